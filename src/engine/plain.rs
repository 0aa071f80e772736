//! Plain generation: the prompt through the full model, then one token per step, sampled
//! from the logits of a forward through the request's FFN (dense, or sparse).

use std::time::Instant;

use crate::backend::{Backend, DeviceCounts, SparseOps};
use crate::engine::decode::{Decoded, Decoder, Prefilled, Request, RequestReport};
use crate::engine::prefill::{chunk_len, prefill_chunks};
use crate::engine::prefix::PromptPrefix;
use crate::error::{Error, Result};
use crate::model::{KvCache, Llama, Logits, Pass, Sampler, SamplingParams, Scratch};
use crate::sparsity::SparseRequest;

pub struct PlainRequest<'m, B: Backend> {
    model: &'m Llama<B>,
    sparse: SparseRequest<'m, B>,
    cache: KvCache<B>,
    scratch: Scratch<B>,
    sampler: Sampler,
}

impl<'m, B: Backend> PlainRequest<'m, B> {
    /// A request of `capacity` cache rows that samples with `sampling` and decodes through
    /// `sparse`'s FFN.
    pub fn new(
        model: &'m Llama<B>,
        sparse: SparseRequest<'m, B>,
        capacity: usize,
        sampling: SamplingParams,
    ) -> Result<Self> {
        Ok(PlainRequest {
            model,
            sparse,
            cache: model.new_cache(capacity)?,
            scratch: Scratch::with_logit_rows(model, 1, 1)?,
            sampler: Sampler::new(sampling)?,
        })
    }

    /// Starts from a prompt prefix computed once (see [`PromptPrefix`]).
    pub fn resume(&mut self, prefix: &PromptPrefix<B>) -> Result<()>
    where
        B: SparseOps,
    {
        prefix.seed(&self.model.backend, &mut self.cache, &mut self.sparse)
    }

    /// The finished request's `prompt`, kept for a request that continues it.
    pub fn into_prompt_prefix(mut self, prompt: &[u32]) -> Result<PromptPrefix<B>>
    where
        B: SparseOps,
    {
        let scores = self.sparse.take_scores();
        PromptPrefix::kept(self.model, prompt, self.cache, scores)
    }
}

impl<B: SparseOps> Decoder for PlainRequest<'_, B> {
    fn room(&self) -> usize {
        self.cache.capacity() - self.cache.len()
    }

    fn device_counts(&self) -> Option<DeviceCounts> {
        self.model.backend.device_counts()
    }

    fn step(&mut self, last: u32, _budget: usize) -> Result<Vec<u32>> {
        let pass = Pass::new(
            std::slice::from_ref(&last),
            Logits::Last,
            self.sparse.decode_ffn()?,
        );
        // Greedy: the backend picks the token where the logits are (no vocab-row readback).
        let token = if self.sampler.is_greedy() {
            let ids = self
                .model
                .forward_argmax(pass, &mut self.cache, &mut self.scratch)?;
            ids.first().copied().ok_or_else(no_logits)?
        } else {
            let logits = self
                .model
                .forward(pass, &mut self.cache, &mut self.scratch)?;
            self.sampler.sample(&logits)
        };
        self.sparse.count_decode(1);
        Ok(vec![token])
    }
}

impl<B: SparseOps> Request for PlainRequest<'_, B> {
    fn prefill(&mut self, prompt: &[u32], chunk: usize, progress: bool) -> Result<Prefilled> {
        let (model, cache, sparse) = (self.model, &mut self.cache, &mut self.sparse);
        let chunk = chunk_len(prompt, chunk);
        let mut scratch = Scratch::with_logit_rows(model, chunk, 1)?;
        let logits = prefill_chunks(prompt, chunk, progress, &mut |piece, want| {
            let pass = Pass::new(piece, want, sparse.prefill_ffn());
            model.forward(pass, cache, &mut scratch)
        })?;
        let t = Instant::now();
        self.sparse.finish_prefill(&model.backend)?;
        Ok(Prefilled {
            setup_seconds: t.elapsed().as_secs_f64(),
            first: self.sampler.sample(&logits),
        })
    }

    fn report(&mut self, _decoded: &Decoded) -> Result<RequestReport> {
        Ok(RequestReport {
            sparsity: self.sparse.report(&self.model.config),
            sirius: None,
            offload: None,
        })
    }
}

fn no_logits() -> Error {
    Error::InvalidArgument("a decode step's forward returned no logits".into())
}
