//! [`SiriusModel`] over the one `Llama` forward: drafts run the request's sparse FFN,
//! verifications and the prompt the full model, all on one KV cache. Where the weights are
//! is a [`Residency`]: all in memory ([`InMemory`]), or partly streamed by an offloading
//! runtime (`offloaded::Streamed`).

use std::time::Instant;

use crate::backend::{DeviceCounts, SparseOps};
use crate::engine::decode::Prefilled;
use crate::engine::prefill::{chunk_len, prefill_chunks};
use crate::engine::prefix::PromptPrefix;
use crate::error::{Error, Result};
use crate::model::sampler::{argmax, RowVerdict};
use crate::model::{KvCache, LayerStream, Llama, Logits, Pass, Scratch};
use crate::offload::runtime::{OffloadReport, PassKind};
use crate::sirius::{SiriusConfig, SiriusModel};
use crate::sparsity::{Dense, FfnStrategy, SparseRequest, Sparsity, SparsityReport, SplitDense};
use crate::tensor::TreeMask;

/// Where a Sirius request's weights are, and what that changes for its passes.
pub trait Residency<B: SparseOps> {
    /// Whether full passes after the prompt run the request's resident neurons plus a
    /// streamed complement (offloaded), rather than the dense FFN.
    const SPLIT_FULL_PASSES: bool;

    /// Before a pass of `kind`: queue what it streams.
    fn begin_pass(&mut self, _kind: PassKind) -> Result<()> {
        Ok(())
    }
    /// The runtime the forward pulls streamed layers from, if any.
    fn stream(&mut self) -> Option<&mut dyn LayerStream<B>> {
        None
    }
    /// After a failed pass: drop what it left queued, so the next pass starts clean.
    fn abandon(&mut self) {}
    /// After the prompt: the request's Griffin neurons made usable (gathered, or copied into
    /// resident memory).
    fn place_neurons(&mut self, request: &mut SparseRequest<'_, B>, backend: &B) -> Result<()>;
    /// Streaming statistics of the request (offloaded only).
    /// `aal` and `period` (the mean K, with adaptive windows) are the request's windows.
    fn report(
        &mut self,
        _aal: f64,
        _period: usize,
        _ms_per_token: f64,
    ) -> Result<Option<OffloadReport>> {
        Ok(None)
    }
}

/// Every weight in memory: nothing streams.
pub struct InMemory;

impl<B: SparseOps> Residency<B> for InMemory {
    const SPLIT_FULL_PASSES: bool = false;

    fn place_neurons(&mut self, request: &mut SparseRequest<'_, B>, backend: &B) -> Result<()> {
        request.finish_prefill(backend)
    }
}

pub struct LlamaSirius<'m, B: SparseOps, W: Residency<B> = InMemory> {
    model: &'m Llama<B>,
    request: SparseRequest<'m, B>,
    pub cache: KvCache<B>,
    draft_scratch: Scratch<B>,
    verify_scratch: Scratch<B>,
    weights: W,
}

impl<'m, B: SparseOps> LlamaSirius<'m, B> {
    /// A request in memory drafting with `sparsity`, with room for `capacity` cache
    /// entries, its windows shaped by `config`.
    pub fn new(
        model: &'m Llama<B>,
        sparsity: &'m Sparsity<B>,
        capacity: usize,
        config: &SiriusConfig,
    ) -> Result<Self> {
        let request = SparseRequest::new(sparsity, &model.backend, model.ffn_dims())?;
        Self::with_weights(model, request, capacity, config, InMemory)
    }
}

impl<'m, B: SparseOps, W: Residency<B>> LlamaSirius<'m, B, W> {
    /// A request drafting with `request`'s FFN whose weights are where `weights` says.
    pub fn with_weights(
        model: &'m Llama<B>,
        request: SparseRequest<'m, B>,
        capacity: usize,
        config: &SiriusConfig,
        weights: W,
    ) -> Result<Self> {
        let (draft_rows, window) = config.batch_rows(capacity);
        Ok(LlamaSirius {
            model,
            request,
            cache: model.new_cache(capacity)?,
            draft_scratch: Scratch::new(model, draft_rows)?,
            verify_scratch: Scratch::new(model, window)?,
            weights,
        })
    }

    /// Starts from a prompt prefix computed once (see [`PromptPrefix`]).
    pub fn resume(&mut self, prefix: &PromptPrefix<B>) -> Result<()> {
        prefix.seed(&self.model.backend, &mut self.cache, &mut self.request)
    }

    /// The finished request's `prompt`, kept for a request that continues it (its rows are
    /// the prefill's: drafts and verifications write only after them).
    pub fn into_prompt_prefix(mut self, prompt: &[u32]) -> Result<PromptPrefix<B>> {
        let scores = self.request.take_scores();
        PromptPrefix::kept(self.model, prompt, self.cache, scores)
    }

    /// Runs the prompt through the full model (Griffin scores its neurons there, then they
    /// are placed) and returns the full model's first token.
    pub fn prefill(&mut self, prompt: &[u32], chunk: usize, progress: bool) -> Result<Prefilled> {
        let chunk = chunk_len(prompt, chunk);
        let mut scratch = Scratch::with_logit_rows(self.model, chunk, 1)?;
        let (model, weights, cache, request) = (
            self.model,
            &mut self.weights,
            &mut self.cache,
            &mut self.request,
        );
        let logits = prefill_chunks(prompt, chunk, progress, &mut |piece, want| {
            let ffn = request.prefill_ffn();
            let batch = Batch::new(PassKind::Full, piece, None, want);
            run_pass(
                model,
                &mut *weights,
                cache,
                &mut scratch,
                batch,
                ffn,
                Llama::forward,
            )
        })?;
        let t = Instant::now();
        self.weights
            .place_neurons(&mut self.request, &self.model.backend)?;
        Ok(Prefilled {
            setup_seconds: t.elapsed().as_secs_f64(),
            first: argmax(&logits),
        })
    }

    /// What the sparse drafts read.
    pub fn sparsity_report(&self) -> SparsityReport {
        self.request.report(&self.model.config)
    }

    /// Streaming statistics (offloaded only; `aal` and `ms_per_token` measured).
    pub fn offload_report(
        &mut self,
        aal: f64,
        period: usize,
        ms_per_token: f64,
    ) -> Result<Option<OffloadReport>> {
        self.weights.report(aal, period, ms_per_token)
    }

    /// A draft pass (the sparse FFN; one token, or the newest nodes of a tree), its output
    /// what `forward` makes of it (logits, or their argmax).
    fn draft_pass<T: Default>(
        &mut self,
        tokens: &[u32],
        tree: Option<&TreeMask>,
        logits: Logits,
        forward: impl Forward<B, T>,
    ) -> Result<T> {
        let ffn = self.request.batch_ffn(tree.is_some())?;
        let batch = Batch::new(PassKind::Draft, tokens, tree, logits);
        let (model, cache, scratch) = (self.model, &mut self.cache, &mut self.draft_scratch);
        let out = run_pass(
            model,
            &mut self.weights,
            cache,
            scratch,
            batch,
            ffn,
            forward,
        )?;
        self.request.count_decode(tokens.len());
        Ok(out)
    }

    /// A full pass over a window or tree (the dense FFN, or resident + streamed neurons),
    /// every row's logits asked for, its output what `forward` makes of them.
    fn full_pass<T: Default>(
        &mut self,
        tokens: &[u32],
        tree: Option<&TreeMask>,
        forward: impl Forward<B, T>,
    ) -> Result<T> {
        let mut dense = Dense;
        let mut split;
        let ffn: &mut dyn FfnStrategy<B> = match W::SPLIT_FULL_PASSES {
            false => &mut dense,
            true => {
                let griffin = self.request.griffin().ok_or_else(|| {
                    Error::InvalidArgument(
                        "the offloaded model decodes only after its prefill".into(),
                    )
                })?;
                split = SplitDense(griffin);
                &mut split
            }
        };
        let batch = Batch::new(PassKind::Full, tokens, tree, Logits::All);
        let (model, cache, scratch) = (self.model, &mut self.cache, &mut self.verify_scratch);
        run_pass(
            model,
            &mut self.weights,
            cache,
            scratch,
            batch,
            ffn,
            forward,
        )
    }

    /// `[rows, vocab]` logits as one vector per row.
    fn split_rows(&self, all: Vec<f32>) -> Vec<Vec<f32>> {
        let vocab = self.model.config.vocab_size.max(1);
        all.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
    }
}

/// What a pass returns, made from the forward: `Llama::forward` (the logits) or
/// `Llama::forward_argmax` (each row's greedy token, picked by the backend).
trait Forward<B: SparseOps, T>:
    FnOnce(&Llama<B>, Pass<'_, B>, &mut KvCache<B>, &mut Scratch<B>) -> Result<T>
{
}

impl<B: SparseOps, T, F> Forward<B, T> for F where
    F: FnOnce(&Llama<B>, Pass<'_, B>, &mut KvCache<B>, &mut Scratch<B>) -> Result<T>
{
}

/// What one pass runs over.
struct Batch<'a> {
    kind: PassKind,
    tokens: &'a [u32],
    tree: Option<&'a TreeMask>,
    logits: Logits,
}

impl<'a> Batch<'a> {
    fn new(kind: PassKind, tokens: &'a [u32], tree: Option<&'a TreeMask>, logits: Logits) -> Self {
        Batch {
            kind,
            tokens,
            tree,
            logits,
        }
    }
}

/// One forward of `batch` through `ffn`, streaming through `weights` where they say so; a
/// pass that fails midway leaves nothing queued.
fn run_pass<B: SparseOps, W: Residency<B>, T: Default>(
    model: &Llama<B>,
    weights: &mut W,
    cache: &mut KvCache<B>,
    scratch: &mut Scratch<B>,
    batch: Batch<'_>,
    ffn: &mut dyn FfnStrategy<B>,
    forward: impl Forward<B, T>,
) -> Result<T> {
    if batch.tokens.is_empty() {
        return Ok(T::default());
    }
    weights.begin_pass(batch.kind)?;
    let mut pass = Pass::new(batch.tokens, batch.logits, ffn);
    if let Some(mask) = batch.tree {
        pass = pass.tree(mask);
    }
    if let Some(stream) = weights.stream() {
        pass = pass.streamed(stream);
    }
    let out = forward(model, pass, cache, scratch);
    if out.is_err() {
        weights.abandon();
    }
    out
}

impl<B: SparseOps, W: Residency<B>> SiriusModel for LlamaSirius<'_, B, W> {
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

    fn device_counts(&self) -> Option<DeviceCounts> {
        self.model.backend.device_counts()
    }

    fn draft(&mut self, token: u32) -> Result<Vec<f32>> {
        self.draft_pass(
            std::slice::from_ref(&token),
            None,
            Logits::Last,
            Llama::forward,
        )
    }

    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let all = self.full_pass(tokens, None, Llama::forward)?;
        Ok(self.split_rows(all))
    }

    fn draft_argmax(&mut self, token: u32) -> Result<u32> {
        let one = std::slice::from_ref(&token);
        let ids = self.draft_pass(one, None, Logits::Last, Llama::forward_argmax)?;
        ids.first()
            .copied()
            .ok_or_else(|| Error::InvalidArgument("a draft pass returned no token".into()))
    }

    fn verify_argmax(&mut self, tokens: &[u32]) -> Result<Vec<u32>> {
        self.full_pass(tokens, None, Llama::forward_argmax)
    }

    fn verify_verdicts(&mut self, tokens: &[u32], temperature: f32) -> Result<Vec<RowVerdict>> {
        let next = tokens.get(1..).unwrap_or(&[]);
        self.full_pass(tokens, None, |m: &Llama<B>, pass, cache, scratch| {
            m.forward_verdicts(pass, cache, scratch, next, temperature)
        })
    }

    fn draft_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        let all = self.draft_pass(tokens, Some(mask), Logits::All, Llama::forward)?;
        Ok(self.split_rows(all))
    }

    fn verify_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        let all = self.full_pass(tokens, Some(mask), Llama::forward)?;
        Ok(self.split_rows(all))
    }

    fn keep_rows(&mut self, start: usize, rows: &[usize]) -> Result<()> {
        self.cache.keep_rows(&self.model.backend, start, rows)
    }
}
