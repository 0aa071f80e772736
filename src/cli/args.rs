//! Option groups that several subcommands share, each parsed once into the library's typed
//! configuration (`SparsityConfig`, `SiriusConfig`), with the checks that need no model.

use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
use crate::model::WeightsChoice;
use crate::sirius::{Period, SiriusConfig};
use crate::sparsity::{validate_keep, SparsityConfig, SparsityMode};
use crate::tensor::{DType, KvDType};

/// The model a subcommand loads, and the CPU threads it computes with.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model directory (HF layout), GGUF file, or preset name (see configs/models), e.g. smollm2-135m.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Don't fetch a preset's weights automatically when they are missing.
    #[arg(long)]
    pub no_fetch: bool,
    /// Compute threads (0 = one per core); `bench --sirius` takes a comma-separated list to
    /// sweep.
    #[arg(long, short = 't', default_values_t = [0usize], value_delimiter = ',', value_name = "N")]
    pub threads: Vec<usize>,
    /// How the weight matrices are kept: as stored (a GGUF's quantized blocks computed on
    /// directly; with CATS or offloading, bf16), or converted at load: to a float type, or
    /// quantized to q8_0 / q4_0 (any model, e.g. a bf16 checkpoint).
    #[arg(long, default_value = "auto")]
    pub weights: WeightsArg,
    /// How the KV cache stores keys and values: f16 (half the memory, and half the bytes
    /// attention reads per token) or f32 (as computed).
    #[arg(long, default_value = "f16")]
    pub kv_dtype: KvDType,
    /// Read every weight before loading and refuse a NaN or infinity, naming the tensor (norms
    /// and biases are always checked; this scans the large matrices too: seconds per GB).
    #[arg(long)]
    pub check_weights: bool,
}

/// `--weights` of run, bench, eval and calibrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsArg {
    Auto,
    Bf16,
    F16,
    F32,
    #[value(name = "q8_0", alias = "q8")]
    Q8_0,
    #[value(name = "q4_0", alias = "q4")]
    Q4_0,
}

impl ModelArgs {
    /// The one `--threads` count (a list is refused: only `bench --sirius` sweeps one).
    pub fn threads(&self) -> Result<usize> {
        self.check_threads()?;
        single("--threads", &self.threads)
    }

    /// Every `--threads` value within what this machine can run (each thread is a spinning
    /// worker with its own stack: tens of thousands exhaust memory before any work).
    pub fn check_threads(&self) -> Result<()> {
        use crate::backend::{max_threads, MAX_THREADS_PER_CORE};
        match self.threads.iter().find(|&&t| t > max_threads()) {
            Some(t) => Err(Error::InvalidArgument(format!(
                "--threads {t} is more than this machine can use: give at most {} \
                 ({MAX_THREADS_PER_CORE} per core), or 0 for one per core",
                max_threads()
            ))),
            None => Ok(()),
        }
    }

    /// The model's directory or GGUF file (a missing preset fetched unless --no-fetch), its
    /// weights scanned first with --check-weights.
    pub fn path(&self) -> Result<PathBuf> {
        let path = crate::cli::fetch::model_dir_or_fetch(&self.model, !self.no_fetch)?;
        if self.check_weights {
            let (_, store) = crate::model::ModelFiles::open_model(&path, WeightsChoice::AsStored)?;
            let show = std::io::IsTerminal::is_terminal(&std::io::stderr());
            crate::model::weight_checks::scan_finite(&store, show)?;
        }
        Ok(path)
    }

    /// The library's choice for `--weights`.
    pub fn weights(&self) -> WeightsChoice {
        match self.weights {
            WeightsArg::Auto => WeightsChoice::AsStored,
            WeightsArg::Bf16 => WeightsChoice::Convert(DType::BF16),
            WeightsArg::F16 => WeightsChoice::Convert(DType::F16),
            WeightsArg::F32 => WeightsChoice::Convert(DType::F32),
            WeightsArg::Q8_0 => WeightsChoice::Convert(DType::Q8_0),
            WeightsArg::Q4_0 => WeightsChoice::Convert(DType::Q4_0),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct SparsityArgs {
    /// FFN sparsity of the decode steps: none, griffin (neurons chosen once from the prompt)
    /// or cats (chosen per token from |SiLU(gate)|). The prompt always runs dense [default:
    /// none; griffin for an offloaded run (--resident-mem, --gpu-mem)].
    #[arg(long)]
    pub sparsity: Option<SparsityMode>,
    /// Fraction of FFN neurons kept, in (0, 1]; `bench --sirius` takes a comma-separated
    /// list to sweep.
    #[arg(long, default_values_t = [DEFAULT_KEEP], value_delimiter = ',', allow_negative_numbers = true,
          value_name = "FRACTION")]
    pub keep: Vec<f32>,
    /// CATS per-layer thresholds from `sirius-offload calibrate`, instead of per-token top-k.
    #[arg(long)]
    pub cats_thresholds: Option<PathBuf>,
    /// Griffin on quantized weights: the format of the compact down matrix gathered per
    /// request (a neuron's down column is split across blocks in GGUF files, so it is
    /// re-encoded): q8_0 (1.06 bytes/weight), q4_0 (0.56: smallest, re-quantized twice), bf16,
    /// f16 or f32 (exact, 4 bytes/weight).
    #[arg(long, default_value = "q8_0")]
    pub griffin_down: GriffinDownArg,
}

/// `--griffin-down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GriffinDownArg {
    #[value(name = "q8_0", alias = "q8")]
    Q8_0,
    #[value(name = "q4_0", alias = "q4")]
    Q4_0,
    Bf16,
    F16,
    F32,
}

impl GriffinDownArg {
    pub(crate) fn dtype(self) -> DType {
        match self {
            GriffinDownArg::Q8_0 => DType::Q8_0,
            GriffinDownArg::Q4_0 => DType::Q4_0,
            GriffinDownArg::Bf16 => DType::BF16,
            GriffinDownArg::F16 => DType::F16,
            GriffinDownArg::F32 => DType::F32,
        }
    }
}

/// `--keep`'s default (a warning only fires when the user chose another value).
const DEFAULT_KEEP: f32 = 0.5;

/// A `--link-gbps` / `--mem-gbps` / `--compute-gflops` value within the range the planner
/// models.
pub fn check_gbps(option: &str, value: Option<f64>) -> Result<()> {
    use crate::offload::placement::{MAX_GBPS, MIN_GBPS};
    let unit = match option {
        "--compute-gflops" => "GFLOP/s",
        _ => "GB/s",
    };
    match value.filter(|v| !(v.is_finite() && (MIN_GBPS..=MAX_GBPS).contains(v))) {
        Some(v) => Err(Error::InvalidArgument(format!(
            "{option} must be between {MIN_GBPS} and {MAX_GBPS} {unit}, got {}",
            crate::units::format_number(v)
        ))),
        None => Ok(()),
    }
}

/// The one value of a list option outside the sweeps of `bench --sirius`.
pub fn single<T: Copy + std::fmt::Display>(option: &str, values: &[T]) -> Result<T> {
    match values {
        [one] => Ok(*one),
        [] => Err(Error::InvalidArgument(format!("{option} needs a value"))),
        many => Err(Error::InvalidArgument(format!(
            "{option} takes one value here, got {}: only `bench --sirius` sweeps a list",
            many.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ))),
    }
}

impl SparsityArgs {
    /// `--sparsity`, none when not given.
    pub fn mode(&self) -> SparsityMode {
        self.sparsity.unwrap_or(SparsityMode::None)
    }

    /// The one `--keep` (a list is refused: only `bench --sirius` sweeps one).
    pub fn keep(&self) -> Result<f32> {
        single("--keep", &self.keep)
    }

    /// The typed configuration, checked as far as it can be without a model.
    pub fn config(&self) -> Result<SparsityConfig> {
        self.config_at(self.keep()?)
    }

    /// The typed configuration with `keep` instead of `--keep` (a point of a sweep).
    pub fn config_at(&self, keep: f32) -> Result<SparsityConfig> {
        self.config_as(self.mode(), keep)
    }

    /// The typed configuration of `mode` (a default the caller resolved) at `keep`.
    pub fn config_as(&self, mode: SparsityMode, keep: f32) -> Result<SparsityConfig> {
        validate_keep(keep)?;
        if let Some(path) = &self.cats_thresholds {
            if mode != SparsityMode::Cats {
                return Err(Error::InvalidArgument(
                    "--cats-thresholds needs --sparsity cats".into(),
                ));
            }
            if !path.exists() {
                return Err(Error::InvalidArgument(format!(
                    "--cats-thresholds {}: no such file",
                    path.display()
                )));
            }
            if !path.is_file() {
                return Err(Error::InvalidArgument(format!(
                    "--cats-thresholds {}: not a file",
                    path.display()
                )));
            }
            if keep != DEFAULT_KEEP {
                tracing::warn!(
                    "--keep {} ignored for CATS: the thresholds say what is kept (reported per layer)",
                    keep
                );
            }
        }
        if mode == SparsityMode::None && keep != DEFAULT_KEEP {
            tracing::warn!(
                "--keep {} has no effect without --sparsity griffin|cats",
                keep
            );
        }
        let config = SparsityConfig {
            mode,
            keep,
            cats_thresholds: self.cats_thresholds.clone(),
            griffin_down: self.griffin_down.dtype(),
        };
        config.validate()?;
        Ok(config)
    }
}

/// The corrector's settings; the defaults are the paper's ([`SiriusConfig::default`]).
#[derive(Debug, Clone, Args)]
pub struct SiriusArgs {
    /// Sirius window K: K - 1 drafted tokens per verification; `auto` (or `auto:MAX`)
    /// chooses each window's K up to 16 (MAX) from the measured acceptance rate and draft and
    /// verification costs (K = 1, the full model alone, where drafting does not pay), so the
    /// text can differ between runs: give a number for reproducible output [default: auto
    /// with --width 1, 16 with a tree; eval: 16].
    #[arg(long, value_name = "K|auto")]
    pub period: Option<Period>,
    /// Sirius acceptance threshold on the full model's probability of a drafted token
    /// [default: 0.1].
    #[arg(long, allow_negative_numbers = true, value_name = "P")]
    pub threshold: Option<f32>,
    /// Temperature of that probability [default: 0.6].
    #[arg(long, allow_negative_numbers = true, value_name = "T")]
    pub accept_temperature: Option<f32>,
    /// Sirius tree width W: 1 is the chain; W > 1 drafts W beams and verifies them as one
    /// tree of (K - 1) * W + 1 tokens [default: 1].
    #[arg(long, value_name = "W")]
    pub width: Option<usize>,
}

impl SiriusArgs {
    /// The typed configuration, validated; without --period, [`default_period`].
    pub fn config(&self) -> Result<SiriusConfig> {
        let width = self.width.unwrap_or(SiriusConfig::default().width);
        self.config_or(default_period(width))
    }

    /// The typed configuration, validated; without --period, `default`. (`eval` keeps the
    /// paper's fixed K: its accuracy and faithfulness numbers must not follow timing, and
    /// adaptive windows on a CPU would mostly measure the full model.)
    pub fn config_or(&self, default: Period) -> Result<SiriusConfig> {
        let d = SiriusConfig::default();
        let width = self.width.unwrap_or(d.width);
        let config = self.period.unwrap_or(default).apply(SiriusConfig {
            threshold: self.threshold.unwrap_or(d.threshold),
            accept_temperature: self.accept_temperature.unwrap_or(d.accept_temperature),
            width,
            ..d
        });
        config.validate()?;
        Ok(config)
    }

    /// The first option given, if any (for "needs --sirius" errors).
    pub fn first_given(&self) -> Option<&'static str> {
        [
            ("--period", self.period.is_some()),
            ("--threshold", self.threshold.is_some()),
            ("--accept-temperature", self.accept_temperature.is_some()),
            ("--width", self.width.is_some()),
        ]
        .into_iter()
        .find(|(_, given)| *given)
        .map(|(name, _)| name)
    }
}

/// The window when `--period` is not given: adaptive windows of at most the paper's K for
/// the chain (they measure which K pays on this machine: on a CPU whose verification of K
/// tokens costs nearly K steps, short windows or none; where a verification costs about one
/// step, long ones; see BENCHMARKS.md, "Adaptive windows"), the paper's K for a tree.
pub fn default_period(width: usize) -> Period {
    let paper = SiriusConfig::default().period;
    match width {
        0 | 1 => Period::Auto(paper),
        _ => Period::Fixed(paper),
    }
}

/// `Err` naming `flag` when a count option that must be at least 1 is 0 (`None`: not given).
pub(crate) fn at_least_one(flag: &str, value: impl Into<Option<usize>>) -> Result<()> {
    if value.into() == Some(0) {
        return Err(Error::InvalidArgument(format!("{flag} must be at least 1")));
    }
    Ok(())
}
