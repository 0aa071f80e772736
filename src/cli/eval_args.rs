//! The options of `sirius-offload eval`: one task per invocation (`--perplexity`, `--data`,
//! `--faithfulness`), the options each task reads, and the long help that says what each
//! measures.

use std::path::PathBuf;
use std::str::FromStr;

use clap::{ArgGroup, Args, ValueEnum};

use crate::cli::args::{ModelArgs, SiriusArgs, SparsityArgs};
use crate::engine::gsm::GsmMode;
use crate::error::{Error, Result};
use crate::sparsity::SparsityMode;

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
    #[command(flatten)]
    pub model: ModelArgs,
    /// Perplexity of this UTF-8 text file (see below).
    #[arg(long, value_name = "FILE", conflicts_with_all = GEN_ONLY)]
    pub perplexity: Option<PathBuf>,
    /// GSM accuracy over the problems of this JSONL file (see below; tools/gsm-data).
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = PPL_ONLY)]
    pub data: Option<PathBuf>,
    /// Common prefix of sparse and Sirius greedy outputs with the full model's, per prompt of
    /// this file (see below).
    #[arg(long, value_name = "FILE", conflicts_with_all = PPL_ONLY, conflicts_with_all = ["mode", "no_prefix_cache"])]
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

/// Options only `--perplexity` reads.
pub(crate) const PPL_ONLY: [&str; 4] = ["window", "prefix", "max_windows", "compare"];
/// Options only `--data` and `--faithfulness` read.
pub(crate) const GEN_ONLY: [&str; 9] = [
    "mode",
    "no_prefix_cache",
    "shots",
    "max_problems",
    "max_tokens",
    "period",
    "threshold",
    "accept_temperature",
    "width",
];

/// The options of the generation tasks (`--data`, `--faithfulness`).
#[derive(Debug, Clone, Args)]
pub struct GenTaskArgs {
    /// --data: modes to run over the same problems, comma-separated: full, sparse, sirius
    /// [default: full,sparse,sirius with --sparsity griffin|cats, else full].
    #[arg(long, value_delimiter = ',', value_name = "MODE,...")]
    pub mode: Vec<GsmMode>,
    /// Few-shot examples: the first N items of the file, not scored [default: 8; 0 for raw
    /// prompts].
    #[arg(long, value_name = "N")]
    pub shots: Option<usize>,
    /// Score at most N problems (prompts with --faithfulness), those after the shots.
    #[arg(long, value_name = "N")]
    pub max_problems: Option<usize>,
    /// New tokens per answer at most (--faithfulness: exactly this many).
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_tokens: usize,
    /// --data: prefill every prompt whole, in every mode (by default the prompt prefix all
    /// problems share, the few-shot examples, runs once and every request starts from it).
    #[arg(long)]
    pub no_prefix_cache: bool,
    #[command(flatten)]
    pub sirius: SiriusArgs,
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
