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
/// registers (pins) for DMA only what decode steps stream ([`PinnedUnits`], summed by
/// [`pinned_host_bytes`]), so `pinned_bytes` must stay in RAM; the rest is read as needed.
/// The copy thread's pinned staging (one host buffer per device stream buffer, where it
/// gathers what is not registered) is allocated besides (`staging_bytes`; the gather
/// tables' host halves, a few MiB, are not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HostFootprint {
    pub checkpoint_bytes: u64,
    pub bundle_cache_bytes: u64,
    pub pinned_bytes: u64,
    pub staging_bytes: u64,
}

/// Which of a layer's host copies a GPU run registers for DMA (the copy engine's `pin`):
/// what a draft, a verification or a new request's moved neurons read. What only a
/// request's prefill reads (the whole FFN of a layer whose sparse set is resident, float
/// weights) or the first request's set-up (bundles of a layer kept whole) is gathered on
/// the host by the copy thread instead, so that a float model is not pinned twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PinnedUnits {
    /// Attention that overflowed: every pass streams it.
    pub attention: bool,
    /// The checkpoint's gate, up and down matrices: verification streams an overflowed
    /// layer's whole FFN, and a quantized complement's rows and down matrix as stored.
    pub dense_ffn: bool,
    /// The bundle cache's rows of the layer (float): its complement at every verification
    /// and a new request's moved neurons.
    pub bundles: bool,
    /// The request's compact FFN of an overflowed layer (a host copy made per request,
    /// registered when the request chooses its neurons): every draft streams it.
    pub overflow: bool,
}

impl PinnedUnits {
    pub fn of(p: &LayerPlacement, quantized: bool) -> PinnedUnits {
        let complement_streams = p.sparse_ffn_resident && !p.complement_resident;
        PinnedUnits {
            attention: !p.attention_resident,
            dense_ffn: !p.sparse_ffn_resident || (quantized && complement_streams),
            bundles: !quantized && complement_streams,
            overflow: !p.sparse_ffn_resident,
        }
    }
}

/// Bytes a GPU run registers for `layers` (before page rounding, which adds at most a page
/// at each end of each merged range): the runtime pins exactly the ranges these units name.
pub fn pinned_host_bytes(sizes: &Sizes, layers: &[LayerPlacement]) -> u64 {
    let unit = |on: bool, bytes: u64| if on { bytes } else { 0 };
    (layers.iter())
        .map(|p| {
            let (u, s) = (PinnedUnits::of(p, sizes.quantized), sizes.layer(p.layer));
            // A float layer's bundles are its FFN's bytes, rearranged.
            unit(u.attention, s.attention)
                + unit(u.dense_ffn, s.ffn)
                + unit(u.bundles, s.ffn)
                + unit(u.overflow, s.sparse_ffn)
        })
        .sum()
}

/// Bytes of layer `p`'s prefill that the copy thread gathers on the host (not pinned).
pub fn unpinned_prefill_bytes(sizes: &Sizes, p: &LayerPlacement) -> u64 {
    match PinnedUnits::of(p, sizes.quantized).dense_ffn {
        true => 0,
        false => sizes.layer(p.layer).ffn,
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
