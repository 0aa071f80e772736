//! `bench --sirius`: the sweep of `engine::bench_sirius` as a markdown table, CSV, JSON (with
//! the commit and the machine) and an SVG plot.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::backend::CpuBackend;
use crate::cli::bench::BenchArgs;
use crate::cli::bench_plot::plot;
use crate::cli::fetch::model_dir_or_fetch;
use crate::cli::input::read_text;
use crate::cli::output::{check_output_dir, print_stdout, write_json};
use crate::engine::bench_sirius::{sweep, SiriusSweep, SweepRow};
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::progress::progress_bar;
use crate::sirius::{Period, SiriusConfig};
use crate::sparsity::SparsityMode;

/// The prompt without `--prompt-file`: plain expository text, which a model continues in
/// kind (Sirius's acceptance depends on the text; random ids would measure nothing real).
const DEFAULT_PROMPT: &str = "The water cycle describes how water moves between the \
oceans, the air and the land. Heat from the sun evaporates water from the surface of seas and \
lakes; the vapour rises, cools and condenses into the droplets that form clouds. When the \
droplets grow heavy enough they fall as rain or snow. Some of that water runs off into rivers \
that carry it back to the sea, some soaks into the ground and feeds springs and wells, and \
some is taken up by plants, which release it again through their leaves. Over a year,";

/// What `bench --sirius` reports.
#[derive(Serialize)]
pub struct SweepReport {
    pub model: String,
    pub commit: String,
    pub machine: String,
    pub backend: String,
    pub dtype: String,
    pub sparsity: SparsityMode,
    pub keep: f32,
    pub threshold: f32,
    pub width: usize,
    pub prompt_tokens: usize,
    pub rows: Vec<SweepRow>,
}

pub fn bench_sirius(args: &BenchArgs) -> Result<()> {
    check_output_dir("--json", args.json.as_deref())?;
    check_output_dir("--csv", args.csv.as_deref())?;
    check_output_dir("--plot", args.plot.as_deref())?;
    let mut sparsity = args.sparsity.config()?;
    if sparsity.mode == SparsityMode::None {
        // Sirius drafts with a sparse model: Griffin unless told otherwise.
        sparsity.mode = SparsityMode::Griffin;
    }
    let base = SiriusConfig {
        threshold: args.threshold.unwrap_or(SiriusConfig::default().threshold),
        width: args.width,
        ..SiriusConfig::default()
    };
    let periods = match args.period.is_empty() {
        true => vec![crate::cli::args::default_period(base.width)],
        false => args.period.clone(),
    };
    // Options checked before the (slow) model load.
    for period in &periods {
        period.apply(base).validate()?;
    }
    if args.gen < 2 {
        return Err(Error::InvalidArgument(
            "bench --sirius needs --gen 2 or more (the first token comes from the prompt)".into(),
        ));
    }
    let text = match &args.prompt_file {
        Some(path) => read_text("--prompt-file", path)?,
        None => DEFAULT_PROMPT.to_string(),
    };
    let config = EngineConfig {
        sparsity: sparsity.clone(),
        offload: None,
        weights: args.model.weights(),
        kv_dtype: args.model.kv_dtype,
    };
    let dir = model_dir_or_fetch(&args.model.model, !args.model.no_fetch)?;
    let mut engine = Engine::load(&dir, CpuBackend::new(args.model.threads), &config)?;
    let prompt = engine.encode(&text, None)?;
    let s = SiriusSweep {
        periods,
        base,
        gen: args.gen,
        reps: args.reps,
    };
    let runs = (s.periods.len() + 2) * (s.reps + 1);
    let bar = progress_bar(runs as u64, "bench");
    let rows = sweep(&mut engine, &prompt, &s, &mut || bar.inc(1))?;
    bar.finish_and_clear();
    let report = SweepReport {
        model: args.model.model.clone(),
        commit: commit_id(),
        machine: machine(),
        backend: engine.model.backend_description(),
        dtype: engine.model.dtype.to_string(),
        sparsity: sparsity.mode,
        keep: sparsity.keep,
        threshold: base.threshold,
        width: base.width,
        prompt_tokens: prompt.len(),
        rows,
    };
    print_stdout(&markdown(&report))?;
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &args.csv {
        write_file(path, &csv(&report))?;
    }
    if let Some(path) = &args.plot {
        write_file(path, &plot(&report)?)?;
    }
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn mode_label(r: &SweepRow) -> String {
    match period_text(r) {
        Some(k) => format!("sirius K={k}"),
        None => r.mode.to_string(),
    }
}

/// A Sirius row's window setting as given (`16`, `auto`, `auto:32`).
fn period_text(r: &SweepRow) -> Option<String> {
    r.period.map(|k| match r.adaptive {
        true => Period::Auto(k).to_string(),
        false => k.to_string(),
    })
}

pub fn markdown(r: &SweepReport) -> String {
    let mut s = format!(
        "Sirius sweep of {} ({}, {}) on {}, commit {}: {} keep {}, threshold {}, width {}; \
         prompt {} tokens, {} tokens decoded per run, medians of {} alternated rounds\n\n",
        r.model,
        r.dtype,
        r.backend,
        r.machine,
        r.commit,
        r.sparsity,
        r.keep,
        r.threshold,
        r.width,
        r.prompt_tokens,
        r.rows.first().map_or(0, |x| x.tokens),
        r.rows.first().map_or(0, |x| x.reps),
    );
    s += "| mode | tok/s (median) | min | max | vs full | AAL | eff. density | draft ms/tok | verify ms/tok | other ms/tok |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|\n";
    for x in &r.rows {
        // AAL out of the window's K (adaptive windows: out of their mean K).
        let aal = match (x.aal, x.period, x.mean_period) {
            (Some(a), Some(_), Some(mean)) if x.adaptive => format!("{a:.2}/{mean:.2}"),
            (Some(a), Some(k), _) => format!("{a:.2}/{k}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2}x | {aal} | {:.3} | {:.1} | {:.1} | {:.1} |",
            mode_label(x),
            x.median_tokens_per_s,
            x.min_tokens_per_s,
            x.max_tokens_per_s,
            x.speedup_vs_full,
            x.effective_density,
            x.draft_ms_per_token,
            x.verify_ms_per_token,
            x.other_ms_per_token,
        );
    }
    s
}

/// One line per row, every column named in the header; the run's settings repeated on each
/// line so that files of several runs can be concatenated.
pub fn csv(r: &SweepReport) -> String {
    let mut s = String::from(
        "model,commit,machine,backend,dtype,sparsity,keep,threshold,width,prompt_tokens,mode,\
         period,tokens,reps,median_tokens_per_s,min_tokens_per_s,max_tokens_per_s,\
         speedup_vs_full,aal,mean_period,effective_density,draft_ms_per_token,verify_ms_per_token,\
         other_ms_per_token\n",
    );
    let quote = |v: &str| format!("\"{}\"", v.replace('"', "\"\""));
    for x in &r.rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{},{},{:.4},{:.3},{:.3},{:.3}",
            quote(&r.model),
            quote(&r.commit),
            quote(&r.machine),
            quote(&r.backend),
            r.dtype,
            r.sparsity,
            r.keep,
            r.threshold,
            r.width,
            r.prompt_tokens,
            x.mode,
            period_text(x).unwrap_or_default(),
            x.tokens,
            x.reps,
            x.median_tokens_per_s,
            x.min_tokens_per_s,
            x.max_tokens_per_s,
            x.speedup_vs_full,
            x.aal.map_or(String::new(), |a| format!("{a:.4}")),
            x.mean_period.map_or(String::new(), |k| format!("{k:.4}")),
            x.effective_density,
            x.draft_ms_per_token,
            x.verify_ms_per_token,
            x.other_ms_per_token,
        );
    }
    s
}

/// The commit of the source tree this binary was built from, read when the bench runs
/// (`git describe --always --dirty`; "-dirty": edited since), or "unknown" without one.
fn commit_id() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The CPU model and its logical cores.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} logical cores")
}
