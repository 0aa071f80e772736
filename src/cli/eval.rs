//! `sirius-offload eval`: what FFN sparsity costs in quality. One task per invocation, chosen
//! by its option: `--perplexity FILE` (here; see `engine::perplexity` for the definition),
//! `--data FILE.jsonl` (GSM accuracy, `cli::eval_gsm`) or `--faithfulness FILE`
//! (`cli::eval_faithfulness`). Every task runs its modes over the same data in one process,
//! so the rows of one table come from one run.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{ArgGroup, Args, ValueEnum};
use serde::Serialize;

use crate::backend::CpuBackend;
use crate::cli::eval_faithfulness::eval_faithfulness;
use crate::cli::eval_gsm::{eval_data, GenTaskArgs, GEN_ONLY, PPL_ONLY};
use crate::cli::fetch::model_dir_or_fetch;
use crate::cli::input::{load_tokenizer, read_text};
use crate::cli::output::{check_output_dir, print_stdout, write_json};
use crate::cli::sparsity_args::SparsityArgs;
use crate::engine::perplexity::{perplexity, PerplexityResult, Windows};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::progress::progress_bar;
use crate::sparsity::{validate_keep, SparsityMode};

/// The long help of `eval`: what each task measures, exactly.
pub const EVAL_HELP: &str = "\
Perplexity (--perplexity FILE): the text is tokenized once (with the BOS a prompt gets, if the
tokenizer adds one, put at the start of every window) and cut into non-overlapping windows of
--window tokens; text left over after the last whole window is not used. In each window the
first --prefix tokens run through the dense model as a prompt (Griffin chooses its neurons
there), and the remaining tokens are scored with teacher forcing by the sparse model in one
batched forward pass. Token number --prefix is predicted by the dense prompt's last logits and
every later token by the sparse pass, so every mode scores exactly the same tokens.
perplexity = exp(mean negative log-likelihood over all scored tokens). density = parameters
read per sparse token / all parameters.

GSM accuracy (--data FILE.jsonl): one {\"question\": ..., \"answer\": ...} object per line, the
answer a GSM8K solution ending in \"#### N\" (or just the number); tools/gsm-data writes such a
file. The first --shots items (default 8) are few-shot examples and are not scored; at most
--max-problems of the rest are. Prompt: each example as \"Question: Q\\nAnswer: A\\n\\n\", then
\"Question: Q\\nAnswer:\". Each --mode (full, sparse, sirius; comma-separated, default all three
with --sparsity griffin|cats) answers every problem greedily, at most --max-tokens tokens,
stopping at EOS, at \"\\nQuestion:\" or once a \"#### N\" line is complete (Sirius: at the
verification boundary after it). The predicted number is the first one after \"####\", else the
last number of the text; numbers compare after dropping \"$\" and thousands commas and trailing
fraction zeros (12.0 = 12). Per mode: accuracy, mean generated tokens, AAL (Sirius), effective
density (full 1, sparse its density, Sirius ((K-1)*density+1)/AAL) and decode tokens/s
(tokens after each answer's first / decode seconds).

Faithfulness (--faithfulness FILE): JSONL (when the first non-blank line starts with \"{\") with a
\"question\" per line (wrapped in the few-shot prompt above, the first --shots items, which need
an \"answer\", being the examples: a --data file works as is) or a \"prompt\" per line (used as
is), or else plain text with one prompt per line (used as is; no shots). For each
prompt the full model, the sparse model and Sirius generate exactly --max-tokens tokens
greedily, EOS and stop strings ignored; the report gives the common token prefix of sparse vs
full and of Sirius vs full per prompt, their means, the ratio of the means and Sirius's AAL.

Examples:
  sirius-offload eval -m smollm2-135m --perplexity text.txt --sparsity griffin --keep 0.5
  sirius-offload eval -m smollm2-135m --perplexity text.txt --compare none,griffin,cats:0.3
  sirius-offload eval -m smollm2-135m --data \"$(tools/gsm-data)\" --mode full,sparse,sirius \\
      --sparsity griffin --keep 0.5 --max-problems 20
  sirius-offload eval -m smollm2-135m --faithfulness \"$(tools/gsm-data)\" --max-problems 20 \\
      --max-tokens 128 --sparsity griffin --keep 0.5 --period 16 --threshold 0.1";

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("task").required(true).args(["perplexity", "data", "faithfulness"])))]
pub struct EvalArgs {
    /// Model directory (HF layout) or preset name (see configs/models), e.g. smollm2-135m.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Don't fetch a preset's weights automatically when they are missing.
    #[arg(long)]
    pub no_fetch: bool,
    /// Perplexity of this UTF-8 text file (see below).
    #[arg(long, value_name = "FILE", conflicts_with_all = GEN_ONLY)]
    pub perplexity: Option<PathBuf>,
    /// GSM accuracy over the problems of this JSONL file (see below; tools/gsm-data).
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = PPL_ONLY)]
    pub data: Option<PathBuf>,
    /// Common prefix of sparse and Sirius greedy outputs with the full model's, per prompt of
    /// this file (see below).
    #[arg(long, value_name = "FILE", conflicts_with_all = PPL_ONLY, conflicts_with = "mode")]
    pub faithfulness: Option<PathBuf>,
    /// Tokens per window (prompt and scored tokens together).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Tokens of each window that run dense as the prompt; the rest are scored.
    #[arg(long, default_value_t = 128)]
    pub prefix: usize,
    /// Use at most N windows (from the start of the text).
    #[arg(long, value_name = "N")]
    pub max_windows: Option<usize>,
    #[command(flatten)]
    pub sparsity: SparsityArgs,
    /// Run several modes over the same windows, e.g. none,griffin,cats or griffin:0.3,cats:0.3
    /// (MODE:KEEP overrides --keep for that entry; with --cats-thresholds, cats uses them).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "sparsity",
        value_name = "MODE[:KEEP],..."
    )]
    pub compare: Vec<ModeSpec>,
    #[command(flatten)]
    pub gen: GenTaskArgs,
    /// Compute threads (0 = one per core).
    #[arg(long, short = 't', default_value_t = 0)]
    pub threads: usize,
    /// What to print on stdout: a markdown table or the JSON report.
    #[arg(long, value_enum, default_value_t = ReportFormat::Md)]
    pub format: ReportFormat,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Md,
    Json,
}

/// One entry of `--compare`: a mode and, optionally, its own keep fraction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModeSpec {
    pub mode: SparsityMode,
    pub keep: Option<f32>,
}

impl FromStr for ModeSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (mode, keep) = match s.split_once(':') {
            Some((mode, keep)) => {
                let k: f32 = keep.trim().parse().map_err(|_| {
                    Error::InvalidArgument(format!("--compare {s}: `{keep}` is not a number"))
                })?;
                (mode, Some(k))
            }
            None => (s, None),
        };
        Ok(ModeSpec {
            mode: mode.trim().parse()?,
            keep,
        })
    }
}

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

pub fn eval(args: &EvalArgs) -> Result<()> {
    if let Some(path) = &args.data {
        return eval_data(args, path);
    }
    if let Some(path) = &args.faithfulness {
        return eval_faithfulness(args, path);
    }
    let specs = sparsity_specs(args)?;
    check_output_dir("--json", args.json.as_deref())?;
    if args.max_windows == Some(0) {
        return Err(Error::InvalidArgument(
            "--max-windows must be at least 1".into(),
        ));
    }
    let Some(text_path) = &args.perplexity else {
        return Err(Error::InvalidArgument(
            "give a task: --perplexity FILE, --data FILE.jsonl or --faithfulness FILE".into(),
        ));
    };
    // The geometry checks that need no model come before the load.
    Windows {
        window: args.window,
        prefix: args.prefix,
    }
    .validate(0, usize::MAX)?;
    let text = read_text("--perplexity", text_path)?;

    let dir = model_dir_or_fetch(&args.model, !args.no_fetch)?;
    let backend = CpuBackend::new(args.threads);
    let threads = backend.threads();
    let model = Llama::load(&dir, backend)?;
    let tokenizer = load_tokenizer(&dir, model.config.vocab_size)?;
    let tokens = tokenizer.encode(&text, false)?;
    // What the tokenizer adds in front of a prompt (BOS): every window starts with it, so
    // each window reads like a document start rather than a cut in mid-text.
    let with_special = tokenizer.encode(&text, true)?;
    let lead: Vec<u32> = match with_special.strip_suffix(tokens.as_slice()) {
        Some(lead) => lead.to_vec(),
        None => Vec::new(),
    };
    let geometry = Windows {
        window: args.window,
        prefix: args.prefix,
    };
    geometry.validate(lead.len(), context(&model))?;
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

    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        progress_bar((n_windows * specs.len()) as u64, "eval")
    };
    let mut results = Vec::with_capacity(specs.len());
    for spec in &specs {
        bar.set_message(spec.sparsity.to_string());
        // One mode at a time: its bundles are built once and dropped before the next mode's.
        let sparsity = spec.build(&model)?;
        let result = perplexity(
            &model,
            &sparsity,
            &lead,
            &tokens,
            geometry,
            n_windows,
            &mut || bar.inc(1),
        )?;
        tracing::info!(mode = %result.sparsity, keep = result.keep, perplexity = result.perplexity, seconds = result.seconds, "done");
        results.push(result);
    }
    bar.finish_and_clear();

    let report = PerplexityReport {
        task: "perplexity",
        model: dir.display().to_string(),
        backend: model.backend_description(),
        dtype: model.dtype.to_string(),
        threads,
        text: text_path.display().to_string(),
        text_tokens: tokens.len(),
        lead_tokens: lead.len(),
        window: args.window,
        prefix: args.prefix,
        windows: n_windows,
        results: &results,
    };
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    match args.format {
        ReportFormat::Md => print_stdout(&markdown(&report)),
        ReportFormat::Json => {
            let json = serde_json::to_string_pretty(&report)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            print_stdout(&(json + "\n"))
        }
    }
}

/// The modes to run, each as the sparsity options it stands for; checked without a model.
fn sparsity_specs(args: &EvalArgs) -> Result<Vec<SparsityArgs>> {
    let base = &args.sparsity;
    if args.compare.is_empty() {
        base.validate()?;
        return Ok(vec![base.clone()]);
    }
    validate_keep(base.keep)?;
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
            let s = SparsityArgs {
                sparsity: spec.mode,
                keep: spec.keep.unwrap_or(base.keep),
                cats_thresholds: if cats { thresholds.cloned() } else { None },
            };
            s.validate()?;
            Ok(s)
        })
        .collect()
}

/// The context a window may fill: the position limit and any sliding window.
fn context(model: &Llama<CpuBackend>) -> usize {
    let c = &model.config;
    c.sliding_window.map_or(c.max_position_embeddings, |w| {
        w.min(c.max_position_embeddings)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_entries_parse() {
        assert_eq!(
            "griffin".parse::<ModeSpec>().unwrap(),
            ModeSpec {
                mode: SparsityMode::Griffin,
                keep: None
            }
        );
        assert_eq!(
            "cats:0.3".parse::<ModeSpec>().unwrap(),
            ModeSpec {
                mode: SparsityMode::Cats,
                keep: Some(0.3)
            }
        );
        assert!("cats:x".parse::<ModeSpec>().is_err());
        assert!("sparse".parse::<ModeSpec>().is_err());
    }
}
