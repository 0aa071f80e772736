//! Sirius with offloaded weights (`run --resident-mem` on the CPU, `--gpu-mem` on CUDA):
//! [`OffloadedSirius`] drafts with the resident Griffin FFN (streaming only what did not
//! fit) and runs the prompt and verifications through the full model with the rest
//! streamed by the [`OffloadRuntime`] ([`Streamed`] weights). [`request_shape`] says what
//! such a request needs resident, once, for the planner and the runtime.

use crate::backend::offload::OffloadBackend;
use crate::config::ModelConfig;
use crate::engine::llama_sirius::{LlamaSirius, Residency};
use crate::engine::prefill::chunk_len;
use crate::error::{Error, Result};
use crate::model::{scratch_byte_size, LayerStream, Llama};
use crate::offload::runtime::{OffloadReport, OffloadRuntime, PassKind, RequestShape};
use crate::sirius::SiriusConfig;
use crate::sparsity::SparseRequest;

/// What an offloaded Sirius request of `capacity` cache rows on `prompt` needs resident:
/// its cache, draft / verification / prefill scratch and Griffin's scores (and, on quantized
/// weights, the verification window's merged activations of every neuron, see
/// `sparsity::split`).
pub fn request_shape<B: OffloadBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    capacity: usize,
    prefill_chunk: usize,
    keep: f32,
    sirius: &SiriusConfig,
) -> RequestShape {
    let quantized = model.dtype.is_quantized();
    let chunk = chunk_len(prompt, prefill_chunk);
    request_shape_for(
        &model.config,
        quantized,
        prompt.len(),
        capacity,
        chunk,
        keep,
        sirius,
    )
}

/// [`request_shape`] from the model's config and whether its weights are quantized, for a
/// prompt of `prompt_tokens` prefilled in chunks of `chunk` (what `plan` books for the same
/// request, without a model).
pub fn request_shape_for(
    c: &ModelConfig,
    quantized: bool,
    prompt_tokens: usize,
    capacity: usize,
    chunk: usize,
    keep: f32,
    sirius: &SiriusConfig,
) -> RequestShape {
    let chunk = chunk.clamp(1, prompt_tokens.max(1));
    let (draft_rows, window) = sirius.batch_rows(capacity);
    let activation_bytes = scratch_byte_size(c, draft_rows, draft_rows)
        + scratch_byte_size(c, window, window)
        + scratch_byte_size(c, chunk, 1)
        + (4 * c.num_layers * c.intermediate_size) as u64
        + match quantized {
            true => (4 * window * c.intermediate_size) as u64,
            false => 0,
        };
    RequestShape {
        keep,
        period: sirius.period,
        context: capacity,
        activation_bytes,
        gemm_rows: chunk.max(draft_rows).max(window),
        sparse_rows: draft_rows.max(window),
        prompt_tokens,
        prefill_chunk: chunk,
    }
}

/// Weights partly streamed by an offloading runtime.
pub struct Streamed<'m, B: OffloadBackend> {
    runtime: &'m mut OffloadRuntime<B>,
}

/// Sirius over offloaded weights.
pub type OffloadedSirius<'m, B> = LlamaSirius<'m, B, Streamed<'m, B>>;

impl<'m, B: OffloadBackend> LlamaSirius<'m, B, Streamed<'m, B>> {
    /// A request of `shape` on `runtime` (which must hold it), its windows shaped by `config`.
    pub fn offloaded(
        model: &'m Llama<B>,
        runtime: &'m mut OffloadRuntime<B>,
        shape: &RequestShape,
        config: &SiriusConfig,
    ) -> Result<Self> {
        if let Some(mismatch) = runtime.mismatch(shape) {
            return Err(Error::InvalidArgument(format!(
                "the offloading runtime was not planned for this request ({mismatch}): \
                 plan a new runtime for it"
            )));
        }
        runtime.begin_request()?;
        let align = runtime.neuron_align();
        let request =
            SparseRequest::griffin_placed(shape.keep, align, &model.backend, model.ffn_dims())?;
        Self::with_weights(model, request, shape.context, config, Streamed { runtime })
    }
}

impl<B: OffloadBackend> Residency<B> for Streamed<'_, B> {
    const SPLIT_FULL_PASSES: bool = true;

    fn begin_pass(&mut self, kind: PassKind) -> Result<()> {
        self.runtime.begin_pass(kind)
    }

    fn stream(&mut self) -> Option<&mut dyn LayerStream<B>> {
        Some(&mut *self.runtime)
    }

    fn abandon(&mut self) {
        if let Err(e) = self.runtime.cancel() {
            tracing::warn!("cancelling the copy engine after a failed pass: {e}");
        }
    }

    /// Griffin picks the request's neurons and the runtime makes them resident.
    fn place_neurons(&mut self, request: &mut SparseRequest<'_, B>, backend: &B) -> Result<()> {
        let selection = (request.selection(backend)?).ok_or_else(|| {
            Error::InvalidArgument("an offloaded request runs Griffin: no neurons chosen".into())
        })?;
        // Drop the old sparse FFN's matrices first: the runtime frees its resident copies
        // before uploading the new ones, which these would keep alive.
        request.drop_placed();
        request.place(self.runtime.choose_neurons(backend, selection)?);
        Ok(())
    }

    fn report(
        &mut self,
        aal: f64,
        period: usize,
        ms_per_token: f64,
    ) -> Result<Option<OffloadReport>> {
        let mut report = self.runtime.report(aal, period)?;
        report.measured_ms_per_token = ms_per_token;
        Ok(Some(report))
    }
}
