//! [`SiriusModel`] over the one `Llama` forward with offloaded weights: drafts run the
//! resident Griffin FFN (streaming only what did not fit), verifications and the prompt run
//! the full model with the rest streamed through the [`OffloadRuntime`].

use std::path::Path;

use crate::backend::TreeMask;
use crate::engine::generate::{GenerateOptions, GenerationOutput};
use crate::engine::request::prefill_chunks;
use crate::engine::sirius_generate::{drive_sirius, sirius_cache_rows, SiriusRequest};
use crate::engine::SiriusOptions;
use crate::error::{Error, Result};
use crate::model::llama::Ffn;
use crate::model::sampler::argmax;
use crate::model::{KvCache, Llama, Logits, Scratch, Tokenizer};
use crate::offload::offload_backend::OffloadBackend;
use crate::offload::placement::PlanInput;
use crate::offload::runtime::{OffloadOptions, OffloadRuntime, PassKind};
use crate::sirius::SiriusModel;
use crate::sparsity::{GriffinFfn, GriffinScores, NeuronCounter, SparsityMode, SparsityReport};

pub struct OffloadedSirius<'m, B: OffloadBackend> {
    model: &'m Llama<B>,
    pub runtime: OffloadRuntime<B>,
    keep: f32,
    scores: GriffinScores<B>,
    griffin: Option<GriffinFfn<B>>,
    counter: NeuronCounter,
    pub cache: KvCache<B>,
    draft_scratch: Scratch<B>,
    verify_scratch: Scratch<B>,
}

impl<'m, B: OffloadBackend> OffloadedSirius<'m, B> {
    /// A request on `runtime` with `capacity` cache rows, windows of `period` tokens per path
    /// and `width` paths (the same shapes as `LlamaSirius::new`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &'m Llama<B>,
        mut runtime: OffloadRuntime<B>,
        keep: f32,
        capacity: usize,
        period: usize,
        width: usize,
        prefill_chunk: usize,
    ) -> Result<Self> {
        let (draft_rows, window) = scratch_rows(capacity, period, width);
        let (rows, reserved) = runtime.reserved();
        let needed = scratch_bytes(&model.config, capacity, period, width, prefill_chunk);
        if capacity > rows || needed > reserved {
            return Err(Error::InvalidArgument(format!(
                "this request needs {capacity} cache rows and {needed} bytes of activations; the runtime was planned for {rows} rows and {reserved} bytes: plan a new runtime for it"
            )));
        }
        runtime.begin_request()?;
        Ok(OffloadedSirius {
            model,
            runtime,
            keep,
            scores: GriffinScores::new(model)?,
            griffin: None,
            counter: NeuronCounter::new(model.config.num_layers),
            cache: model.new_cache(capacity)?,
            draft_scratch: Scratch::new(model, draft_rows)?,
            verify_scratch: Scratch::new(model, window)?,
        })
    }

    /// Runs the prompt through the full model in chunks of `chunk` tokens, each chunk one
    /// streamed pass; Griffin then picks the request's neurons and the runtime makes them
    /// resident. Returns the full model's first token.
    fn prefill_streamed(
        &mut self,
        prompt: &[u32],
        chunk: usize,
        show_progress: bool,
    ) -> Result<u32> {
        let chunk = chunk.max(1).min(prompt.len().max(1));
        let mut scratch = Scratch::with_logit_rows(self.model, chunk, 1)?;
        let (model, runtime, cache, scores) = (
            self.model,
            &mut self.runtime,
            &mut self.cache,
            &mut self.scores,
        );
        let logits = prefill_chunks(prompt, chunk, show_progress, &mut |piece, want| {
            runtime.begin_pass(PassKind::Full)?;
            let out = model.forward_streamed(
                piece,
                None,
                cache,
                &mut scratch,
                want,
                &mut Ffn::DenseScoring(scores),
                runtime,
            );
            cancel_on_error(runtime, out)
        })?;
        let selection = self.scores.select(&self.model.backend, self.keep)?;
        // Drop the old sparse FFN's matrices first: the runtime frees its resident copies
        // before uploading the new ones, which these would keep alive.
        self.griffin = None;
        self.griffin = Some(
            self.runtime
                .choose_neurons(&self.model.backend, selection)?,
        );
        Ok(argmax(&logits))
    }

    /// Ends the request, keeping the runtime (and its resident neurons) for the next one.
    pub fn into_runtime(self) -> OffloadRuntime<B> {
        self.runtime
    }

    /// What the sparse steps read (density as in `SparseRequest::report`).
    fn report_sparsity(&self) -> SparsityReport {
        SparsityReport::new(
            SparsityMode::Griffin,
            self.keep,
            &self.counter,
            &self.model.config,
        )
    }

    fn count_draft(&mut self, n_tokens: usize) {
        if let Some(g) = &self.griffin {
            for (li, k) in g.kept().into_iter().enumerate() {
                self.counter.add(li, k * n_tokens, n_tokens);
            }
        }
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
        let griffin = self.griffin.as_ref().ok_or_else(|| {
            Error::InvalidArgument("the offloaded model decodes only after its prefill".into())
        })?;
        let (scratch, mut ffn, want) = match kind {
            PassKind::Draft if mask.is_none() => {
                (&mut self.draft_scratch, Ffn::Griffin(griffin), Logits::Last)
            }
            PassKind::Draft => (&mut self.draft_scratch, Ffn::Griffin(griffin), Logits::All),
            PassKind::Full => (
                &mut self.verify_scratch,
                Ffn::SplitDense(griffin),
                Logits::All,
            ),
        };
        self.runtime.begin_pass(kind)?;
        let out = self.model.forward_streamed(
            tokens,
            mask,
            &mut self.cache,
            scratch,
            want,
            &mut ffn,
            &mut self.runtime,
        );
        let all = cancel_on_error(&mut self.runtime, out)?;
        if kind == PassKind::Draft {
            self.count_draft(tokens.len());
        }
        let vocab = self.model.config.vocab_size;
        Ok(all.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
}

/// Bytes of a request's activation buffers: draft, verification and prefill scratch, and
/// Griffin's per-layer neuron scores.
fn scratch_bytes(
    c: &crate::config::ModelConfig,
    capacity: usize,
    period: usize,
    width: usize,
    prefill_chunk: usize,
) -> u64 {
    let (draft_rows, window) = scratch_rows(capacity, period, width);
    // f32 buffers on either backend: the CPU's type only names the formula.
    use crate::backend::CpuBackend;
    Scratch::<CpuBackend>::byte_size(c, draft_rows, draft_rows)
        + Scratch::<CpuBackend>::byte_size(c, window, window)
        + Scratch::<CpuBackend>::byte_size(c, prefill_chunk, 1)
        + (4 * c.num_layers * c.intermediate_size) as u64
}

/// Rows of the draft and verification scratch buffers (as `LlamaSirius` sizes them).
pub fn scratch_rows(capacity: usize, period: usize, width: usize) -> (usize, usize) {
    let width = width.clamp(1, capacity.max(1));
    let window = ((period.max(1) - 1) * width + 1).min(capacity.max(1));
    (width, window)
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

impl<B: OffloadBackend> SiriusRequest for OffloadedSirius<'_, B> {
    fn prefill(&mut self, prompt: &[u32], chunk: usize, show_progress: bool) -> Result<u32> {
        self.prefill_streamed(prompt, chunk, show_progress)
    }

    fn sparsity_report(&self) -> SparsityReport {
        self.report_sparsity()
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

/// The planner's input for an offloaded Sirius request (and `offload` completed with the
/// request's context and prompt length): the cache rows and scratch buffers the request will
/// allocate count against the budget.
pub fn offload_plan_input<B: OffloadBackend>(
    model: &Llama<B>,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    sirius: &SiriusOptions,
    offload: &OffloadOptions,
) -> Result<(PlanInput, OffloadOptions)> {
    let capacity = sirius_cache_rows(model, prompt_ids, opts, sirius)?;
    let chunk = opts.prefill_chunk.max(1).min(prompt_ids.len().max(1));
    let activations = scratch_bytes(&model.config, capacity, sirius.period, sirius.width, chunk);
    let (draft_rows, window) = scratch_rows(capacity, sirius.period, sirius.width);
    let options = OffloadOptions {
        context: capacity,
        gemm_rows: chunk.max(draft_rows).max(window),
        prompt_tokens: prompt_ids.len(),
        period: sirius.period,
        ..offload.clone()
    };
    let input = OffloadRuntime::plan_input(model, &options, activations, chunk)?;
    Ok((input, options))
}

/// `run --sirius --resident-mem` (CPU) or `--gpu-mem` (CUDA): Sirius generation with the
/// weights offloaded as planned for `offload.budget`. Fills the output's `offload`
/// statistics (with the planner's prediction at the measured AAL) and writes the Chrome
/// trace to `trace_path` if given.
#[allow(clippy::too_many_arguments)]
pub fn generate_sirius_offloaded<B: OffloadBackend>(
    model: &mut Llama<B>,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    sirius: SiriusOptions,
    offload: OffloadOptions,
    trace_path: Option<&Path>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    let (input, options) = offload_plan_input(model, prompt_ids, opts, &sirius, &offload)?;
    let runtime = OffloadRuntime::new(model, input, &options)?;
    let (out, _) = generate_on_runtime(
        model, runtime, tokenizer, prompt_ids, opts, sirius, trace_path, on_text,
    )?;
    Ok(out)
}

/// One offloaded Sirius request on an existing `runtime` (planned for at least this
/// request's context), which it hands back for the next request: neurons the next request
/// shares with this one are not copied again.
#[allow(clippy::too_many_arguments)]
pub fn generate_on_runtime<B: OffloadBackend>(
    model: &Llama<B>,
    runtime: OffloadRuntime<B>,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    sirius: SiriusOptions,
    trace_path: Option<&Path>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<(GenerationOutput, OffloadRuntime<B>)> {
    let capacity = sirius_cache_rows(model, prompt_ids, opts, &sirius)?;
    let chunk = opts.prefill_chunk.max(1).min(prompt_ids.len().max(1));
    let keep = runtime.plan.keep as f32;
    let mut m = OffloadedSirius::new(
        model,
        runtime,
        keep,
        capacity,
        sirius.period,
        sirius.width,
        chunk,
    )?;
    let mut out = drive_sirius(&mut m, tokenizer, prompt_ids, opts, sirius, on_text)?;
    let aal = out.sirius.as_ref().map_or(1.0, |s| s.aal);
    let mut report = m.runtime.report(aal)?;
    report.measured_ms_per_token = match out.decode_tokens_per_s {
        r if r > 0.0 => 1e3 / r,
        _ => 0.0,
    };
    out.offload = Some(report);
    if let (Some(path), Some(trace)) = (trace_path, m.runtime.trace()) {
        trace.write_chrome_json(path)?;
    }
    Ok((out, m.into_runtime()))
}
