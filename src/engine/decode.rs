//! The one request loop. Every way of generating (plain or sparse decoding, Sirius, Sirius
//! offloaded) is a [`Request`]: a prefill that yields the first token, then steps that each
//! yield the tokens after the last one produced (one for plain decoding, a correction
//! window's accepted drafts and the full model's token for Sirius). [`decode`] runs the steps
//! and owns every stopping rule; [`run`] adds the text stream and the statistics.

use std::time::Instant;

use crate::engine::output::{rate, GenerationOutput, SiriusReport, StopReason};
use crate::engine::prefill::chunk_len;
use crate::engine::text::TextOutput;
use crate::error::{Error, Result};
use crate::model::{DeviceCounts, Tokenizer};
use crate::offload::runtime::OffloadReport;
use crate::sparsity::SparsityReport;

/// A request after its prefill: makes the tokens that follow.
pub trait Decoder {
    /// KV cache rows left (a step needs at least one).
    fn room(&self) -> usize;
    /// The tokens after `last` (produced, not yet in the cache), at least one and at most
    /// `budget + 1` of them; all but the last are in the cache afterwards.
    fn step(&mut self, last: u32, budget: usize) -> Result<Vec<u32>>;
    /// Launches and allocations of the backend so far, where it counts them (a GPU).
    fn device_counts(&self) -> Option<DeviceCounts> {
        None
    }
}

/// What [`decode`] produced.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub ids: Vec<u32>,
    pub stop: StopReason,
    /// Seconds spent in `Decoder::step`.
    pub step_seconds: f64,
    /// Tokens the steps produced that the loop used: the generated ones after the first
    /// (which the prefill made) and a stop id that ended the request (its step ran too).
    pub step_tokens: usize,
    /// Kernel launches and device allocations of the steps (None where the backend does not
    /// count them).
    pub step_counts: Option<DeviceCounts>,
}

impl Decoded {
    /// The steps' launches per token: per step token (`per_produced` false, as
    /// `decode_tokens_per_s`) or per produced token after the first (as an offloaded run's
    /// ms per token).
    pub fn launches_per_token(&self, per_produced: bool) -> Option<f64> {
        let tokens = match per_produced {
            true => self.ids.len().saturating_sub(1),
            false => self.step_tokens,
        };
        let launches = self.step_counts?.launches;
        (tokens > 0).then(|| launches as f64 / tokens as f64)
    }
}

/// Generates from `first` (the prefill's token) until `max_tokens` tokens, a stop id (not
/// included), a full cache, or `on_token` says stop (after the token it was given). Tokens
/// count in order: a budget or stop id met in the middle of a step's tokens ends the
/// request there, which for Sirius is a verification boundary.
pub fn decode(
    dec: &mut dyn Decoder,
    first: u32,
    max_tokens: usize,
    stop_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> Result<Option<StopReason>>,
) -> Result<Decoded> {
    let mut ids = Vec::new();
    let mut pending = vec![first];
    let mut step_seconds = 0.0;
    let mut step_tokens = 0;
    let mut step_counts = dec.device_counts().map(|_| DeviceCounts::default());
    let mut from_step = false;
    let stop = 'decode: loop {
        for token in pending {
            if ids.len() >= max_tokens {
                break 'decode StopReason::MaxTokens;
            }
            step_tokens += usize::from(from_step);
            if stop_ids.contains(&token) {
                break 'decode StopReason::Eos;
            }
            ids.push(token);
            if let Some(reason) = on_token(token)? {
                break 'decode reason;
            }
        }
        if ids.len() >= max_tokens {
            break StopReason::MaxTokens;
        }
        if dec.room() == 0 {
            break StopReason::ContextFull;
        }
        let last = *ids.last().unwrap_or(&first);
        let t = Instant::now();
        let before = dec.device_counts();
        pending = dec.step(last, max_tokens - ids.len())?;
        step_seconds += t.elapsed().as_secs_f64();
        if let (Some(total), Some(before), Some(after)) =
            (step_counts.as_mut(), before, dec.device_counts())
        {
            total.add(after.since(before));
        }
        if pending.is_empty() {
            return Err(Error::InvalidArgument(
                "a decode step produced no token".into(),
            ));
        }
        from_step = true;
    };
    Ok(Decoded {
        ids,
        stop,
        step_seconds,
        step_tokens,
        step_counts,
    })
}

/// What a request's prefill produced.
pub struct Prefilled {
    pub first: u32,
    /// Seconds of the prefill spent choosing and placing sparse neurons (not forward passes).
    pub setup_seconds: f64,
}

/// The statistics a request adds to its output.
pub struct RequestReport {
    pub sparsity: SparsityReport,
    pub sirius: Option<SiriusReport>,
    pub offload: Option<OffloadReport>,
}

/// One generation in flight: plain, Sirius or offloaded Sirius.
pub trait Request: Decoder {
    /// Runs the prompt in chunks of `chunk` tokens (a progress bar on long ones when
    /// `progress`) and returns the first token.
    fn prefill(&mut self, prompt: &[u32], chunk: usize, progress: bool) -> Result<Prefilled>;
    /// The request's statistics once it is done (`decoded`: what the loop measured).
    fn report(&mut self, decoded: &Decoded) -> Result<RequestReport>;
}

/// How [`run`] feeds and stops a request.
pub struct RunLimits<'a> {
    pub max_tokens: usize,
    pub stop_ids: &'a [u32],
    pub stop_strings: &'a [String],
    pub prefill_chunk: usize,
    pub show_progress: bool,
    /// Leading prompt tokens already in the request's cache (a shared prefix): the prefill
    /// runs the rest.
    pub cached_prompt: usize,
}

/// Runs `request` on `prompt`: prefill, the decode loop, text to `on_text` as it is complete
/// (`on_text` returns false to stop: `StopReason::Cancelled`), statistics.
pub fn run(
    request: &mut dyn Request,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    limits: &RunLimits<'_>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    let t0 = Instant::now();
    let fresh = match prompt.get(limits.cached_prompt..) {
        Some(rest) if !rest.is_empty() => rest,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{} cached prompt tokens leave none of a {}-token prompt to prefill",
                limits.cached_prompt,
                prompt.len()
            )))
        }
    };
    let prefilled = request.prefill(fresh, limits.prefill_chunk, limits.show_progress)?;
    let prefill_seconds = t0.elapsed().as_secs_f64() - prefilled.setup_seconds;
    let mut out = TextOutput::new(tokenizer, prompt, limits.stop_strings, on_text);
    let decoded = decode(
        request,
        prefilled.first,
        limits.max_tokens,
        limits.stop_ids,
        &mut |token| out.push(token),
    )?;
    out.finish(decoded.stop)?;
    let report = request.report(&decoded)?;
    let seconds = decoded.step_seconds;
    Ok(GenerationOutput {
        text: out.text,
        prompt_tokens: prompt.len(),
        cached_prompt_tokens: limits.cached_prompt,
        generated_tokens: decoded.ids.len(),
        stop_reason: decoded.stop,
        prefill_chunk: chunk_len(fresh, limits.prefill_chunk),
        prefill_seconds,
        decode_seconds: seconds,
        prefill_tokens_per_s: rate(fresh.len(), prefill_seconds),
        decode_tokens_per_s: rate(decoded.step_tokens, seconds),
        decode_launches_per_token: decoded.launches_per_token(false),
        decode_device_allocations: decoded.step_counts.map(|c| c.allocations),
        generated_token_ids: decoded.ids,
        sparse_setup_seconds: prefilled.setup_seconds,
        sparsity: report.sparsity,
        sirius: report.sirius,
        offload: report.offload,
    })
}
