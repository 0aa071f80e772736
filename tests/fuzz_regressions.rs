//! What the fuzz loops (`tests/fuzz_loaders.rs`) found, each kept as the smallest input that
//! showed it: a clear one-line error now, where there was a panic or a silently wrong value.

mod common;

use std::path::Path;

use sirius_offload::config::ModelConfig;
use sirius_offload::model::Tokenizer;

fn one_line_error<T>(result: sirius_offload::Result<T>, needles: &[&str]) {
    let Err(e) = result else {
        panic!("expected an error")
    };
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "one line: {msg:?}");
    for needle in needles {
        assert!(msg.contains(needle), "{needle:?} in {msg}");
    }
}

/// tokenizer_and_chat loop: the tokenizers crate panicked (`expect("Helper")`) on a JSON
/// syntax error inside `decoder`, as in a file cut short there, and on a number out of range.
#[test]
fn a_tokenizer_with_a_broken_decoder_is_an_error_not_a_panic() {
    let tokenizer = common::tokenizer_json(8).to_string();
    let at = tokenizer.find("\"decoder\"").expect("the decoder") + 20;
    let path = Path::new("tokenizer.json");
    one_line_error(
        Tokenizer::from_json(&tokenizer[..at], path),
        &["tokenizer.json"],
    );
    let nan = tokenizer.replacen("\"decoder\":{", "\"decoder\":{\"x\":NaN,", 1);
    one_line_error(
        Tokenizer::from_json(&nan, path),
        &["tokenizer.json", "line 1"],
    );
    let huge = tokenizer.replacen("\"decoder\":{", "\"decoder\":{\"x\":1e400,", 1);
    one_line_error(
        Tokenizer::from_json(&huge, path),
        &["tokenizer.json", "out of range"],
    );
}

/// tokenizer_and_chat loop: a BPE `continuing_subword_prefix` longer than a merge's second
/// token made the tokenizers crate slice past the token's end (a panic).
#[test]
fn a_bpe_prefix_that_merges_do_not_carry_is_an_error_not_a_panic() {
    let tokenizer = serde_json::json!({
        "version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
        "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]],
                  "continuing_subword_prefix": "##########"}
    });
    let result = Tokenizer::from_json(&tokenizer.to_string(), Path::new("tokenizer.json"));
    one_line_error(result, &["tokenizer.json", "continuing_subword_prefix"]);
}

fn config_with(extra: &str) -> sirius_offload::Result<ModelConfig> {
    let text = format!(
        r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":96,
        "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":128{extra}}}"#
    );
    ModelConfig::from_json(&text, Path::new("config.json"))
}

/// config_json loop: numbers valid as f64 but 0 or infinite as the f32 the forward pass
/// uses were accepted (rms_norm_eps 1e-300 is 0: a division by zero on a zero row; a linear
/// rope factor of 1e-300 is 0), and llama3 rope scaling took a context of 0 positions.
#[test]
fn config_numbers_that_f32_cannot_hold_are_refused() {
    assert!(config_with("").is_ok());
    for (extra, field) in [
        (r#","rms_norm_eps":1e-300"#, "rms_norm_eps"),
        (r#","rope_theta":1e300"#, "rope_theta"),
        (
            r#","rope_scaling":{"type":"linear","factor":1e-300}"#,
            "factor",
        ),
        (
            r#","rope_scaling":{"type":"linear","factor":1e39}"#,
            "factor",
        ),
        (
            r#","rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":0}"#,
            "original_max_position_embeddings",
        ),
        (
            r#","rope_scaling":{"rope_type":"llama3","factor":1e39,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":8192}"#,
            "factor",
        ),
        (
            r#","rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":-1,"high_freq_factor":4,"original_max_position_embeddings":8192}"#,
            "low_freq_factor",
        ),
    ] {
        one_line_error(config_with(extra), &["config.json", field]);
    }
}

/// gguf loop: a metadata key whose length field was corrupted swallowed kilobytes of the
/// file, newlines and NULs included, and the error quoted it whole over many lines.
#[test]
fn a_gguf_error_quoting_a_corrupt_key_stays_one_short_line() {
    let mut file = b"GGUF".to_vec();
    file.extend(3u32.to_le_bytes());
    file.extend(0u64.to_le_bytes());
    file.extend(1u64.to_le_bytes());
    let key = format!("general.{}\n\0{}", "x".repeat(3000), "y".repeat(3000));
    file.extend((key.len() as u64).to_le_bytes());
    file.extend(key.as_bytes());
    file.extend(99u32.to_le_bytes());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, &file).expect("writing the file");
    let err = sirius_offload::model::ModelFiles::open(&path)
        .err()
        .expect("an error")
        .to_string();
    assert!(!err.contains('\n') && err.len() < 600, "{err}");
    assert!(
        err.contains("broken.gguf") && err.contains("unknown value type 99"),
        "{err}"
    );
}

/// gguf loop: a vocabulary whose merge names a token holding a newline; the tokenizers
/// crate's error quoted the token raw, over two lines.
#[test]
fn a_tokenizer_error_quoting_a_newline_token_stays_one_line() {
    let tokenizer = serde_json::json!({
        "version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
        "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "\n"]]}
    });
    let result = Tokenizer::from_json(&tokenizer.to_string(), Path::new("tokenizer.json"));
    one_line_error(result, &["tokenizer.json", "\\n"]);
}
