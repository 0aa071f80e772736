//! `sirius-offload bench`: llama-bench-style throughput of prefill (pp) and decode (tg), so the
//! two can be compared in one run. pp: a batch of N prompt tokens from an empty cache; tg: N
//! single-token forwards starting from an empty cache. Token ids are fixed pseudo-random ids
//! (speed does not depend on them).

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use crate::backend::offload::OffloadBackend;
use crate::backend::CpuBackend;
use crate::cli::args::{at_least_one, ModelArgs, SparsityArgs};
use crate::cli::output::{check_output_dir, print_stdout, write_json};
use crate::cli::run_args::{parse_device, Device};
use crate::engine::bench::{bench as measure, BenchResult, BenchSettings};
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::progress::progress_bar;
use crate::sparsity::{SparsityMode, SparsityReport};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Compute on: cpu, or cuda / cuda:N (a build with --features cuda) [default: cpu; cuda
    /// with --gpu-mem].
    #[arg(long = "device", value_parser = parse_device)]
    pub device_arg: Option<Device>,
    /// Prompt tokens of the prefill test (0 = skip).
    #[arg(long, short = 'p', default_value_t = 128)]
    pub prompt: usize,
    /// Tokens of the decode test (0 = skip). With --sparsity griffin the neurons are chosen
    /// from a dense prefill of the pp test's tokens (128 if --prompt is 0); the reported
    /// kept fractions cover every rep, warm-up included.
    #[arg(long, short = 'n', default_value_t = 64)]
    pub gen: usize,
    /// Repetitions of each test; the median is reported.
    #[arg(long, short = 'r', default_value_t = 5)]
    pub reps: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Sparsity of the decode (tg) test. Griffin picks its neurons from a prefill of the pp
    /// test's tokens (128 if --prompt is 0); pp always runs dense.
    #[command(flatten)]
    pub sparsity: SparsityArgs,
    /// Measure Sirius instead: decode tokens/s of the full model, the sparse model (Griffin
    /// unless --sparsity says otherwise) and Sirius at each --period, on one real prompt,
    /// --gen tokens per run, --reps alternated rounds after a warm-up.
    #[arg(long)]
    pub sirius: bool,
    /// --sirius: windows K to sweep, comma-separated, `auto` (or `auto:MAX`) for adaptive
    /// windows [default: auto; 16 with --width above 1].
    #[arg(long, value_delimiter = ',', value_name = "K,...", requires = "sirius")]
    pub period: Vec<crate::sirius::Period>,
    /// --sirius: acceptance threshold [default: 0.1].
    #[arg(long, value_name = "P", requires = "sirius")]
    pub threshold: Option<f32>,
    /// --sirius: tree width W (1 = the chain).
    #[arg(long, default_value_t = 1, value_name = "W", requires = "sirius")]
    pub width: usize,
    /// --sirius: offload as `run --resident-mem` does, keeping this much memory resident
    /// (a comma-separated list to sweep): the full row is the dense model offloaded, the
    /// Sirius rows draft with Griffin's offloaded runtime (no sparse row); each row shows the
    /// planner's predicted ms/token beside the measured one (with --link-gbps).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "SIZE,...",
        requires = "sirius"
    )]
    pub resident_mem: Vec<String>,
    /// --sirius on a GPU (implies --device cuda): offload within this much GPU memory (a list to sweep), as
    /// `run --gpu-mem`.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "SIZE,...",
        requires = "sirius"
    )]
    pub gpu_mem: Vec<String>,
    /// With --resident-mem: cap the copy engine at this many GB/s, emulating a PCIe link;
    /// with --gpu-mem: the link speed the planner assumes (as `run`).
    #[arg(long, value_name = "GB/s", requires = "sirius")]
    pub link_gbps: Option<f64>,
    /// With --resident-mem / --gpu-mem: the memory bandwidth the planner assumes for compute
    /// (as `run`).
    #[arg(long, value_name = "GB/s", requires = "sirius")]
    pub mem_gbps: Option<f64>,
    /// With --resident-mem / --gpu-mem: the arithmetic throughput the planner assumes (as
    /// `run`).
    #[arg(long, value_name = "GFLOP/s", requires = "sirius")]
    pub compute_gflops: Option<f64>,
    /// --sirius: the prompt, from this text file [default: a built-in paragraph].
    #[arg(long, value_name = "FILE", requires = "sirius")]
    pub prompt_file: Option<PathBuf>,
    /// --sirius: also write the table as CSV (the commit and machine on every line).
    #[arg(long, value_name = "OUT.csv", requires = "sirius")]
    pub csv: Option<PathBuf>,
    /// --sirius: draw tokens/s, acceptance and the per-token time breakdown against the
    /// swept option (the window K, or the one of --keep, --threads, --resident-mem /
    /// --gpu-mem given as a list) into this SVG file.
    #[arg(long, value_name = "OUT.svg", requires = "sirius")]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    model: String,
    backend: String,
    dtype: String,
    weight_bytes: usize,
    /// Weight bytes a decode step reads: the dense figure minus the FFN bytes sparsity skips
    /// (an untied embedding table is not counted: a step reads one row of it).
    decode_weight_bytes_per_token: f64,
    #[serde(flatten)]
    sparsity: SparsityReport,
    results: Vec<BenchResult>,
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    at_least_one("--reps", args.reps)?;
    if args.sirius {
        return crate::cli::bench_sirius::bench_sirius(args);
    }
    if args.prompt == 0 && args.gen == 0 {
        return Err(Error::InvalidArgument(
            "nothing to measure: --prompt and --gen are both 0".into(),
        ));
    }
    check_output_dir("--json", args.json.as_deref())?;
    let config = EngineConfig {
        sparsity: args.sparsity.config()?,
        offload: None,
        weights: args.model.weights(),
        kv_dtype: args.model.kv_dtype,
    };
    check_threads_for_device(args)?;
    let threads = args.model.threads()?;
    let dir = args.model.path()?;
    match args.device() {
        Device::Cpu => bench_on(
            args,
            Engine::load(&dir, CpuBackend::new(threads), &config)?,
            &dir,
        ),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let backend = crate::backend::cuda::CudaBackend::new(ordinal)?;
            bench_on(args, Engine::load(&dir, backend, &config)?, &dir)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(crate::cli::run_args::built_without_cuda("bench")),
    }
}

/// `--threads` only with the CPU: a GPU computes there (0, the default, is no choice).
impl BenchArgs {
    /// `--device`, or CUDA when `--gpu-mem` is given without it (as `run` does).
    pub fn device(&self) -> Device {
        self.device_arg.unwrap_or(match self.gpu_mem.is_empty() {
            true => Device::Cpu,
            false => Device::Cuda(0),
        })
    }
}

pub fn check_threads_for_device(args: &BenchArgs) -> Result<()> {
    match (args.device(), &args.model.threads[..]) {
        (Device::Cpu, _) | (_, [0]) => Ok(()),
        _ => Err(Error::InvalidArgument(
            "--threads sets CPU compute threads: drop it with --device cuda".into(),
        )),
    }
}

/// pp and tg on a loaded engine.
fn bench_on<B: OffloadBackend>(args: &BenchArgs, engine: Engine<B>, dir: &Path) -> Result<()> {
    let settings = BenchSettings {
        prompt: args.prompt,
        gen: args.gen,
        reps: args.reps,
    };
    let tests = usize::from(args.prompt > 0) + usize::from(args.gen > 0);
    let bar = progress_bar((tests * (args.reps + 1)) as u64, "bench");
    let (results, sparsity_report) = measure(&engine, settings, &mut || bar.inc(1))?;
    bar.finish_and_clear();
    let model = &engine.model;
    let report = BenchReport {
        decode_weight_bytes_per_token: decode_bytes_per_token(&engine, &sparsity_report),
        sparsity: sparsity_report,
        model: dir.display().to_string(),
        backend: model.backend_description(),
        dtype: model.dtype.to_string(),
        weight_bytes: model.weight_bytes(),
        results,
    };
    let mut table = String::from("| model | backend | dtype | sparsity | test | t/s (median) | min | max |\n|---|---|---|---|---|---|---|---|\n");
    for r in &report.results {
        let sparse = match (&report.sparsity.sparsity, r.test.starts_with("tg")) {
            (SparsityMode::None, _) | (_, false) => "none".to_string(),
            (mode, true) => format!(
                "{mode} {} (density {:.3})",
                report.sparsity.keep, report.sparsity.density
            ),
        };
        table += &format!(
            "| {} | {} | {} | {sparse} | {} | {:.2} | {:.2} | {:.2} |\n",
            args.model.model,
            report.backend,
            report.dtype,
            r.test,
            r.median_tokens_per_s,
            r.min_tokens_per_s,
            r.max_tokens_per_s
        );
    }
    print_stdout(&table)?;
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    Ok(())
}

/// Weight bytes one decode step reads: everything but an untied embedding table (one row of
/// it is read), minus the FFN bytes the sparse steps skipped on average.
fn decode_bytes_per_token<B: OffloadBackend>(engine: &Engine<B>, report: &SparsityReport) -> f64 {
    let model = &engine.model;
    let c = &model.config;
    let esz = model.dtype.size() as f64;
    let embed = if c.tie_word_embeddings {
        0.0
    } else {
        (c.vocab_size * c.hidden_size) as f64 * esz
    };
    let skipped_params = (1.0 - report.density) * c.parameter_count() as f64;
    model.weight_bytes() as f64 - embed - skipped_params * esz
}
