//! `eval --data` (GSM accuracy) and `eval --faithfulness` through the binary: option and data
//! errors on a tiny random model, the JSON report's shape, the keep-1.0 invariant of the
//! faithfulness report, and a short real run on SmolLM2 when it is available.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_clean_failure, assert_one_line_failure, run_bin as run, stderr_of as stderr,
    write_model, TinySpec,
};

/// A tiny random model with room for few-shot prompts.
fn tiny(root: &Path) -> String {
    let spec = TinySpec {
        max_pos: 512,
        ..TinySpec::default()
    };
    write_model(&root.join("tiny"), &spec, 7)
        .display()
        .to_string()
}

/// A JSONL data file of `n` problems in the tiny tokenizer's words.
fn tiny_data(root: &Path, n: usize) -> PathBuf {
    let mut text = String::new();
    for i in 0..n {
        text += &serde_json::json!({
            "question": format!("w{} w{} w5", 3 + i, 10 + i),
            "answer": format!("w6 w7\n#### {}", i + 1),
        })
        .to_string();
        text.push('\n');
    }
    let path = root.join("data.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

fn json_of(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

#[test]
fn bad_modes_and_missing_sparsity_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let data = tiny_data(tmp.path(), 3);
    let data = data.to_str().unwrap();
    let base = ["eval", "-m", &model, "--data", data, "--shots", "1", "-q"];

    let mut args = base.to_vec();
    args.extend(["--mode", "full,bogus"]);
    assert_clean_failure(&run(&args), "bogus");

    for mode in ["sparse", "sirius", "full,sparse"] {
        let mut args = base.to_vec();
        args.extend(["--mode", mode]);
        let o = run(&args);
        assert_one_line_failure(&o, "--sparsity griffin|cats");
        assert!(
            stderr(&o).contains("needs a sparse model"),
            "{}",
            stderr(&o)
        );
    }

    let mut args = base.to_vec();
    args.extend(["--mode", "full,full"]);
    assert_one_line_failure(&run(&args), "twice");

    // Perplexity options with a generation task, and the other way round.
    let mut args = base.to_vec();
    args.extend(["--compare", "none,griffin"]);
    assert_clean_failure(&run(&args), "--compare");
    let o = run(&[
        "eval",
        "-m",
        &model,
        "--perplexity",
        data,
        "--max-tokens",
        "8",
    ]);
    assert_clean_failure(&o, "--max-tokens");

    let mut args = base.to_vec();
    args.extend(["--max-problems", "0"]);
    assert_one_line_failure(&run(&args), "--max-problems");

    // Nothing left to score after the shots.
    let o = run(&["eval", "-m", &model, "--data", data, "--shots", "3", "-q"]);
    assert_one_line_failure(&o, "none left to score");

    // A prompt that does not fit the context names its line.
    let o = run(&[
        "eval",
        "-m",
        &model,
        "--data",
        data,
        "--shots",
        "1",
        "--max-tokens",
        "500",
        "-q",
    ]);
    assert_one_line_failure(&o, "line 2");
    assert!(stderr(&o).contains("context"), "{}", stderr(&o));
}

#[test]
fn malformed_jsonl_names_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    for (line3, needle) in [
        ("{\"question\": \"w3\", \"answer\": ", "not valid JSON"),
        ("{\"question\": \"w3\"}", "no \"answer\""),
        (
            "{\"question\": \"w3\", \"answer\": \"four\"}",
            "has no number",
        ),
        ("[\"w3\", 4]", "not a JSON object"),
    ] {
        let path = tmp.path().join("bad.jsonl");
        std::fs::write(
            &path,
            format!(
                "{{\"question\": \"w3\", \"answer\": \"#### 1\"}}\n\n{line3}\n{{\"question\": \"w4\", \"answer\": 2}}\n"
            ),
        )
        .unwrap();
        let path = path.to_str().unwrap();
        for task in ["--data", "--faithfulness"] {
            let mut args = vec!["eval", "-m", &model, task, path, "--shots", "1", "-q"];
            if task == "--faithfulness" {
                args.extend(["--sparsity", "griffin"]);
                if needle != "not valid JSON" && needle != "not a JSON object" {
                    continue; // faithfulness needs no answer on a scored line
                }
            }
            let o = run(&args);
            assert_one_line_failure(&o, needle);
            let err = stderr(&o);
            assert!(
                err.contains(&format!("{task} {path}: line 3")),
                "{task}: {err}"
            );
        }
    }
}

#[test]
fn json_report_has_one_row_per_mode_and_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let data = tiny_data(tmp.path(), 4);
    let out = tmp.path().join("report.json");
    let o = run(&[
        "eval",
        "-m",
        &model,
        "--data",
        data.to_str().unwrap(),
        "--mode",
        "full,sparse,sirius",
        "--sparsity",
        "griffin",
        "--keep",
        "0.5",
        "--shots",
        "1",
        "--max-problems",
        "2",
        "--max-tokens",
        "12",
        "--period",
        "4",
        "--format",
        "json",
        "--json",
        out.to_str().unwrap(),
        "-q",
    ]);
    let r = json_of(&o);
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(file, r, "--json writes what --format json prints");
    assert_eq!(r["task"], "gsm");
    assert_eq!(r["shots"], 1);
    assert_eq!(r["max_tokens"], 12);
    assert_eq!(r["sparsity"], "griffin");
    assert_eq!(r["period"], 4);
    assert_eq!(r["modes"], serde_json::json!(["full", "sparse", "sirius"]));
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (row, mode) in results.iter().zip(["full", "sparse", "sirius"]) {
        assert_eq!(row["mode"], mode, "{row}");
        assert_eq!(row["problems"], 2, "{row}");
        let acc = row["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{row}");
        assert_eq!(
            acc,
            row["correct"].as_f64().unwrap() / 2.0,
            "accuracy = correct / problems: {row}"
        );
        let tokens = row["mean_generated_tokens"].as_f64().unwrap();
        assert!(tokens > 0.0 && tokens <= 12.0, "{row}");
        assert!(row["decode_tokens_per_s"].as_f64().unwrap() >= 0.0, "{row}");
        let ed = row["effective_density"].as_f64().unwrap();
        match mode {
            "full" => {
                assert_eq!(ed, 1.0);
                assert!(row["aal"].is_null(), "{row}");
            }
            "sparse" => assert!(ed > 0.0 && ed < 1.0, "{row}"),
            _ => {
                let aal = row["aal"].as_f64().unwrap();
                assert!((1.0..=4.0).contains(&aal), "{row}");
                assert!(row["verifications"].as_u64().unwrap() >= 1, "{row}");
                assert!(ed > 0.0, "{row}");
            }
        }
    }
    let problems = r["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2);
    // The shot is line 1: the scored problems are lines 2 and 3, whose answers are 2 and 3.
    assert_eq!(problems[0]["line"], 2);
    assert_eq!(problems[0]["target"], "2");
    assert_eq!(problems[1]["target"], "3");
    for p in problems {
        let answers = p["answers"].as_array().unwrap();
        assert_eq!(answers.len(), 3, "{p}");
        for a in answers {
            assert!(a["generated_tokens"].as_u64().unwrap() <= 12, "{a}");
            assert_eq!(
                a["correct"].as_bool().unwrap(),
                a["predicted"] == p["target"],
                "{a}"
            );
        }
    }

    // The markdown table has the same rows.
    let o = run(&[
        "eval",
        "-m",
        &model,
        "--data",
        data.to_str().unwrap(),
        "--mode",
        "sirius,full",
        "--sparsity",
        "cats",
        "--shots",
        "0",
        "--max-problems",
        "1",
        "--max-tokens",
        "4",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(rows.len(), 3, "header and two modes: {md}");
    assert!(
        rows[1].starts_with("| sirius | 1 |") && rows[2].starts_with("| full | 1 |"),
        "{md}"
    );
}

/// The few-shot prefix computed once gives every mode the answers of whole-prompt prefills
/// (the same KV rows, and Griffin scores summed over the same tokens).
#[test]
fn a_shared_prefix_computed_once_gives_the_same_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let data = tiny_data(tmp.path(), 6);
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "-m",
            &model,
            "--data",
            data.to_str().unwrap(),
            "--sparsity",
            "griffin",
            "--keep",
            "0.5",
            "--shots",
            "3",
            "--max-tokens",
            "10",
            "--period",
            "3",
            "--format",
            "json",
            "-q",
        ];
        args.extend(extra);
        json_of(&run(&args))
    };
    let shared = eval(&[]);
    let whole = eval(&["--no-prefix-cache"]);
    let prefix = shared["shared_prefix_tokens"].as_u64().unwrap();
    assert!(prefix >= 16, "three shots share a prefix: {prefix}");
    assert_eq!(whole["shared_prefix_tokens"], 0);
    let answers = |r: &serde_json::Value| {
        let problems = r["problems"].as_array().unwrap().clone();
        assert_eq!(problems.len(), 3);
        problems
            .iter()
            .flat_map(|p| p["answers"].as_array().unwrap().clone())
            .map(|a| {
                (
                    a["mode"].clone(),
                    a["text"].clone(),
                    a["generated_tokens"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(answers(&shared), answers(&whole));
    // Sparse answers depend on Griffin's choice: their density is the same too.
    let density = |r: &serde_json::Value| r["results"][1]["effective_density"].clone();
    assert_eq!(density(&shared), density(&whole));
}

#[test]
fn faithfulness_with_keep_one_matches_the_full_model_for_every_token() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "w3 w4 w5\n\nw9 w12 w20 w7\nw30\n").unwrap();
    let faith = |keep: &str, mode: &str| {
        json_of(&run(&[
            "eval",
            "-m",
            &model,
            "--faithfulness",
            prompts.to_str().unwrap(),
            "--max-tokens",
            "24",
            "--sparsity",
            mode,
            "--keep",
            keep,
            "--period",
            "5",
            "--format",
            "json",
            "-q",
        ]))
    };
    for mode in ["griffin", "cats"] {
        let r = faith("1", mode);
        assert_eq!(r["task"], "faithfulness");
        assert_eq!(r["prompts"], 3);
        assert_eq!(r["shots"], 0, "plain-text prompts take no shots");
        let results = r["results"].as_array().unwrap();
        assert_eq!(
            results
                .iter()
                .map(|x| x["line"].clone())
                .collect::<Vec<_>>(),
            vec![1, 3, 4]
        );
        for x in results {
            // EOS is ignored: every output has exactly --max-tokens tokens.
            assert_eq!(x["tokens"], 24, "{mode}: {x}");
            assert_eq!(x["sparse_prefix"], 24, "{mode}: {x}");
            assert_eq!(x["sirius_prefix"], 24, "{mode}: {x}");
            assert_eq!(x["full_text"], x["sirius_text"], "{mode}: {x}");
        }
        assert_eq!(r["mean_sparse_prefix"], 24.0, "{mode}");
        assert_eq!(r["mean_sirius_prefix"], 24.0, "{mode}");
        assert_eq!(r["prefix_ratio"], 1.0, "{mode}");
        // keep 1.0: every draft is accepted, so all windows but the last advance by K.
        assert!(r["sirius_aal"].as_f64().unwrap() > 4.0, "{mode}: {r}");
    }

    // A real sparsity: prefixes are bounded by the output, AAL by K.
    let r = faith("0.3", "griffin");
    for x in r["results"].as_array().unwrap() {
        assert!(x["sparse_prefix"].as_u64().unwrap() <= 24, "{x}");
        assert!(x["sirius_prefix"].as_u64().unwrap() <= 24, "{x}");
        let aal = x["sirius_aal"].as_f64().unwrap();
        assert!((1.0..=5.0).contains(&aal), "{x}");
    }
}

#[test]
fn faithfulness_option_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "w3 w4\nw5\n").unwrap();
    let p = prompts.to_str().unwrap();
    let o = run(&["eval", "-m", &model, "--faithfulness", p, "-q"]);
    assert_one_line_failure(&o, "--sparsity griffin|cats");
    let o = run(&[
        "eval",
        "-m",
        &model,
        "--faithfulness",
        p,
        "--sparsity",
        "griffin",
        "--shots",
        "1",
    ]);
    assert_one_line_failure(&o, "--shots 1");
    let o = run(&[
        "eval",
        "-m",
        &model,
        "--faithfulness",
        p,
        "--sparsity",
        "griffin",
        "--mode",
        "full",
    ]);
    assert_clean_failure(&o, "--mode");
    // Few-shot examples need answers.
    let q = tmp.path().join("q.jsonl");
    std::fs::write(&q, "{\"question\": \"w3\"}\n{\"question\": \"w4\"}\n").unwrap();
    let o = run(&[
        "eval",
        "-m",
        &model,
        "--faithfulness",
        q.to_str().unwrap(),
        "--sparsity",
        "griffin",
        "--shots",
        "1",
    ]);
    assert_one_line_failure(&o, "line 1: a few-shot example needs an \"answer\"");
}

/// Three GSM-style problems (one shot, two scored) on the real model.
#[test]
fn smollm2_gsm_table_has_a_row_per_mode() {
    let Some(dir) = common::smollm2_dir("eval --data on SmolLM2") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("gsm.jsonl");
    let items = [
        (
            "Tom has 3 apples and buys 4 more. How many apples does he have?",
            "Tom has 3 + 4 = 7 apples.\n#### 7",
        ),
        (
            "A box holds 5 pens. How many pens are in 2 boxes?",
            "2 * 5 = 10\n#### 10",
        ),
        (
            "Sara had 9 cookies and ate 2. How many are left?",
            "9 - 2 = 7\n#### 7",
        ),
    ];
    let text: String = items
        .iter()
        .map(|(q, a)| serde_json::json!({"question": q, "answer": a}).to_string() + "\n")
        .collect();
    std::fs::write(&data, text).unwrap();
    let o = run(&[
        "eval",
        "-m",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--mode",
        "full,sparse,sirius",
        "--sparsity",
        "griffin",
        "--keep",
        "0.5",
        "--shots",
        "1",
        "--max-tokens",
        "16",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = String::from_utf8_lossy(&o.stdout);
    for mode in ["full", "sparse", "sirius"] {
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {mode} |")))
            .unwrap_or_else(|| panic!("no {mode} row: {md}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[2], "2", "problems: {row}");
        let acc: f64 = cells[3].parse().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{row}");
        let tokens: f64 = cells[5].parse().unwrap();
        assert!(tokens <= 16.0, "{row}");
    }
}
