//! `run --resident-mem` through the CLI: on SmolLM2 at 60% of the model's size the tokens equal
//! an unconstrained run's, with streaming statistics and a Chrome trace; bad budgets and
//! option combinations are one-line errors.

mod common;

use common::{assert_one_line_failure, run_bin, stderr_of};

/// 60% of SmolLM2-135M's 269 MB of bf16 weights.
const SIXTY_PERCENT: &str = "161MB";

const PROMPTS: [&str; 2] = [
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:",
    "The three primary colors are",
];

fn run_json(
    model: &str,
    prompt: &str,
    extra: &[&str],
    dir: &std::path::Path,
    name: &str,
) -> serde_json::Value {
    let stats = dir.join(name);
    let stats_arg = stats.to_str().unwrap();
    let mut args = vec![
        "run",
        "-m",
        model,
        "-p",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "48",
        "--sirius",
        "--period",
        "16",
        "--sparsity",
        "griffin",
        "--keep",
        "0.5",
        "-q",
        "--stats-json",
        stats_arg,
    ];
    args.extend_from_slice(extra);
    let out = run_bin(&args);
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        extra,
        stderr_of(&out)
    );
    serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap()
}

#[test]
fn smollm2_offloaded_at_sixty_percent_gives_the_unconstrained_tokens() {
    let Some(dir) = common::smollm2_dir("offloaded SmolLM2 run") else {
        return;
    };
    let model = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("trace.json");
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let plain = run_json(model, prompt, &[], tmp.path(), "plain.json");
        let mut extra = vec!["--resident-mem", SIXTY_PERCENT];
        if i == 0 {
            extra.extend_from_slice(&["--trace", trace.to_str().unwrap(), "--link-gbps", "8"]);
        }
        let off = run_json(model, prompt, &extra, tmp.path(), "offloaded.json");
        assert_eq!(
            off["generated_token_ids"], plain["generated_token_ids"],
            "prompt {i}: offloaded tokens differ"
        );
        assert!(off["resident_bytes"].as_u64().unwrap() <= 161_000_000);
        assert!(off["streamed_bytes"].as_u64().unwrap() > 0);
        assert!(
            off["overflow_ffn_layers"].as_u64().unwrap() > 0,
            "60% cannot hold every sparse layer"
        );
        for key in [
            "link_busy_s",
            "achieved_link_gbps",
            "overlap",
            "moved_neurons",
            "measured_ms_per_token",
        ] {
            assert!(off[key].as_f64().is_some(), "stats JSON lacks {key}");
        }
        // The planner's prediction comes with a link cap only (uncapped, the CPU "link" is
        // memcpy, which it does not model).
        let predicted = off["predicted_ms_per_token"].as_f64();
        assert_eq!(predicted.is_some(), i == 0, "predicted: {predicted:?}");
        if let Some(p) = predicted {
            let measured = off["measured_ms_per_token"].as_f64().unwrap();
            // Loose: the machine is shared; BENCHMARKS.md has the careful comparison.
            assert!(
                p > 0.2 * measured && p < 5.0 * measured,
                "predicted {p} vs measured {measured}"
            );
        }
    }
    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let spans = |cat: &str| {
        events
            .iter()
            .filter(|e| e["ph"] == "X" && e["cat"] == cat)
            .count()
    };
    assert!(
        spans("copy engine") > 30,
        "copy spans: {}",
        spans("copy engine")
    );
    assert!(spans("compute") > 30, "compute spans: {}", spans("compute"));
}

#[test]
fn offloading_option_errors_are_one_line() {
    let Some(dir) = common::smollm2_dir("offloading option errors") else {
        return;
    };
    let model = dir.to_str().unwrap();
    let base = [
        "run",
        "-m",
        model,
        "-p",
        "Hi",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        run_bin(&a)
    };
    let sirius = ["--sirius", "--sparsity", "griffin"];
    let out = with(&[&sirius[..], &["--resident-mem", "50M"]].concat());
    assert_one_line_failure(&out, "minimum");
    // CATS does not offload (Griffin's set is fixed per request); Griffin and the dense
    // model do.
    let out = with(&["--resident-mem", "200M", "--sparsity", "cats"]);
    assert_one_line_failure(&out, "offloads Sirius with Griffin sparsity");
    let out = with(&[&sirius[..], &["--resident-mem", "lots"]].concat());
    assert_one_line_failure(&out, "size");
    let out = with(&[&sirius[..], &["--resident-mem", "200M", "--link-gbps", "0"]].concat());
    assert_one_line_failure(&out, "--link-gbps");
    // An automatic budget reads a GPU's free memory: on the CPU it names the way out.
    let out = with(&["--resident-mem", "auto"]);
    assert_one_line_failure(&out, "--gpu-mem auto");
}

/// The budget options belong to their devices: `--gpu-mem` with the CPU and `--resident-mem`
/// with CUDA are one-line errors naming the other option, before any model or GPU is looked
/// at (so this needs neither); options of an offloaded run need a budget.
#[test]
fn budget_options_name_the_one_for_the_device() {
    let base = [
        "run",
        "-m",
        "/nonexistent/model",
        "--no-fetch",
        "-p",
        "Hi",
        "--temperature",
        "0",
        "--sirius",
        "--sparsity",
        "griffin",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        run_bin(&a)
    };
    // --gpu-mem alone implies --device cuda; without CUDA the error names the CPU's way.
    let out = with(&["--gpu-mem", "1G"]);
    assert_one_line_failure(&out, "--resident-mem 1G in place of --gpu-mem 1G");
    let out = with(&["--device", "cpu", "--gpu-mem", "1G"]);
    assert_one_line_failure(&out, "--resident-mem");
    let out = with(&["--device", "cuda", "--resident-mem", "1G"]);
    assert_one_line_failure(&out, "--gpu-mem");
    let out = with(&[
        "--device",
        "cuda",
        "--resident-mem",
        "1G",
        "--gpu-mem",
        "1G",
    ]);
    assert_one_line_failure(&out, "one offloading budget");
    let out = with(&["--trace", "/tmp/never-written.json"]);
    assert_one_line_failure(&out, "--gpu-mem");
    // --link-gbps is the emulated cap (CPU) or the planner's link (GPU): a budget's option.
    let out = with(&["--link-gbps", "8"]);
    assert_one_line_failure(&out, "--link-gbps describes an offloaded run");
    let out = with(&["--device", "cuda", "--gpu-mem", "1G", "--link-gbps", "0"]);
    assert_one_line_failure(&out, "--link-gbps must be between");
    // Accepted with --gpu-mem (no clap `requires`): the run goes on to the model, which
    // does not exist.
    let out = with(&["--device", "cuda", "--gpu-mem", "1G", "--link-gbps", "12"]);
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        !err.contains("--link-gbps") && !err.contains("required"),
        "{err}"
    );
    // --gpu-mem also needs the offloaded configuration (checked before the device opens):
    // greedy (its default), so a temperature is refused.
    let out = run_bin(&[
        "run",
        "-m",
        "/nonexistent/model",
        "--no-fetch",
        "-p",
        "Hi",
        "--gpu-mem",
        "1G",
        "--temperature",
        "0.7",
    ]);
    assert_one_line_failure(&out, "--gpu-mem: an offloaded run decodes greedily");
    let out = with(&["--device", "cuda", "--gpu-mem", "lots"]);
    assert_one_line_failure(&out, "size");
}

/// `plan` and `run` book the same budget, line for line: the plan for the run's request
/// (its context, prompt length, period and keep) lists, summed by line, exactly the bytes the
/// run's arena holds once the request chose its neurons.
#[test]
fn plan_and_run_agree_on_every_budget_line() {
    let Some(dir) = common::smollm2_dir("plan vs run budget lines") else {
        return;
    };
    let model = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for budget in [SIXTY_PERCENT, "300MB"] {
        let extra = ["--resident-mem", budget];
        let run = run_json(model, PROMPTS[1], &extra, tmp.path(), "run.json");
        let prompt_tokens = run["prompt_tokens"]
            .as_u64()
            .expect("prompt_tokens")
            .to_string();
        let context = run["kv_cache_rows"]
            .as_u64()
            .expect("kv_cache_rows")
            .to_string();
        let plan = plan_json(model, budget, &context, &prompt_tokens);
        let planned = &plan["plan"]["budget_lines"];
        assert!(
            planned.as_array().is_some_and(|l| l.len() >= 6),
            "plan lines: {planned}"
        );
        assert_eq!(&run["budget_lines"], planned, "budget {budget}");
    }
}

/// `plan --format json` for a `run` of SmolLM2 at `budget` (K = 16, keep 0.5, as the runs
/// here), with the run's context and prompt length.
fn plan_json(model: &str, budget: &str, context: &str, prompt_tokens: &str) -> serde_json::Value {
    let out = run_bin(&[
        "plan",
        "--model",
        model,
        "--resident-mem",
        budget,
        "--context",
        context,
        "--prompt-tokens",
        prompt_tokens,
        "--period",
        "16",
        "--keep",
        "0.5",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "plan failed: {}", stderr_of(&out));
    serde_json::from_slice(&out.stdout).expect("plan prints JSON")
}

/// A prompt of about 700 tokens: numbered lines, then a question about them.
fn long_prompt() -> String {
    let lines: Vec<String> = (1..=40)
        .map(|i| {
            format!(
                "Item {i}: a crate of {} apples was shipped to store {}.",
                i * 7 % 31,
                i * 13 % 17
            )
        })
        .collect();
    format!(
        "{}\nQuestion: how many apples went to store 5?\nAnswer:",
        lines.join(" ")
    )
}

/// `run --resident-mem` prefills a long prompt in the chunk `plan` picks for the same
/// request: longer than 256 tokens where the budget has bytes to spare, the old 256 where
/// it has none. Either way the tokens are those of the unconstrained run, whose prefill runs
/// in chunks of 256: the chunking does not change the greedy output.
#[test]
fn a_long_prompt_prefills_in_the_planned_chunk_with_the_same_tokens() {
    let Some(dir) = common::smollm2_dir("long-prompt prefill chunks") else {
        return;
    };
    let model = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let prompt = long_prompt();
    let plain = run_json(model, &prompt, &[], tmp.path(), "plain.json");
    let prompt_tokens = plain["prompt_tokens"].as_u64().expect("prompt_tokens");
    assert!(prompt_tokens > 600, "{prompt_tokens} prompt tokens");
    assert_eq!(plain["prefill_chunk"], 256);
    let mut chunks = Vec::new();
    for budget in [SIXTY_PERCENT, "300MB"] {
        let extra = ["--resident-mem", budget];
        let run = run_json(model, &prompt, &extra, tmp.path(), "run.json");
        assert_eq!(
            run["generated_token_ids"], plain["generated_token_ids"],
            "budget {budget}: the offloaded tokens differ"
        );
        let context = run["kv_cache_rows"].as_u64().expect("kv_cache_rows");
        let plan = plan_json(
            model,
            budget,
            &context.to_string(),
            &prompt_tokens.to_string(),
        );
        let chunk = run["prefill_chunk"].as_u64().expect("prefill_chunk");
        assert_eq!(plan["prefill_chunk"], chunk, "budget {budget}");
        assert_eq!(
            plan["prefill_passes"],
            prompt_tokens.div_ceil(chunk),
            "budget {budget}"
        );
        assert_eq!(
            run["budget_lines"], plan["plan"]["budget_lines"],
            "budget {budget}"
        );
        chunks.push(chunk);
    }
    // 300 MB holds the whole model with room for the whole prompt's activations.
    assert_eq!(chunks[1], prompt_tokens, "chunks {chunks:?}");
    assert!(
        chunks[0] >= 256 && chunks[0] <= chunks[1],
        "chunks {chunks:?}"
    );
}
