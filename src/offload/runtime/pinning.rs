//! What the copy engine registers for DMA (pins) on a GPU, and when: the host ranges the
//! installed plan streams, when the runtime is made, and a request's overflow copies, when it
//! chooses its neurons; never during a pass (registering many GB takes seconds). The units
//! come from `plan::PinnedUnits`, the same the planner sums for `plan`'s host line, so plan
//! and run agree on what is pinned.

use super::OffloadRuntime;
use crate::backend::offload::{OffloadBackend, ResidentMemory};
use crate::error::Result;
use crate::model::Llama;
use crate::offload::cost::HostGather;
use crate::offload::placement::PinnedUnits;
use crate::transfer::{CopyEngine, HostSlice, PinFor, PinReport};

impl<B: OffloadBackend> OffloadRuntime<B> {
    /// The host ranges the installed plan streams in decode steps and new requests (not the
    /// overflow copies, made per request).
    pub fn planned_host_ranges(&self) -> Vec<HostSlice> {
        let quantized = self.host.is_quantized();
        let mut out = Vec::new();
        for (p, layer) in self.plan.layers.iter().zip(&self.host.layers) {
            let units = PinnedUnits::of(p, quantized);
            if units.attention {
                out.extend(layer.attention.iter().cloned());
            }
            if units.dense_ffn {
                out.extend(layer.dense_ffn.iter().cloned());
            }
            if units.bundles {
                out.extend(layer.bundles.iter().cloned());
            }
        }
        out
    }

    /// What a GPU run holds pinned now: the plan's ranges and this request's overflow
    /// copies (`plan.host.pinned_bytes` counts the same, before page rounding).
    pub fn pinned_host_ranges(&self) -> Vec<HostSlice> {
        let mut out = self.planned_host_ranges();
        out.extend(self.overflow.iter().flatten().cloned());
        out
    }

    /// The runtime with the plan's ranges registered (at `new`, before any pass: registering
    /// many GB takes seconds, none of it streaming); on failure `model` gets its weights back.
    pub(super) fn with_plan_pinned(mut self, model: &mut Llama<B>) -> Result<Self> {
        let ranges = self.planned_host_ranges();
        match self.engine.pin(&ranges, PinFor::Engine) {
            Ok(report) => {
                self.note_pinning(report);
                Ok(self)
            }
            Err(e) => {
                self.restore_model(model);
                Err(e)
            }
        }
    }

    /// Registers this request's overflow copies until the next request (when it chooses
    /// its neurons, before its drafts).
    pub(super) fn pin_overflow(&mut self) -> Result<()> {
        let ranges: Vec<HostSlice> = self.overflow.iter().flatten().cloned().collect();
        if ranges.is_empty() {
            return Ok(());
        }
        let report = self.engine.pin(&ranges, PinFor::Request)?;
        self.note_pinning(report);
        Ok(())
    }

    /// What the driver refused is gathered on the host: the cost model's gather stage takes
    /// that share of every copy (a device backend only; the CPU has no such stage).
    fn note_pinning(&mut self, report: PinReport) {
        if B::RESIDENT_MEMORY != ResidentMemory::Device || report.streamed_bytes == 0 {
            return;
        }
        let share = report.refused_bytes as f64 / report.streamed_bytes as f64;
        let gather = self
            .input
            .host_gather
            .get_or_insert_with(HostGather::default);
        gather.unpinned_share = gather.unpinned_share.max(share);
    }
}

#[cfg(test)]
mod tests {
    use crate::offload::budget::max_job_pieces;
    use crate::sparsity::bundles::{complement_ids, neuron_byte_runs};

    #[test]
    fn no_complement_has_more_runs_than_the_bound() {
        let f = 64;
        for kept in [0, 1, 2, 31, 32, 33, 63, 64] {
            // Every other neuron kept: the most runs a complement of that size can have.
            let ids: Vec<u32> = (0..f as u32).filter(|i| i % 2 == 1).take(kept).collect();
            let rest = complement_ids(&ids, f).unwrap();
            let runs = neuron_byte_runs(&rest, f, 1).unwrap().len();
            assert!(
                4 + runs <= max_job_pieces(f, ids.len(), false),
                "{kept}: {runs}"
            );
            assert!(4 + 2 * runs < max_job_pieces(f, ids.len(), true));
        }
        assert_eq!(max_job_pieces(10, 10, false), 14);
    }
}
