//! `eval --perplexity FILE`: perplexity of one or more sparsity modes over the same windows
//! of a text (`engine::perplexity` defines it).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::cli::args::{at_least_one, SparsityArgs};
use crate::cli::eval_args::EvalArgs;
use crate::cli::eval_common::{bar, emit, load};
use crate::cli::input::read_text;
use crate::cli::output::check_output_dir;
use crate::engine::perplexity::{perplexity, PerplexityResult, Windows};
use crate::error::{Error, Result};
use crate::model::Tokenizer;
use crate::sparsity::{validate_keep, SparsityConfig, SparsityMode};

#[derive(Serialize)]
struct PerplexityReport<'a> {
    task: &'static str,
    model: String,
    backend: String,
    dtype: String,
    threads: usize,
    text: String,
    text_tokens: usize,
    /// Tokens the tokenizer puts before a text (BOS), at the start of every window.
    lead_tokens: usize,
    window: usize,
    prefix: usize,
    windows: usize,
    results: &'a [PerplexityResult],
}

/// `eval --perplexity FILE`.
pub fn eval_perplexity(args: &EvalArgs, text_path: &Path) -> Result<()> {
    let specs = sparsity_specs(args)?;
    check_output_dir("--json", args.json.as_deref())?;
    at_least_one("--max-windows", args.max_windows)?;
    let geometry = Windows {
        window: args.window,
        prefix: args.prefix,
    };
    // The geometry checks that need no model come before the load.
    geometry.validate(0, usize::MAX)?;
    let text = read_text("--perplexity", text_path)?;

    let mut l = load(args, false)?;
    let (tokens, lead) = text_tokens(&l.engine.tokenizer, &text)?;
    geometry.validate(lead.len(), l.engine.context())?;
    let body = geometry.body(lead.len());
    let available = tokens.len() / body;
    if available == 0 {
        return Err(Error::InvalidArgument(format!(
            "--perplexity {}: {} tokens, fewer than one window of {body} text tokens (--window {})",
            text_path.display(),
            tokens.len(),
            args.window
        )));
    }
    let n_windows = args.max_windows.map_or(available, |m| m.min(available));
    tracing::info!(
        text_tokens = tokens.len(),
        lead = lead.len(),
        windows = n_windows,
        "perplexity"
    );
    let bar = bar(args.quiet, n_windows * specs.len());
    let mut results = Vec::with_capacity(specs.len());
    for spec in &specs {
        bar.set_message(spec.mode.to_string());
        // One mode at a time: its bundles are built once and dropped before the next mode's.
        l.engine.set_sparsity(spec)?;
        let result = perplexity(&l.engine, &lead, &tokens, geometry, n_windows, &mut || {
            bar.inc(1)
        })?;
        tracing::info!(mode = %result.sparsity, keep = result.keep, perplexity = result.perplexity, seconds = result.seconds, "done");
        results.push(result);
    }
    bar.finish_and_clear();
    let report = PerplexityReport {
        task: "perplexity",
        model: l.engine.path.display().to_string(),
        backend: l.engine.model.backend_description(),
        dtype: l.engine.model.dtype.to_string(),
        threads: l.threads,
        text: text_path.display().to_string(),
        text_tokens: tokens.len(),
        lead_tokens: lead.len(),
        window: args.window,
        prefix: args.prefix,
        windows: n_windows,
        results: &results,
    };
    emit(args, &report, || markdown(&report))
}

/// The text's tokens, and what the tokenizer adds in front of a prompt (BOS): every window
/// starts with it, so each window reads like a document start rather than a cut in
/// mid-text.
fn text_tokens(tokenizer: &Tokenizer, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let tokens = tokenizer.encode(text, false)?;
    let with_special = tokenizer.encode(text, true)?;
    let lead = match with_special.strip_suffix(tokens.as_slice()) {
        Some(lead) => lead.to_vec(),
        None => Vec::new(),
    };
    Ok((tokens, lead))
}

/// The modes to run, each as the sparsity it stands for; checked without a model.
fn sparsity_specs(args: &EvalArgs) -> Result<Vec<SparsityConfig>> {
    let base = &args.sparsity;
    if args.compare.is_empty() {
        return Ok(vec![base.config()?]);
    }
    let base_keep = base.keep()?;
    validate_keep(base_keep)?;
    let thresholds = base.cats_thresholds.as_ref();
    if thresholds.is_some() && !args.compare.iter().any(|s| s.mode == SparsityMode::Cats) {
        return Err(Error::InvalidArgument(
            "--cats-thresholds needs cats in --compare".into(),
        ));
    }
    args.compare
        .iter()
        .map(|spec| {
            let cats = spec.mode == SparsityMode::Cats;
            if cats && thresholds.is_some() && spec.keep.is_some() {
                return Err(Error::InvalidArgument(
                    "--compare cats:KEEP and --cats-thresholds both set the CATS neurons: give one"
                        .into(),
                ));
            }
            if spec.mode == SparsityMode::None && spec.keep.is_some() {
                return Err(Error::InvalidArgument(
                    "--compare none:KEEP: dense keeps every neuron, drop the :KEEP".into(),
                ));
            }
            SparsityArgs {
                sparsity: Some(spec.mode),
                keep: vec![spec.keep.unwrap_or(base_keep)],
                cats_thresholds: if cats { thresholds.cloned() } else { None },
                griffin_down: base.griffin_down,
            }
            .config()
        })
        .collect()
}

fn markdown(r: &PerplexityReport) -> String {
    let mut s = format!(
        "perplexity of {} on {} ({} tokens; {} windows of {} tokens, {} dense prompt + {} scored each; {} threads)\n\n",
        r.model,
        r.text,
        r.text_tokens,
        r.windows,
        r.window,
        r.prefix,
        r.window - r.prefix,
        r.threads
    );
    s += "| sparsity | keep | density | perplexity | mean NLL | tokens scored | windows | seconds | tok/s |\n";
    s += "|---|---|---|---|---|---|---|---|---|\n";
    for x in r.results {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.4} | {:.5} | {} | {} | {:.1} | {:.0} |",
            x.sparsity,
            x.keep,
            x.density,
            x.perplexity,
            x.mean_nll,
            x.tokens_scored,
            x.windows,
            x.seconds,
            x.tokens_per_s
        );
    }
    s
}
