//! The statistics of an offloaded request (stats JSON) and its one-line summary.

use serde::Serialize;

/// Streaming statistics of a request (stats JSON).
#[derive(Debug, Clone, Serialize)]
pub struct OffloadReport {
    pub resident_budget_bytes: u64,
    /// Peak bytes the resident arena handed out.
    pub resident_bytes: u64,
    /// Bytes the copy engine moved (the new neurons' bundles of float FFNs included), plus
    /// (CUDA) what was uploaded outside it when the request chose its neurons: quantized
    /// compact FFNs (regathered on the host), the FFN complements kept resident, and the new
    /// splits of layers whose every neuron is resident.
    pub streamed_bytes: u64,
    /// Seconds the copy engine spent on jobs (CPU: pacing included; CUDA: the copies' time
    /// on the copy stream, from events).
    pub link_busy_s: f64,
    pub achieved_link_gbps: f64,
    /// Fraction of copy time hidden behind compute.
    pub overlap: f64,
    /// Seconds compute waited for copies (CUDA: the compute stream, from events; the host
    /// never waits there).
    pub copy_wait_s: f64,
    pub link_gbps_cap: Option<f64>,
    /// Seconds compute's thread spent gathering copy jobs into pinned memory (CUDA, host
    /// timed, only for host mappings that could not be registered for DMA, else 0; the GPU
    /// may idle meanwhile, counted neither in `link_busy_s` nor in `copy_wait_s`). 0 on the
    /// CPU, whose copy thread gathers within `link_busy_s`.
    pub host_gather_s: f64,
    /// Neurons copied in when the request chose its sparse set.
    pub moved_neurons: u64,
    pub draft_passes: u64,
    pub full_passes: u64,
    /// Layers whose attention / sparse FFN did not fit and stream every pass.
    pub overflow_attention_layers: usize,
    pub overflow_ffn_layers: usize,
    /// The planner's ms per produced token for this run (its period, measured AAL, link):
    /// on CUDA always, on the CPU only with a link cap (uncapped, the CPU's "link" is
    /// memcpy, which the planner does not model).
    pub predicted_ms_per_token: Option<f64>,
    /// Measured decode ms per produced token (the first token, from the prefill, excluded).
    pub measured_ms_per_token: f64,
    /// Kernel launches (cuBLAS calls included) per produced token, as
    /// `measured_ms_per_token` counts tokens (CUDA; None on the CPU).
    pub launches_per_token: Option<f64>,
    /// The planner's predicted time to first token (when `predicted_ms_per_token` is).
    pub predicted_ttft_ms: Option<f64>,
    /// What the arena holds, summed by budget line: `plan`'s `budget_lines` for the same
    /// request, byte for byte.
    pub budget_lines: Vec<crate::offload::budget::BudgetLine>,
    /// KV cache rows the runtime was planned for (`plan --context` for the same request).
    pub kv_cache_rows: usize,
}

impl OffloadReport {
    /// One line for the end of a run: what was resident, what streamed, how well it hid.
    pub fn summary(&self, layers: usize) -> String {
        use crate::units::format_bytes;
        let predicted = match self.predicted_ms_per_token {
            Some(p) => format!(
                ", predicted {p:.1} ms/token vs measured {:.1}",
                self.measured_ms_per_token
            ),
            None => String::new(),
        };
        let launches = match self.launches_per_token {
            Some(l) => format!(", {l:.0} launches/token"),
            None => String::new(),
        };
        format!(
            "[offload] resident {} of {} | not resident: attention {}/{layers} layers, sparse FFN {}/{layers} | streamed {} ({:.2} GB/s, overlap {:.2}) | moved in {} neurons{predicted}{launches}",
            format_bytes(self.resident_bytes),
            format_bytes(self.resident_budget_bytes),
            self.overflow_attention_layers,
            self.overflow_ffn_layers,
            format_bytes(self.streamed_bytes),
            self.achieved_link_gbps,
            self.overlap,
            self.moved_neurons,
        )
    }
}
