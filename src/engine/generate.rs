//! The generation loop for one request: chunked prefill, then one token at a time with the KV
//! cache, streaming text and stopping on EOS ids, stop strings or the token budget.

use std::time::Instant;

use serde::Serialize;

use crate::backend::Backend;
use crate::engine::request::{cache_capacity, prefill, rate, TextOutput};
use crate::error::Result;
use crate::model::{Llama, Logits, Sampler, SamplingParams, Scratch, Tokenizer};
use crate::sparsity::{Sparsity, SparsityReport};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Context length cap (the KV cache never grows past it).
    pub context: usize,
    /// Prompt tokens per prefill forward (bounds scratch memory).
    pub prefill_chunk: usize,
    /// Show a progress bar for long prefills (on a terminal).
    pub show_progress: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
    /// The consumer of the text stopped listening (e.g. a closed pipe).
    Cancelled,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Eos => "eos",
            StopReason::StopString => "stop_string",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Cancelled => "cancelled",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationOutput {
    pub text: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub generated_token_ids: Vec<u32>,
    pub stop_reason: StopReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tokens_per_s: f64,
    /// Tokens fed through single-token forwards per second of those forwards.
    pub decode_tokens_per_s: f64,
    /// Seconds spent picking and gathering Griffin's neurons after the prompt (0 otherwise).
    pub sparse_setup_seconds: f64,
    #[serde(flatten)]
    pub sparsity: SparsityReport,
    /// Correction statistics of a `--sirius` run.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub sirius: Option<crate::engine::SiriusReport>,
    /// Streaming statistics of an offloaded run (`run --resident-mem`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub offload: Option<crate::offload::runtime::OffloadReport>,
}

/// Generates from `prompt_ids`, calling `on_text` with each piece of text as it is complete;
/// `on_text` returns false to stop generation (StopReason::Cancelled). The prompt runs the
/// dense model; decode steps use `sparsity`'s FFN.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    sparsity: &Sparsity<B>,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    let capacity = cache_capacity(model, prompt_ids, opts)?;
    let mut cache = model.new_cache(capacity)?;
    let mut scratch = Scratch::with_logit_rows(model, 1, 1)?;
    let mut sampler = Sampler::new(opts.sampling)?;
    let mut sparse = sparsity.request(model)?;

    let t0 = Instant::now();
    let mut logits = prefill(
        model,
        &mut sparse,
        &mut cache,
        prompt_ids,
        opts.prefill_chunk,
        opts.show_progress,
    )?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t_sparse = Instant::now();
    sparse.finish_prefill(model)?;
    let sparse_setup_seconds = t_sparse.elapsed().as_secs_f64();

    let mut out = TextOutput::new(tokenizer, prompt_ids, &opts.stop_strings, on_text);
    let mut ids = Vec::new();
    let mut decode_seconds = 0.0;
    let mut decode_steps = 0usize;
    let stop_reason = loop {
        if ids.len() >= opts.max_tokens {
            break StopReason::MaxTokens;
        }
        let next = sampler.sample(&logits);
        if opts.stop_token_ids.contains(&next) {
            break StopReason::Eos;
        }
        ids.push(next);
        if let Some(reason) = out.push(next)? {
            break reason;
        }
        if ids.len() >= opts.max_tokens {
            break StopReason::MaxTokens;
        }
        if cache.len() >= cache.capacity() {
            break StopReason::ContextFull;
        }
        let t = Instant::now();
        logits = model.forward_with(
            &[next],
            &mut cache,
            &mut scratch,
            Logits::Last,
            &mut sparse.decode_ffn()?,
        )?;
        sparse.count_decode(1);
        decode_seconds += t.elapsed().as_secs_f64();
        decode_steps += 1;
    };
    out.finish(stop_reason)?;
    let text = out.text;
    Ok(GenerationOutput {
        text,
        prompt_tokens: prompt_ids.len(),
        generated_tokens: ids.len(),
        generated_token_ids: ids,
        stop_reason,
        prefill_seconds,
        decode_seconds,
        prefill_tokens_per_s: rate(prompt_ids.len(), prefill_seconds),
        decode_tokens_per_s: rate(decode_steps, decode_seconds),
        sparse_setup_seconds,
        sparsity: sparse.report(&model.config),
        sirius: None,
        offload: None,
    })
}

/// The context a request can use: the caller's cap, the model's position limit and its
/// sliding window (within the window, windowed attention equals full attention).
pub fn effective_context<B: Backend>(model: &Llama<B>, requested: usize) -> usize {
    let c = &model.config;
    let mut context = requested.min(c.max_position_embeddings);
    if context < requested {
        tracing::warn!("context capped at the model's max_position_embeddings, {context}");
    }
    if let Some(window) = c.sliding_window.filter(|&w| w < context) {
        tracing::warn!("context capped at the model's sliding window, {window} tokens");
        context = window;
    }
    context
}
