//! One loop per untrusted input the program reads.

pub mod cats;
pub mod config;
pub mod gguf_file;
pub mod safetensors;
pub mod serve;
pub mod text;
