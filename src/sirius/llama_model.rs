//! [`SiriusModel`] over the one `Llama` forward: drafting runs the request's sparse FFN,
//! verification the dense one, both on the same KV cache.

use crate::backend::{Backend, TreeMask};
use crate::engine::request::prefill;
use crate::error::Result;
use crate::model::llama::Ffn;
use crate::model::sampler::argmax;
use crate::model::{KvCache, Llama, Logits, Scratch};
use crate::sirius::corrector::SiriusModel;
use crate::sparsity::{SparseRequest, Sparsity};

pub struct LlamaSirius<'m, B: Backend> {
    model: &'m Llama<B>,
    request: SparseRequest<'m, B>,
    pub cache: KvCache<B>,
    draft_scratch: Scratch<B>,
    verify_scratch: Scratch<B>,
}

impl<'m, B: Backend> LlamaSirius<'m, B> {
    /// A request with room for `capacity` cache entries and verification windows of `period`
    /// tokens per path, `width` paths (a tree of (period - 1) * width + 1 tokens).
    pub fn new(
        model: &'m Llama<B>,
        sparsity: &'m Sparsity<B>,
        capacity: usize,
        period: usize,
        width: usize,
    ) -> Result<Self> {
        // A window never holds more tokens than the cache has rows.
        let width = width.clamp(1, capacity.max(1));
        let window = ((period.max(1) - 1) * width + 1).min(capacity.max(1));
        Ok(LlamaSirius {
            model,
            request: sparsity.request(model)?,
            cache: model.new_cache(capacity)?,
            draft_scratch: Scratch::new(model, width)?,
            verify_scratch: Scratch::new(model, window)?,
        })
    }

    /// Runs the prompt through the full model (Griffin picks its neurons here) and returns
    /// the full model's first token.
    pub fn prefill(&mut self, prompt: &[u32], chunk: usize, show_progress: bool) -> Result<u32> {
        let logits = prefill(
            self.model,
            &mut self.request,
            &mut self.cache,
            prompt,
            chunk,
            show_progress,
        )?;
        self.request.finish_prefill(self.model)?;
        Ok(argmax(&logits))
    }

    pub fn request(&self) -> &SparseRequest<'m, B> {
        &self.request
    }

    /// What the request's sparse steps read.
    pub fn sparsity_report(&self) -> crate::sparsity::SparsityReport {
        self.request.report(&self.model.config)
    }
}

impl<B: Backend> SiriusModel for LlamaSirius<'_, B> {
    fn cache_len(&self) -> usize {
        self.cache.len()
    }

    fn cache_room(&self) -> usize {
        self.cache.capacity() - self.cache.len()
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len);
        Ok(())
    }

    fn draft(&mut self, token: u32) -> Result<Vec<f32>> {
        let logits = self.model.forward_with(
            &[token],
            &mut self.cache,
            &mut self.draft_scratch,
            Logits::Last,
            &mut self.request.decode_ffn()?,
        )?;
        self.request.count_decode(1);
        Ok(logits)
    }

    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let vocab = self.model.config.vocab_size;
        let all = self.model.forward_with(
            tokens,
            &mut self.cache,
            &mut self.verify_scratch,
            Logits::All,
            &mut Ffn::Dense,
        )?;
        Ok(all.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    fn draft_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        let vocab = self.model.config.vocab_size;
        let all = self.model.forward_tree(
            tokens,
            mask,
            &mut self.cache,
            &mut self.draft_scratch,
            Logits::All,
            &mut self.request.batch_ffn(true)?,
        )?;
        self.request.count_decode(tokens.len());
        Ok(all.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    fn verify_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        let vocab = self.model.config.vocab_size;
        let all = self.model.forward_tree(
            tokens,
            mask,
            &mut self.cache,
            &mut self.verify_scratch,
            Logits::All,
            &mut Ffn::Dense,
        )?;
        Ok(all.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    fn keep_rows(&mut self, start: usize, rows: &[usize]) -> Result<()> {
        self.cache.keep_rows(&self.model.backend, start, rows)
    }
}
