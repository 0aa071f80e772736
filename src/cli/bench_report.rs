//! What `bench --sirius` reports: the sweep's rows with the run's settings, as a markdown
//! table, CSV (the settings on every line) and JSON, with the commit and the machine.

use std::fmt::Write as _;

use serde::Serialize;

use crate::engine::bench_sirius::SweepRow;
use crate::sirius::Period;
use crate::sparsity::SparsityMode;
use crate::units::format_bytes;

/// What `bench --sirius` reports.
#[derive(Serialize)]
pub struct SweepReport {
    pub model: String,
    pub commit: String,
    pub machine: String,
    pub backend: String,
    pub dtype: String,
    pub kv_dtype: String,
    pub sparsity: SparsityMode,
    /// The swept values (one value: a fixed setting); `budgets` empty: in memory.
    pub threads: Vec<usize>,
    pub keeps: Vec<f32>,
    pub budgets: Vec<u64>,
    /// The emulated link of offloaded rows (`None`: memory speed, or a GPU's real link).
    pub link_gbps: Option<f64>,
    /// The memory bandwidth the planner assumed for offloaded rows' predictions.
    pub mem_gbps: Option<f64>,
    /// The arithmetic throughput it assumed (`None`: memory-bound passes).
    pub compute_gflops: Option<f64>,
    pub threshold: f32,
    pub width: usize,
    pub prompt_tokens: usize,
    pub rows: Vec<SweepRow>,
}

impl SweepReport {
    /// Whether the rows ran offloaded.
    pub fn offloaded(&self) -> bool {
        !self.budgets.is_empty()
    }

    /// The settings every row shares, in words (the swept ones are columns).
    pub fn fixed_settings(&self) -> String {
        let mut parts = vec![self.sparsity.to_string()];
        if let [keep] = self.keeps[..] {
            parts.push(format!("keep {keep}"));
        }
        parts.push(format!("threshold {}", self.threshold));
        parts.push(format!("width {}", self.width));
        // 0: a GPU computes (no CPU threads to speak of).
        if let [threads] = self.threads[..] {
            if threads > 0 {
                parts.push(format!("{threads} threads"));
            }
        }
        if let [budget] = self.budgets[..] {
            parts.push(format!("offloaded in {}", format_bytes(budget)));
        }
        if let Some(gbps) = self.link_gbps.filter(|_| self.offloaded()) {
            parts.push(format!("link {gbps} GB/s"));
        }
        if let Some(gbps) = self.mem_gbps.filter(|_| self.offloaded()) {
            parts.push(format!("planner memory bandwidth {gbps} GB/s"));
        }
        if let Some(g) = self.compute_gflops.filter(|_| self.offloaded()) {
            parts.push(format!("planner compute {g} GFLOP/s"));
        }
        parts.join(", ")
    }
}

/// A row's mode as a label (`full`, `sparse`, `sirius K=4`).
pub fn mode_label(r: &SweepRow) -> String {
    match period_text(r) {
        Some(k) => format!("sirius K={k}"),
        None => r.mode.to_string(),
    }
}

/// A Sirius row's window setting as given (`16`, `auto`, `auto:32`).
pub fn period_text(r: &SweepRow) -> Option<String> {
    r.period.map(|k| match r.adaptive {
        true => Period::Auto(k).to_string(),
        false => k.to_string(),
    })
}

/// A table column: its name and a row's value.
type Column = (&'static str, fn(&SweepRow) -> String);

/// The swept settings' columns: those with more than one value.
fn swept_columns(r: &SweepReport) -> Vec<Column> {
    let mut columns: Vec<Column> = Vec::new();
    if r.threads.len() > 1 {
        columns.push(("threads", |x| x.point.threads.to_string()));
    }
    if r.keeps.len() > 1 {
        columns.push(("keep", |x| x.point.keep.to_string()));
    }
    if r.budgets.len() > 1 {
        columns.push(("budget", |x| {
            x.point.budget_bytes.map_or("-".into(), format_bytes)
        }));
    }
    columns
}

fn optional(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.digits$}"))
}

pub fn markdown(r: &SweepReport) -> String {
    let mut s = format!(
        "Sirius sweep of {} ({}, KV {}, {}) on {}, commit {}: {}; prompt {} tokens, {} tokens \
         decoded per run, medians of {} alternated rounds\n\n",
        r.model,
        r.dtype,
        r.kv_dtype,
        r.backend,
        r.machine,
        r.commit,
        r.fixed_settings(),
        r.prompt_tokens,
        r.rows.first().map_or(0, |x| x.tokens),
        r.rows.first().map_or(0, |x| x.reps),
    );
    let swept = swept_columns(r);
    let mut header: Vec<&str> = swept.iter().map(|(name, _)| *name).collect();
    header.extend([
        "mode",
        "tok/s (median)",
        "min",
        "max",
        "vs full",
        "AAL",
        "eff. density",
        "draft ms/tok",
        "verify ms/tok",
        "other ms/tok",
    ]);
    if r.offloaded() {
        header.extend([
            "predicted ms/tok",
            "measured ms/tok",
            "streamed MB/tok (prompt incl.)",
        ]);
    }
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
    for x in &r.rows {
        let mut cells: Vec<String> = swept.iter().map(|(_, value)| value(x)).collect();
        // AAL out of the window's K (adaptive windows: out of their mean K).
        let aal = match (x.aal, x.period, x.mean_period) {
            (Some(a), Some(_), Some(mean)) if x.adaptive => format!("{a:.2}/{mean:.2}"),
            (Some(a), Some(k), _) => format!("{a:.2}/{k}"),
            _ => "-".into(),
        };
        cells.extend([
            mode_label(x),
            format!("{:.2}", x.median_tokens_per_s),
            format!("{:.2}", x.min_tokens_per_s),
            format!("{:.2}", x.max_tokens_per_s),
            format!("{:.2}x", x.speedup_vs_full),
            aal,
            format!("{:.3}", x.effective_density),
            format!("{:.1}", x.draft_ms_per_token),
            format!("{:.1}", x.verify_ms_per_token),
            format!("{:.1}", x.other_ms_per_token),
        ]);
        if r.offloaded() {
            cells.extend([
                optional(x.predicted_ms_per_token, 1),
                optional(x.measured_ms_per_token, 1),
                optional(x.streamed_mb_per_token, 1),
            ]);
        }
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    s
}

/// One line per row, every column named in the header; the run's settings repeated on each
/// line so that files of several runs can be concatenated.
pub fn csv(r: &SweepReport) -> String {
    let mut s = String::from(
        "model,commit,machine,backend,dtype,kv_dtype,sparsity,threads,keep,budget_bytes,\
         link_gbps,mem_gbps,compute_gflops,threshold,width,prompt_tokens,mode,period,tokens,reps,median_tokens_per_s,\
         min_tokens_per_s,max_tokens_per_s,speedup_vs_full,aal,mean_period,effective_density,\
         draft_ms_per_token,verify_ms_per_token,other_ms_per_token,predicted_ms_per_token,\
         measured_ms_per_token,streamed_mb_per_token\n",
    );
    let quote = |v: &str| format!("\"{}\"", v.replace('"', "\"\""));
    let blank =
        |v: Option<f64>, digits: usize| v.map_or(String::new(), |v| format!("{v:.digits$}"));
    // The link and bandwidth of offloaded rows (blank in memory).
    let offloaded = |gbps: Option<f64>| {
        gbps.filter(|_| r.offloaded())
            .map_or(String::new(), |g| g.to_string())
    };
    for x in &r.rows {
        let fields = [
            quote(&r.model),
            quote(&r.commit),
            quote(&r.machine),
            quote(&r.backend),
            r.dtype.clone(),
            r.kv_dtype.clone(),
            r.sparsity.to_string(),
            x.point.threads.to_string(),
            x.point.keep.to_string(),
            x.point
                .budget_bytes
                .map_or(String::new(), |b| b.to_string()),
            offloaded(r.link_gbps),
            offloaded(r.mem_gbps),
            offloaded(r.compute_gflops),
            r.threshold.to_string(),
            r.width.to_string(),
            r.prompt_tokens.to_string(),
            x.mode.to_string(),
            period_text(x).unwrap_or_default(),
            x.tokens.to_string(),
            x.reps.to_string(),
            format!("{:.4}", x.median_tokens_per_s),
            format!("{:.4}", x.min_tokens_per_s),
            format!("{:.4}", x.max_tokens_per_s),
            format!("{:.4}", x.speedup_vs_full),
            blank(x.aal, 4),
            blank(x.mean_period, 4),
            format!("{:.4}", x.effective_density),
            format!("{:.3}", x.draft_ms_per_token),
            format!("{:.3}", x.verify_ms_per_token),
            format!("{:.3}", x.other_ms_per_token),
            blank(x.predicted_ms_per_token, 3),
            blank(x.measured_ms_per_token, 3),
            blank(x.streamed_mb_per_token, 3),
        ];
        let _ = writeln!(s, "{}", fields.join(","));
    }
    s
}

/// The commit of the source tree this binary was built from, read when the bench runs
/// (`git describe --always --dirty`; "-dirty": edited since), or "unknown" without one.
pub fn commit_id() -> String {
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
pub fn machine() -> String {
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
