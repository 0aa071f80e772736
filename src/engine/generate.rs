//! [`Engine::generate`]: one request, as its decoding asks, through the one loop.

use crate::backend::offload::OffloadBackend;
use crate::engine::decode::{run, RunLimits};
use crate::engine::llama_sirius::LlamaSirius;
use crate::engine::offloaded::request_shape;
use crate::engine::output::GenerationOutput;
use crate::engine::plain::PlainRequest;
use crate::engine::prefill::{cache_rows, effective_context};
use crate::engine::prefix::PromptPrefix;
use crate::engine::sirius::{check_greedy, SiriusRequest};
use crate::engine::{Decoding, Engine, Offload, RequestOptions};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::offload::placement::{plan, Plan};
use crate::offload::prefill::prefill_chunk;
use crate::offload::runtime::{OffloadRuntime, RequestShape};
use crate::sirius::SiriusConfig;
use crate::sparsity::{NeuronCounter, SparseRequest, Sparsity, SparsityMode, SparsityReport};

impl<B: OffloadBackend> Engine<B> {
    /// Generates from `prompt` as `decoding` says, calling `on_text` with each piece of text
    /// as it is complete; `on_text` returns false to stop (`StopReason::Cancelled`). The
    /// prompt always runs the full model. An offloaded engine runs Sirius, or the dense model
    /// (greedy) when it was loaded without sparsity.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &RequestOptions,
        decoding: Decoding,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerationOutput> {
        let (decoding, dense_offload) = self.offloaded_decoding(decoding, opts)?;
        let capacity = self.request_capacity(prompt, opts, decoding)?;
        let shape = match (decoding, self.offload.is_some()) {
            (Decoding::Sirius(config), true) => {
                Some(self.offload_shape(prompt, capacity, opts, &config)?)
            }
            _ => None,
        };
        let Engine {
            model,
            tokenizer,
            stop_ids,
            sparsity,
            offload,
            prefix: prefix_slot,
            remember_prompts,
            ..
        } = self;
        // Only the in-memory requests below start from a prefix (`set_prompt_prefix` refuses
        // offloaded engines; this keeps an offloaded request from skipping prompt tokens).
        let griffin = matches!(sparsity, Sparsity::Griffin { .. });
        let prefix =
            (prefix_slot.as_ref()).filter(|p| offload.is_none() && p.serves(prompt, griffin));
        // A remembered prompt is kept for the next request (in memory only: see above).
        let keep_prompt = *remember_prompts && offload.is_none();
        let stop_ids: &[u32] = if opts.stop_at_eos { stop_ids } else { &[] };
        // An offloaded request prefills in the chunk its runtime is planned for.
        let chunk = shape.map_or(opts.prefill_chunk.tokens(), |s| s.prefill_chunk);
        let limits = run_limits(opts, stop_ids, prefix.map_or(0, PromptPrefix::len), chunk);
        match (decoding, shape.zip(offload.as_mut())) {
            (Decoding::Dense | Decoding::Sparse, _) => {
                let sparse = decoding == Decoding::Sparse;
                let mut r = plain_request(model, sparsity, sparse, capacity, opts, prefix)?;
                let out = run(&mut r, tokenizer, prompt, &limits, on_text)?;
                if keep_prompt {
                    *prefix_slot = None;
                    *prefix_slot = kept(r.into_prompt_prefix(prompt));
                }
                Ok(out)
            }
            (Decoding::Sirius(config), None) => {
                let mut m = LlamaSirius::new(model, sparsity, capacity, &config)?;
                if let Some(prefix) = prefix {
                    m.resume(prefix)?;
                }
                let mut r = SiriusRequest::new(m, config, stop_ids)?;
                let out = run(&mut r, tokenizer, prompt, &limits, on_text)?;
                if keep_prompt {
                    *prefix_slot = None;
                    *prefix_slot = kept(r.model.into_prompt_prefix(prompt));
                }
                Ok(out)
            }
            (Decoding::Sirius(config), Some((shape, offload))) => {
                // The runtime is planned before anything borrows the model for the request.
                let runtime = plan_runtime(model, offload, &shape)?;
                // Adaptive windows start from the planner's costs (probes stream full passes).
                let adaptive_max = if config.adaptive { config.period } else { 0 };
                let predicted = runtime.predicted_windows(adaptive_max);
                let m = LlamaSirius::offloaded(model, runtime, &shape, &config)?;
                let mut r = SiriusRequest::new(m, config, stop_ids)?;
                r.prime_windows(&predicted);
                let mut out = run(&mut r, tokenizer, prompt, &limits, on_text)?;
                if dense_offload {
                    // Reported as what it is: the dense model, no drafts, no windows.
                    out.sirius = None;
                    out.sparsity = dense_report(&model.config);
                }
                Ok(out)
            }
        }
    }

    /// What an offloaded engine runs for `decoding` (unchanged without offloading), and
    /// whether it is the dense model offloaded: every token one full pass over the resident
    /// part and the streamed rest, which is a Sirius window of one token (nothing drafts, the
    /// verification's pick is the full model's greedy one).
    fn offloaded_decoding(
        &self,
        decoding: Decoding,
        opts: &RequestOptions,
    ) -> Result<(Decoding, bool)> {
        match (&self.offload, decoding) {
            (None, _) => Ok((decoding, false)),
            (Some(o), Decoding::Dense) if o.dense => {
                check_greedy_offloaded(opts.sampling.temperature)?;
                Ok((Decoding::Sirius(DENSE_WINDOW), true))
            }
            (Some(o), Decoding::Sirius(_)) if !o.dense => Ok((decoding, false)),
            (Some(o), _) => Err(Error::InvalidArgument(match o.dense {
                true => "this engine offloads the dense model: decode without --sirius and \
                         --sparsity"
                    .into(),
                false => "an offloaded Griffin model decodes with Sirius (--sirius \
                          --temperature 0); load it without --sparsity for the dense model"
                    .into(),
            })),
        }
    }

    /// KV cache rows a request of `decoding` on `prompt` needs within its context.
    fn request_capacity(
        &self,
        prompt: &[u32],
        opts: &RequestOptions,
        decoding: Decoding,
    ) -> Result<usize> {
        let context = effective_context(&self.model, opts.context);
        let mut capacity = cache_rows(prompt, opts.max_tokens, context)?;
        if let Decoding::Sirius(config) = decoding {
            capacity = sirius_capacity(capacity, &config, opts)?;
        }
        tracing::debug!(context, capacity, "request cache rows");
        Ok(capacity)
    }

    /// What an offloaded Sirius request on `prompt` needs resident (what `generate` plans
    /// its runtime for).
    pub fn offload_request_shape(
        &self,
        prompt: &[u32],
        opts: &RequestOptions,
        sirius: &SiriusConfig,
    ) -> Result<RequestShape> {
        // A dense offloaded engine runs its own one-token window, whatever the caller's.
        let sirius = match &self.offload {
            Some(o) if o.dense => &DENSE_WINDOW,
            _ => sirius,
        };
        let capacity = self.request_capacity(prompt, opts, Decoding::Sirius(*sirius))?;
        self.offload_shape(prompt, capacity, opts, sirius)
    }

    /// The offloading plan an offloaded Sirius request on `prompt` would run with.
    pub fn offload_plan(
        &self,
        prompt: &[u32],
        opts: &RequestOptions,
        sirius: &SiriusConfig,
    ) -> Result<Plan> {
        let shape = self.offload_request_shape(prompt, opts, sirius)?;
        let cfg = self.offload_config()?;
        plan(&OffloadRuntime::plan_input(&self.model, cfg, &shape)?)
    }

    fn offload_config(&self) -> Result<&crate::offload::runtime::OffloadConfig> {
        self.offload
            .as_ref()
            .map(|o| &o.config)
            .ok_or_else(|| Error::InvalidArgument("this engine offloads nothing".into()))
    }

    fn offload_shape(
        &self,
        prompt: &[u32],
        capacity: usize,
        opts: &RequestOptions,
        sirius: &SiriusConfig,
    ) -> Result<RequestShape> {
        let keep = self.offload.as_ref().map_or(1.0, |o| o.keep);
        let cfg = self.offload_config()?;
        let shape_for = |chunk| request_shape(&self.model, prompt, capacity, chunk, keep, sirius);
        // As `plan` picks it for the same request: as asked, or the one the budget pays for.
        let chunk = prefill_chunk(opts.prefill_chunk, prompt.len(), &mut |chunk| {
            OffloadRuntime::plan_input(&self.model, cfg, &shape_for(chunk))
        })?;
        Ok(shape_for(chunk))
    }
}

/// The runtime for requests of `shape`: the current one when it holds them, else a new plan.
fn plan_runtime<'o, B: OffloadBackend>(
    model: &mut Llama<B>,
    offload: &'o mut Offload<B>,
    shape: &RequestShape,
) -> Result<&'o mut OffloadRuntime<B>> {
    let runtime = match offload.runtime.take() {
        Some(r) if r.holds(shape) => r,
        old => {
            // The old runtime's arena and copy engine go first (one budget at a time), and
            // the model gets its checkpoint weights back to be planned again.
            if let Some(old) = old {
                old.restore_model(model);
            }
            OffloadRuntime::new(model, &offload.config, *shape)?
        }
    };
    Ok(offload.runtime.insert(runtime))
}

/// How `run` feeds and stops a request of `opts` (`cached`: prompt tokens from a prefix)
/// prefilled in chunks of `chunk`.
fn run_limits<'a>(
    opts: &'a RequestOptions,
    stop_ids: &'a [u32],
    cached: usize,
    chunk: usize,
) -> RunLimits<'a> {
    RunLimits {
        max_tokens: opts.max_tokens,
        stop_ids,
        stop_strings: &opts.stop_strings,
        prefill_chunk: chunk,
        show_progress: opts.show_progress,
        cached_prompt: cached,
    }
}

/// A plain request (through the engine's sparse FFN when `sparse`), started from `prefix`.
fn plain_request<'m, B: OffloadBackend>(
    model: &'m Llama<B>,
    sparsity: &'m Sparsity<B>,
    sparse: bool,
    capacity: usize,
    opts: &RequestOptions,
    prefix: Option<&PromptPrefix<B>>,
) -> Result<PlainRequest<'m, B>> {
    let dims = model.ffn_dims();
    let ffn = match sparse {
        true => SparseRequest::new(sparsity, &model.backend, dims)?,
        false => SparseRequest::dense(dims),
    };
    let mut r = PlainRequest::new(model, ffn, capacity, opts.sampling)?;
    if let Some(prefix) = prefix {
        r.resume(prefix)?;
    }
    Ok(r)
}

/// The sparsity report of the dense model.
fn dense_report(config: &crate::config::ModelConfig) -> SparsityReport {
    let layers = NeuronCounter::new(config.num_layers);
    SparsityReport::new(SparsityMode::None, 1.0, &layers, config)
}

/// A request's kept prompt; a failure to keep it (memory) costs the next request its reuse,
/// not this request its answer.
fn kept<B: OffloadBackend>(prefix: Result<PromptPrefix<B>>) -> Option<PromptPrefix<B>> {
    prefix
        .inspect_err(|e| tracing::warn!("the prompt is not kept for the next request: {e}"))
        .ok()
}

/// A dense offloaded request's window: one token, verified (computed) by the full model.
const DENSE_WINDOW: SiriusConfig = SiriusConfig {
    period: 1,
    threshold: 0.1,
    accept_temperature: 0.6,
    width: 1,
    adaptive: false,
};

/// An offloaded dense request picks greedily (its passes are Sirius's verifications).
fn check_greedy_offloaded(temperature: f32) -> Result<()> {
    if temperature != 0.0 {
        return Err(Error::InvalidArgument(
            "an offloaded run decodes greedily for now: add --temperature 0".into(),
        ));
    }
    Ok(())
}

/// Cache rows of a Sirius request whose plain decoding would need `capacity`: a Sirius
/// request decodes greedily and needs the corrector's extra rows.
fn sirius_capacity(capacity: usize, config: &SiriusConfig, opts: &RequestOptions) -> Result<usize> {
    check_greedy(opts.sampling.temperature)?;
    config.validate()?;
    Ok(capacity + config.extra_cache_rows())
}
