//! The `sirius-offload` binary on tiny random models: the CLI contract, stats JSON and clear,
//! panic-free errors with a non-zero exit.

mod common;

use std::path::Path;

use common::{assert_clean_failure, run_bin as run, stderr_of as stderr, write_model, TinySpec};

fn tiny(tmp: &Path) -> String {
    write_model(&tmp.join("tiny"), &TinySpec::default(), 7)
        .display()
        .to_string()
}

#[test]
fn run_writes_stats_json_with_the_contract_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let stats = tmp.path().join("stats.json");
    let o = run(&[
        "run",
        "--model",
        &model,
        "--prompt",
        "w3 w4 w5",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--threads",
        "2",
        "--stats-json",
        stats.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    assert_eq!(json["prompt_tokens"], 3);
    let ids = json["generated_token_ids"].as_array().unwrap();
    assert_eq!(
        json["generated_tokens"].as_u64().unwrap() as usize,
        ids.len()
    );
    assert!(!ids.is_empty() && ids.len() <= 6);
    assert!(json["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["decode_tokens_per_s"].as_f64().is_some());
    assert_eq!(json["threads"], 2);
}

#[test]
fn no_subcommand_behaves_like_run_and_greedy_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let args = [
        "--model",
        model.as_str(),
        "--prompt",
        "w7 w8",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "-q",
    ];
    let a = run(&args);
    let mut with_run = vec!["run"];
    with_run.extend_from_slice(&args);
    let b = run(&with_run);
    assert!(a.status.success() && b.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn same_seed_gives_same_sampled_text() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let args = |seed: &'static str| {
        run(&[
            "run",
            "--model",
            &model,
            "--prompt",
            "w9",
            "--max-tokens",
            "12",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "-q",
        ])
    };
    let (a, b) = (args("11"), args("11"));
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn chat_uses_the_model_template() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let stats = tmp.path().join("s.json");
    let o = run(&[
        "run",
        "--model",
        &model,
        "--prompt",
        "w10 w11",
        "--chat",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
        "--stats-json",
        stats.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    // Template: "w3 {content} w4 w5" = 5 tokens.
    assert_eq!(json["prompt_tokens"], 5);
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let long: Vec<String> = (0..70).map(|i| format!("w{}", 3 + i % 50)).collect();
    let o = run(&["run", "--model", &model, "--prompt", &long.join(" ")]);
    assert_clean_failure(&o, "70 tokens");
    let o = run(&[
        "run",
        "--model",
        &model,
        "--prompt",
        "w3 w4 w5 w6",
        "--ctx-size",
        "3",
    ]);
    assert_clean_failure(&o, "--ctx-size");
}

#[test]
fn context_limit_counts_prompt_and_generated_tokens_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let stats = tmp.path().join("s.json");
    let generated = |ctx: &str| -> (u64, String) {
        let o = run(&[
            "run",
            "--model",
            &model,
            "--prompt",
            "w3 w4 w5",
            "--ctx-size",
            ctx,
            "--max-tokens",
            "50",
            "--temperature",
            "0",
            "--stats-json",
            stats.to_str().unwrap(),
            "-q",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        (
            json["generated_tokens"].as_u64().unwrap(),
            json["stop_reason"].as_str().unwrap().to_string(),
        )
    };
    // A prompt that fills the context still yields the one token its logits predict; each
    // extra position of context yields one more. (The tiny model may also stop on EOS.)
    for (ctx, most) in [("3", 1), ("4", 2), ("6", 4)] {
        let (n, reason) = generated(ctx);
        assert!(n <= most, "ctx {ctx}: {n} tokens");
        assert!(
            n == most || reason == "eos",
            "ctx {ctx}: {n} tokens, stop {reason}"
        );
    }
}

#[test]
fn unknown_model_lists_presets() {
    let o = run(&["run", "--model", "/no/such/dir", "--prompt", "hi"]);
    assert_clean_failure(&o, "smollm2-135m");
}

#[test]
fn bad_sampling_options_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    assert_clean_failure(
        &run(&["run", "--model", &model, "--prompt", "w3", "--top-p", "0"]),
        "--top-p",
    );
    assert_clean_failure(
        &run(&[
            "run",
            "--model",
            &model,
            "--prompt",
            "w3",
            "--temperature=-1",
        ]),
        "--temperature",
    );
}

#[test]
fn missing_tokenizer_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    std::fs::remove_file(Path::new(&model).join("tokenizer.json")).unwrap();
    assert_clean_failure(
        &run(&["run", "--model", &model, "--prompt", "w3"]),
        "tokenizer.json",
    );
}

#[test]
fn corrupt_weights_fail_without_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    std::fs::write(Path::new(&model).join("model.safetensors"), b"garbage").unwrap();
    assert_clean_failure(
        &run(&["run", "--model", &model, "--prompt", "w3"]),
        "model.safetensors",
    );
}

#[test]
fn chat_without_template_is_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    std::fs::write(Path::new(&model).join("tokenizer_config.json"), "{}").unwrap();
    assert_clean_failure(
        &run(&["run", "--model", &model, "--prompt", "w3", "--chat"]),
        "without --chat",
    );
}

#[test]
fn error_causes_are_printed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    std::fs::remove_file(Path::new(&model).join("tokenizer_config.json")).unwrap();
    let o = run(&["run", "--model", &model, "--prompt", "w3", "--chat"]);
    assert_clean_failure(&o, "tokenizer_config.json");
    let err = stderr(&o);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn prompts_may_start_with_a_dash_or_come_from_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let stats = tmp.path().join("s.json");
    let o = run(&[
        "run",
        "--model",
        &model,
        "-p",
        "- w3 w4",
        "--max-tokens",
        "1",
        "-q",
        "--stats-json",
        stats.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let prompt = tmp.path().join("prompt.txt");
    std::fs::write(&prompt, "w3 w4 w5 w6").unwrap();
    let o = run(&[
        "run",
        "--model",
        &model,
        "--prompt-file",
        prompt.to_str().unwrap(),
        "--max-tokens",
        "1",
        "-q",
        "--stats-json",
        stats.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    assert_eq!(json["prompt_tokens"], 4);
    assert_clean_failure(
        &run(&["run", "--model", &model, "--prompt-file", "/no/such/prompt"]),
        "/no/such/prompt",
    );
}

#[test]
fn model_path_mistakes_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let config = format!("{model}/config.json");
    assert_clean_failure(
        &run(&["run", "--model", &config, "--prompt", "w3"]),
        "it is a file",
    );
    assert_clean_failure(
        &run(&[
            "run",
            "--model",
            tmp.path().to_str().unwrap(),
            "--prompt",
            "w3",
        ]),
        "no config.json",
    );
    assert_clean_failure(
        &run(&[
            "run",
            "--model",
            &model,
            "--prompt",
            "w3",
            "--ctx-size",
            "100000",
        ]),
        "max_position_embeddings",
    );
    assert_clean_failure(
        &run(&["run", "--model", &model, "--prompt", "w3", "--stop", ""]),
        "--stop",
    );
    let missing_dir = tmp.path().join("nope").join("s.json");
    assert_clean_failure(
        &run(&[
            "run",
            "--model",
            &model,
            "--prompt",
            "w3",
            "--stats-json",
            missing_dir.to_str().unwrap(),
        ]),
        "does not exist",
    );
}

#[test]
fn bench_reports_and_rejects_nothing_to_measure() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let json = tmp.path().join("b.json");
    let o = run(&[
        "bench",
        "--model",
        &model,
        "-p",
        "8",
        "-n",
        "4",
        "-r",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let tests: Vec<&str> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["test"].as_str().unwrap())
        .collect();
    assert_eq!(tests, ["pp8", "tg4"]);
    assert_clean_failure(
        &run(&["bench", "--model", &model, "-p", "0", "-n", "0"]),
        "nothing to measure",
    );
    assert_clean_failure(&run(&["bench", "--model", &model, "-p", "1000"]), "context");
}
