//! `eval --data FILE.jsonl`: GSM8K-style accuracy of the full model, the sparse model and
//! Sirius over the same problems (`engine::gsm`), and the options and setup it shares with
//! `eval --faithfulness` (`cli::eval_faithfulness`).

use std::fmt::Write as _;
use std::path::Path;

use clap::Args;
use serde::Serialize;

use crate::backend::CpuBackend;
use crate::cli::args::SiriusArgs;
use crate::cli::eval::{EvalArgs, ReportFormat};
use crate::cli::fetch::model_dir_or_fetch;
use crate::cli::input::read_text;
use crate::cli::output::{check_output_dir, print_stdout, write_json};
use crate::engine::gsm::{
    evaluate, parse_problems, tokenize_prompts, GsmMode, GsmOptions, ModeResult, ProblemResult,
};
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::progress::progress_bar;
use crate::sirius::SiriusConfig;
use crate::sparsity::{SparsityConfig, SparsityMode};

/// Few-shot examples when --shots is not given: GSM8K's usual 8-shot chain of thought. With
/// gsm_symbolic problems that is about 1.5k SmolLM2 tokens, well inside its 8k context.
pub const DEFAULT_SHOTS: usize = 8;

/// Options only `--perplexity` reads.
pub(crate) const PPL_ONLY: [&str; 4] = ["window", "prefix", "max_windows", "compare"];
/// Options only `--data` and `--faithfulness` read.
pub(crate) const GEN_ONLY: [&str; 8] = [
    "mode",
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
    #[command(flatten)]
    pub sirius: SiriusArgs,
}

/// Sirius options from the command line, checked without a model.
pub(crate) fn sirius_options(g: &GenTaskArgs) -> Result<SiriusConfig> {
    if g.max_tokens == 0 {
        return Err(Error::InvalidArgument(
            "--max-tokens must be at least 1".into(),
        ));
    }
    if g.max_problems == Some(0) {
        return Err(Error::InvalidArgument(
            "--max-problems must be at least 1".into(),
        ));
    }
    g.sirius.config()
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
    let dir = model_dir_or_fetch(&args.model.model, !args.model.no_fetch)?;
    let backend = CpuBackend::new(args.model.threads);
    let threads = backend.threads();
    let config = EngineConfig {
        sparsity,
        offload: None,
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
    pub threshold: f32,
    pub accept_temperature: f32,
    pub width: usize,
}

impl Header {
    pub fn new(l: &Loaded, file: &Path, shots: usize, max_tokens: usize, s: SiriusConfig) -> Self {
        let e = &l.engine;
        Header {
            model: e.dir.display().to_string(),
            backend: e.model.backend_description(),
            dtype: e.model.dtype.to_string(),
            threads: l.threads,
            file: file.display().to_string(),
            shots,
            max_tokens,
            sparsity: e.sparsity().mode(),
            keep: e.sparsity().keep(),
            period: s.period,
            threshold: s.threshold,
            accept_temperature: s.accept_temperature,
            width: s.width,
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
            self.period,
            self.threshold,
            self.accept_temperature,
            self.width
        )
    }
}

#[derive(Serialize)]
struct GsmOut<'a> {
    task: &'static str,
    #[serde(flatten)]
    header: Header,
    modes: Vec<GsmMode>,
    results: &'a [ModeResult],
    problems: &'a [ProblemResult],
}

/// `eval --data FILE`.
pub fn eval_data(args: &EvalArgs, path: &Path) -> Result<()> {
    let g = &args.gen;
    let sirius = sirius_options(g)?;
    check_output_dir("--json", args.json.as_deref())?;
    let modes = modes(&g.mode, args.sparsity.sparsity)?;
    if modes != [GsmMode::Full] {
        args.sparsity.config()?;
    }
    let source = format!("--data {}", path.display());
    let all = parse_problems(&source, &read_text("--data", path)?)?;
    let shots = g.shots.unwrap_or(DEFAULT_SHOTS);
    if all.len() <= shots {
        return Err(Error::InvalidArgument(format!(
            "{source}: {} problems, none left to score after --shots {shots}",
            all.len()
        )));
    }
    let (examples, rest) = all.split_at(shots);
    let problems = &rest[..g.max_problems.map_or(rest.len(), |m| m.min(rest.len()))];

    let mut l = load(args, modes != [GsmMode::Full])?;
    let context = l.engine.context();
    let prompts = tokenize_prompts(
        &l.engine.tokenizer,
        &source,
        examples,
        problems,
        g.max_tokens,
        context,
    )?;
    let bar = bar(args.quiet, problems.len() * modes.len());
    let opts = GsmOptions {
        max_tokens: g.max_tokens,
        sirius,
    };
    let report = evaluate(
        &mut l.engine,
        problems,
        &prompts,
        &modes,
        &opts,
        &mut |_| bar.inc(1),
    )?;
    bar.finish_and_clear();
    let out = GsmOut {
        task: "gsm",
        header: Header::new(&l, path, shots, g.max_tokens, sirius),
        modes,
        results: &report.results,
        problems: &report.problems,
    };
    emit(args, &out, || markdown(&out))
}

/// The modes to run: the given ones (each once), or the default; sparse and Sirius need a
/// sparse model.
fn modes(given: &[GsmMode], sparsity: SparsityMode) -> Result<Vec<GsmMode>> {
    let modes = match (given.is_empty(), sparsity) {
        (false, _) => given.to_vec(),
        (true, SparsityMode::None) => vec![GsmMode::Full],
        (true, _) => vec![GsmMode::Full, GsmMode::Sparse, GsmMode::Sirius],
    };
    for (i, m) in modes.iter().enumerate() {
        if modes[..i].contains(m) {
            return Err(Error::InvalidArgument(format!("--mode {m} is given twice")));
        }
        if *m != GsmMode::Full && sparsity == SparsityMode::None {
            return Err(Error::InvalidArgument(format!(
                "--mode {m} needs a sparse model: add --sparsity griffin|cats (and --keep F)"
            )));
        }
    }
    Ok(modes)
}

fn markdown(r: &GsmOut) -> String {
    let h = &r.header;
    let n = r.results.first().map_or(0, |x| x.problems);
    let mut s = format!(
        "GSM accuracy of {} on {}: {n} problems, {}-shot, at most {} new tokens, greedy; {}; {} threads\n\n",
        h.model, h.file, h.shots, h.max_tokens, h.settings(), h.threads
    );
    s += "| mode | problems | accuracy | correct | mean tokens | AAL | eff. density | decode tok/s | seconds |\n";
    s += "|---|---|---|---|---|---|---|---|---|\n";
    for x in r.results {
        let aal = x
            .aal
            .map_or("-".to_string(), |a| format!("{a:.2}/{}", h.period));
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {} | {:.1} | {aal} | {:.3} | {:.1} | {:.1} |",
            x.mode,
            x.problems,
            x.accuracy,
            x.correct,
            x.mean_generated_tokens,
            x.effective_density,
            x.decode_tokens_per_s,
            x.seconds
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_checked_modes() {
        use GsmMode::*;
        assert_eq!(modes(&[], SparsityMode::None).unwrap(), vec![Full]);
        assert_eq!(
            modes(&[], SparsityMode::Griffin).unwrap(),
            vec![Full, Sparse, Sirius]
        );
        assert_eq!(
            modes(&[Sirius, Full], SparsityMode::Cats).unwrap(),
            vec![Sirius, Full]
        );
        let e = modes(&[Full, Sparse], SparsityMode::None).unwrap_err();
        assert!(e.to_string().contains("--sparsity"), "{e}");
        assert!(modes(&[Full, Full], SparsityMode::None).is_err());
    }
}
