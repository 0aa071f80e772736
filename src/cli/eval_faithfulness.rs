//! `eval --faithfulness FILE`: how many tokens the sparse model and Sirius share with the
//! full model's greedy output, prompt by prompt (`engine::faithfulness`).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::cli::eval_args::EvalArgs;
use crate::cli::eval_common::{bar, emit, load, sirius_options, Header, Loaded, DEFAULT_SHOTS};
use crate::cli::input::read_text;
use crate::cli::output::check_output_dir;
use crate::engine::faithfulness::{
    faithfulness, parse_prompts, FaithfulnessOptions, FaithfulnessReport, PromptItem, PromptKind,
};
use crate::engine::gsm::{few_shot_prompt, final_answer, Problem};
use crate::error::{Error, Result};
use crate::sparsity::SparsityMode;

#[derive(Serialize)]
struct FaithOut<'a> {
    task: &'static str,
    #[serde(flatten)]
    header: Header,
    #[serde(flatten)]
    report: &'a FaithfulnessReport,
}

/// `eval --faithfulness FILE`.
pub fn eval_faithfulness(args: &EvalArgs, path: &Path) -> Result<()> {
    let g = &args.gen;
    let sirius = sirius_options(g)?;
    check_output_dir("--json", args.json.as_deref())?;
    if args.sparsity.mode() == SparsityMode::None {
        return Err(Error::InvalidArgument(
            "--faithfulness compares the sparse model and Sirius with the full model: add --sparsity griffin|cats (and --keep F)".into(),
        ));
    }
    args.sparsity.config()?;
    let source = format!("--faithfulness {}", path.display());
    let items = parse_prompts(&source, &read_text("--faithfulness", path)?)?;
    let questions = items[0].kind == PromptKind::Question;
    let shots = match g.shots {
        Some(n) if n > 0 && !questions => {
            return Err(Error::InvalidArgument(format!(
                "--shots {n}: the prompts of {} are used as they are (\"prompt\" lines or plain text); few-shot examples need \"question\" and \"answer\" lines",
                path.display()
            )))
        }
        Some(n) => n,
        None if questions => DEFAULT_SHOTS,
        None => 0,
    };
    if items.len() <= shots {
        return Err(Error::InvalidArgument(format!(
            "{source}: {} prompts, none left after --shots {shots}",
            items.len()
        )));
    }
    let examples = few_shot_examples(&source, &items[..shots])?;
    let rest = &items[shots..];
    let rest = &rest[..g.max_problems.map_or(rest.len(), |m| m.min(rest.len()))];

    let mut l = load(args, true)?;
    let prompts = prompt_ids(&l, &source, &examples, rest, g.max_tokens)?;
    let bar = bar(args.quiet, prompts.len() * 3);
    let opts = FaithfulnessOptions {
        max_tokens: g.max_tokens,
        sirius,
    };
    let report = faithfulness(&mut l.engine, &prompts, &opts, &mut |_| bar.inc(1))?;
    bar.finish_and_clear();
    let out = FaithOut {
        task: "faithfulness",
        header: Header::new(&l, path, shots, g.max_tokens, sirius),
        report: &report,
    };
    emit(args, &out, || markdown(&out))
}

/// The few-shot examples: question lines with their answers.
fn few_shot_examples(source: &str, items: &[PromptItem]) -> Result<Vec<Problem>> {
    items
        .iter()
        .map(|item| {
            let Some(answer) = &item.answer else {
                return Err(Error::InvalidArgument(format!(
                    "{source}: line {}: a few-shot example needs an \"answer\" (or give --shots 0)",
                    item.line
                )));
            };
            Ok(Problem {
                line: item.line,
                question: item.text.clone(),
                answer: answer.clone(),
                target: final_answer(answer).unwrap_or_default(),
            })
        })
        .collect()
}

/// Each item's prompt ids (questions in the few-shot prompt of `examples`), checked to fit
/// the context with `max_tokens` generated.
fn prompt_ids(
    l: &Loaded,
    source: &str,
    examples: &[Problem],
    items: &[PromptItem],
    max_tokens: usize,
) -> Result<Vec<(usize, Vec<u32>)>> {
    let context = l.engine.context();
    items
        .iter()
        .map(|item| {
            let text = match item.kind {
                PromptKind::Question => few_shot_prompt(examples, &item.text),
                PromptKind::Raw => item.text.clone(),
            };
            let ids = l.engine.encode(&text, None)?;
            if ids.is_empty() || ids.len().saturating_add(max_tokens) > context {
                return Err(Error::InvalidArgument(format!(
                    "{source}: line {}: the prompt ({} tokens) and --max-tokens {max_tokens} do not fit the context of {context} tokens",
                    item.line,
                    ids.len(),
                )));
            }
            Ok((item.line, ids))
        })
        .collect()
}

fn markdown(o: &FaithOut) -> String {
    let (h, r) = (&o.header, o.report);
    let mut s = format!(
        "Faithfulness to the full model's greedy output: {} on {}: {} prompts ({}-shot), {} new tokens each (EOS and stop strings ignored); {}; {} threads\n\n",
        h.model,
        h.file,
        r.prompts,
        h.shots,
        h.max_tokens,
        h.settings(),
        h.threads
    );
    s += "| line | prompt tokens | tokens | sparse = full prefix | Sirius = full prefix | Sirius AAL |\n";
    s += "|---|---|---|---|---|---|\n";
    for x in &r.results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.2} |",
            x.line, x.prompt_tokens, x.tokens, x.sparse_prefix, x.sirius_prefix, x.sirius_aal
        );
    }
    let ratio = r
        .prefix_ratio
        .map_or("-".to_string(), |x| format!("{x:.2}"));
    let _ = writeln!(
        s,
        "| mean | | | {:.2} | {:.2} | {:.2}/{} |",
        r.mean_sparse_prefix,
        r.mean_sirius_prefix,
        r.sirius_aal,
        h.period_text()
    );
    let _ = writeln!(
        s,
        "\nmean common prefix, Sirius / sparse: {ratio}; sparse density {:.3}, Sirius effective density {:.3}; decode tok/s full {:.1}, sparse {:.1}, Sirius {:.1}",
        r.sparse_density,
        r.sirius_effective_density,
        r.full_decode_tokens_per_s,
        r.sparse_decode_tokens_per_s,
        r.sirius_decode_tokens_per_s
    );
    s
}
