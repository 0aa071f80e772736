//! What the planner decides: where every item lives, how much streams per pass, the
//! predicted costs and, when the sparse set does not fit, what would.

use serde::Serialize;

use crate::offload::budget::{budget_line_of_item, budget_lines, BudgetLine};
use crate::offload::cost::Costs;
use crate::offload::format::WeightFormat;
use crate::offload::sizes::{LayerPlacement, Sizes};

/// How often a streamed item crosses the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Every {
    /// Every pass: each drafted token and each verification.
    Pass,
    /// Only when the full model runs (verification, prefill).
    Verification,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Residence {
    Resident,
    Streamed {
        every: Every,
    },
    /// Stays in host memory and is used there (embedding rows).
    Host,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanItem {
    pub name: String,
    pub bytes: u64,
    pub residence: Residence,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub format: WeightFormat,
    pub keep: f64,
    pub budget: u64,
    pub context: usize,
    pub period: usize,
    pub aal: f64,
    pub sizes: Sizes,
    pub items: Vec<PlanItem>,
    pub layers: Vec<LayerPlacement>,
    pub total_weight_bytes: u64,
    /// Sum of the resident items, buffers included; never above `budget`.
    pub resident_bytes: u64,
    /// All attention and the whole sparse set are resident: drafting streams nothing.
    pub fits: bool,
    /// Bytes of one streaming buffer (0 when nothing is ever streamed).
    pub stream_buffer_bytes: u64,
    pub stream_buffers: usize,
    pub streamed_bytes_per_verification: u64,
    pub streamed_bytes_per_draft: u64,
    pub streamed_bytes_per_prefill: u64,
    /// The smallest budget any placement needs.
    pub minimum_bytes: u64,
    pub costs: Costs,
    pub advice: Vec<String>,
    /// Largest keep (hundredths) whose sparse set fits in this format, when this one does not.
    pub advised_keep: Option<f64>,
    /// Largest format holding the requested keep's sparse set, when this one does not.
    pub advised_format: Option<WeightFormat>,
    /// The compact down format that advice needs (a quantized `advised_format` that fits
    /// only with its compact down matrices in q4_0).
    pub advised_sparse_down: Option<WeightFormat>,
    /// The keep `advised_format` holds where it cannot hold the requested one (neither a
    /// smaller keep in the requested format nor a smaller format alone fits).
    pub advised_format_keep: Option<f64>,
    /// What the host holds for the run (`offload::host_store`).
    pub host: HostFootprint,
    /// The resident items summed by budget line (`offload::budget`): what `run` books in its
    /// arena for the same request, line for line.
    pub budget_lines: Vec<BudgetLine>,
}

/// What the host holds for an offloaded run: the checkpoint, memory-mapped (its pages are
/// read as used and can be dropped again), and for float FFNs the neuron bundles, written
/// once to a cache file beside the model and mapped the same way. On a GPU the copy engine
/// registers (pins) both mappings for DMA, so `pinned_bytes` must stay in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HostFootprint {
    pub checkpoint_bytes: u64,
    pub bundle_cache_bytes: u64,
    pub pinned_bytes: u64,
}

impl HostFootprint {
    /// The footprint of a model of `total_weight_bytes` whose float FFN bundles take
    /// `bundle_bytes` (0 for quantized FFNs, which stream as stored), planned for a GPU
    /// (`on_gpu`) or the CPU.
    pub fn new(total_weight_bytes: u64, bundle_bytes: u64, on_gpu: bool) -> HostFootprint {
        HostFootprint {
            checkpoint_bytes: total_weight_bytes,
            bundle_cache_bytes: bundle_bytes,
            pinned_bytes: if on_gpu {
                total_weight_bytes + bundle_bytes
            } else {
                0
            },
        }
    }
}

/// The resident items of `items` summed by budget line.
pub fn budget_lines_of(items: &[PlanItem]) -> Vec<BudgetLine> {
    budget_lines(
        items
            .iter()
            .filter(|i| i.residence == Residence::Resident)
            .map(|i| (budget_line_of_item(&i.name), i.bytes)),
    )
}
