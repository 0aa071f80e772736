//! How long the sparse model and Sirius stay on the full model's greedy path
//! (`eval --faithfulness FILE`). For each prompt the full model, the sparse model and Sirius
//! each generate exactly `max_tokens` tokens greedily, with no EOS and no stop strings (so
//! every output has the same length and an early EOS cannot make a prefix look long); the
//! report is, per prompt, the length of the common token prefix of sparse vs full and of
//! Sirius vs full, their means over prompts and the ratio of the means (Sirius / sparse).
//!
//! Input ([`parse_prompts`]): when the first non-blank line starts with `{`, JSONL, one object
//! per line with a `"question"` (GSM style: the prompt is the few-shot prompt of `engine::gsm`,
//! its examples being the first items, which then need an `"answer"`) or a `"prompt"` (used
//! as is); otherwise plain text, each non-blank line one prompt used as is.

use serde::Serialize;

use crate::backend::offload::OffloadBackend;
use crate::engine::gsm::problems::{answer_text, json_object, line_error};
use crate::engine::gsm::{pooled_aal, pooled_period, GsmMode};
use crate::engine::output::rate;
use crate::engine::{Engine, GenerationOutput, RequestOptions};
use crate::error::{Error, Result};
use crate::sirius::{effective_density, SiriusConfig};

/// What a prompt line holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// A GSM question: wrapped in the few-shot prompt.
    Question,
    /// Text used as the prompt as is (a JSONL `"prompt"` or a line of plain text).
    Raw,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptItem {
    /// 1-based line of the file.
    pub line: usize,
    pub kind: PromptKind,
    pub text: String,
    /// A question's worked answer, when the line has one (needed for few-shot examples).
    pub answer: Option<String>,
}

/// Parses a prompt file (see the module doc); every item has the same kind. `source` names
/// the file in errors, which give the line and fit on one line.
pub fn parse_prompts(source: &str, text: &str) -> Result<Vec<PromptItem>> {
    let jsonl = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.trim_start().starts_with('{'));
    let mut out: Vec<PromptItem> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let err = |what: String| line_error(source, n, what);
        let item = if jsonl {
            let object = json_object(source, n, line)?;
            let string = |key: &str| match object.get(key) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
                Some(_) => Err(err(format!("\"{key}\" must be a non-empty string"))),
                None => Ok(None),
            };
            let (kind, text) = match (string("question")?, string("prompt")?) {
                (Some(q), None) => (PromptKind::Question, q.trim().to_string()),
                (None, Some(p)) => (PromptKind::Raw, p),
                (Some(_), Some(_)) => {
                    return Err(err("give \"question\" or \"prompt\", not both".into()))
                }
                (None, None) => return Err(err("no \"question\" or \"prompt\"".into())),
            };
            let answer = object.get("answer").and_then(answer_text);
            PromptItem {
                line: n,
                kind,
                text,
                answer,
            }
        } else {
            PromptItem {
                line: n,
                kind: PromptKind::Raw,
                text: line.to_string(),
                answer: None,
            }
        };
        if let Some(first) = out.first().filter(|f| f.kind != item.kind) {
            return Err(err(format!(
                "mixes \"question\" and \"prompt\" lines (line {} is the other kind)",
                first.line
            )));
        }
        out.push(item);
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument(format!("{source}: no prompts")));
    }
    Ok(out)
}

/// Tokens shared at the start of `a` and `b`.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[derive(Debug, Clone)]
pub struct FaithfulnessOptions {
    /// Tokens every mode generates for every prompt.
    pub max_tokens: usize,
    pub sirius: SiriusConfig,
}

/// One prompt's outputs compared.
#[derive(Debug, Clone, Serialize)]
pub struct PromptResult {
    pub line: usize,
    pub prompt_tokens: usize,
    /// Tokens the full model generated (`max_tokens` unless the context filled).
    pub tokens: usize,
    pub sparse_prefix: usize,
    pub sirius_prefix: usize,
    pub sirius_aal: f64,
    pub sirius_verifications: usize,
    pub full_text: String,
    pub sparse_text: String,
    pub sirius_text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaithfulnessReport {
    pub prompts: usize,
    pub mean_sparse_prefix: f64,
    pub mean_sirius_prefix: f64,
    /// mean_sirius_prefix / mean_sparse_prefix (None when the sparse mean is 0).
    pub prefix_ratio: Option<f64>,
    /// Σ(n + 1) / verifications over all prompts.
    pub sirius_aal: f64,
    pub sparse_density: f64,
    pub sirius_effective_density: f64,
    pub full_decode_tokens_per_s: f64,
    pub sparse_decode_tokens_per_s: f64,
    pub sirius_decode_tokens_per_s: f64,
    pub results: Vec<PromptResult>,
}

/// Runs full, sparse and Sirius on every prompt (`(line, ids)`); `on_step` is called after
/// each generation.
pub fn faithfulness<B: OffloadBackend>(
    engine: &mut Engine<B>,
    prompts: &[(usize, Vec<u32>)],
    opts: &FaithfulnessOptions,
    on_step: &mut dyn FnMut(GsmMode),
) -> Result<FaithfulnessReport> {
    let request = RequestOptions {
        stop_at_eos: false,
        ..RequestOptions::greedy(opts.max_tokens)
    };
    let mut results = Vec::with_capacity(prompts.len());
    // Per mode: decode tokens and seconds.
    let mut decode = [(0usize, 0.0f64); 3];
    let (mut advanced, mut verifications, mut density) = (0.0, 0usize, 0.0);
    // Σ tokens verified (mean K x verifications): the effective density's K.
    let mut verified = 0.0;
    for (line, ids) in prompts {
        let mut run = |mode: GsmMode, slot: usize| -> Result<GenerationOutput> {
            let decoding = mode.decoding(opts.sirius);
            let out = engine.generate(ids, &request, decoding, &mut |_| true)?;
            decode[slot].0 += out.generated_tokens.saturating_sub(1);
            decode[slot].1 += out.decode_seconds;
            on_step(mode);
            Ok(out)
        };
        let full = run(GsmMode::Full, 0)?;
        let sparse_out = run(GsmMode::Sparse, 1)?;
        let sirius_out = run(GsmMode::Sirius, 2)?;
        let (aal, v) = sirius_out
            .sirius
            .as_ref()
            .map_or((0.0, 0), |s| (s.aal, s.verifications));
        verified += sirius_out.sirius.as_ref().map_or(0.0, |s| s.mean_period) * v as f64;
        advanced += aal * v as f64;
        verifications += v;
        density += sparse_out.sparsity.density;
        results.push(PromptResult {
            line: *line,
            prompt_tokens: ids.len(),
            tokens: full.generated_tokens,
            sparse_prefix: common_prefix(
                &sparse_out.generated_token_ids,
                &full.generated_token_ids,
            ),
            sirius_prefix: common_prefix(
                &sirius_out.generated_token_ids,
                &full.generated_token_ids,
            ),
            sirius_aal: aal,
            sirius_verifications: v,
            full_text: full.text,
            sparse_text: sparse_out.text,
            sirius_text: sirius_out.text,
        });
    }
    let n = results.len().max(1) as f64;
    let mean_sparse = results.iter().map(|r| r.sparse_prefix as f64).sum::<f64>() / n;
    let mean_sirius = results.iter().map(|r| r.sirius_prefix as f64).sum::<f64>() / n;
    let aal = pooled_aal(advanced, verifications);
    let sparse_density = density / n;
    Ok(FaithfulnessReport {
        prompts: results.len(),
        mean_sparse_prefix: mean_sparse,
        mean_sirius_prefix: mean_sirius,
        prefix_ratio: (mean_sparse > 0.0).then(|| mean_sirius / mean_sparse),
        sirius_aal: aal,
        sparse_density,
        sirius_effective_density: effective_density(
            pooled_period(&opts.sirius, verified, verifications),
            sparse_density,
            aal,
        ),
        full_decode_tokens_per_s: rate(decode[0].0, decode[0].1),
        sparse_decode_tokens_per_s: rate(decode[1].0, decode[1].1),
        sirius_decode_tokens_per_s: rate(decode[2].0, decode[2].1),
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_counts_leading_matches() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 3]), 3);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[5], &[1]), 0);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }

    #[test]
    fn prompt_files() {
        let q = parse_prompts(
            "--faithfulness f",
            "{\"question\": \"Q1\", \"answer\": \"#### 2\"}\n\n{\"question\": \"Q2\"}\n",
        )
        .unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].kind, PromptKind::Question);
        assert_eq!(q[0].answer.as_deref(), Some("#### 2"));
        assert_eq!((q[1].line, q[1].answer.as_deref()), (3, None));

        let p = parse_prompts("--faithfulness f", "{\"prompt\": \"Once upon\"}\n").unwrap();
        assert_eq!(
            (p[0].kind, p[0].text.as_str()),
            (PromptKind::Raw, "Once upon")
        );

        let t = parse_prompts("--faithfulness f", "\nThe cat\n  \nA dog {x}\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].line, t[0].text.as_str()), (2, "The cat"));
        assert_eq!((t[1].line, t[1].kind), (4, PromptKind::Raw));

        for (bad, needle) in [
            (
                "{\"question\": \"Q\"}\n{\"prompt\": \"P\"}",
                "line 2: mixes",
            ),
            ("{\"question\": \"Q\"}\nnot json", "line 2: not valid JSON"),
            ("{\"text\": \"Q\"}", "line 1: no \"question\" or \"prompt\""),
            ("{\"question\": \"Q\", \"prompt\": \"P\"}", "line 1: give"),
            ("{\"prompt\": \"\"}", "line 1: \"prompt\" must be"),
        ] {
            let e = parse_prompts("--faithfulness f", bad)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--faithfulness f: ") && e.contains(needle),
                "{e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        assert!(parse_prompts("--faithfulness f", " \n").is_err());
    }
}
