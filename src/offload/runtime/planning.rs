//! The planner's input for a request: shared by the runtime (`run`) and `plan`, so that both
//! plan, and print, the same bytes.

use super::{OffloadConfig, RequestShape};
use crate::backend::offload::{OffloadBackend, ResidentMemory, ScratchShape};
use crate::config::ModelConfig;
use crate::offload::cost::HostGather;
use crate::offload::format::WeightFormat;
use crate::offload::placement::{
    LayerFormats, PlanInput, CPU_MEM_GBPS, GPU_LINK_GBPS, GPU_MEM_GBPS,
};

/// The planner needs a link speed; uncapped host copies run at memory speed, far above any
/// PCIe link, so this stands for "not the bottleneck".
const UNCAPPED_LINK_GBPS: f64 = 1000.0;

/// Where a request's plan runs: on a GPU or in host memory, the link the planner assumes,
/// the backend's own scratch for the request (`OffloadBackend::scratch_bytes`), the KV
/// cache's element size.
#[derive(Debug, Clone, Copy)]
pub struct PlanTarget {
    pub on_gpu: bool,
    pub link_gbps: f64,
    pub backend_scratch: u64,
    pub kv_bytes: usize,
}

/// The format naming a model, each layer's formats where they mix, the LM head's format and
/// (quantized FFNs) the compact down format: what [`request_plan_input`] plans in.
pub type PlanFormats = (
    WeightFormat,
    Option<Vec<LayerFormats>>,
    Option<WeightFormat>,
    Option<WeightFormat>,
);

/// The planner's input for requests of `shape` under `cfg` on a model of config `c` stored in
/// `formats`: what `run` plans with, and what `plan` builds for the same request, so both
/// print the same budget lines.
pub fn request_plan_input(
    c: &ModelConfig,
    formats: PlanFormats,
    cfg: &OffloadConfig,
    shape: &RequestShape,
    target: &PlanTarget,
) -> PlanInput {
    let (format, layer_formats, head_format, sparse_down) = formats;
    let on_gpu = target.on_gpu;
    PlanInput {
        config: c.clone(),
        format,
        head_format,
        sparse_down,
        layer_formats,
        keep: shape.keep as f64,
        budget: cfg.budget,
        context: shape.context,
        kv_bytes: target.kv_bytes,
        on_gpu,
        link_gbps: target.link_gbps,
        mem_gbps: cfg.mem_gbps.unwrap_or(match on_gpu {
            false => CPU_MEM_GBPS,
            true => GPU_MEM_GBPS,
        }),
        compute_gflops: cfg.compute_gflops,
        period: shape.period,
        aal: shape.period as f64,
        prompt_tokens: shape.prompt_tokens.max(1),
        activation_bytes: Some(shape.activation_bytes),
        backend_scratch: target.backend_scratch,
        prefill_chunk: Some(shape.prefill_chunk),
        // On a GPU what is not pinned is gathered on the host (`plan::PinnedUnits`).
        host_gather: on_gpu.then(HostGather::default),
    }
}

/// The host-to-resident GB/s the planner assumes for `cfg` on backend `B`, and whether its
/// predictions describe the run: on host memory the emulated cap (uncapped copies are
/// memcpy, which the planner does not model: no prediction); on a device the assumed speed
/// of the real link.
pub(super) fn planner_link<B: OffloadBackend>(cfg: &OffloadConfig) -> (f64, bool) {
    match B::RESIDENT_MEMORY {
        ResidentMemory::Host => (
            cfg.link_gbps.unwrap_or(UNCAPPED_LINK_GBPS),
            cfg.link_gbps.is_some(),
        ),
        ResidentMemory::Device => (cfg.link_gbps.unwrap_or(GPU_LINK_GBPS), true),
    }
}

/// The shapes the backend's own scratch depends on, for requests of `shape`.
pub fn scratch_shape(c: &ModelConfig, shape: &RequestShape) -> ScratchShape {
    ScratchShape {
        widest_cols: c.hidden_size.max(c.intermediate_size).max(c.q_dim()),
        gemm_rows: shape.gemm_rows,
        sparse_rows: shape.sparse_rows,
        head_dim: c.head_dim,
        context: shape.context,
        num_heads: c.num_heads,
        hidden: c.hidden_size,
        ffn_neurons: c.intermediate_size,
    }
}
