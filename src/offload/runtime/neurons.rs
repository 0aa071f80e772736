//! A request's choice of Griffin neurons on a runtime: resident layers keep the neurons they
//! already hold and copy in only new ones; layers whose sparse set does not fit keep a host
//! copy that every draft pass streams.

use super::OffloadRuntime;
use crate::backend::compact::moved_in;
use crate::backend::offload::{CompactUpdate, OffloadBackend, ResidentMemory};
use crate::error::{Error, Result};
use crate::sparsity::bundles::complement_ids;
use crate::sparsity::ffn::{Complement, FfnMatrices};
use crate::sparsity::griffin::GriffinLayer;
use crate::sparsity::{GriffinFfn, GriffinSelection};
use crate::transfer::{CopyEngine, CopyJob, StagedJob};

impl<B: OffloadBackend> OffloadRuntime<B> {
    /// Makes `selection` the request's sparse set. Resident layers keep the neurons they
    /// already hold (from an earlier request on this runtime) and copy in only the others
    /// through the copy engine, as bundles; their compact FFN is reassembled in resident
    /// memory (on a GPU by a kernel), in the arena. Layers whose sparse set does not fit
    /// get a host copy that every draft pass streams.
    pub fn choose_neurons(
        &mut self,
        backend: &B,
        selection: GriffinSelection,
    ) -> Result<GriffinFfn<B>> {
        let out = self.choose_neurons_now(backend, selection);
        if out.is_err() {
            if let Err(e) = self.cancel() {
                tracing::warn!("cancelling the copy engine after a failed neuron copy: {e}");
            }
        }
        out
    }

    fn choose_neurons_now(
        &mut self,
        backend: &B,
        selection: GriffinSelection,
    ) -> Result<GriffinFfn<B>> {
        let n_layers = self.plan.layers.len();
        if selection.layers.len() != n_layers {
            return Err(Error::InvalidArgument(format!(
                "a selection for {} layers, the model has {n_layers}",
                selection.layers.len()
            )));
        }
        let moved = self.queue_moved_neurons(&selection)?;
        let mut layers = Vec::with_capacity(n_layers);
        for (li, ids) in selection.layers.iter().enumerate() {
            if !self.plan.layers[li].sparse_ffn_resident {
                self.overflow[li] = Some(self.host.gather_sparse(li, ids)?);
                layers.push(None);
                continue;
            }
            let matrices = self.resident_layer(backend, li, ids, !moved[li].is_empty())?;
            self.moved_neurons += moved[li].len() as u64;
            if self.plan.layers[li].complement_resident {
                self.make_rest_resident(backend, li, ids)?;
            }
            let [gate, up, down] = &matrices;
            layers.push(Some(GriffinLayer {
                ffn: FfnMatrices {
                    gate: gate.clone(),
                    up: up.clone(),
                    down: down.clone(),
                },
                gate_bias: None,
                up_bias: None,
            }));
            self.resident_ffn[li] = Some(matrices);
            self.resident_ids[li] = ids.clone();
        }
        self.kept = Some(selection.layers.clone());
        // The overflow copies are streamed by every draft: registered now, before them.
        self.pin_overflow()?;
        Ok(GriffinFfn { layers, selection })
    }

    /// Per layer, the neurons of `selection` a resident layer lacks; for float weights their
    /// bundles are queued on the copy engine now, one job per layer, all at once, so the
    /// copies of later layers overlap the assembly of earlier ones.
    fn queue_moved_neurons(&mut self, selection: &GriffinSelection) -> Result<Vec<Vec<u32>>> {
        let mut jobs = Vec::new();
        let mut moved: Vec<Vec<u32>> = vec![Vec::new(); selection.layers.len()];
        for (li, ids) in selection.layers.iter().enumerate() {
            // With the whole layer resident, a new split moves nothing over the link.
            if !self.plan.layers[li].sparse_ffn_resident || self.whole_layer[li] {
                continue;
            }
            moved[li] = moved_in(&self.resident_ids[li], ids);
            if self.assembles_from_staging() && !moved[li].is_empty() {
                jobs.push(CopyJob {
                    layer: li,
                    label: format!("L{li} neurons in"),
                    pieces: self.host.neuron_runs(li, &moved[li])?,
                });
            }
        }
        self.engine.submit(jobs)?;
        Ok(moved)
    }

    /// Layer `li`'s new resident compact FFN of `ids` (`staged`: the moved neurons' bundles
    /// are queued on the copy engine).
    fn resident_layer(
        &mut self,
        backend: &B,
        li: usize,
        ids: &[u32],
        staged: bool,
    ) -> Result<[B::Matrix; 3]> {
        let unchanged = self.resident_ids[li] == *ids;
        // Cloned only when kept: a clone alive across the upload below would keep the old
        // device matrices allocated next to the new ones.
        if let Some(m) = self.resident_ffn[li].as_ref().filter(|_| unchanged) {
            return Ok(m.clone());
        }
        if self.whole_layer[li] {
            // Every neuron is resident: the new split is a move within resident memory
            // (here: regathered from the host copy, nothing counted as moved; on a device
            // the upload crosses the link and counts as streamed).
            self.count_upload(ids.len() * self.host.bundle_bytes(li)?);
            return self.regather(backend, li, ids);
        }
        if !self.assembles_from_staging() {
            // A quantized FFN, gathered on the host and uploaded once: on a device that
            // upload is what crossed the link; in host memory only the neurons that were
            // not resident before count as moved over it.
            let crossed = match B::RESIDENT_MEMORY {
                ResidentMemory::Device => ids.len(),
                ResidentMemory::Host => moved_in(&self.resident_ids[li], ids).len(),
            };
            let m = self.regather(backend, li, ids)?;
            self.uploaded_bytes += (crossed * self.host.bundle_bytes(li)?) as u64;
            return Ok(m);
        }
        self.copy_in(backend, li, ids, staged)
    }

    /// Counts `bytes` uploaded outside the copy engine as streamed where they cross a link
    /// (device memory; in host memory they are a memcpy).
    fn count_upload(&mut self, bytes: usize) {
        if B::RESIDENT_MEMORY == ResidentMemory::Device {
            self.uploaded_bytes += bytes as u64;
        }
    }

    /// Keeps the neurons of layer `li` not in `ids` resident too, as bundles `[f - k, 3h]`
    /// (quantized: their gate and up rows and the whole down matrix): verification then
    /// streams nothing for the layer. Neurons that were not resident before count as moved.
    fn make_rest_resident(&mut self, backend: &B, li: usize, ids: &[u32]) -> Result<()> {
        let d = self.dims.clone();
        let rest = complement_ids(ids, d.f)?;
        if !self.whole_layer[li] {
            // Before, only the previous request's sparse set (if any) was resident; it is
            // still in `resident_ids` (updated after this call).
            self.moved_neurons += moved_in(&self.resident_ids[li], &rest).len() as u64;
        }
        let label = format!("FFN complement layer {li}");
        if self.host.is_quantized() {
            return self.make_rest_rows_resident(backend, li, ids, rest.len(), &label);
        }
        let mut bytes = Vec::with_capacity(rest.len() * self.host.bundle_bytes(li)?);
        for piece in self.host.neuron_runs(li, &rest)? {
            bytes.extend_from_slice(&piece.map[piece.range.clone()]);
        }
        self.arena.set(&label, bytes.len() as u64)?;
        self.count_upload(bytes.len());
        // Free the old rest before uploading the new one (see `upload_compact`).
        self.resident_rest[li] = None;
        self.resident_rest[li] = match rest.len() {
            0 => None,
            c => Some(Complement::Bundles(backend.upload_matrix(
                bytes,
                d.dtype,
                c,
                3 * d.h,
            )?)),
        };
        self.whole_layer[li] = true;
        Ok(())
    }

    /// [`Self::make_rest_resident`] for a quantized FFN: the `c` other neurons' gate and up
    /// rows (none when every neuron is kept) and the layer's whole down matrix, as stored.
    fn make_rest_rows_resident(
        &mut self,
        backend: &B,
        li: usize,
        ids: &[u32],
        c: usize,
        label: &str,
    ) -> Result<()> {
        let d = self.dims.clone();
        self.resident_rest[li] = None;
        // Gate runs, up runs, the down matrix (just the down matrix when c is 0).
        let pieces = self.host.complement(li, ids)?;
        let runs = pieces.len().saturating_sub(1) / 2;
        let bytes = |ps: &[crate::transfer::HostSlice]| -> Vec<u8> {
            ps.iter()
                .flat_map(|p| p.map[p.range.clone()].iter().copied())
                .collect()
        };
        let (gate, up, down) = (
            bytes(&pieces[..runs]),
            bytes(&pieces[runs..2 * runs]),
            bytes(&pieces[2 * runs..]),
        );
        let total = gate.len() + up.len() + down.len();
        self.arena.set(label, total as u64)?;
        self.count_upload(total);
        let [.., tg, tu, td] = d.types(li)?;
        let rest = match c {
            0 => None,
            _ => Some([
                backend.upload_matrix(gate, tg, c, d.h)?,
                backend.upload_matrix(up, tu, c, d.h)?,
            ]),
        };
        self.resident_rest[li] = Some(Complement::Rows {
            rest,
            down: backend.upload_matrix(down, td, d.h, d.f)?,
        });
        self.whole_layer[li] = true;
        Ok(())
    }

    /// Layer `li`'s compact FFN of `ids` rebuilt within resident memory (the whole layer is
    /// resident), in the arena.
    fn regather(&mut self, backend: &B, li: usize, ids: &[u32]) -> Result<[B::Matrix; 3]> {
        let parts = self.host.gather_parts(li, ids)?;
        self.upload_compact(backend, li, ids.len(), parts)
    }

    /// Layer `li`'s compact FFN of `k` neurons (gate, up, down bytes) into resident memory,
    /// accounted in the arena as the layer's sparse FFN.
    fn upload_compact(
        &mut self,
        backend: &B,
        li: usize,
        k: usize,
        (gate, up, down): (Vec<u8>, Vec<u8>, Vec<u8>),
    ) -> Result<[B::Matrix; 3]> {
        let d = self.dims.clone();
        let bytes = (gate.len() + up.len() + down.len()) as u64;
        self.arena.set(&format!("sparse FFN layer {li}"), bytes)?;
        // The old compact FFN's bytes have been used (or are not needed): free it before the
        // upload so the device never holds old and new at once (the arena counts one).
        self.resident_ffn[li] = None;
        let uploaded = (|| {
            let [.., tg, tu, _] = d.types(li)?;
            Ok([
                backend.upload_matrix(gate, tg, k, d.h)?,
                backend.upload_matrix(up, tu, k, d.h)?,
                backend.upload_matrix(down, d.compact_down(), d.h, k)?,
            ])
        })();
        if uploaded.is_err() {
            // Nothing of the layer's sparse set is resident any more: the next request
            // copies in all of it.
            self.resident_ids[li].clear();
        }
        uploaded
    }

    /// Layer `li`'s new compact FFN of `ids`: the resident neurons it keeps plus the staged
    /// bundles of the moved ones (when `staged`, waited for here), built by the backend in
    /// resident memory (the CPU: a memcpy from the staging buffer; a GPU: a kernel), in the
    /// arena.
    fn copy_in(
        &mut self,
        backend: &B,
        li: usize,
        ids: &[u32],
        staged: bool,
    ) -> Result<[B::Matrix; 3]> {
        let d = self.dims.clone();
        let filled = if staged {
            Some(self.engine.wait(li)?)
        } else {
            None
        };
        // The bundles of the moved neurons landed back to back.
        let range = filled
            .as_ref()
            .and_then(|f| Some(f.pieces().first()?.start..f.pieces().last()?.end));
        let bytes = (3 * ids.len() * d.h * d.dtype.size()) as u64;
        let built = self
            .arena
            .set(&format!("sparse FFN layer {li}"), bytes)
            .and_then(|()| {
                // Handed over: the backend frees each old matrix once its replacement is
                // built, so old and new are never whole side by side (the arena counts one).
                let old = self.resident_ffn[li].take();
                backend.assemble_compact(CompactUpdate {
                    old: old.map(|m| (&self.resident_ids[li][..], m)),
                    staged: filled.as_ref().zip(range),
                    new_ids: ids,
                    hidden: d.h,
                    dtype: d.dtype,
                })
            });
        // After the assembly is queued: the engine reuses the buffer only after it.
        let released = filled.map_or(Ok(()), |f| self.engine.release(f));
        let out = built.and_then(|m| released.map(|()| m));
        if out.is_err() {
            // Nothing of the layer's sparse set is resident any more: the next request
            // copies in all of it.
            self.resident_ffn[li] = None;
            self.resident_ids[li].clear();
        }
        out
    }
}

impl<B: OffloadBackend> OffloadRuntime<B> {
    /// Whether a layer's new compact FFN is built from the old one and the moved neurons'
    /// bundles, staged by the copy engine (float weights, on every backend: only the new
    /// neurons cross the link). A quantized FFN is regathered on the host instead (its
    /// compact down matrix is re-encoded from the stored one).
    fn assembles_from_staging(&self) -> bool {
        !self.host.is_quantized()
    }
}
