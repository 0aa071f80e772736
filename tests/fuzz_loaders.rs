//! Fuzz/property loops over every loader of untrusted input: config.json, safetensors
//! checkpoints and shard indexes, tokenizer and chat-template files, CATS thresholds, GGUF
//! files and the server's request bodies. Each loop mutates valid inputs field by field and
//! byte by byte and asserts: no panic, no hang, no absurd allocation, every accepted input
//! consistent, every refusal one line that names the file. `tests/fuzz/mod.rs` says how to
//! run them longer or reproduce a failure; README.md ("Testing") gives the commands.

mod common;
mod fuzz;

use fuzz::targets::{cats, config, gguf_file, safetensors, serve, text};

#[test]
fn config_json() {
    fuzz::run(config::Config::new());
}

#[test]
fn safetensors() {
    fuzz::run(safetensors::Safetensors::new());
}

#[test]
fn tokenizer_and_chat() {
    fuzz::run(text::Text::new());
}

#[test]
fn cats_thresholds() {
    fuzz::run(cats::Cats::new());
}

#[test]
fn gguf() {
    fuzz::run(gguf_file::GgufTarget::new());
}

#[test]
fn serve_requests() {
    fuzz::run(serve::Serve::new());
}
