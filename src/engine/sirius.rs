//! Sirius generation: a request whose steps are correction windows ([`Corrector`]) over a
//! model that drafts with its sparse FFN and verifies with the full one on one KV cache:
//! [`LlamaSirius`] in memory here, `offloaded::OffloadedSirius` with streamed weights.

use std::time::Instant;

use crate::backend::{Backend, SparseOps};
use crate::engine::decode::{decode, Decoded, Decoder, Prefilled, Request, RequestReport};
use crate::engine::output::SiriusReport;
use crate::engine::prefill::{chunk_len, prefill_chunks};
use crate::error::{Error, Result};
use crate::model::sampler::argmax;
use crate::model::{KvCache, Llama, Logits, Pass, Scratch};
use crate::offload::runtime::OffloadReport;
use crate::sirius::{Corrector, SiriusConfig, SiriusModel};
use crate::sparsity::{Dense, SparseRequest, Sparsity, SparsityReport};
use crate::tensor::TreeMask;

/// A [`SiriusModel`] a request can prefill and report on.
pub trait SiriusBacked: SiriusModel {
    /// Runs the prompt through the full model (Griffin picks its neurons here) and returns
    /// the full model's first token.
    fn prefill(&mut self, prompt: &[u32], chunk: usize, progress: bool) -> Result<Prefilled>;
    /// What the sparse drafts read.
    fn sparsity_report(&self) -> SparsityReport;
    /// Streaming statistics, for an offloaded model (`aal`: the request's, measured;
    /// `ms_per_token`: measured decode ms per produced token).
    fn offload_report(&mut self, _aal: f64, _ms_per_token: f64) -> Result<Option<OffloadReport>> {
        Ok(None)
    }
}

/// Greedy Sirius generation over `M`.
pub struct SiriusRequest<M: SiriusBacked> {
    pub model: M,
    corrector: Corrector,
}

impl<M: SiriusBacked> SiriusRequest<M> {
    pub fn new(model: M, config: SiriusConfig, stop_ids: &[u32]) -> Result<Self> {
        Ok(SiriusRequest {
            model,
            corrector: Corrector::new(config, stop_ids)?,
        })
    }

    /// Tree windows whatever the width (see `Corrector::with_tree_windows`).
    pub fn with_tree_windows(mut self) -> Self {
        self.corrector = self.corrector.with_tree_windows();
        self
    }

    pub fn stats(&self) -> &crate::sirius::CorrectionStats {
        &self.corrector.stats
    }
}

impl<M: SiriusBacked> Decoder for SiriusRequest<M> {
    fn room(&self) -> usize {
        self.model.cache_room()
    }

    fn step(&mut self, last: u32, budget: usize) -> Result<Vec<u32>> {
        self.corrector.window(&mut self.model, last, budget)
    }
}

impl<M: SiriusBacked> Request for SiriusRequest<M> {
    fn prefill(&mut self, prompt: &[u32], chunk: usize, progress: bool) -> Result<Prefilled> {
        self.model.prefill(prompt, chunk, progress)
    }

    fn report(&mut self, decoded: &Decoded) -> Result<RequestReport> {
        let stats = &self.corrector.stats;
        let config = *self.corrector.config();
        let sparsity = self.model.sparsity_report();
        let report = SiriusReport {
            period: config.period,
            width: config.width,
            verifications: stats.verifications,
            aal: stats.aal(),
            effective_density: stats.effective_density(config.period, sparsity.density),
            rollback_tokens: stats.rollback_tokens,
            draft_seconds: stats.draft_seconds,
            verify_seconds: stats.verify_seconds,
            other_seconds: (decoded.step_seconds - stats.draft_seconds - stats.verify_seconds)
                .max(0.0),
        };
        let produced = decoded.ids.len().saturating_sub(1);
        let ms_per_token = match produced {
            0 => 0.0,
            n => 1e3 * decoded.step_seconds / n as f64,
        };
        Ok(RequestReport {
            offload: self
                .model
                .offload_report(report.aal.max(1.0), ms_per_token)?,
            sparsity,
            sirius: Some(report),
        })
    }
}

/// [`SiriusModel`] over the one `Llama` forward in memory: drafting runs the request's
/// sparse FFN, verification the dense one, both on the same KV cache.
pub struct LlamaSirius<'m, B: Backend> {
    model: &'m Llama<B>,
    request: SparseRequest<'m, B>,
    pub cache: KvCache<B>,
    draft_scratch: Scratch<B>,
    verify_scratch: Scratch<B>,
}

impl<'m, B: SparseOps> LlamaSirius<'m, B> {
    /// A request drafting with `sparsity`, with room for `capacity` cache entries, its
    /// windows shaped by `config`.
    pub fn new(
        model: &'m Llama<B>,
        sparsity: &'m Sparsity<B>,
        capacity: usize,
        config: &SiriusConfig,
    ) -> Result<Self> {
        let (draft_rows, window) = config.batch_rows(capacity);
        Ok(LlamaSirius {
            model,
            request: SparseRequest::new(sparsity, &model.backend, model.ffn_dims())?,
            cache: model.new_cache(capacity)?,
            draft_scratch: Scratch::new(model, draft_rows)?,
            verify_scratch: Scratch::new(model, window)?,
        })
    }

    /// Logits rows of a forward's `[rows, vocab]` output.
    fn rows(&self, all: Vec<f32>) -> Vec<Vec<f32>> {
        let vocab = self.model.config.vocab_size;
        all.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
    }
}

impl<B: SparseOps> SiriusBacked for LlamaSirius<'_, B> {
    fn prefill(&mut self, prompt: &[u32], chunk: usize, progress: bool) -> Result<Prefilled> {
        let (model, cache, request) = (self.model, &mut self.cache, &mut self.request);
        let chunk = chunk_len(prompt, chunk);
        let mut scratch = Scratch::with_logit_rows(model, chunk, 1)?;
        let logits = prefill_chunks(prompt, chunk, progress, &mut |piece, want| {
            model.forward(
                Pass::new(piece, want, request.prefill_ffn()),
                cache,
                &mut scratch,
            )
        })?;
        let t = Instant::now();
        self.request.finish_prefill(&model.backend)?;
        Ok(Prefilled {
            setup_seconds: t.elapsed().as_secs_f64(),
            first: argmax(&logits),
        })
    }

    fn sparsity_report(&self) -> SparsityReport {
        self.request.report(&self.model.config)
    }
}

impl<B: SparseOps> SiriusModel for LlamaSirius<'_, B> {
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
        let pass = Pass::new(
            std::slice::from_ref(&token),
            Logits::Last,
            self.request.decode_ffn()?,
        );
        let logits = self
            .model
            .forward(pass, &mut self.cache, &mut self.draft_scratch)?;
        self.request.count_decode(1);
        Ok(logits)
    }

    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut dense = Dense;
        let pass = Pass::new(tokens, Logits::All, &mut dense);
        let all = self
            .model
            .forward(pass, &mut self.cache, &mut self.verify_scratch)?;
        Ok(self.rows(all))
    }

    fn draft_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        let pass = Pass::new(tokens, Logits::All, self.request.batch_ffn(true)?).tree(mask);
        let all = self
            .model
            .forward(pass, &mut self.cache, &mut self.draft_scratch)?;
        self.request.count_decode(tokens.len());
        Ok(self.rows(all))
    }

    fn verify_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        let mut dense = Dense;
        let pass = Pass::new(tokens, Logits::All, &mut dense).tree(mask);
        let all = self
            .model
            .forward(pass, &mut self.cache, &mut self.verify_scratch)?;
        Ok(self.rows(all))
    }

    fn keep_rows(&mut self, start: usize, rows: &[usize]) -> Result<()> {
        self.cache.keep_rows(&self.model.backend, start, rows)
    }
}

/// Greedy Sirius generation after a prompt already in `model`'s cache (`first`: the full
/// model's token after it), through the one decode loop: at most `max_tokens` tokens
/// (`first` included), ending at a stop id (not included) met at a verification boundary or
/// a full cache. Returns the tokens and the corrector's statistics.
pub fn correct(
    model: &mut dyn SiriusModel,
    first: u32,
    stop_ids: &[u32],
    corrector: Corrector,
    max_tokens: usize,
) -> Result<(Vec<u32>, crate::sirius::CorrectionStats)> {
    struct Windows<'a> {
        model: &'a mut dyn SiriusModel,
        corrector: Corrector,
    }
    impl Decoder for Windows<'_> {
        fn room(&self) -> usize {
            self.model.cache_room()
        }
        fn step(&mut self, last: u32, budget: usize) -> Result<Vec<u32>> {
            self.corrector.window(&mut *self.model, last, budget)
        }
    }
    let mut windows = Windows { model, corrector };
    let decoded = decode(&mut windows, first, max_tokens, stop_ids, &mut |_| Ok(None))?;
    Ok((decoded.ids, windows.corrector.stats))
}

/// Sirius decodes greedily (as the paper does): a sampling temperature is refused.
pub fn check_greedy(temperature: f32) -> Result<()> {
    if temperature != 0.0 {
        return Err(Error::InvalidArgument(
            "--sirius decodes greedily (as the paper does): add --temperature 0".into(),
        ));
    }
    Ok(())
}
