//! `bench --sirius`: the sweep's table, CSV, JSON and SVG on a tiny random model, and its
//! option errors.

mod common;

use common::{assert_clean_failure, run_bin as run, stderr_of as stderr, write_model, TinySpec};

#[test]
fn a_period_sweep_writes_one_row_per_mode_and_window_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 3);
    let model = model.to_str().unwrap();
    let prompt = tmp.path().join("prompt.txt");
    std::fs::write(&prompt, "w3 w4 w5 w6 w7 w8 w9 w10 w11 w12").unwrap();
    let (csv, svg, json) = (
        tmp.path().join("s.csv"),
        tmp.path().join("s.svg"),
        tmp.path().join("s.json"),
    );
    let o = run(&[
        "bench",
        "--model",
        model,
        "--sirius",
        "--period",
        "2,4,auto:6",
        "--gen",
        "8",
        "--reps",
        "2",
        "--prompt-file",
        prompt.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(
        rows.len(),
        6,
        "header, full, sparse, K=2, K=4, auto: {table}"
    );
    assert!(
        rows[1].starts_with("| full |") && rows[1].contains("| 1.00x |"),
        "{table}"
    );
    assert!(rows[4].starts_with("| sirius K=4 |"), "{table}");
    assert!(rows[5].starts_with("| sirius K=auto:6 |"), "{table}");

    let csv = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 6, "{csv}");
    let columns = lines[0].split(',').count();
    let mode_col = lines[0].split(',').position(|c| c == "mode").unwrap();
    let modes: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.rsplitn(columns - mode_col, ',').last().unwrap())
        .map(|head| head.rsplit(',').next().unwrap())
        .collect();
    assert_eq!(
        modes,
        ["full", "sparse", "sirius", "sirius", "sirius"],
        "{csv}"
    );
    let period_col = lines[0].split(',').position(|c| c == "period").unwrap();
    assert_eq!(period_col, mode_col + 1, "{csv}");
    assert!(lines[0].contains(",aal,mean_period,"), "{csv}");
    assert!(lines[5].contains(",sirius,auto:6,"), "{csv}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    for r in rows {
        assert_eq!(r["tokens"], 8, "{r}");
        assert_eq!(r["reps"], 2, "{r}");
        assert!(r["median_tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(rows[2]["period"], 2);
    let aal = rows[3]["aal"].as_f64().unwrap();
    assert!((1.0..=4.0).contains(&aal), "AAL within the window: {aal}");
    // Adaptive windows: K varies in 1..=6, the mean K reported beside the AAL.
    assert_eq!(rows[4]["adaptive"], true);
    assert_eq!(rows[3]["adaptive"], false);
    let mean = rows[4]["mean_period"].as_f64().unwrap();
    assert!((1.0..=6.0).contains(&mean), "mean K {mean}");
    let aal = rows[4]["aal"].as_f64().unwrap();
    assert!(
        (1.0..=mean).contains(&aal),
        "AAL {aal} within the mean window {mean}"
    );
    assert!(report["commit"].as_str().is_some_and(|c| !c.is_empty()));

    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for label in [
        "window K",
        "tokens/s",
        "AAL / K",
        "ms / token",
        "K=4",
        "sirius auto",
        "at its mean K",
    ] {
        assert!(svg.contains(label), "the plot names {label}");
    }
}

#[test]
fn sweep_options_need_sirius_and_valid_windows() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 3);
    let model = model.to_str().unwrap();
    assert_clean_failure(
        &run(&["bench", "--model", model, "--period", "4"]),
        "--sirius",
    );
    assert_clean_failure(
        &run(&["bench", "--model", model, "--csv", "x.csv"]),
        "--sirius",
    );
    let o = run(&[
        "bench", "--model", model, "--sirius", "--period", "0", "--gen", "4",
    ]);
    assert_clean_failure(&o, "period");
    let o = run(&[
        "bench", "--model", model, "--sirius", "--period", "auto:x", "--gen", "4",
    ]);
    assert_clean_failure(&o, "auto:MAX");
    let o = run(&[
        "bench", "--model", model, "--sirius", "--period", "auto", "--width", "2", "--gen", "4",
    ]);
    assert_clean_failure(&o, "--period auto");
}
