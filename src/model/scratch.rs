//! The forward pass's activation buffers, sized once for the largest batch and reused.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::Llama;
use crate::sparsity::ffn::FfnScratch;

/// Activation buffers for batches of up to `max_tokens` tokens (of which at most
/// `max_logit_rows` want logits), reused across calls.
pub struct Scratch<B: Backend> {
    pub(super) max_tokens: usize,
    pub(super) max_logit_rows: usize,
    pub(super) x: B::Buf,      // [n, h] residual stream
    pub(super) xn: B::Buf,     // [n, h] normed
    pub(super) q: B::Buf,      // [n, q]
    pub(super) k: B::Buf,      // [n, kv]
    pub(super) v: B::Buf,      // [n, kv]
    pub(super) attn: B::Buf,   // [n, q]
    pub(super) proj: B::Buf,   // [n, h] output of wo / the FFN
    pub(super) picked: B::Buf, // [r, h] rows selected for the head
    pub(super) logits: B::Buf, // [r, vocab]
    pub(super) ffn: FfnScratch<B>,
}

impl<B: Backend> Scratch<B> {
    /// Scratch for batches of `max_tokens` that may all want logits.
    pub fn new(model: &Llama<B>, max_tokens: usize) -> Result<Self> {
        Self::with_logit_rows(model, max_tokens, max_tokens)
    }

    /// Scratch whose batches want logits for at most `max_logit_rows` rows (1 for plain
    /// generation): the logits buffer is rows x vocab, the largest one here.
    pub fn with_logit_rows(
        model: &Llama<B>,
        max_tokens: usize,
        max_logit_rows: usize,
    ) -> Result<Self> {
        let c = &model.config;
        let b = &model.backend;
        let n = max_tokens.max(1);
        let r = max_logit_rows.clamp(1, n);
        Ok(Scratch {
            max_tokens: n,
            max_logit_rows: r,
            x: b.alloc(n * c.hidden_size)?,
            xn: b.alloc(n * c.hidden_size)?,
            q: b.alloc(n * c.q_dim())?,
            k: b.alloc(n * c.kv_dim())?,
            v: b.alloc(n * c.kv_dim())?,
            attn: b.alloc(n * c.q_dim())?,
            proj: b.alloc(n * c.hidden_size)?,
            picked: b.alloc(r * c.hidden_size)?,
            logits: b.alloc(r * c.vocab_size)?,
            ffn: FfnScratch::new(b, n, model.ffn_dims())?,
        })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Bytes of the f32 buffers [`Scratch::with_logit_rows`] allocates (an offloading
    /// runtime reserves them in its budget before allocating).
    pub fn byte_size(c: &ModelConfig, max_tokens: usize, max_logit_rows: usize) -> u64 {
        scratch_byte_size(c, max_tokens, max_logit_rows)
    }
}

/// [`Scratch::byte_size`] without naming a backend (the buffers are f32 on every one).
pub fn scratch_byte_size(c: &ModelConfig, max_tokens: usize, max_logit_rows: usize) -> u64 {
    let n = max_tokens.max(1);
    let r = max_logit_rows.clamp(1, n);
    let per_token = 5 * c.hidden_size + 2 * c.q_dim() + 2 * c.kv_dim() + 2 * c.intermediate_size;
    (4 * (n * per_token + r * (c.hidden_size + c.vocab_size))) as u64
}
