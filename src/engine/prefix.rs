//! Prompt prefix reuse: requests that share a long prompt prefix (an evaluation's few-shot
//! examples, a chat's system prompt) compute its KV cache once.
//!
//! A [`PromptPrefix`] is the prefix run once through the full model: its KV rows and, because
//! Griffin scores a request's neurons from every prompt token, the prefix's share of those
//! scores (a sum over tokens, so the prefix's part adds to the rest of a prompt's). A request
//! whose prompt continues the prefix starts from a copy of both and runs only the rest of its
//! prompt. The result equals a prefill of the whole prompt up to where the chunks fall: the
//! sums run in another order, and a chunk of 2-16 tokens of quantized weights takes 8-bit
//! activations (`backend::cpu` quantized batches) where a longer one takes f32 ones, so a
//! near-tie may pick another token.

use crate::backend::SparseOps;
use crate::engine::prefill::{chunk_len, prefill_chunks};
use crate::error::{Error, Result};
use crate::model::{KvCache, Llama, Logits, Pass, Scratch};
use crate::sparsity::{GriffinScores, SparseRequest};

pub struct PromptPrefix<B: SparseOps> {
    tokens: Vec<u32>,
    cache: KvCache<B>,
    /// The prefix's Griffin scores (None: a kept prompt of a request that did not score).
    scores: Option<GriffinScores<B>>,
}

impl<B: SparseOps> PromptPrefix<B> {
    /// Runs `tokens` through the full model in chunks of `chunk` (a progress bar on long ones
    /// when `progress`).
    pub fn build(model: &Llama<B>, tokens: &[u32], chunk: usize, progress: bool) -> Result<Self> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument(
                "a prompt prefix needs at least one token".into(),
            ));
        }
        let mut cache = model.new_cache(tokens.len())?;
        let mut scores = GriffinScores::new(&model.backend, model.ffn_dims())?;
        let chunk = chunk_len(tokens, chunk);
        let mut scratch = Scratch::with_logit_rows(model, chunk, 1)?;
        prefill_chunks(tokens, chunk, progress, &mut |piece, _| {
            // No logits: the prefix is never a whole prompt (see `continued_by`).
            let pass = Pass::new(piece, Logits::None, &mut scores);
            model.forward(pass, &mut cache, &mut scratch)
        })?;
        Ok(PromptPrefix {
            tokens: tokens.to_vec(),
            cache,
            scores: Some(scores),
        })
    }

    /// The prompt of a finished request, kept: the first `prompt.len()` rows of its `cache`
    /// (rows a request writes after its prompt are its generated tokens, which the sparse
    /// model may have computed), copied into a cache of just that size, and its Griffin
    /// scores, if it scored.
    pub fn kept(
        model: &Llama<B>,
        prompt: &[u32],
        mut cache: KvCache<B>,
        scores: Option<GriffinScores<B>>,
    ) -> Result<Self> {
        if prompt.is_empty() || cache.len() < prompt.len() {
            return Err(Error::InvalidArgument(format!(
                "a kept prompt of {} tokens needs as many cache rows, the cache has {}",
                prompt.len(),
                cache.len()
            )));
        }
        cache.truncate(prompt.len());
        // The request's cache has room for its whole generation: keep only the prompt's.
        let mut kept = model.new_cache(prompt.len())?;
        kept.seed_from(&model.backend, &cache)?;
        Ok(PromptPrefix {
            tokens: prompt.to_vec(),
            cache: kept,
            scores,
        })
    }

    /// Whether a request of an engine whose requests score Griffin neurons (`griffin`) can
    /// start from this prefix: it needs the prefix's scores.
    pub fn serves(&self, prompt: &[u32], griffin: bool) -> bool {
        self.continued_by(prompt) && (self.scores.is_some() || !griffin)
    }

    /// Prefix tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether `prompt` starts with the prefix and has at least one token after it (whose
    /// logits give the request's first token).
    pub fn continued_by(&self, prompt: &[u32]) -> bool {
        prompt.len() > self.tokens.len() && prompt.starts_with(&self.tokens)
    }

    /// Starts a request from the prefix: its rows into the request's empty `cache`, its
    /// Griffin scores into the request's (if it scores).
    pub fn seed(
        &self,
        backend: &B,
        cache: &mut KvCache<B>,
        request: &mut SparseRequest<'_, B>,
    ) -> Result<()> {
        cache.seed_from(backend, &self.cache)?;
        match &self.scores {
            Some(scores) => request.add_prompt_scores(backend, scores),
            None => Ok(()),
        }
    }
}

/// The longest token prefix all `prompts` share (empty without prompts).
pub fn common_prefix_len(prompts: &[Vec<u32>]) -> usize {
    let Some((first, rest)) = prompts.split_first() else {
        return 0;
    };
    rest.iter().fold(first.len(), |len, p| {
        first[..len]
            .iter()
            .zip(p)
            .take_while(|(a, b)| a == b)
            .count()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_of_prompts() {
        let p = |v: &[u32]| v.to_vec();
        assert_eq!(common_prefix_len(&[]), 0);
        assert_eq!(common_prefix_len(&[p(&[1, 2, 3])]), 3);
        assert_eq!(common_prefix_len(&[p(&[1, 2, 3]), p(&[1, 2, 4, 5])]), 2);
        assert_eq!(common_prefix_len(&[p(&[1, 2]), p(&[1, 2, 3]), p(&[9])]), 0);
        assert_eq!(common_prefix_len(&[p(&[1, 2, 3]), p(&[1, 2])]), 2);
    }
}
