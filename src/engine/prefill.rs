//! What every request does before decoding: check the prompt against the context, size the
//! KV cache, and run the prompt through the full model chunk by chunk.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Llama, Logits};
use crate::progress::progress_bar;

pub use crate::offload::prefill::DEFAULT_PREFILL_CHUNK;

/// The positions the model allows: its position limit, capped by any sliding window
/// (within the window, windowed attention equals full attention).
pub fn model_context(c: &ModelConfig) -> usize {
    c.sliding_window.map_or(c.max_position_embeddings, |w| {
        w.min(c.max_position_embeddings)
    })
}

/// The context a request can use: the caller's cap (`None`: none) within
/// [`model_context`]; says which limit capped a requested context.
pub fn effective_context<B: Backend>(model: &Llama<B>, requested: Option<usize>) -> usize {
    let c = &model.config;
    let limit = model_context(c);
    let Some(r) = requested else { return limit };
    if r > limit {
        if limit < c.max_position_embeddings {
            tracing::warn!("context capped at the model's sliding window, {limit} tokens");
        } else {
            tracing::warn!("context capped at the model's max_position_embeddings, {limit}");
        }
    }
    r.min(limit)
}

/// Checks the prompt and returns the KV cache rows a plain request needs: the prompt plus
/// `max_tokens - 1` (the last generated token is never fed back), capped by `context`.
pub fn cache_rows(prompt: &[u32], max_tokens: usize, context: usize) -> Result<usize> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt is empty after tokenization".into(),
        ));
    }
    // The prompt may fill the context: its last logits still give one token.
    if prompt.len() > context {
        return Err(Error::PromptTooLong {
            prompt_tokens: prompt.len(),
            context,
        });
    }
    Ok(context.min(prompt.len().saturating_add(max_tokens.saturating_sub(1))))
}

/// The prefill's chunk: at most `chunk` tokens, at least one, no longer than the prompt.
pub fn chunk_len(prompt: &[u32], chunk: usize) -> usize {
    chunk.max(1).min(prompt.len().max(1))
}

/// One prefill chunk: its tokens and which logits to return.
pub type PrefillStep<'a> = dyn FnMut(&[u32], Logits) -> Result<Vec<f32>> + 'a;

/// Feeds the prompt to `step` in chunks of `chunk` tokens, asking logits of the last one
/// only, with a progress bar for long prompts; returns the last chunk's logits.
pub fn prefill_chunks(
    prompt: &[u32],
    chunk: usize,
    show_progress: bool,
    step: &mut PrefillStep<'_>,
) -> Result<Vec<f32>> {
    let chunks: Vec<&[u32]> = prompt.chunks(chunk.max(1)).collect();
    // indicatif hides the bar when stderr is not a terminal.
    let bar =
        (show_progress && chunks.len() > 1).then(|| progress_bar(prompt.len() as u64, "prefill"));
    let mut logits = Vec::new();
    for (i, piece) in chunks.iter().enumerate() {
        // Every chunk but the last needs no logits.
        let want = if i + 1 == chunks.len() {
            Logits::Last
        } else {
            Logits::None
        };
        logits = step(piece, want)?;
        if let Some(bar) = &bar {
            bar.inc(piece.len() as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(logits)
}
