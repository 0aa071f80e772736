//! The cases of the bad-input sweep that were silently wrong or late, each checked for the
//! behaviour that replaced it: refused at load (a config that runs fewer layers than its
//! checkpoint, in a directory and in a GGUF), thresholds that keep nothing, measured density,
//! stats written however the run ends, output paths checked before any work.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{run_bin, smollm2_dir, smollm2_gguf, write_model, TinySpec};
use crate::harness::{check, Case};

/// A directory beside `model`'s whose files are links to its files, but for `config.json`,
/// changed by `edit`.
fn linked_copy(model: &Path, into: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    std::fs::create_dir_all(into).expect("a directory");
    for entry in std::fs::read_dir(model)
        .expect("the model directory")
        .flatten()
    {
        let name = entry.file_name();
        if name != "config.json" && entry.path().is_file() {
            std::os::unix::fs::symlink(entry.path(), into.join(&name)).expect("a link");
        }
    }
    let text = std::fs::read_to_string(model.join("config.json")).expect("config.json");
    let mut config: Value = serde_json::from_str(&text).expect("config.json is JSON");
    edit(&mut config);
    std::fs::write(into.join("config.json"), config.to_string()).expect("config.json written");
    into.to_path_buf()
}

fn must_fail(what: &str, args: &[&str], needles: &[&str]) {
    if let Err(e) = check(&Case::new(what, args, needles)) {
        panic!("{what}: {e}");
    }
}

#[test]
fn smollm2_with_a_one_layer_config_is_refused() {
    let Some(model) = smollm2_dir("bad_inputs: one-layer config") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = linked_copy(&model, &tmp.path().join("one-layer"), |c| {
        c["num_hidden_layers"] = 1.into();
    });
    must_run_fail(
        "one layer of thirty",
        &dir,
        &["30 layers", "num_hidden_layers is 1"],
    );
    let dir = linked_copy(&model, &tmp.path().join("rope"), |c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 0});
    });
    must_run_fail(
        "rope original context 0",
        &dir,
        &["original_max_position_embeddings"],
    );
}

/// `run -m model` on a short prompt must fail as `must_fail` says.
fn must_run_fail(what: &str, model: &Path, needles: &[&str]) {
    let m = model.to_string_lossy();
    let args = [
        "run",
        "-m",
        &m,
        "--prompt",
        "Hi",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
    ];
    must_fail(what, &args, needles);
}

/// The GGUF with its `llama.<key>` u32 metadata set to `value`.
fn patched_gguf(gguf: &Path, into: &Path, key: &str, value: u32) -> PathBuf {
    let mut bytes = std::fs::read(gguf).expect("the GGUF file");
    let needle = key.as_bytes();
    let at = (bytes.windows(needle.len()))
        .position(|w| w == needle)
        .expect("the key is in the metadata")
        + needle.len();
    // The value's type (4 = u32), then the value.
    assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes(), "{key} is a u32");
    bytes[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
    std::fs::write(into, bytes).expect("the copy is written");
    into.to_path_buf()
}

#[test]
fn a_gguf_whose_metadata_disagrees_with_its_tensors_is_refused() {
    let Some(gguf) = smollm2_gguf("bad_inputs: GGUF consistency") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("a temporary directory");
    for (key, value, needles) in [
        (
            "llama.block_count",
            1,
            &["block_count is 1", "30 layers"][..],
        ),
        (
            "llama.feed_forward_length",
            1024,
            &["blk.0.ffn_gate.weight", "1024"][..],
        ),
        (
            "llama.attention.head_count_kv",
            1,
            &["blk.0.attn_k.weight", "[64, 576]"][..],
        ),
        ("llama.embedding_length", 504, &["head dimension 56"][..]),
    ] {
        let path = patched_gguf(&gguf, &tmp.path().join("m.gguf"), key, value);
        must_run_fail(key, &path, needles);
    }
}

/// Runs `args`, closes its stdout as soon as it starts (a reader that went away) and waits.
fn run_with_stdout_closed(args: &[&str]) -> std::process::ExitStatus {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sirius-offload"))
        .args(args)
        .env_remove("SIRIUS_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts");
    drop(child.stdout.take());
    child.wait().expect("the run ends")
}

fn stats(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("the stats file was written");
    serde_json::from_str(&text).expect("the stats are JSON")
}

#[test]
fn stats_are_written_when_stdout_closes_early() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let model = write_model(&tmp.path().join("model"), &TinySpec::default(), 1);
    let stats_path = tmp.path().join("stats.json");
    let (m, s) = (model.to_string_lossy(), stats_path.to_string_lossy());
    let status = run_with_stdout_closed(&[
        "run",
        "-m",
        &m,
        "--prompt",
        "w3 w4",
        "--max-tokens",
        "40",
        "--temperature",
        "0",
        "--stats-json",
        &s,
    ]);
    assert!(
        status.success(),
        "a reader that leaves is no error: {status}"
    );
    let stats = stats(&stats_path);
    assert_eq!(stats["stop_reason"], "cancelled", "{stats}");
    assert_eq!(stats["prompt_tokens"], 2, "{stats}");
}

#[test]
fn ctrl_c_ends_the_run_with_its_stats() {
    let Some(model) = smollm2_dir("bad_inputs: Ctrl-C") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let stats_path = tmp.path().join("stats.json");
    let (m, s) = (model.to_string_lossy(), stats_path.to_string_lossy());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sirius-offload"))
        .args([
            "run",
            "-m",
            &m,
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "4000",
        ])
        .args(["--temperature", "0", "--stats-json", &s, "--threads", "1"])
        .env_remove("SIRIUS_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("the run writes text");
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(interrupted.success());
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child is ours") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not stop after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130), "Ctrl-C's exit code");
    let stats = stats(&stats_path);
    assert_eq!(stats["stop_reason"], "cancelled", "{stats}");
    let generated = stats["generated_tokens"].as_u64().unwrap_or(0);
    assert!((1..4000).contains(&generated), "{stats}");
}

#[test]
fn an_unwritable_stats_path_fails_before_the_model_is_read() {
    // The model does not exist: an error about the stats path proves it came first.
    for option in ["--stats-json", "--trace"] {
        let mut args = vec!["run", "-m", "/no/such/model", "--prompt", "x", option];
        args.push("/sys/kernel/stats.json");
        if option == "--trace" {
            args.extend(["--resident-mem", "1G"]);
        }
        must_fail(option, &args, &[option, "/sys/kernel/stats.json"]);
    }
}

#[test]
fn cats_reports_the_density_it_measured() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let model = write_model(&tmp.path().join("model"), &TinySpec::default(), 1);
    // Threshold 0 keeps every neuron whose activation is not exactly 0, while the file's
    // nominal keep is 0.5: the stats must show what ran.
    let thresholds = serde_json::json!({
        "model": {"architecture": "Llama", "hidden_size": 32, "intermediate_size": 48,
                  "num_layers": 2, "vocab_size": 64},
        "keep": 0.5, "thresholds": [0.0, 0.0], "calibration_kept": [0.5, 0.5],
        "calibration_tokens": 10, "calibration_text": "x"
    });
    let t_path = tmp.path().join("thresholds.json");
    std::fs::write(&t_path, thresholds.to_string()).expect("written");
    let stats_path = tmp.path().join("stats.json");
    let (m, t, s) = (
        model.to_string_lossy(),
        t_path.to_string_lossy(),
        stats_path.to_string_lossy(),
    );
    let out = run_bin(&[
        "run",
        "-m",
        &m,
        "--prompt",
        "w3 w4",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--sparsity",
        "cats",
        "--cats-thresholds",
        &t,
        "--stats-json",
        &s,
        "-q",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = stats(&stats_path);
    let kept: Vec<f64> = (stats["kept_per_layer"]
        .as_array()
        .expect("kept per layer")
        .iter())
    .filter_map(Value::as_f64)
    .collect();
    assert_eq!(kept.len(), 2, "{stats}");
    assert!(
        kept.iter().all(|&k| k > 0.9),
        "measured, not the nominal 0.5: {stats}"
    );
    assert!(stats["density"].as_f64().unwrap_or(0.0) > 0.95, "{stats}");
}
