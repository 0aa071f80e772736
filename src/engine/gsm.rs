//! GSM8K-style accuracy (`eval --data FILE.jsonl`): few-shot chain-of-thought prompts, greedy
//! generation by the full model, the sparse model and Sirius over the same problems, and the
//! final number of each answer compared with the reference's.
//!
//! Data: one JSON object per line, `{"question": "...", "answer": "..."}` (blank lines
//! skipped); `answer` is a GSM8K solution ending in `#### N`, or just the number (a JSON
//! number works too). The first `shots` problems are the few-shot examples and are not scored.
//!
//! Prompt: every example as `Question: Q\nAnswer: A\n\n`, then `Question: Q\nAnswer:`.
//! Generation stops at EOS, at the stop string `\nQuestion:` (the model starting the next
//! problem), or once a `#### N` line is complete.
//!
//! Scoring: [`final_answer`] of the generated text against that of the reference answer.

use std::time::Instant;

use serde::Serialize;

use crate::backend::offload::OffloadBackend;
use crate::engine::output::rate;
use crate::engine::{Decoding, Engine, GenerationOutput, RequestOptions};
use crate::error::{Error, Result};
use crate::model::Tokenizer;
use crate::sirius::{effective_density, SiriusConfig};

pub(crate) mod problems;

pub use problems::{
    answer_complete, canonical_number, few_shot_prompt, final_answer, parse_problems, Problem,
};

/// Where generation stops besides EOS: the model starting the next few-shot block.
pub const STOP_STRINGS: &[&str] = &["\nQuestion:"];

/// The ways a problem is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GsmMode {
    /// The dense model.
    Full,
    /// The sparse model for every decode step (the prompt runs dense).
    Sparse,
    /// Sparse drafts corrected by the full model.
    Sirius,
}

impl std::str::FromStr for GsmMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "full" | "dense" => Ok(GsmMode::Full),
            "sparse" => Ok(GsmMode::Sparse),
            "sirius" => Ok(GsmMode::Sirius),
            _ => Err(Error::InvalidArgument(format!(
                "unknown mode `{s}`: expected full, sparse or sirius"
            ))),
        }
    }
}

impl std::fmt::Display for GsmMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GsmMode::Full => "full",
            GsmMode::Sparse => "sparse",
            GsmMode::Sirius => "sirius",
        })
    }
}

/// How every problem is generated.
#[derive(Debug, Clone)]
pub struct GsmOptions {
    /// New tokens per answer at most.
    pub max_tokens: usize,
    pub sirius: SiriusConfig,
}

impl GsmMode {
    /// How the engine decodes in this mode.
    pub fn decoding(self, sirius: SiriusConfig) -> Decoding {
        match self {
            GsmMode::Full => Decoding::Dense,
            GsmMode::Sparse => Decoding::Sparse,
            GsmMode::Sirius => Decoding::Sirius(sirius),
        }
    }
}

/// One mode's answer to one problem.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub mode: GsmMode,
    /// The final number found in the text (None: no number).
    pub predicted: Option<String>,
    pub correct: bool,
    pub generated_tokens: usize,
    pub stop_reason: crate::engine::StopReason,
    pub text: String,
}

/// One scored problem.
#[derive(Debug, Clone, Serialize)]
pub struct ProblemResult {
    pub line: usize,
    pub prompt_tokens: usize,
    pub target: String,
    pub answers: Vec<Answer>,
}

/// One mode over all problems.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: GsmMode,
    pub problems: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub mean_generated_tokens: f64,
    /// Parameters read per decode token / all parameters: 1 for full, the sparse model's
    /// density for sparse, Sirius's effective density ((K - 1) * density + 1) / AAL.
    pub effective_density: f64,
    /// Sirius: average advance length per verification, pooled over problems.
    pub aal: Option<f64>,
    pub period: Option<usize>,
    pub verifications: Option<usize>,
    /// Tokens after each answer's first (which comes from the prompt pass) per decode second.
    pub decode_tokens_per_s: f64,
    pub decode_seconds: f64,
    pub prefill_seconds: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GsmReport {
    pub results: Vec<ModeResult>,
    pub problems: Vec<ProblemResult>,
}

/// The token ids of every problem's prompt, checked against the context (prompt plus
/// `max_tokens` must fit). `source` names the data file in errors.
pub fn tokenize_prompts(
    tokenizer: &Tokenizer,
    source: &str,
    shots: &[Problem],
    problems: &[Problem],
    max_tokens: usize,
    context: usize,
) -> Result<Vec<Vec<u32>>> {
    problems
        .iter()
        .map(|p| {
            let ids = tokenizer.encode(&few_shot_prompt(shots, &p.question), true)?;
            if ids.len().saturating_add(max_tokens) > context {
                return Err(Error::InvalidArgument(format!(
                    "{source}: line {}: the prompt ({} tokens with {} shots) and --max-tokens {max_tokens} exceed the context of {context} tokens: lower --shots or --max-tokens",
                    p.line,
                    ids.len(),
                    shots.len()
                )));
            }
            Ok(ids)
        })
        .collect()
}

/// One greedy answer in `mode`, stopped once the `#### N` line is complete (the rest
/// would not change the score).
pub fn answer_one<B: OffloadBackend>(
    engine: &mut Engine<B>,
    prompt: &[u32],
    mode: GsmMode,
    opts: &GsmOptions,
) -> Result<GenerationOutput> {
    let mut request = RequestOptions::greedy(opts.max_tokens);
    request.stop_strings = STOP_STRINGS.iter().map(|s| s.to_string()).collect();
    let mut text = String::new();
    let mut on_text = |piece: &str| {
        text.push_str(piece);
        !answer_complete(&text)
    };
    engine.generate(prompt, &request, mode.decoding(opts.sirius), &mut on_text)
}

/// Runs every mode over every problem (problem by problem, so an interrupted run has seen
/// the same problems in every mode). `on_step` is called after each answer.
pub fn evaluate<B: OffloadBackend>(
    engine: &mut Engine<B>,
    problems: &[Problem],
    prompts: &[Vec<u32>],
    modes: &[GsmMode],
    opts: &GsmOptions,
    on_step: &mut dyn FnMut(GsmMode),
) -> Result<GsmReport> {
    let mut acc: Vec<Accumulator> = modes.iter().map(|&m| Accumulator::new(m)).collect();
    let mut results = Vec::with_capacity(problems.len());
    for (problem, prompt) in problems.iter().zip(prompts) {
        let mut answers = Vec::with_capacity(modes.len());
        for (&mode, a) in modes.iter().zip(acc.iter_mut()) {
            let t = Instant::now();
            let out = answer_one(engine, prompt, mode, opts)?;
            let predicted = final_answer(&out.text);
            let correct = predicted.as_deref() == Some(problem.target.as_str());
            a.add(&out, correct, t.elapsed().as_secs_f64());
            answers.push(Answer {
                mode,
                predicted,
                correct,
                generated_tokens: out.generated_tokens,
                stop_reason: out.stop_reason,
                text: out.text,
            });
            on_step(mode);
        }
        results.push(ProblemResult {
            line: problem.line,
            prompt_tokens: prompt.len(),
            target: problem.target.clone(),
            answers,
        });
    }
    Ok(GsmReport {
        results: acc.into_iter().map(|a| a.finish(&opts.sirius)).collect(),
        problems: results,
    })
}

/// Sums of one mode's outputs.
struct Accumulator {
    mode: GsmMode,
    problems: usize,
    correct: usize,
    tokens: usize,
    decode_tokens: usize,
    decode_seconds: f64,
    prefill_seconds: f64,
    seconds: f64,
    density_sum: f64,
    verifications: usize,
    advanced: f64,
    /// Σ tokens verified (mean K x verifications).
    verified: f64,
}

impl Accumulator {
    fn new(mode: GsmMode) -> Self {
        Accumulator {
            mode,
            problems: 0,
            correct: 0,
            tokens: 0,
            decode_tokens: 0,
            decode_seconds: 0.0,
            prefill_seconds: 0.0,
            seconds: 0.0,
            density_sum: 0.0,
            verifications: 0,
            advanced: 0.0,
            verified: 0.0,
        }
    }

    fn add(&mut self, out: &GenerationOutput, correct: bool, seconds: f64) {
        self.problems += 1;
        self.correct += usize::from(correct);
        self.tokens += out.generated_tokens;
        self.decode_tokens += out.generated_tokens.saturating_sub(1);
        self.decode_seconds += out.decode_seconds;
        self.prefill_seconds += out.prefill_seconds;
        self.seconds += seconds;
        self.density_sum += out.sparsity.density;
        if let Some(s) = &out.sirius {
            self.verifications += s.verifications;
            self.advanced += s.aal * s.verifications as f64;
            self.verified += s.mean_period * s.verifications as f64;
        }
    }

    fn finish(self, config: &SiriusConfig) -> ModeResult {
        let period = config.period;
        let per = |x: f64| {
            if self.problems == 0 {
                0.0
            } else {
                x / self.problems as f64
            }
        };
        let density = per(self.density_sum);
        let sirius = self.mode == GsmMode::Sirius;
        let aal = pooled_aal(self.advanced, self.verifications);
        ModeResult {
            mode: self.mode,
            problems: self.problems,
            correct: self.correct,
            accuracy: per(self.correct as f64),
            mean_generated_tokens: per(self.tokens as f64),
            effective_density: match self.mode {
                GsmMode::Full => 1.0,
                GsmMode::Sparse => density,
                GsmMode::Sirius => {
                    let k = pooled_period(config, self.verified, self.verifications);
                    effective_density(k, density, aal)
                }
            },
            aal: sirius.then_some(aal),
            period: sirius.then_some(period),
            verifications: sirius.then_some(self.verifications),
            decode_tokens_per_s: rate(self.decode_tokens, self.decode_seconds),
            decode_seconds: self.decode_seconds,
            prefill_seconds: self.prefill_seconds,
            seconds: self.seconds,
        }
    }
}

/// The K of the effective density over several requests: the configured K, or with
/// `--period auto` the windows' mean (`verified`: Σ mean K x verifications).
pub fn pooled_period(config: &SiriusConfig, verified: f64, verifications: usize) -> f64 {
    match config.adaptive {
        true => pooled_aal(verified, verifications),
        false => config.period as f64,
    }
}

/// Σ(n + 1) / verifications over several requests (0 without verifications).
pub fn pooled_aal(advanced: f64, verifications: usize) -> f64 {
    if verifications == 0 {
        0.0
    } else {
        advanced / verifications as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_metrics() {
        assert_eq!("Sirius".parse::<GsmMode>().unwrap(), GsmMode::Sirius);
        assert_eq!("full".parse::<GsmMode>().unwrap(), GsmMode::Full);
        assert!("griffin".parse::<GsmMode>().is_err());
        assert_eq!(pooled_aal(30.0, 2), 15.0);
        assert_eq!(pooled_aal(0.0, 0), 0.0);
        // The Sirius paper (Llama-3-8B, GSM8K): Griffin D 0.65, AAL 15.22/16 -> ED 0.706.
        assert!((effective_density(16.0, 0.65, 15.22) - 0.7063).abs() < 1e-3);
    }
}
