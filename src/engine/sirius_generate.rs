//! Generation with Sirius correction (`run --sirius`): dense prefill, then windows of sparse
//! drafts verified by the full model (`sirius::correct_streaming`), text streamed at each
//! verification boundary, where EOS and stop strings take effect.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::Serialize;

use crate::backend::Backend;
use crate::engine::generate::{GenerateOptions, GenerationOutput, StopReason};
use crate::engine::request::{cache_capacity, rate, TextOutput};
use crate::error::{Error, Result};
use crate::model::{Llama, Tokenizer};
use crate::sirius::{correct_streaming, CorrectorOptions, LlamaSirius, SiriusModel};
use crate::sparsity::{Sparsity, SparsityReport};

/// The corrector's settings (`run --period --threshold --accept-temperature`).
#[derive(Debug, Clone, Copy)]
pub struct SiriusOptions {
    pub period: usize,
    pub threshold: f32,
    pub accept_temperature: f32,
    /// Tree width W: 1 is the chain; W > 1 drafts W beams verified as one tree.
    pub width: usize,
}

/// Correction statistics of a request (SIRIUS.md, "Metrics").
#[derive(Debug, Clone, Serialize)]
pub struct SiriusReport {
    pub period: usize,
    /// Tree width W (1 = the chain).
    pub width: usize,
    pub verifications: usize,
    /// Average advance length per verification (at most `period`).
    pub aal: f64,
    /// ((K - 1) * density + 1) / AAL.
    pub effective_density: f64,
    pub rollback_tokens: usize,
    pub draft_seconds: f64,
    pub verify_seconds: f64,
    pub other_seconds: f64,
}

/// Greedy generation with Sirius correction; the output has `sirius` statistics.
pub fn generate_sirius<B: Backend>(
    model: &Llama<B>,
    sparsity: &Sparsity<B>,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    sirius: SiriusOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    let capacity = sirius_cache_rows(model, prompt_ids, opts, &sirius)?;
    let mut m = LlamaSirius::new(model, sparsity, capacity, sirius.period, sirius.width)?;
    drive_sirius(&mut m, tokenizer, prompt_ids, opts, sirius, on_text)
}

/// A Sirius request the generation loop drives: the plain one ([`LlamaSirius`]) and the
/// offloaded one (`crate::offload::OffloadedSirius`).
pub trait SiriusRequest: SiriusModel {
    /// Runs the prompt through the full model and returns its first token.
    fn prefill(&mut self, prompt: &[u32], chunk: usize, show_progress: bool) -> Result<u32>;
    /// What the request's sparse steps read.
    fn sparsity_report(&self) -> SparsityReport;
}

impl<B: Backend> SiriusRequest for LlamaSirius<'_, B> {
    fn prefill(&mut self, prompt: &[u32], chunk: usize, show_progress: bool) -> Result<u32> {
        LlamaSirius::prefill(self, prompt, chunk, show_progress)
    }

    fn sparsity_report(&self) -> SparsityReport {
        LlamaSirius::sparsity_report(self)
    }
}

/// Cache rows of a Sirius request: the plain request's, plus a row for the last window's
/// full-model token (the cache for plain decoding never holds the final token), plus rows
/// for a tree's pruned branches until the verification compacts them away (their positions
/// are depths, so they never pass the context). Without these the last windows would shrink.
/// Validates the corrector options first.
pub fn sirius_cache_rows<B: Backend>(
    model: &Llama<B>,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    sirius: &SiriusOptions,
) -> Result<usize> {
    if opts.sampling.temperature != 0.0 {
        return Err(Error::InvalidArgument(
            "--sirius decodes greedily (as the paper does): add --temperature 0".into(),
        ));
    }
    corrector_options(sirius, opts).validate()?;
    let capacity = cache_capacity(model, prompt_ids, opts)?;
    Ok(capacity + 1 + (sirius.period - 1) * (sirius.width - 1))
}

fn corrector_options(sirius: &SiriusOptions, opts: &GenerateOptions) -> CorrectorOptions {
    CorrectorOptions {
        period: sirius.period,
        threshold: sirius.threshold,
        accept_temperature: sirius.accept_temperature,
        width: sirius.width,
        max_tokens: opts.max_tokens,
    }
}

/// Prefill, then correction windows with text streamed at each verification boundary.
pub fn drive_sirius(
    m: &mut dyn SiriusRequest,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    sirius: SiriusOptions,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    let corrector = corrector_options(&sirius, opts);
    let t0 = Instant::now();
    let first = m.prefill(prompt_ids, opts.prefill_chunk, opts.show_progress)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();

    let mut out = TextOutput::new(tokenizer, prompt_ids, &opts.stop_strings, on_text);
    let mut reason: Option<StopReason> = None;
    let mut failure: Option<Error> = None;
    let t_decode = Instant::now();
    let (ids, stats) =
        correct_streaming(m, first, &opts.stop_token_ids, &corrector, &mut |tokens| {
            // Like plain generation, the token that completes a stop string is counted.
            for (i, &t) in tokens.iter().enumerate() {
                match out.push(t) {
                    Ok(None) => {}
                    Ok(Some(r)) => {
                        reason = Some(r);
                        return ControlFlow::Break(i + 1);
                    }
                    Err(e) => {
                        failure = Some(e);
                        return ControlFlow::Break(i);
                    }
                }
            }
            ControlFlow::Continue(())
        })?;
    if let Some(e) = failure {
        return Err(e);
    }
    let decode_wall = t_decode.elapsed().as_secs_f64();
    let stop_reason = reason.unwrap_or(if ids.len() >= opts.max_tokens {
        StopReason::MaxTokens
    } else if m.cache_room() == 0 {
        StopReason::ContextFull
    } else {
        StopReason::Eos
    });
    out.finish(stop_reason)?;
    let text = out.text;
    let sparse_report = m.sparsity_report();
    let report = SiriusReport {
        period: sirius.period,
        width: sirius.width,
        verifications: stats.verifications,
        aal: stats.aal(),
        effective_density: stats.effective_density(sirius.period, sparse_report.density),
        rollback_tokens: stats.rollback_tokens,
        draft_seconds: stats.draft_seconds,
        verify_seconds: stats.verify_seconds,
        other_seconds: (decode_wall - stats.draft_seconds - stats.verify_seconds).max(0.0),
    };
    Ok(GenerationOutput {
        text,
        prompt_tokens: prompt_ids.len(),
        generated_tokens: ids.len(),
        stop_reason,
        prefill_seconds,
        decode_seconds: decode_wall,
        prefill_tokens_per_s: rate(prompt_ids.len(), prefill_seconds),
        // The first token came from the prefill, as in plain generation.
        decode_tokens_per_s: rate(ids.len().saturating_sub(1), decode_wall),
        generated_token_ids: ids,
        sparse_setup_seconds: 0.0,
        sparsity: sparse_report,
        sirius: Some(report),
        offload: None,
    })
}
