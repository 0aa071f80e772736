//! What the eval tasks share: loading the model, the progress bar, the report header and
//! printing the report.

use std::path::Path;

use serde::Serialize;

use crate::backend::CpuBackend;
use crate::cli::args::at_least_one;
use crate::cli::eval_args::{EvalArgs, GenTaskArgs, ReportFormat};
use crate::cli::output::{print_stdout, write_json};
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::progress::progress_bar;
use crate::sirius::{Period, SiriusConfig};
use crate::sparsity::{SparsityConfig, SparsityMode};

/// Few-shot examples when --shots is not given: GSM8K's usual 8-shot chain of thought. With
/// gsm_symbolic problems that is about 1.5k SmolLM2 tokens, well inside its 8k context.
pub const DEFAULT_SHOTS: usize = 8;

/// Sirius options from the command line, checked without a model.
pub(crate) fn sirius_options(g: &GenTaskArgs) -> Result<SiriusConfig> {
    at_least_one("--max-tokens", g.max_tokens)?;
    at_least_one("--max-problems", g.max_problems)?;
    g.sirius.config_or(Period::of(&SiriusConfig::default()))
}

/// A loaded model and what the report says of it.
pub(crate) struct Loaded {
    pub engine: Engine<CpuBackend>,
    pub threads: usize,
}

/// Loads the model; the sparse FFN is built only when `sparse` (else dense).
pub(crate) fn load(args: &EvalArgs, sparse: bool) -> Result<Loaded> {
    let sparsity = match sparse {
        true => args.sparsity.config()?,
        false => SparsityConfig::dense(),
    };
    let dir = args.model.path()?;
    let backend = CpuBackend::new(args.model.threads()?);
    let threads = backend.threads();
    let config = EngineConfig {
        sparsity,
        offload: None,
        weights: args.model.weights(),
        kv_dtype: args.model.kv_dtype,
    };
    let engine = Engine::load(&dir, backend, &config)?;
    Ok(Loaded { engine, threads })
}

/// The progress bar of `n` generations (hidden with -q).
pub(crate) fn bar(quiet: bool, n: usize) -> indicatif::ProgressBar {
    if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        progress_bar(n as u64, "eval")
    }
}

/// Prints the report (markdown or JSON) and writes `--json`.
pub(crate) fn emit(
    args: &EvalArgs,
    report: &impl Serialize,
    md: impl Fn() -> String,
) -> Result<()> {
    if let Some(path) = &args.json {
        write_json(path, report)?;
    }
    match args.format {
        ReportFormat::Md => print_stdout(&md()),
        ReportFormat::Json => {
            let json = serde_json::to_string_pretty(report)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            print_stdout(&(json + "\n"))
        }
    }
}

/// Settings shared by both reports.
#[derive(Serialize)]
pub(crate) struct Header {
    pub model: String,
    pub backend: String,
    pub dtype: String,
    pub threads: usize,
    pub file: String,
    pub shots: usize,
    pub max_tokens: usize,
    pub sparsity: SparsityMode,
    pub keep: f32,
    pub period: usize,
    /// Windows chose their K up to `period` (`--period auto`).
    pub adaptive: bool,
    pub threshold: f32,
    pub accept_temperature: f32,
    pub width: usize,
}

impl Header {
    pub fn new(l: &Loaded, file: &Path, shots: usize, max_tokens: usize, s: SiriusConfig) -> Self {
        let e = &l.engine;
        Header {
            model: e.path.display().to_string(),
            backend: e.model.backend_description(),
            dtype: e.model.dtype.to_string(),
            threads: l.threads,
            file: file.display().to_string(),
            shots,
            max_tokens,
            sparsity: e.sparsity().mode(),
            keep: e.sparsity().keep(),
            period: s.period,
            adaptive: s.adaptive,
            threshold: s.threshold,
            accept_temperature: s.accept_temperature,
            width: s.width,
        }
    }

    /// The window setting as given: `16`, `auto`, `auto:32`.
    pub fn period_text(&self) -> String {
        match self.adaptive {
            true => crate::sirius::Period::Auto(self.period).to_string(),
            false => self.period.to_string(),
        }
    }

    /// "griffin keep 0.5; Sirius K 16, threshold 0.1, T 0.6, width 1" ("dense" without a
    /// sparse model).
    pub fn settings(&self) -> String {
        if self.sparsity == SparsityMode::None {
            return "dense".into();
        }
        format!(
            "{} keep {}; Sirius K {}, threshold {}, T {}, width {}",
            self.sparsity,
            self.keep,
            self.period_text(),
            self.threshold,
            self.accept_temperature,
            self.width
        )
    }
}
