//! Sirius with offloaded weights (`run --resident-mem` on the CPU, `--gpu-mem` on CUDA):
//! [`OffloadedSirius`] drafts with the resident Griffin FFN (streaming only what did not
//! fit) and runs the prompt and verifications through the full model with the rest
//! streamed by the [`OffloadRuntime`]. [`request_shape`] says what such a request needs
//! resident, once, for the planner and the runtime.

use std::time::Instant;

use crate::backend::offload::OffloadBackend;
use crate::engine::decode::Prefilled;
use crate::engine::prefill::{chunk_len, prefill_chunks};
use crate::engine::sirius::SiriusBacked;
use crate::error::{Error, Result};
use crate::model::sampler::argmax;
use crate::model::{KvCache, Llama, Logits, Pass, Scratch};
use crate::offload::runtime::{OffloadReport, OffloadRuntime, PassKind, RequestShape};
use crate::sirius::{SiriusConfig, SiriusModel};
use crate::sparsity::{SparseRequest, SparsityReport, SplitDense};
use crate::tensor::TreeMask;

/// What an offloaded Sirius request of `capacity` cache rows on `prompt` needs resident:
/// its cache, draft / verification / prefill scratch and Griffin's scores.
pub fn request_shape<B: OffloadBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    capacity: usize,
    prefill_chunk: usize,
    keep: f32,
    sirius: &SiriusConfig,
) -> RequestShape {
    let c = &model.config;
    let chunk = chunk_len(prompt, prefill_chunk);
    let (draft_rows, window) = sirius.batch_rows(capacity);
    let activation_bytes = Scratch::<B>::byte_size(c, draft_rows, draft_rows)
        + Scratch::<B>::byte_size(c, window, window)
        + Scratch::<B>::byte_size(c, chunk, 1)
        + (4 * c.num_layers * c.intermediate_size) as u64;
    RequestShape {
        keep,
        period: sirius.period,
        context: capacity,
        activation_bytes,
        gemm_rows: chunk.max(draft_rows).max(window),
        prompt_tokens: prompt.len(),
        prefill_chunk: chunk,
    }
}

pub struct OffloadedSirius<'m, B: OffloadBackend> {
    model: &'m Llama<B>,
    runtime: &'m mut OffloadRuntime<B>,
    request: SparseRequest<'m, B>,
    cache: KvCache<B>,
    draft_scratch: Scratch<B>,
    verify_scratch: Scratch<B>,
}

impl<'m, B: OffloadBackend> OffloadedSirius<'m, B> {
    /// A request of `shape` on `runtime` (which must hold it), its windows shaped by `config`.
    pub fn new(
        model: &'m Llama<B>,
        runtime: &'m mut OffloadRuntime<B>,
        shape: &RequestShape,
        config: &SiriusConfig,
    ) -> Result<Self> {
        if !runtime.holds(shape) {
            return Err(Error::InvalidArgument(
                "this request needs more cache rows or activations than the runtime was \
                 planned for: plan a new runtime for it"
                    .into(),
            ));
        }
        runtime.begin_request()?;
        let (draft_rows, window) = config.batch_rows(shape.context);
        Ok(OffloadedSirius {
            model,
            runtime,
            request: SparseRequest::griffin_placed(shape.keep, &model.backend, model.ffn_dims())?,
            cache: model.new_cache(shape.context)?,
            draft_scratch: Scratch::new(model, draft_rows)?,
            verify_scratch: Scratch::new(model, window)?,
        })
    }

    /// One streamed pass over `tokens` (a tree when `mask` is given).
    fn pass(
        &mut self,
        kind: PassKind,
        tokens: &[u32],
        mask: Option<&TreeMask>,
    ) -> Result<Vec<Vec<f32>>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let griffin = self.request.griffin().ok_or_else(|| {
            Error::InvalidArgument("the offloaded model decodes only after its prefill".into())
        })?;
        let mut split = SplitDense(griffin);
        let (scratch, logits) = match (kind, mask) {
            (PassKind::Draft, None) => (&mut self.draft_scratch, Logits::Last),
            (PassKind::Draft, Some(_)) => (&mut self.draft_scratch, Logits::All),
            (PassKind::Full, _) => (&mut self.verify_scratch, Logits::All),
        };
        self.runtime.begin_pass(kind)?;
        let mut griffin_ffn = griffin;
        let ffn: &mut dyn crate::sparsity::FfnStrategy<B> = match kind {
            PassKind::Draft => &mut griffin_ffn,
            PassKind::Full => &mut split,
        };
        let mut pass = Pass::new(tokens, logits, ffn).streamed(&mut *self.runtime);
        if let Some(mask) = mask {
            pass = pass.tree(mask);
        }
        let out = self.model.forward(pass, &mut self.cache, scratch);
        let all = cancel_on_error(self.runtime, out)?;
        if kind == PassKind::Draft {
            self.request.count_decode(tokens.len());
        }
        let vocab = self.model.config.vocab_size;
        Ok(all.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
}

/// A pass that failed midway leaves copies queued: drop them so the next pass starts clean.
fn cancel_on_error<B: OffloadBackend, T>(
    runtime: &mut OffloadRuntime<B>,
    out: Result<T>,
) -> Result<T> {
    if out.is_err() {
        if let Err(e) = runtime.cancel() {
            tracing::warn!("cancelling the copy engine after a failed pass: {e}");
        }
    }
    out
}

impl<B: OffloadBackend> SiriusBacked for OffloadedSirius<'_, B> {
    /// The prompt in chunks, each chunk one streamed full pass; Griffin then picks the
    /// request's neurons and the runtime makes them resident.
    fn prefill(&mut self, prompt: &[u32], chunk: usize, progress: bool) -> Result<Prefilled> {
        let chunk = chunk_len(prompt, chunk);
        let mut scratch = Scratch::with_logit_rows(self.model, chunk, 1)?;
        let (model, runtime, cache, request) = (
            self.model,
            &mut *self.runtime,
            &mut self.cache,
            &mut self.request,
        );
        let logits = prefill_chunks(prompt, chunk, progress, &mut |piece, want| {
            runtime.begin_pass(PassKind::Full)?;
            let pass = Pass::new(piece, want, request.prefill_ffn()).streamed(&mut *runtime);
            let out = model.forward(pass, cache, &mut scratch);
            cancel_on_error(runtime, out)
        })?;
        let t = Instant::now();
        let backend = &self.model.backend;
        let selection = (self.request.selection(backend)?).ok_or_else(|| {
            Error::InvalidArgument("an offloaded request runs Griffin: no neurons chosen".into())
        })?;
        // Drop the old sparse FFN's matrices first: the runtime frees its resident copies
        // before uploading the new ones, which these would keep alive.
        self.request.drop_placed();
        let ffn = self.runtime.choose_neurons(backend, selection)?;
        self.request.place(ffn);
        Ok(Prefilled {
            setup_seconds: t.elapsed().as_secs_f64(),
            first: argmax(&logits),
        })
    }

    fn sparsity_report(&self) -> SparsityReport {
        self.request.report(&self.model.config)
    }

    fn offload_report(&mut self, aal: f64, ms_per_token: f64) -> Result<Option<OffloadReport>> {
        let mut report = self.runtime.report(aal)?;
        report.measured_ms_per_token = ms_per_token;
        Ok(Some(report))
    }
}

impl<B: OffloadBackend> SiriusModel for OffloadedSirius<'_, B> {
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
        let mut rows = self.pass(PassKind::Draft, &[token], None)?;
        rows.pop()
            .ok_or_else(|| Error::InvalidArgument("a draft step returned no logits".into()))
    }

    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.pass(PassKind::Full, tokens, None)
    }

    fn draft_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        self.pass(PassKind::Draft, tokens, Some(mask))
    }

    fn verify_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        self.pass(PassKind::Full, tokens, Some(mask))
    }

    fn keep_rows(&mut self, start: usize, rows: &[usize]) -> Result<()> {
        self.cache.keep_rows(&self.model.backend, start, rows)
    }
}
