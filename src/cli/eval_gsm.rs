//! `eval --data FILE.jsonl`: GSM8K-style accuracy of the full model, the sparse model and
//! Sirius over the same problems (`engine::gsm`).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::backend::CpuBackend;
use crate::cli::eval_args::EvalArgs;
use crate::cli::eval_common::{bar, emit, load, sirius_options, Header, DEFAULT_SHOTS};
use crate::cli::input::read_text;
use crate::cli::output::check_output_dir;
use crate::engine::gsm::{
    evaluate, parse_problems, tokenize_prompts, GsmMode, GsmOptions, ModeResult, ProblemResult,
};
use crate::engine::prefill::DEFAULT_PREFILL_CHUNK;
use crate::engine::prefix::common_prefix_len;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::sparsity::SparsityMode;

#[derive(Serialize)]
struct GsmOut<'a> {
    task: &'static str,
    #[serde(flatten)]
    header: Header,
    modes: Vec<GsmMode>,
    /// Prompt tokens every problem shares, computed once (0: each prompt prefilled whole).
    shared_prefix_tokens: usize,
    /// Seconds of that one prefill (not in any mode's `prefill_seconds`).
    shared_prefix_seconds: f64,
    results: &'a [ModeResult],
    problems: &'a [ProblemResult],
}

/// `eval --data FILE`.
pub fn eval_data(args: &EvalArgs, path: &Path) -> Result<()> {
    let g = &args.gen;
    let sirius = sirius_options(g)?;
    check_output_dir("--json", args.json.as_deref())?;
    let modes = modes(&g.mode, args.sparsity.mode())?;
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
    let t = std::time::Instant::now();
    let shared_prefix_tokens = match g.no_prefix_cache {
        true => 0,
        false => share_prefix(&mut l.engine, &prompts, args.quiet)?,
    };
    let shared_prefix_seconds = t.elapsed().as_secs_f64();
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
        shared_prefix_tokens,
        shared_prefix_seconds,
        results: &report.results,
        problems: &report.problems,
    };
    emit(args, &out, || markdown(&out))
}

/// Prompts shorter than this prefill whole: a shared prefix saves little there.
const MIN_SHARED_PREFIX: usize = 16;

/// Computes the token prefix every prompt shares once (at most all but one token of the
/// shortest: each request's first token needs logits of its own); returns its length.
fn share_prefix(
    engine: &mut Engine<CpuBackend>,
    prompts: &[Vec<u32>],
    quiet: bool,
) -> Result<usize> {
    let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
    let shared = common_prefix_len(prompts).min(shortest.saturating_sub(1));
    let Some(first) = prompts.first().filter(|_| shared >= MIN_SHARED_PREFIX) else {
        return Ok(0);
    };
    tracing::info!(
        tokens = shared,
        "computing the prompt prefix every problem shares once"
    );
    engine.set_prompt_prefix(&first[..shared], DEFAULT_PREFILL_CHUNK, !quiet)?;
    Ok(shared)
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
            .map_or("-".to_string(), |a| format!("{a:.2}/{}", h.period_text()));
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
