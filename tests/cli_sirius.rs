//! `run --sirius` on a tiny random model: with keep 1.0 it prints exactly what plain greedy
//! decoding prints, its stats carry the correction metrics, and bad options are clear errors.

mod common;

use common::{run_bin as run, stderr_of as stderr, write_model, TinySpec};

#[test]
fn sirius_with_keep_one_prints_plain_greedy_text_and_reports_aal() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 7)
        .display()
        .to_string();
    let base = [
        "run",
        "--model",
        &model,
        "--prompt",
        "w3 w4 w5",
        "--max-tokens",
        "20",
        "--temperature",
        "0",
        "-q",
    ];
    let plain = run(&base);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let stats = tmp.path().join("s.json");
    let mut args = base.to_vec();
    args.extend([
        "--sirius",
        "--period",
        "5",
        "--sparsity",
        "griffin",
        "--keep",
        "1",
        "--stats-json",
        stats.to_str().unwrap(),
    ]);
    let sirius = run(&args);
    assert!(sirius.status.success(), "{}", stderr(&sirius));
    assert_eq!(
        sirius.stdout, plain.stdout,
        "keep 1.0 Sirius must equal full greedy"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    for key in [
        "aal",
        "period",
        "verifications",
        "effective_density",
        "rollback_tokens",
        "draft_seconds",
        "verify_seconds",
        "other_seconds",
    ] {
        assert!(s.get(key).is_some(), "stats lack {key}: {s}");
    }
    assert_eq!(s["period"], 5);
    assert!(s["verifications"].as_u64().unwrap() >= 1);
    // keep 1.0: every draft is accepted, so each full window advances by K.
    assert_eq!(s["rollback_tokens"], 0, "{s}");
    assert_eq!(s["adaptive"], false, "{s}");

    // Adaptive windows: whatever K each window takes, keep 1.0 is still full greedy.
    let period = args.iter().position(|a| *a == "5").unwrap();
    args[period] = "auto:6";
    let auto = run(&args);
    assert!(auto.status.success(), "{}", stderr(&auto));
    assert_eq!(auto.stdout, plain.stdout, "keep 1.0, --period auto");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(
        (s["adaptive"].clone(), s["period"].clone()),
        (true.into(), 6.into())
    );
    let mean = s["mean_period"].as_f64().unwrap();
    assert!((1.0..=6.0).contains(&mean), "{s}");
}

#[test]
fn a_tree_that_accepts_nothing_prints_plain_greedy_text() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 7)
        .display()
        .to_string();
    let base = [
        "run",
        "--model",
        &model,
        "--prompt",
        "w3 w4 w5",
        "--max-tokens",
        "20",
        "--temperature",
        "0",
        "-q",
    ];
    let plain = run(&base);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let stats = tmp.path().join("s.json");
    let mut args = base.to_vec();
    args.extend([
        "--sirius",
        "--width",
        "3",
        "--period",
        "4",
        "--threshold",
        "1.5",
        "--sparsity",
        "cats",
        "--keep",
        "0.5",
        "--stats-json",
        stats.to_str().unwrap(),
    ]);
    let tree = run(&args);
    assert!(tree.status.success(), "{}", stderr(&tree));
    assert_eq!(tree.stdout, plain.stdout, "nothing accepted: full greedy");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(s["width"], 3, "{s}");
    assert_eq!(s["aal"], 1.0, "{s}");
    // One token per verification; each drafted (K - 1) * W = 9 nodes and kept none, except
    // the last two, whose token budget needs fewer levels.
    let v = s["verifications"].as_u64().unwrap();
    assert_eq!(v, 19, "{s}");
    let drafted: u64 = (1..=v).map(|i| (20 - i).min(3) * 3).sum();
    assert_eq!(s["rollback_tokens"].as_u64().unwrap(), drafted, "{s}");
}

/// A stop string completed mid-window ends the output there, and the tokens Sirius had
/// accepted after it are not counted (keep 1.0: same text and count as plain decoding).
#[test]
fn a_stop_string_mid_window_counts_like_plain_decoding() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 7)
        .display()
        .to_string();
    let plain_stats = tmp.path().join("p.json");
    let base = [
        "run",
        "--model",
        &model,
        "--prompt",
        "w3 w4 w5",
        "--max-tokens",
        "40",
        "--temperature",
        "0",
        "-q",
    ];
    // The stop string: a piece of the plain output's middle.
    let mut args = base.to_vec();
    args.extend(["--stats-json", plain_stats.to_str().unwrap()]);
    let plain = run(&args);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let text = String::from_utf8(plain.stdout.clone()).unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 8, "tiny model output too short: {text:?}");
    let stop = format!("{} {}", words[5], words[6]);
    let count = |path: &std::path::Path| -> (u64, String) {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        (
            s["generated_tokens"].as_u64().unwrap(),
            s["stop_reason"].as_str().unwrap_or("").to_string(),
        )
    };
    let mut args = base.to_vec();
    args.extend([
        "--stop",
        &stop,
        "--stats-json",
        plain_stats.to_str().unwrap(),
    ]);
    let plain = run(&args);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let sirius_stats = tmp.path().join("s.json");
    let mut args = base.to_vec();
    args.extend([
        "--stop",
        &stop,
        "--sirius",
        "--period",
        "16",
        "--sparsity",
        "griffin",
        "--keep",
        "1",
        "--stats-json",
        sirius_stats.to_str().unwrap(),
    ]);
    let sirius = run(&args);
    assert!(sirius.status.success(), "{}", stderr(&sirius));
    assert_eq!(sirius.stdout, plain.stdout);
    let (p, reason) = count(&plain_stats);
    assert_eq!(reason, "stop_string", "{stop:?}");
    assert!(p < 40);
    assert_eq!(count(&sirius_stats), (p, reason));
}

#[test]
fn bad_sirius_options_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 7)
        .display()
        .to_string();
    for (extra, needle) in [
        (
            vec!["--sirius", "--period", "0", "--temperature", "0"],
            "--period",
        ),
        (
            vec!["--sirius", "--width", "0", "--temperature", "0"],
            "--width",
        ),
        (
            vec!["--sirius", "--width", "17", "--temperature", "0"],
            "--width",
        ),
        (
            vec![
                "--sirius",
                "--period",
                "100000000",
                "--width",
                "16",
                "--temperature",
                "0",
            ],
            "--period",
        ),
        (
            vec!["--sirius", "--threshold", "nan", "--temperature", "0"],
            "--threshold",
        ),
        (
            vec![
                "--sirius",
                "--accept-temperature",
                "0",
                "--temperature",
                "0",
            ],
            "--accept-temperature",
        ),
        (vec!["--sirius", "--temperature", "0.7"], "--temperature 0"),
    ] {
        let mut args = vec![
            "run",
            "--model",
            &model,
            "--prompt",
            "w3",
            "--max-tokens",
            "4",
        ];
        args.extend(extra.iter());
        let o = run(&args);
        let err = stderr(&o);
        assert!(
            !o.status.success() && !err.contains("panicked") && err.contains(needle),
            "{extra:?}: {err}"
        );
    }
}
