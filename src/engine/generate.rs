//! [`Engine::generate`]: one request, as its decoding asks, through the one loop.

use crate::backend::offload::OffloadBackend;
use crate::engine::decode::{run, RunLimits};
use crate::engine::llama_sirius::LlamaSirius;
use crate::engine::offloaded::request_shape;
use crate::engine::output::GenerationOutput;
use crate::engine::plain::PlainRequest;
use crate::engine::prefill::{cache_rows, effective_context};
use crate::engine::sirius::{check_greedy, SiriusRequest};
use crate::engine::{Decoding, Engine, RequestOptions};
use crate::error::{Error, Result};
use crate::offload::placement::{plan, Plan};
use crate::offload::runtime::{OffloadRuntime, RequestShape};
use crate::sirius::SiriusConfig;
use crate::sparsity::SparseRequest;

impl<B: OffloadBackend> Engine<B> {
    /// Generates from `prompt` as `decoding` says, calling `on_text` with each piece of text
    /// as it is complete; `on_text` returns false to stop (`StopReason::Cancelled`). The
    /// prompt always runs the full model. An offloaded engine runs Sirius only.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &RequestOptions,
        decoding: Decoding,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerationOutput> {
        let context = effective_context(&self.model, opts.context);
        let mut capacity = cache_rows(prompt, opts.max_tokens, context)?;
        if let Decoding::Sirius(config) = decoding {
            capacity = sirius_capacity(capacity, &config, opts)?;
        }
        // An offloaded request needs its runtime planned before anything borrows the model.
        let shape = match (decoding, self.offload.is_some()) {
            (_, false) => None,
            (Decoding::Sirius(config), true) => {
                let shape = self.offload_shape(prompt, capacity, opts, &config)?;
                self.plan_runtime(&shape)?;
                Some(shape)
            }
            (_, true) => {
                return Err(Error::InvalidArgument(
                    "an offloaded model decodes with Sirius (--sirius --temperature 0)".into(),
                ))
            }
        };
        let stop_ids: &[u32] = if opts.stop_at_eos {
            &self.stop_ids
        } else {
            &[]
        };
        let limits = RunLimits {
            max_tokens: opts.max_tokens,
            stop_ids,
            stop_strings: &opts.stop_strings,
            prefill_chunk: opts.prefill_chunk,
            show_progress: opts.show_progress,
        };
        let (model, tokenizer) = (&self.model, &self.tokenizer);
        let dims = model.ffn_dims();
        match (decoding, shape) {
            (Decoding::Dense | Decoding::Sparse, _) => {
                let sparse = match decoding {
                    Decoding::Sparse => SparseRequest::new(&self.sparsity, &model.backend, dims)?,
                    _ => SparseRequest::dense(dims),
                };
                let mut r = PlainRequest::new(model, sparse, capacity, opts.sampling)?;
                run(&mut r, tokenizer, prompt, &limits, on_text)
            }
            (Decoding::Sirius(config), None) => {
                let m = LlamaSirius::new(model, &self.sparsity, capacity, &config)?;
                let mut r = SiriusRequest::new(m, config, stop_ids)?;
                run(&mut r, tokenizer, prompt, &limits, on_text)
            }
            (Decoding::Sirius(config), Some(shape)) => {
                let runtime = self.offload.as_mut().and_then(|o| o.runtime.as_mut());
                let Some(runtime) = runtime else {
                    return Err(Error::InvalidArgument("no offloading runtime".into()));
                };
                let m = LlamaSirius::offloaded(model, runtime, &shape, &config)?;
                let mut r = SiriusRequest::new(m, config, stop_ids)?;
                run(&mut r, tokenizer, prompt, &limits, on_text)
            }
        }
    }

    /// What an offloaded Sirius request on `prompt` needs resident (what `generate` plans
    /// its runtime for).
    pub fn offload_request_shape(
        &self,
        prompt: &[u32],
        opts: &RequestOptions,
        sirius: &SiriusConfig,
    ) -> Result<RequestShape> {
        let context = effective_context(&self.model, opts.context);
        let capacity = cache_rows(prompt, opts.max_tokens, context)?;
        let capacity = sirius_capacity(capacity, sirius, opts)?;
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
        Ok(request_shape(
            &self.model,
            prompt,
            capacity,
            opts.prefill_chunk,
            keep,
            sirius,
        ))
    }

    /// Plans a runtime for requests of `shape` unless the current one holds them.
    fn plan_runtime(&mut self, shape: &RequestShape) -> Result<()> {
        let Some(offload) = self.offload.as_mut() else {
            return Err(Error::InvalidArgument(
                "this engine offloads nothing".into(),
            ));
        };
        if offload.runtime.as_ref().is_some_and(|r| r.holds(shape)) {
            return Ok(());
        }
        // The old runtime's arena and copy engine go first: one budget at a time.
        offload.runtime = None;
        offload.runtime = Some(OffloadRuntime::new(
            &mut self.model,
            &offload.config,
            *shape,
        )?);
        Ok(())
    }
}

/// Cache rows of a Sirius request whose plain decoding would need `capacity`: a Sirius
/// request decodes greedily and needs the corrector's extra rows.
fn sirius_capacity(capacity: usize, config: &SiriusConfig, opts: &RequestOptions) -> Result<usize> {
    check_greedy(opts.sampling.temperature)?;
    config.validate()?;
    Ok(capacity + config.extra_cache_rows())
}
