//! The sparsity subcommands on tiny random models: `calibrate` thresholds and their use by
//! `run`, `eval --perplexity`, and clear one-line errors for bad options.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_one_line_failure as assert_clean_failure, run_bin as run, stderr_of as stderr,
    write_model, TinySpec,
};

fn tiny(root: &Path, spec: &TinySpec) -> String {
    write_model(root, spec, 7).display().to_string()
}

/// `n` words of the tiny tokenizer's vocabulary (w3..w63), in a fixed pseudo-random order.
fn words(n: usize, seed: usize) -> String {
    (0..n)
        .map(|i| format!("w{}", 3 + (i * 7 + seed + i * i * 3) % 61))
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_text(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn calibrated_thresholds_reach_the_target_and_drive_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(&tmp.path().join("m"), &TinySpec::default());
    let text = write_text(tmp.path(), "calib.txt", &words(200, 1));
    let out = tmp.path().join("thr.json");
    let o = run(&[
        "calibrate",
        "--model",
        &model,
        "--text",
        text.to_str().unwrap(),
        "--keep",
        "0.5",
        "--out",
        out.to_str().unwrap(),
        "--seq-len",
        "32",
        "--threads",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("| 1 |") && table.contains("mean kept"),
        "{table}"
    );
    let t = json(&out);
    let kept = t["calibration_kept"].as_array().unwrap();
    assert_eq!(kept.len(), 2);
    for k in kept {
        // Bins are 1.1% wide and ties are rare: the kept fraction lands just above the target.
        let k = k.as_f64().unwrap();
        assert!((0.5..0.56).contains(&k), "kept {k}");
    }
    assert_eq!(t["calibration_tokens"], 200);

    let stats = tmp.path().join("stats.json");
    let o = run(&[
        "run",
        "--model",
        &model,
        "--prompt",
        &words(6, 2),
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--sparsity",
        "cats",
        "--cats-thresholds",
        out.to_str().unwrap(),
        "--stats-json",
        stats.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = json(&stats);
    assert_eq!(s["sparsity"], "cats");
    assert_eq!(s["keep"].as_f64().unwrap(), 0.5);
    let density = s["density"].as_f64().unwrap();
    assert!(density > 0.0 && density < 1.0, "density {density}");
    let per_layer = s["kept_per_layer"].as_array().unwrap();
    assert_eq!(per_layer.len(), 2);
    if s["sparse_tokens"].as_u64().unwrap() > 0 {
        for k in per_layer {
            let k = k.as_f64().unwrap();
            assert!(k > 0.0 && k <= 1.0, "kept {k}");
        }
    }
}

#[test]
fn thresholds_of_another_model_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(&tmp.path().join("a"), &TinySpec::default());
    let other = tiny(
        &tmp.path().join("b"),
        &TinySpec {
            ffn: 64,
            ..TinySpec::default()
        },
    );
    let text = write_text(tmp.path(), "calib.txt", &words(64, 3));
    let out = tmp.path().join("thr.json");
    let o = run(&[
        "calibrate",
        "--model",
        &other,
        "--text",
        text.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        "run",
        "--model",
        &model,
        "--prompt",
        "w3 w4",
        "--sparsity",
        "cats",
        "--cats-thresholds",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "calibrated for another model");
    assert!(
        stderr(&o).contains("intermediate_size 64 in the file vs 48 in the model"),
        "{}",
        stderr(&o)
    );
    let text = write_text(tmp.path(), "ppl.txt", &words(100, 4));
    let o = run(&[
        "eval",
        "--model",
        &model,
        "--perplexity",
        text.to_str().unwrap(),
        "--window",
        "16",
        "--prefix",
        "8",
        "--sparsity",
        "cats",
        "--cats-thresholds",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "calibrated for another model");
}

#[test]
fn bad_keep_values_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(&tmp.path().join("m"), &TinySpec::default());
    let text = write_text(tmp.path(), "t.txt", &words(100, 5));
    let t = text.to_str().unwrap();
    let out = tmp.path().join("thr.json");
    for keep in ["0", "-0.5", "1.5", "NaN"] {
        let o = run(&[
            "run",
            "--model",
            &model,
            "--prompt",
            "w3",
            "--sparsity",
            "griffin",
            "--keep",
            keep,
        ]);
        assert_clean_failure(&o, "--keep");
        let o = run(&[
            "eval",
            "--model",
            &model,
            "--perplexity",
            t,
            "--window",
            "16",
            "--prefix",
            "8",
            "--sparsity",
            "cats",
            "--keep",
            keep,
        ]);
        assert_clean_failure(&o, "--keep");
        let o = run(&[
            "calibrate",
            "--model",
            &model,
            "--text",
            t,
            "--keep",
            keep,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_clean_failure(&o, "--keep");
        let compare = format!("none,griffin:{keep}");
        let o = run(&[
            "eval",
            "--model",
            &model,
            "--perplexity",
            t,
            "--window",
            "16",
            "--prefix",
            "8",
            "--compare",
            &compare,
        ]);
        assert_clean_failure(&o, "--keep");
    }
    assert!(!out.exists());
}

/// Runs `eval --perplexity` and returns its JSON report.
fn eval(model: &str, text: &Path, extra: &[&str]) -> serde_json::Value {
    let dir = text.parent().unwrap();
    let report = dir.join("report.json");
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--perplexity",
        text.to_str().unwrap(),
        "--window",
        "24",
        "--prefix",
        "12",
        "--threads",
        "2",
        "-q",
        "--json",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    json(&report)
}

#[test]
fn perplexity_is_finite_and_griffin_at_keep_one_is_dense() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(&tmp.path().join("m"), &TinySpec::default());
    // 100 words = 100 tokens: 4 windows of 24, 12 scored each.
    let text = write_text(tmp.path(), "t.txt", &words(100, 6));
    let dense = eval(&model, &text, &[]);
    let r = &dense["results"][0];
    assert_eq!(dense["windows"], 4);
    assert_eq!(r["tokens_scored"], 48);
    assert_eq!(r["sparsity"], "none");
    assert_eq!(r["density"].as_f64().unwrap(), 1.0);
    let ppl = r["perplexity"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "perplexity {ppl}");
    let nll = r["mean_nll"].as_f64().unwrap();
    assert!((nll.exp() - ppl).abs() < 1e-9 * ppl);

    let griffin = eval(&model, &text, &["--sparsity", "griffin", "--keep", "1.0"]);
    let g = griffin["results"][0]["perplexity"].as_f64().unwrap();
    assert!(
        ((g - ppl) / ppl).abs() < 1e-4,
        "griffin keep 1.0: {g}, dense {ppl}"
    );
    assert_eq!(
        griffin["results"][0]["kept_per_layer"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // --compare runs every mode over the same windows: its dense row is the dense run.
    let all = eval(
        &model,
        &text,
        &[
            "--compare",
            "none,griffin:0.5,cats:0.25",
            "--max-windows",
            "3",
        ],
    );
    let rows = all["results"].as_array().unwrap();
    let modes: Vec<&str> = rows
        .iter()
        .map(|r| r["sparsity"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["none", "griffin", "cats"]);
    assert_eq!(rows[2]["keep"].as_f64().unwrap(), 0.25);
    for r in rows {
        assert_eq!(r["tokens_scored"], 36);
        assert!(r["perplexity"].as_f64().unwrap().is_finite());
    }
    let cats_kept = rows[2]["kept_per_layer"].as_array().unwrap();
    // 0.25 of 48 neurons = 12 per token, exactly.
    assert!(
        cats_kept
            .iter()
            .all(|k| (k.as_f64().unwrap() - 0.25).abs() < 1e-9),
        "{cats_kept:?}"
    );
    assert!(rows[1]["density"].as_f64().unwrap() < rows[2]["density"].as_f64().unwrap() + 0.5);
}

#[test]
fn eval_rejects_short_texts_and_bad_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(&tmp.path().join("m"), &TinySpec::default());
    let short = write_text(tmp.path(), "short.txt", &words(20, 7));
    let s = short.to_str().unwrap();
    assert_clean_failure(
        &run(&[
            "eval",
            "--model",
            &model,
            "--perplexity",
            s,
            "--window",
            "24",
            "--prefix",
            "12",
        ]),
        "fewer than one window",
    );
    assert_clean_failure(
        &run(&[
            "eval",
            "--model",
            &model,
            "--perplexity",
            s,
            "--window",
            "8",
            "--prefix",
            "0",
        ]),
        "--prefix",
    );
    assert_clean_failure(
        &run(&[
            "eval",
            "--model",
            &model,
            "--perplexity",
            s,
            "--window",
            "8",
            "--prefix",
            "8",
        ]),
        "--prefix",
    );
    assert_clean_failure(
        &run(&[
            "eval",
            "--model",
            &model,
            "--perplexity",
            s,
            "--window",
            "100",
            "--prefix",
            "8",
        ]),
        "context",
    );
    let empty = write_text(tmp.path(), "empty.txt", " \n");
    assert_clean_failure(
        &run(&[
            "eval",
            "--model",
            &model,
            "--perplexity",
            empty.to_str().unwrap(),
        ]),
        "empty",
    );
    assert_clean_failure(
        &run(&["eval", "--model", &model, "--perplexity", "/no/such/text"]),
        "/no/such/text",
    );
    assert_clean_failure(
        &run(&[
            "calibrate",
            "--model",
            &model,
            "--text",
            "/no/such/text",
            "--out",
            tmp.path().join("t.json").to_str().unwrap(),
        ]),
        "/no/such/text",
    );
    let missing_dir = tmp.path().join("nope").join("t.json");
    assert_clean_failure(
        &run(&[
            "calibrate",
            "--model",
            &model,
            "--text",
            s,
            "--out",
            missing_dir.to_str().unwrap(),
        ]),
        "does not exist",
    );
    assert_clean_failure(
        &run(&[
            "eval",
            "--model",
            &model,
            "--perplexity",
            s,
            "--compare",
            "none,dense:0.5",
        ]),
        ":KEEP",
    );
}
