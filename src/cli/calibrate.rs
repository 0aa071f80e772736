//! `sirius-offload calibrate`: per-layer CATS thresholds from sample text, so that
//! `run --sparsity cats --cats-thresholds FILE` skips neurons by a fixed |SiLU(gate)| cut
//! instead of a per-token top-k (the CATS paper's rule).

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::backend::CpuBackend;
use crate::cli::args::{at_least_one, ModelArgs};
use crate::cli::input::read_text;
use crate::cli::output::{check_output_dir, print_stdout};
use crate::engine::calibrate::calibrate as calibrate_thresholds;
use crate::engine::{Engine, EngineConfig};
use crate::error::Result;
use crate::sparsity::validate_keep;

#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration text (UTF-8), taken raw like a `run` prompt (BOS added as for a prompt).
    #[arg(long)]
    pub text: PathBuf,
    /// Target fraction of FFN neurons kept per layer, in (0, 1].
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    pub keep: f32,
    /// Where to write the thresholds (JSON).
    #[arg(long)]
    pub out: PathBuf,
    /// The text runs as independent sequences of this many tokens (capped at the model's
    /// max_position_embeddings).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Use only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Don't print the table; errors only.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub fn calibrate(args: &CalibrateArgs) -> Result<()> {
    // Option and input errors first: they should not wait for a model load.
    let keep = validate_keep(args.keep)?;
    at_least_one("--seq-len", args.seq_len)?;
    at_least_one("--max-tokens", args.max_tokens)?;
    check_output_dir("--out", Some(&args.out))?;
    let text = read_text("--text", &args.text)?;

    let dir = args.model.path()?;
    let backend = CpuBackend::new(args.model.threads()?);
    let config = EngineConfig {
        weights: args.model.weights(),
        kv_dtype: args.model.kv_dtype,
        ..EngineConfig::dense()
    };
    let engine = Engine::load(&dir, backend, &config)?;
    let mut tokens = engine.encode(&text, None)?;
    if let Some(max) = args.max_tokens {
        tokens.truncate(max);
    }
    tracing::info!(
        tokens = tokens.len(),
        seq_len = args.seq_len,
        keep,
        "calibrating"
    );
    let t0 = std::time::Instant::now();
    let thresholds = calibrate_thresholds(&engine, &tokens, keep, args.seq_len, &args.text)?;
    let seconds = t0.elapsed().as_secs_f64();
    thresholds.save(&args.out)?;
    if !args.quiet {
        let mut table = String::from("| layer | threshold | kept on the text |\n|---|---|---|\n");
        for (li, (t, k)) in thresholds
            .thresholds
            .iter()
            .zip(&thresholds.calibration_kept)
            .enumerate()
        {
            let _ = writeln!(table, "| {li} | {t:.6} | {k:.4} |");
        }
        let n = thresholds.calibration_kept.len().max(1) as f64;
        let mean = thresholds.calibration_kept.iter().sum::<f64>() / n;
        let _ = writeln!(
            table,
            "\nmean kept {mean:.4} (target {keep}) over {} tokens in {seconds:.1} s",
            tokens.len()
        );
        let _ = writeln!(table, "wrote {}", args.out.display());
        print_stdout(&table)?;
    }
    Ok(())
}
