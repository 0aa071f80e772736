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

/// A prompt the tiny model's 64 positions hold, as a file.
fn short_prompt(dir: &std::path::Path) -> String {
    let path = dir.join("prompt.txt");
    std::fs::write(&path, "w3 w4 w5 w6 w7 w8 w9 w10").unwrap();
    path.to_str().unwrap().to_string()
}

/// The rows of `table` (markdown), header included.
fn table_rows(table: &str) -> Vec<&str> {
    table.lines().filter(|l| l.starts_with("| ")).collect()
}

/// The fields of a CSV line (quoted fields may hold commas; no quotes inside them here).
fn csv_fields(line: &str) -> Vec<&str> {
    let mut fields = Vec::new();
    let mut rest = line;
    loop {
        let (field, after) = match rest.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').unwrap();
                (&quoted[..end], quoted[end + 1..].strip_prefix(','))
            }
            None => match rest.split_once(',') {
                Some((field, after)) => (field, Some(after)),
                None => (rest, None),
            },
        };
        fields.push(field);
        match after {
            Some(after) => rest = after,
            None => return fields,
        }
    }
}

/// The values of `column` in `csv`, one per data line.
fn csv_column<'a>(csv: &'a str, column: &str) -> Vec<&'a str> {
    let mut lines = csv.lines();
    let header = csv_fields(lines.next().unwrap());
    let at = header.iter().position(|c| *c == column).unwrap();
    lines
        .map(|l| {
            let fields = csv_fields(l);
            assert_eq!(fields.len(), header.len(), "{l}");
            fields[at]
        })
        .collect()
}

#[test]
fn a_keep_sweep_runs_every_mode_at_each_keep_and_plots_against_keep() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 3);
    let (csv, svg) = (tmp.path().join("k.csv"), tmp.path().join("k.svg"));
    let o = run(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--sirius",
        "--keep",
        "0.25,0.75",
        "--period",
        "2,3",
        "--gen",
        "6",
        "--reps",
        "1",
        "--threads",
        "1",
        "--prompt-file",
        &short_prompt(tmp.path()),
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    let rows = table_rows(&table);
    assert_eq!(
        rows.len(),
        1 + 2 * 4,
        "full, sparse, K=2, K=3 per keep: {table}"
    );
    assert!(rows[0].starts_with("| keep | mode |"), "{table}");
    assert!(rows[1].starts_with("| 0.25 | full |"), "{table}");
    assert!(rows[5].starts_with("| 0.75 | full |"), "{table}");
    // Each keep's rows are compared with that keep's full model.
    assert!(rows[5].contains("| 1.00x |"), "{table}");
    let csv = std::fs::read_to_string(&csv).unwrap();
    let keeps = csv_column(&csv, "keep");
    assert_eq!(
        keeps,
        ["0.25"; 4]
            .iter()
            .chain(&["0.75"; 4])
            .copied()
            .collect::<Vec<_>>()
    );
    // The sparse model reads fewer weights at the smaller keep.
    let density = csv_column(&csv, "effective_density");
    let (low, high): (f64, f64) = (density[1].parse().unwrap(), density[5].parse().unwrap());
    assert!(low < high && high < 1.0, "sparse densities {low} {high}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    for label in ["keep (fraction of FFN neurons)", "sirius K=3", "0.75 K=2"] {
        assert!(svg.contains(label), "the plot names {label}");
    }
}

#[test]
fn an_offloaded_sweep_compares_sirius_with_the_dense_model_offloaded_at_each_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 3);
    let csv = tmp.path().join("o.csv");
    let o = run(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--sirius",
        "--resident-mem",
        "60K,1M",
        "--link-gbps",
        "4",
        "--period",
        "2",
        "--gen",
        "6",
        "--reps",
        "1",
        "--threads",
        "1",
        "--prompt-file",
        &short_prompt(tmp.path()),
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    let rows = table_rows(&table);
    assert_eq!(rows.len(), 1 + 2 * 2, "full and K=2 per budget: {table}");
    assert!(rows[0].starts_with("| budget | mode |"), "{table}");
    assert!(
        rows[0].contains("| predicted ms/tok | measured ms/tok |"),
        "{table}"
    );
    assert!(
        !table.contains("| sparse |"),
        "no sparse row offloaded: {table}"
    );
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(
        csv_column(&csv, "budget_bytes"),
        ["61440", "61440", "1048576", "1048576"]
    );
    assert_eq!(
        csv_column(&csv, "mode"),
        ["full", "sirius", "full", "sirius"]
    );
    // With a link cap the planner predicts every offloaded row; each was measured.
    for column in [
        "predicted_ms_per_token",
        "measured_ms_per_token",
        "streamed_mb_per_token",
    ] {
        for v in csv_column(&csv, column) {
            assert!(
                v.parse::<f64>().is_ok_and(|v| v >= 0.0),
                "{column} {v:?}: {csv}"
            );
        }
    }
}

#[test]
fn a_thread_sweep_loads_the_model_per_count() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 3);
    let json = tmp.path().join("t.json");
    let o = run(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--sirius",
        "--threads",
        "1,2",
        "--period",
        "2",
        "--gen",
        "4",
        "--reps",
        "1",
        "--prompt-file",
        &short_prompt(tmp.path()),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let threads: Vec<u64> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["threads"].as_u64().unwrap())
        .collect();
    assert_eq!(threads, [1, 1, 1, 2, 2, 2]);
    assert_eq!(report["threads"], serde_json::json!([1, 2]));
}

#[test]
fn sweep_lists_and_budgets_are_checked_before_the_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 3);
    let model = model.to_str().unwrap();
    let bench = |extra: &[&str]| {
        let mut a = vec!["bench", "--model", model, "--sirius", "--gen", "4"];
        a.extend_from_slice(extra);
        run(&a)
    };
    let plot = tmp.path().join("p.svg");
    let o = bench(&[
        "--keep",
        "0.3,0.5",
        "--threads",
        "1,2",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "--plot draws one swept option");
    assert_clean_failure(&bench(&["--link-gbps", "4"]), "--resident-mem");
    // --gpu-mem implies --device cuda (as in `run`); on the CPU it is refused by name.
    assert_clean_failure(
        &bench(&["--device", "cpu", "--gpu-mem", "1G"]),
        "--resident-mem",
    );
    assert_clean_failure(
        &bench(&["--resident-mem", "1G,lots"]),
        "--resident-mem lots",
    );
    assert_clean_failure(&bench(&["--keep", "0.3,1.5"]), "1.5");
    assert_clean_failure(&bench(&["--keep", "0.3,0.3"]), "--keep lists 0.3 twice");
    let o = bench(&["--resident-mem", "1M,1024K"]);
    assert_clean_failure(&o, "--resident-mem/--gpu-mem lists 1.00 MiB twice");
    let o = bench(&["--resident-mem", "1G", "--sparsity", "cats"]);
    assert_clean_failure(&o, "Griffin");
    // Outside bench --sirius a list is refused, naming the option.
    let o = run(&[
        "run",
        "--model",
        model,
        "--prompt",
        "w1",
        "--threads",
        "1,2",
    ]);
    assert_clean_failure(&o, "--threads takes one value");
    let o = run(&[
        "bench",
        "--model",
        model,
        "--keep",
        "0.3,0.5",
        "--sparsity",
        "griffin",
    ]);
    assert_clean_failure(&o, "--keep takes one value");
}

/// A budget the model cannot run in fails at its point; the rows measured before it are
/// still printed and written, and the run ends with the planner's error.
#[test]
fn a_failing_point_keeps_the_rows_measured_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("tiny"), &TinySpec::default(), 3);
    let csv = tmp.path().join("p.csv");
    let o = run(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--sirius",
        "--resident-mem",
        "1M,2K",
        "--period",
        "2",
        "--gen",
        "4",
        "--reps",
        "1",
        "--threads",
        "1",
        "--prompt-file",
        &short_prompt(tmp.path()),
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "2 KiB cannot hold the model's minimum");
    let err = stderr(&o);
    assert!(err.contains("minimum"), "{err}");
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.starts_with("The sweep stopped early"), "{table}");
    assert_eq!(
        table_rows(&table).len(),
        3,
        "header, full, K=2 at 1 MiB: {table}"
    );
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv_column(&csv, "budget_bytes"), ["1048576", "1048576"]);
}
