//! Options out of range, of the wrong type, or naming paths that cannot be used, for every
//! subcommand: each refused in one line naming the option, before any work.

use std::path::Path;

use crate::common::{write_model, TinySpec};
use crate::harness::{check_all, run_args, Case};

/// A directory nobody may create files in, not even root (sysfs).
const UNWRITABLE: &str = "/sys/kernel/stats.json";

fn run(what: &str, model: &Path, extra: &[&str], needles: &[&str]) -> Case {
    let args = run_args(model, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Case::new(what, &args, needles)
}

fn sub(what: &str, sub: &str, model: &Path, extra: &[&str], needles: &[&str]) -> Case {
    let m = model.to_string_lossy();
    let mut args = vec![sub, "-m", &m, "--no-fetch"];
    args.extend(extra);
    Case::new(what, &args, needles)
}

fn plan(what: &str, model: &Path, extra: &[&str], needles: &[&str]) -> Case {
    let m = model.to_string_lossy();
    let mut args = vec!["plan", "-m", &m];
    args.extend(extra);
    Case::new(what, &args, needles)
}

fn run_cases(m: &Path, tmp: &Path) -> Vec<Case> {
    let dir = tmp.to_string_lossy().into_owned();
    let missing_dir = tmp
        .join("no/such/dir/stats.json")
        .to_string_lossy()
        .into_owned();
    let r = |what: &str, extra: &[&str], needles: &[&str]| run(what, m, extra, needles);
    vec![
        r(
            "--threads 100000",
            &["--threads", "100000"],
            &["--threads 100000", "at most"],
        ),
        r("--threads a list", &["--threads", "1,2"], &["--threads"]),
        r("--threads negative", &["--threads", "-1"], &["--threads"]),
        r(
            "--prefill-chunk 0",
            &["--prefill-chunk", "0"],
            &["--prefill-chunk", "above 0"],
        ),
        r(
            "--prefill-chunk a word",
            &["--prefill-chunk", "big"],
            &["--prefill-chunk", "auto"],
        ),
        r(
            "--max-tokens negative",
            &["--max-tokens", "-5"],
            &["--max-tokens"],
        ),
        r(
            "--max-tokens a word",
            &["--max-tokens", "many"],
            &["--max-tokens"],
        ),
        r(
            "--temperature negative",
            &["--temperature", "-1"],
            &["--temperature"],
        ),
        r(
            "--temperature NaN",
            &["--temperature", "nan"],
            &["--temperature"],
        ),
        r(
            "--temperature infinite",
            &["--temperature", "inf"],
            &["--temperature"],
        ),
        r("--top-p 0", &["--top-p", "0"], &["--top-p"]),
        r("--top-p above 1", &["--top-p", "1.5"], &["--top-p"]),
        r(
            "--top-p negative and tiny",
            &["--top-p", "-1e-30"],
            &["--top-p", "-1e-30"],
        ),
        r(
            "--top-p tiny",
            &["--top-p", "1e-300"],
            &["--top-p", "got 0"],
        ),
        r("--top-k negative", &["--top-k", "-1"], &["--top-k"]),
        r("--seed negative", &["--seed", "-1"], &["--seed"]),
        r("--ctx-size 0", &["--ctx-size", "0"], &["--ctx-size"]),
        r(
            "--ctx-size above the model's",
            &["--ctx-size", "100000"],
            &["--ctx-size", "max_position_embeddings"],
        ),
        r(
            "--keep 0",
            &["--sparsity", "griffin", "--keep", "0"],
            &["--keep"],
        ),
        r(
            "--keep above 1",
            &["--sparsity", "griffin", "--keep", "1.5"],
            &["--keep"],
        ),
        r(
            "--keep NaN",
            &["--sparsity", "griffin", "--keep", "nan"],
            &["--keep"],
        ),
        r(
            "--keep -1e-38",
            &["--sparsity", "griffin", "--keep", "-1e-38"],
            &["--keep", "-1e-38"],
        ),
        r(
            "--sparsity unknown",
            &["--sparsity", "half"],
            &["--sparsity"],
        ),
        r(
            "--period 0",
            &["--sirius", "--period", "0", "--temperature", "0"],
            &["--period"],
        ),
        r(
            "--period huge",
            &["--sirius", "--period", "100000", "--temperature", "0"],
            &["--period"],
        ),
        r(
            "--period a word",
            &["--sirius", "--period", "often", "--temperature", "0"],
            &["--period"],
        ),
        r(
            "--width 0",
            &[
                "--sirius",
                "--width",
                "0",
                "--period",
                "4",
                "--temperature",
                "0",
            ],
            &["--width"],
        ),
        r(
            "--width 1000",
            &[
                "--sirius",
                "--width",
                "1000",
                "--period",
                "4",
                "--temperature",
                "0",
            ],
            &["--width"],
        ),
        r(
            "--threshold infinite",
            &["--sirius", "--threshold", "inf", "--temperature", "0"],
            &["--threshold"],
        ),
        r(
            "--threshold negative",
            &["--sirius", "--threshold", "-0.5", "--temperature", "0"],
            &["--threshold"],
        ),
        r(
            "--accept-temperature 0",
            &[
                "--sirius",
                "--accept-temperature",
                "0",
                "--temperature",
                "0",
            ],
            &["--accept-temperature"],
        ),
        r(
            "--threshold without --sirius",
            &["--threshold", "0.5"],
            &["--threshold", "--sirius"],
        ),
        r(
            "--resident-mem 0",
            &["--resident-mem", "0"],
            &["--resident-mem"],
        ),
        r(
            "--resident-mem too large",
            &["--resident-mem", "99999999999999999999999"],
            &["--resident-mem", "too large"],
        ),
        r(
            "--resident-mem a word",
            &["--resident-mem", "lots"],
            &["--resident-mem", "lots"],
        ),
        r(
            "--resident-mem in exponent form",
            &["--resident-mem", "1e30"],
            &["1e30"],
        ),
        r(
            "--link-gbps 1e-300",
            &["--resident-mem", "1G", "--link-gbps", "1e-300"],
            &["--link-gbps", "1e-300"],
        ),
        r(
            "--link-gbps 0",
            &["--resident-mem", "1G", "--link-gbps", "0"],
            &["--link-gbps"],
        ),
        r(
            "--mem-gbps infinite",
            &[
                "--resident-mem",
                "1G",
                "--link-gbps",
                "4",
                "--mem-gbps",
                "inf",
            ],
            &["--mem-gbps"],
        ),
        r(
            "--compute-gflops negative",
            &[
                "--resident-mem",
                "1G",
                "--link-gbps",
                "4",
                "--compute-gflops",
                "-1",
            ],
            &["--compute-gflops"],
        ),
        r(
            "--link-gbps without a budget",
            &["--link-gbps", "4"],
            &["--link-gbps", "--resident-mem"],
        ),
        r(
            "--trace without a budget",
            &["--trace", "t.json"],
            &["--trace"],
        ),
        r(
            "--stats-json in a missing directory",
            &["--stats-json", &missing_dir],
            &["--stats-json", "does not exist"],
        ),
        r(
            "--stats-json a directory",
            &["--stats-json", &dir],
            &["--stats-json", "directory"],
        ),
        r(
            "--stats-json unwritable",
            &["--stats-json", UNWRITABLE],
            &["--stats-json", UNWRITABLE],
        ),
        r(
            "--trace unwritable",
            &["--resident-mem", "1G", "--trace", UNWRITABLE],
            &["--trace", UNWRITABLE],
        ),
        r("--stop empty", &["--stop", ""], &["--stop"]),
        r("--device unknown", &["--device", "tpu"], &["--device"]),
        r("--device cuda:x", &["--device", "cuda:x"], &["--device"]),
        r("--weights unknown", &["--weights", "q2"], &["--weights"]),
        r("--kv-dtype unknown", &["--kv-dtype", "f8"], &["--kv-dtype"]),
        r(
            "--griffin-down unknown",
            &["--griffin-down", "q3"],
            &["--griffin-down"],
        ),
        r("an unknown option", &["--threds", "2"], &["--threds"]),
    ]
}

fn other_cases(m: &Path, tmp: &Path) -> Vec<Case> {
    let missing = tmp
        .join("no/such/dir/out.json")
        .to_string_lossy()
        .into_owned();
    let text = tmp.join("text.txt");
    let _ = std::fs::write(&text, "w3 w4 w5 w6 w7 w8 w9 w10 w11 w12");
    let text = text.to_string_lossy().into_owned();
    let absent = tmp.join("absent.txt").to_string_lossy().into_owned();
    let out = tmp.join("t.json").to_string_lossy().into_owned();
    vec![
        sub(
            "serve --port too large",
            "serve",
            m,
            &["--port", "70000"],
            &["--port"],
        ),
        sub(
            "serve --max-queue negative",
            "serve",
            m,
            &["--max-queue", "-1"],
            &["--max-queue"],
        ),
        sub(
            "serve --temperature 3",
            "serve",
            m,
            &["--temperature", "3"],
            &["--temperature"],
        ),
        sub(
            "serve --top-p 0",
            "serve",
            m,
            &["--top-p", "0"],
            &["--top-p"],
        ),
        sub(
            "serve --max-tokens 0",
            "serve",
            m,
            &["--max-tokens", "0"],
            &["--max-tokens"],
        ),
        sub(
            "serve --host not an address",
            "serve",
            m,
            &["--host", "not a host"],
            &["not a host"],
        ),
        sub(
            "serve --threads 100000",
            "serve",
            m,
            &["--threads", "100000"],
            &["--threads"],
        ),
        sub(
            "serve --trace",
            "serve",
            m,
            &["--resident-mem", "1G", "--trace", &out],
            &["--trace"],
        ),
        sub(
            "bench --gen 0 --prompt 0",
            "bench",
            m,
            &["--gen", "0", "--prompt", "0"],
            &["--prompt", "--gen"],
        ),
        sub("bench --reps 0", "bench", m, &["--reps", "0"], &["--reps"]),
        sub(
            "bench --prompt-file without --sirius",
            "bench",
            m,
            &["--prompt-file", &absent],
            &["--sirius"],
        ),
        sub(
            "bench --sirius --prompt-file missing",
            "bench",
            m,
            &["--sirius", "--prompt-file", &absent],
            &["--prompt-file", "absent.txt"],
        ),
        sub(
            "bench --json in a missing directory",
            "bench",
            m,
            &["--json", &missing],
            &["--json"],
        ),
        sub(
            "bench --threads 100000",
            "bench",
            m,
            &["--threads", "100000"],
            &["--threads"],
        ),
        sub(
            "bench --sirius --threads sweep too large",
            "bench",
            m,
            &["--sirius", "--threads", "1,100000"],
            &["--threads"],
        ),
        sub(
            "bench --keep 0",
            "bench",
            m,
            &["--sparsity", "griffin", "--keep", "0"],
            &["--keep"],
        ),
        sub(
            "calibrate --keep 0",
            "calibrate",
            m,
            &["--text", &text, "--keep", "0", "--out", &out],
            &["--keep"],
        ),
        sub(
            "calibrate --seq-len 0",
            "calibrate",
            m,
            &["--text", &text, "--seq-len", "0", "--out", &out],
            &["--seq-len"],
        ),
        sub(
            "calibrate --out unwritable",
            "calibrate",
            m,
            &["--text", &text, "--out", UNWRITABLE],
            &["--out"],
        ),
        sub(
            "calibrate --text missing",
            "calibrate",
            m,
            &["--text", &absent, "--out", &out],
            &["absent.txt"],
        ),
        sub(
            "eval --perplexity missing",
            "eval",
            m,
            &["--perplexity", &absent],
            &["absent.txt"],
        ),
        sub(
            "eval --window 0",
            "eval",
            m,
            &["--perplexity", &text, "--window", "0"],
            &["--window"],
        ),
        sub(
            "eval --json unwritable",
            "eval",
            m,
            &["--perplexity", &text, "--json", UNWRITABLE],
            &["--json"],
        ),
        plan(
            "plan --resident-mem 0",
            m,
            &["--resident-mem", "0"],
            &["--resident-mem"],
        ),
        plan(
            "plan --gpu-mem too large",
            m,
            &["--gpu-mem", "99999999999999999999999"],
            &["--gpu-mem", "too large"],
        ),
        plan(
            "plan --prefill-chunk -1",
            m,
            &["--resident-mem", "1G", "--prefill-chunk", "-1"],
            &["--prefill-chunk"],
        ),
        plan(
            "plan --keep 0",
            m,
            &["--resident-mem", "1G", "--keep", "0"],
            &["keep"],
        ),
        plan(
            "plan --period 0",
            m,
            &["--resident-mem", "1G", "--period", "0"],
            &["period"],
        ),
        plan(
            "plan --context 0",
            m,
            &["--resident-mem", "1G", "--context", "0"],
            &["context"],
        ),
        plan(
            "plan --aal 0",
            m,
            &["--resident-mem", "1G", "--aal", "0"],
            &["aal"],
        ),
        plan(
            "plan --link-gbps 1e-300",
            m,
            &["--resident-mem", "1G", "--link-gbps", "1e-300"],
            &["--link-gbps", "1e-300"],
        ),
        plan(
            "plan --mem-gbps 1e300",
            m,
            &["--resident-mem", "1G", "--mem-gbps", "1e300"],
            &["--mem-gbps", "1e300"],
        ),
    ]
}

#[test]
fn bad_options_are_one_line_errors_naming_the_option() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let model = write_model(&tmp.path().join("model"), &TinySpec::default(), 1);
    let mut cases = run_cases(&model, tmp.path());
    cases.extend(other_cases(&model, tmp.path()));
    check_all("options", &cases);
}
