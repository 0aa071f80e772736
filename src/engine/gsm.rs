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

use crate::backend::Backend;
use crate::engine::request::rate;
use crate::engine::{generate, generate_sirius, GenerateOptions, GenerationOutput, SiriusOptions};
use crate::error::{Error, Result};
use crate::model::{Llama, SamplingParams, Tokenizer};
use crate::sparsity::Sparsity;

/// Where generation stops besides EOS: the model starting the next few-shot block.
pub const STOP_STRINGS: &[&str] = &["\nQuestion:"];

/// One problem of a data file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 1-based line of the file.
    pub line: usize,
    pub question: String,
    pub answer: String,
    /// The reference's final number, canonical (see [`canonical_number`]).
    pub target: String,
}

/// Parses a JSONL data file. `source` names the file in errors ("--data path"), which say the
/// line and what is wrong, on one line.
pub fn parse_problems(source: &str, text: &str) -> Result<Vec<Problem>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let err = |what: String| Error::InvalidArgument(format!("{source}: line {n}: {what}"));
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            err(format!(
                "not valid JSON ({e}); expected one object per line"
            ))
        })?;
        let object = value
            .as_object()
            .ok_or_else(|| err("not a JSON object".into()))?;
        let question = match object.get("question") {
            Some(serde_json::Value::String(q)) if !q.trim().is_empty() => q.trim().to_string(),
            Some(_) => return Err(err("\"question\" must be a non-empty string".into())),
            None => return Err(err("no \"question\"".into())),
        };
        let answer = match object.get("answer") {
            Some(serde_json::Value::String(a)) => a.trim().to_string(),
            Some(serde_json::Value::Number(a)) => a.to_string(),
            Some(_) => return Err(err("\"answer\" must be a string or a number".into())),
            None => return Err(err("no \"answer\"".into())),
        };
        let target = final_answer(&answer)
            .ok_or_else(|| err(format!("the answer {answer:?} has no number")))?;
        out.push(Problem {
            line: n,
            question,
            answer,
            target,
        });
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument(format!("{source}: no problems")));
    }
    Ok(out)
}

/// The few-shot prompt for `question`.
pub fn few_shot_prompt(shots: &[Problem], question: &str) -> String {
    let mut s = String::new();
    for shot in shots {
        s.push_str("Question: ");
        s.push_str(&shot.question);
        s.push_str("\nAnswer: ");
        s.push_str(&shot.answer);
        s.push_str("\n\n");
    }
    s.push_str("Question: ");
    s.push_str(question.trim());
    s.push_str("\nAnswer:");
    s
}

/// True once the text has a complete `#### N` line: a `####`, a digit after it, then a newline.
pub fn answer_complete(text: &str) -> bool {
    text.find("####").is_some_and(|at| {
        let rest = &text[at + 4..];
        rest.find(|c: char| c.is_ascii_digit())
            .is_some_and(|d| rest[d..].contains('\n'))
    })
}

/// The final number of an answer: the first number after the first `####` that is followed
/// by one, otherwise the last number in the text. Canonical (see [`canonical_number`]).
pub fn final_answer(text: &str) -> Option<String> {
    let mut from = 0;
    while let Some(at) = text[from..].find("####") {
        let after = from + at + 4;
        if let Some(n) = numbers(&text[after..]).into_iter().next() {
            return Some(n);
        }
        from = after;
    }
    numbers(text).pop()
}

/// Canonical form of one number written as text ("$1,234.50" -> "1234.5", "12.0" -> "12",
/// "-0" -> "0"); None when `raw` holds no number or more than one.
pub fn canonical_number(raw: &str) -> Option<String> {
    let mut all = numbers(raw);
    (all.len() == 1).then(|| all.remove(0))
}

/// Every number in `text`, in order, canonical. A number is digits with optional thousands
/// groups (`1,234`: a comma then exactly three digits) and an optional fraction (`.5`; a
/// trailing `.` ends a sentence). A `-` directly before it (or before its `$`) is a sign
/// unless it follows a letter, a digit or `)` (then it is a minus: `160-48`).
fn numbers(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let digit = |k: usize| k < b.len() && b[k].is_ascii_digit();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let mut j = i;
        if j > 0 && b[j - 1] == b'$' {
            j -= 1;
        }
        let negative = j > 0
            && b[j - 1] == b'-'
            && (j == 1 || !(b[j - 2].is_ascii_alphanumeric() || b[j - 2] == b')'));
        let mut k = i;
        while digit(k) {
            k += 1;
        }
        let mut int = text[i..k].to_string();
        while k < b.len() && b[k] == b',' && (1..=3).all(|d| digit(k + d)) && !digit(k + 4) {
            int.push_str(&text[k + 1..k + 4]);
            k += 4;
        }
        let mut frac = "";
        if k < b.len() && b[k] == b'.' && digit(k + 1) {
            let start = k + 1;
            k = start;
            while digit(k) {
                k += 1;
            }
            frac = &text[start..k];
        }
        out.push(canonical(negative, &int, frac));
        i = k;
    }
    out
}

fn canonical(negative: bool, int: &str, frac: &str) -> String {
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let mut s = if int.is_empty() { "0" } else { int }.to_string();
    if !frac.is_empty() {
        s.push('.');
        s.push_str(frac);
    }
    if negative && s != "0" {
        s.insert(0, '-');
    }
    s
}

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
    /// EOS ids (from the model's generation_config).
    pub stop_token_ids: Vec<u32>,
    /// Context cap of a request.
    pub context: usize,
    pub sirius: SiriusOptions,
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
            if ids.len() + max_tokens > context {
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

/// Generates greedily from `prompt` in `mode`; `sparse` serves the sparse and Sirius modes.
#[allow(clippy::too_many_arguments)]
pub fn generate_in_mode<B: Backend>(
    model: &Llama<B>,
    sparse: &Sparsity<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    mode: GsmMode,
    opts: &GenerateOptions,
    sirius: SiriusOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    match mode {
        GsmMode::Full => generate(model, &Sparsity::None, tokenizer, prompt, opts, on_text),
        GsmMode::Sparse => generate(model, sparse, tokenizer, prompt, opts, on_text),
        GsmMode::Sirius => generate_sirius(model, sparse, tokenizer, prompt, opts, sirius, on_text),
    }
}

/// One answer: [`generate_in_mode`], stopped once the `#### N` line is complete (the rest
/// would not change the score).
pub fn answer_one<B: Backend>(
    model: &Llama<B>,
    sparse: &Sparsity<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    mode: GsmMode,
    opts: &GenerateOptions,
    sirius: SiriusOptions,
) -> Result<GenerationOutput> {
    let mut text = String::new();
    let mut on_text = |piece: &str| {
        text.push_str(piece);
        !answer_complete(&text)
    };
    generate_in_mode(
        model,
        sparse,
        tokenizer,
        prompt,
        mode,
        opts,
        sirius,
        &mut on_text,
    )
}

/// Runs every mode over every problem (problem by problem, so an interrupted run has seen
/// the same problems in every mode). `on_step` is called after each answer.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    sparse: &Sparsity<B>,
    tokenizer: &Tokenizer,
    problems: &[Problem],
    prompts: &[Vec<u32>],
    modes: &[GsmMode],
    opts: &GsmOptions,
    on_step: &mut dyn FnMut(GsmMode),
) -> Result<GsmReport> {
    let gen = GenerateOptions {
        max_tokens: opts.max_tokens,
        sampling: SamplingParams::greedy(),
        stop_token_ids: opts.stop_token_ids.clone(),
        stop_strings: STOP_STRINGS.iter().map(|s| s.to_string()).collect(),
        context: opts.context,
        prefill_chunk: 256,
        show_progress: false,
    };
    let mut acc: Vec<Accumulator> = modes.iter().map(|&m| Accumulator::new(m)).collect();
    let mut results = Vec::with_capacity(problems.len());
    for (problem, prompt) in problems.iter().zip(prompts) {
        let mut answers = Vec::with_capacity(modes.len());
        for (&mode, a) in modes.iter().zip(acc.iter_mut()) {
            let t = Instant::now();
            let out = answer_one(model, sparse, tokenizer, prompt, mode, &gen, opts.sirius)?;
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
        results: acc
            .into_iter()
            .map(|a| a.finish(opts.sirius.period))
            .collect(),
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
        }
    }

    fn finish(self, period: usize) -> ModeResult {
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
                GsmMode::Sirius => effective_density(period, density, aal),
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

/// Σ(n + 1) / verifications over several requests (0 without verifications).
pub fn pooled_aal(advanced: f64, verifications: usize) -> f64 {
    if verifications == 0 {
        0.0
    } else {
        advanced / verifications as f64
    }
}

pub use crate::sirius::corrector::effective_density;

#[cfg(test)]
mod tests {
    use super::*;

    fn fa(s: &str) -> Option<String> {
        final_answer(s)
    }

    #[test]
    fn final_answer_after_the_marker() {
        assert_eq!(fa("3 + 4 = 7\n#### 7").as_deref(), Some("7"));
        // The first number after the marker, not the last of the text.
        assert_eq!(
            fa("so 5 apples\n#### 12 apples, 3 left").as_deref(),
            Some("12")
        );
        assert_eq!(fa("#### $1,234.50").as_deref(), Some("1234.5"));
        assert_eq!(fa("####-3").as_deref(), Some("-3"));
        // A marker with no number after it: the next marker or the last number.
        assert_eq!(fa("#### none\n#### 9").as_deref(), Some("9"));
        assert_eq!(fa("it is 4 then 6\n####").as_deref(), Some("6"));
    }

    #[test]
    fn final_answer_without_marker_is_the_last_number() {
        assert_eq!(
            fa("160-48=112 emails, times 5 is 560.").as_deref(),
            Some("560")
        );
        assert_eq!(fa("The answer is 12.0.").as_deref(), Some("12"));
        assert_eq!(fa("She has $-5 left").as_deref(), Some("-5"));
        assert_eq!(fa("no digits here"), None);
        assert_eq!(fa(""), None);
    }

    #[test]
    fn numbers_canonical_forms() {
        assert_eq!(canonical_number("1,234").as_deref(), Some("1234"));
        assert_eq!(canonical_number("$1,234,567").as_deref(), Some("1234567"));
        assert_eq!(canonical_number("12.0").as_deref(), Some("12"));
        assert_eq!(canonical_number("12.50").as_deref(), Some("12.5"));
        assert_eq!(canonical_number("0.5").as_deref(), Some("0.5"));
        assert_eq!(canonical_number("007").as_deref(), Some("7"));
        assert_eq!(canonical_number("-0.0").as_deref(), Some("0"));
        assert_eq!(canonical_number("-42").as_deref(), Some("-42"));
        assert_eq!(canonical_number("-$42").as_deref(), Some("-42"));
        assert_eq!(canonical_number("(-3)").as_deref(), Some("-3"));
        // A minus between operands is not a sign.
        assert_eq!(numbers("160-48"), vec!["160", "48"]);
        assert_eq!(numbers("x-2"), vec!["2"]);
        // A comma not followed by exactly three digits separates numbers.
        assert_eq!(numbers("3,4 and 1,2345"), vec!["3", "4", "1", "2345"]);
        assert_eq!(numbers("1,000."), vec!["1000"]);
        // A sentence-ending dot is not a fraction.
        assert_eq!(numbers("was 7. Then 8"), vec!["7", "8"]);
        assert_eq!(canonical_number("3 and 4"), None);
        assert_eq!(canonical_number("none"), None);
        assert_eq!(fa("12").as_deref(), fa("#### 12.00").as_deref());
        assert_ne!(fa("#### 12.01"), fa("#### 12"));
    }

    #[test]
    fn answer_complete_needs_a_number_and_a_newline() {
        assert!(!answer_complete("so 7\n"));
        assert!(!answer_complete("#### 7"));
        assert!(!answer_complete("####\n"));
        assert!(!answer_complete("#### \n"));
        assert!(answer_complete("3+4=7\n#### 7\n"));
        assert!(answer_complete("#### 1,234\n\nQuestion"));
    }

    #[test]
    fn parse_problems_reads_jsonl_and_names_bad_lines() {
        let text = "{\"question\": \" Q1 \", \"answer\": \"1+1=2\\n#### 2\"}\n\n{\"question\": \"Q2\", \"answer\": 1234}\n";
        let p = parse_problems("--data f.jsonl", text).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].line, p[0].question.as_str()), (1, "Q1"));
        assert_eq!(p[0].target, "2");
        assert_eq!((p[1].line, p[1].target.as_str()), (3, "1234"));
        for (bad, needle) in [
            ("{\"question\": \"Q\"", "line 2: not valid JSON"),
            ("[1, 2]", "line 2: not a JSON object"),
            ("{\"answer\": \"2\"}", "line 2: no \"question\""),
            ("{\"question\": \"Q\"}", "line 2: no \"answer\""),
            (
                "{\"question\": \"Q\", \"answer\": \"two\"}",
                "line 2: the answer",
            ),
            (
                "{\"question\": 3, \"answer\": \"2\"}",
                "line 2: \"question\"",
            ),
        ] {
            let text = format!("{{\"question\": \"Q\", \"answer\": \"1\"}}\n{bad}\n");
            let e = parse_problems("--data f.jsonl", &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--data f.jsonl: ") && e.contains(needle), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        assert!(parse_problems("--data f", "\n \n").is_err());
    }

    #[test]
    fn prompt_layout() {
        let shot = Problem {
            line: 1,
            question: "Q1?".into(),
            answer: "1+1=2\n#### 2".into(),
            target: "2".into(),
        };
        assert_eq!(
            few_shot_prompt(&[shot], "Q2?"),
            "Question: Q1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: Q2?\nAnswer:"
        );
        assert_eq!(few_shot_prompt(&[], " Q "), "Question: Q\nAnswer:");
    }

    #[test]
    fn modes_parse_and_metrics() {
        assert_eq!("Sirius".parse::<GsmMode>().unwrap(), GsmMode::Sirius);
        assert_eq!("full".parse::<GsmMode>().unwrap(), GsmMode::Full);
        assert!("griffin".parse::<GsmMode>().is_err());
        assert_eq!(pooled_aal(30.0, 2), 15.0);
        assert_eq!(pooled_aal(0.0, 0), 0.0);
        // SIRIUS.md: Griffin D 0.65, AAL 15.22/16 -> ED 0.706.
        assert!((effective_density(16, 0.65, 15.22) - 0.7063).abs() < 1e-3);
    }
}
