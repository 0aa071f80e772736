//! Throughput in the manner of llama-bench: prefill (pp) and decode (tg) tokens per second,
//! so the two can be compared in one run. pp: a batch of N prompt tokens from an empty
//! cache; tg: N single-token forwards from an empty cache, through the engine's sparse FFN.
//! Token ids are fixed pseudo-random ids (speed does not depend on them).

use std::time::Instant;

use serde::Serialize;

use crate::backend::offload::OffloadBackend;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::{Logits, Pass, Scratch};
use crate::sparsity::{Dense, SparseRequest, SparsityMode, SparsityReport};

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchSettings {
    /// Prompt tokens of the prefill test (0 = skip).
    pub prompt: usize,
    /// Tokens of the decode test (0 = skip).
    pub gen: usize,
    /// Timed repetitions of each test (after one warm-up).
    pub reps: usize,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub test: String,
    pub tokens: usize,
    pub reps: usize,
    pub median_tokens_per_s: f64,
    pub min_tokens_per_s: f64,
    pub max_tokens_per_s: f64,
    pub samples_tokens_per_s: Vec<f64>,
}

/// Runs the tests; `on_rep` is called after each repetition (warm-ups included). Returns
/// the results and what the decode steps read (Griffin chooses its neurons from a dense
/// prefill of the pp test's tokens, or of 128 tokens without one).
pub fn bench<B: OffloadBackend>(
    engine: &Engine<B>,
    settings: BenchSettings,
    on_rep: &mut dyn FnMut(),
) -> Result<(Vec<BenchResult>, SparsityReport)> {
    let BenchSettings { prompt, gen, reps } = settings;
    if reps == 0 {
        return Err(Error::InvalidArgument("--reps must be at least 1".into()));
    }
    let model = &engine.model;
    let max_pos = model.config.max_position_embeddings;
    if prompt > max_pos || gen > max_pos {
        return Err(Error::InvalidArgument(format!(
            "--prompt {prompt} / --gen {gen}: each must fit the model's context of {max_pos} tokens"
        )));
    }
    let vocab = model.config.vocab_size as u32;
    let ids = |n: usize| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % vocab)
            .collect()
    };
    let mut results = Vec::new();
    if prompt > 0 {
        let tokens = ids(prompt);
        let mut scratch = Scratch::with_logit_rows(model, prompt, 1)?;
        // The cache is allocated once, outside the timed runs (a device allocation is slow).
        let mut cache = model.new_cache(prompt)?;
        let samples = timed(reps, prompt, on_rep, &mut || {
            cache.truncate(0);
            let mut dense = Dense;
            let pass = Pass::new(&tokens, Logits::Last, &mut dense);
            model.forward(pass, &mut cache, &mut scratch).map(drop)
        })?;
        results.push(summarise(format!("pp{prompt}"), prompt, samples));
    }
    // Griffin needs a prompt to choose its neurons; the same request state serves every rep.
    let mut request = SparseRequest::new(engine.sparsity(), &model.backend, model.ffn_dims())?;
    if gen > 0 && engine.sparsity().mode() == SparsityMode::Griffin {
        let tokens = ids(if prompt > 0 { prompt } else { 128 }.min(max_pos));
        let mut scratch = Scratch::with_logit_rows(model, tokens.len(), 1)?;
        let mut cache = model.new_cache(tokens.len())?;
        let pass = Pass::new(&tokens, Logits::Last, request.prefill_ffn());
        model.forward(pass, &mut cache, &mut scratch)?;
        request.finish_prefill(&model.backend)?;
    }
    if gen > 0 {
        let tokens = ids(gen);
        let mut scratch = Scratch::new(model, 1)?;
        let mut cache = model.new_cache(gen)?;
        let samples = timed(reps, gen, on_rep, &mut || {
            cache.truncate(0);
            for tok in &tokens {
                let pass = Pass::new(
                    std::slice::from_ref(tok),
                    Logits::Last,
                    request.decode_ffn()?,
                );
                model.forward(pass, &mut cache, &mut scratch)?;
                request.count_decode(1);
            }
            Ok(())
        })?;
        results.push(summarise(format!("tg{gen}"), gen, samples));
    }
    Ok((results, request.report(&model.config)))
}

/// Tokens per second of `reps` runs of `run` over `tokens` tokens, after one warm-up run
/// (caches and page-ins; not counted).
fn timed(
    reps: usize,
    tokens: usize,
    on_rep: &mut dyn FnMut(),
    run: &mut dyn FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let t = Instant::now();
        run()?;
        on_rep();
        if rep > 0 {
            samples.push(tokens as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok(samples)
}

fn summarise(test: String, tokens: usize, mut samples: Vec<f64>) -> BenchResult {
    let unsorted = samples.clone();
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    BenchResult {
        test,
        tokens,
        reps: n,
        median_tokens_per_s: median,
        min_tokens_per_s: samples[0],
        max_tokens_per_s: samples[n - 1],
        samples_tokens_per_s: unsorted,
    }
}
