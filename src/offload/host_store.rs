//! The host side of offloading: everything a pass may stream, in host memory (pinned RAM on
//! CUDA; on CPU the checkpoint mapping and the heap), addressed as [`HostSlice`]s the copy
//! engine reads.
//!
//! Per layer: the attention projections and the dense FFN matrices are ranges of the
//! memory-mapped checkpoint; the FFN is also rearranged into neuron bundles (gate row, up row,
//! down column together, see `crate::sparsity::bundles`), so the complement of any neuron
//! subset is a short list of contiguous runs.

use std::sync::Arc;

use memmap2::Mmap;

use crate::backend::{cpu, Backend};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::progress::progress_bar;
use crate::sparsity::bundles::{complement_ids, interleave, neuron_byte_runs};
use crate::tensor::DType;
use crate::transfer::HostSlice;

/// One layer's streamable weights.
pub struct HostLayer {
    /// wq `[q, h]`, wk `[kv, h]`, wv `[kv, h]`, wo `[h, q]` (checkpoint mapping).
    pub attention: [HostSlice; 4],
    /// gate `[f, h]`, up `[f, h]`, down `[h, f]` (checkpoint mapping).
    pub dense_ffn: [HostSlice; 3],
    /// `[f, 3h]` gate|up|down bundles.
    pub bundles: Arc<Mmap>,
}

pub struct HostStore {
    pub layers: Vec<HostLayer>,
    pub hidden: usize,
    pub neurons: usize,
    pub dtype: DType,
}

impl HostStore {
    /// Maps every layer's tensors and builds its bundles (a progress bar: this copies the
    /// whole FFN once).
    pub fn build<B: Backend>(model: &Llama<B>) -> Result<Self> {
        let c = &model.config;
        let (h, f, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let store = model.weights();
        let slice = |name: String, shape: [usize; 2]| -> Result<HostSlice> {
            let t = store.get(&name, &shape)?;
            let (map, range) = t.mapping();
            Ok(HostSlice { map, range })
        };
        let bar = progress_bar(c.num_layers as u64, "host store");
        let mut layers = Vec::with_capacity(c.num_layers);
        for li in 0..c.num_layers {
            let a = format!("model.layers.{li}.self_attn");
            let m = format!("model.layers.{li}.mlp");
            let attention = [
                slice(format!("{a}.q_proj.weight"), [q, h])?,
                slice(format!("{a}.k_proj.weight"), [kv, h])?,
                slice(format!("{a}.v_proj.weight"), [kv, h])?,
                slice(format!("{a}.o_proj.weight"), [h, q])?,
            ];
            let dense_ffn = [
                slice(format!("{m}.gate_proj.weight"), [f, h])?,
                slice(format!("{m}.up_proj.weight"), [f, h])?,
                slice(format!("{m}.down_proj.weight"), [h, f])?,
            ];
            let [gate, up, down] = &dense_ffn;
            let bytes = interleave(
                Some(&gate.map[gate.range.clone()]),
                &up.map[up.range.clone()],
                &down.map[down.range.clone()],
                h,
                f,
                model.dtype.size(),
            );
            layers.push(HostLayer {
                attention,
                dense_ffn,
                bundles: host_mapping(&bytes)?,
            });
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(HostStore {
            layers,
            hidden: h,
            neurons: f,
            dtype: model.dtype,
        })
    }

    /// Bytes of one neuron's bundle.
    pub fn bundle_bytes(&self) -> usize {
        self.dtype.bytes_for(3 * self.hidden)
    }

    /// Runs of the bundles of every neuron of layer `li` NOT in `kept` (ascending): what a
    /// full pass over a resident subset streams. Adjacent neurons form one piece.
    pub fn complement(&self, li: usize, kept: &[u32]) -> Result<Vec<HostSlice>> {
        let rest = complement_ids(kept, self.neurons).map_err(|e| in_layer(li, e))?;
        self.neuron_runs(li, &rest)
    }

    /// Runs of the bundles of neurons `ids` (ascending) of layer `li`, adjacent neurons
    /// merged into one piece: what copying that subset moves.
    pub fn neuron_runs(&self, li: usize, ids: &[u32]) -> Result<Vec<HostSlice>> {
        let layer = self.layer(li)?;
        let runs = neuron_byte_runs(ids, self.neurons, self.bundle_bytes())
            .map_err(|e| in_layer(li, e))?;
        Ok(runs
            .into_iter()
            .map(|range| HostSlice {
                map: Arc::clone(&layer.bundles),
                range,
            })
            .collect())
    }

    /// Griffin's compact FFN of neurons `ids` (ascending) of layer `li`, gathered on the host:
    /// gate `[k, h]` | up `[k, h]` | down `[h, k]` back to back in one slice.
    pub fn gather_sparse(&self, li: usize, ids: &[u32]) -> Result<HostSlice> {
        let (gate, up, down) = self.gather_parts(li, ids)?;
        let mut all = gate;
        all.extend_from_slice(&up);
        all.extend_from_slice(&down);
        let len = all.len();
        Ok(HostSlice {
            map: host_mapping(&all)?,
            range: 0..len,
        })
    }

    /// [`HostStore::gather_sparse`] as three byte vectors (gate, up, down).
    pub fn gather_parts(&self, li: usize, ids: &[u32]) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let layer = self.layer(li)?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.neurons) {
            return Err(Error::InvalidArgument(format!(
                "neuron {bad} of layer {li}: the layer has {}",
                self.neurons
            )));
        }
        Ok(cpu::gather_ffn(
            &layer.bundles,
            self.dtype,
            self.hidden,
            ids,
        ))
    }

    fn layer(&self, li: usize) -> Result<&HostLayer> {
        self.layers.get(li).ok_or_else(|| {
            Error::InvalidArgument(format!("layer {li}: the model has {}", self.layers.len()))
        })
    }
}

/// Names the layer in an argument error.
fn in_layer(li: usize, e: Error) -> Error {
    match e {
        Error::InvalidArgument(msg) => Error::InvalidArgument(format!("layer {li}: {msg}")),
        other => other,
    }
}

/// `bytes` copied into a fresh read-only anonymous mapping (host memory the copy engine reads).
pub fn host_mapping(bytes: &[u8]) -> Result<Arc<Mmap>> {
    let io = |e: std::io::Error| Error::io("anonymous host memory for streamed weights", e);
    let mut map = memmap2::MmapOptions::new()
        .len(bytes.len().max(1))
        .map_anon()
        .map_err(io)?;
    map[..bytes.len()].copy_from_slice(bytes);
    Ok(Arc::new(map.make_read_only().map_err(io)?))
}
