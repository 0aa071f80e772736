//! What the user chose for an offloaded run.

use crate::tensor::DType;

/// How an offloaded run is set up: what the user chose (`run --resident-mem` on the CPU,
/// `run --gpu-mem` on CUDA). What a request needs (context, scratch) comes apart, in
/// [`RequestShape`].
#[derive(Clone)]
pub struct OffloadConfig {
    /// The resident budget (bytes).
    pub budget: u64,
    /// `--gpu-mem auto`: `budget` is set from the device's free memory when the engine
    /// loads (`OffloadBackend::auto_budget`).
    pub auto_budget: bool,
    /// The host-to-resident link in GB/s: on a backend whose resident memory is host RAM
    /// (the CPU) a cap that emulates a PCIe link (`None`: copies at memory speed); on a
    /// device backend (CUDA) the speed the planner assumes of the real link (`None`:
    /// `GPU_LINK_GBPS`), never a cap.
    pub link_gbps: Option<f64>,
    /// Memory bandwidth the planner assumes for compute (GB/s), for the predicted ms/token
    /// (`None`: `CPU_MEM_GBPS` on host memory, `GPU_MEM_GBPS` on a device).
    pub mem_gbps: Option<f64>,
    /// Arithmetic throughput the planner assumes for compute (GFLOP/s; `None`: memory-bound
    /// passes), for the predicted ms/token.
    pub compute_gflops: Option<f64>,
    /// Record a Chrome trace of copy and compute spans.
    pub trace: bool,
    /// Extra delay per copy job (tests: random delays must never change the output; the
    /// CUDA engine sleeps on the host before issuing the copy).
    pub delay: Option<crate::transfer::DelayFn>,
    /// The model's path (folder or GGUF file) its float FFN's bundle cache lives beside
    /// (`offload::bundle_cache`; the engine sets it); `None` builds the bundles in anonymous
    /// memory, holding the FFN twice on the host.
    pub bundle_cache: Option<std::path::PathBuf>,
    /// Quantized weights: the format of the resident compact down matrices
    /// (`--griffin-down`; q8_0 by default).
    pub griffin_down: DType,
}

impl OffloadConfig {
    /// `budget` bytes resident, no link cap or assumption, default bandwidths, no trace.
    pub fn new(budget: u64) -> Self {
        OffloadConfig {
            budget,
            auto_budget: false,
            link_gbps: None,
            mem_gbps: None,
            compute_gflops: None,
            trace: false,
            delay: None,
            griffin_down: DType::Q8_0,
            bundle_cache: None,
        }
    }
}
