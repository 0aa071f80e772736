//! The host side of offloading: everything a pass may stream, in host memory (pinned RAM on
//! CUDA; on CPU the checkpoint mapping and the heap), addressed as [`HostSlice`]s the copy
//! engine reads.
//!
//! Per layer: the attention projections and the dense FFN matrices are ranges of the
//! memory-mapped checkpoint. Float FFNs are also rearranged into neuron bundles (gate row, up
//! row, down column together, see `crate::sparsity::bundles`), so the complement of any
//! neuron subset is a short list of contiguous runs. Quantized FFNs are not copied at all: a
//! neuron's gate and up rows are runs of the mapped matrices as they are, and its down column
//! (spread over the blocks of every down row) is only ever read as part of the whole down
//! matrix or re-encoded in a gathered compact FFN (see `crate::offload::sizes`).

use std::sync::Arc;

use memmap2::Mmap;

use crate::backend::{checks, cpu, Backend};
use crate::config::ModelConfig;
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
    /// `[f, 3h]` gate|up|down bundles (float FFNs only).
    pub bundles: Option<Arc<Mmap>>,
    /// The stored types of wq, wk, wv, wo, gate, up and down (block formats may differ
    /// between matrices and layers: a GGUF Q4_K_M's Q6_K v and down).
    pub dtypes: [DType; 7],
}

pub struct HostStore {
    pub layers: Vec<HostLayer>,
    pub hidden: usize,
    pub neurons: usize,
    pub dtype: DType,
    /// Quantized FFNs: the format gathered compact down matrices are re-encoded in, and the
    /// threads that gather them.
    quantized: Option<(DType, cpu::ThreadPool)>,
}

impl HostStore {
    /// Maps every layer's tensors and, for a float FFN, builds its bundles (a progress bar:
    /// this copies the whole FFN once). A quantized FFN's compact down matrices are gathered
    /// in `sparse_down`.
    pub fn build<B: Backend>(model: &Llama<B>, sparse_down: DType) -> Result<Self> {
        let quantized = model.dtype.is_quantized();
        let c = &model.config;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let store = model.weights();
        let slice = |(name, shape): (String, [usize; 2])| -> Result<(HostSlice, DType)> {
            let t = store.get(&name, &shape)?;
            let (map, range) = t.mapping();
            Ok((HostSlice { map, range }, t.dtype))
        };
        let bar = progress_bar(c.num_layers as u64, "host store");
        let mut layers = Vec::with_capacity(c.num_layers);
        for li in 0..c.num_layers {
            let [q_, k_, v_, o_, g_, u_, d_] = layer_matrices(c, li);
            let [(wq, tq), (wk, tk), (wv, tv), (wo, to), (gate, tg), (up, tu), (down, td)] = [
                slice(q_)?,
                slice(k_)?,
                slice(v_)?,
                slice(o_)?,
                slice(g_)?,
                slice(u_)?,
                slice(d_)?,
            ];
            let dtypes = [tq, tk, tv, to, tg, tu, td];
            if !quantized && dtypes.iter().any(|&t| t != model.dtype) {
                return Err(Error::InvalidArgument(format!(
                    "layer {li} mixes {} with other formats: float FFNs move as bundles of one \
                     format (convert at load with --weights bf16)",
                    model.dtype
                )));
            }
            let (attention, dense_ffn) = ([wq, wk, wv, wo], [gate, up, down]);
            let [gate, up, down] = &dense_ffn;
            let bundles = match quantized {
                true => None,
                false => Some(host_mapping(&interleave(
                    Some(&gate.map[gate.range.clone()]),
                    &up.map[up.range.clone()],
                    &down.map[down.range.clone()],
                    h,
                    f,
                    model.dtype.size(),
                ))?),
            };
            layers.push(HostLayer {
                attention,
                dense_ffn,
                bundles,
                dtypes,
            });
            bar.inc(1);
        }
        bar.finish_and_clear();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(HostStore {
            layers,
            hidden: h,
            neurons: f,
            dtype: model.dtype,
            quantized: quantized.then(|| (sparse_down, cpu::ThreadPool::new(threads))),
        })
    }

    /// Whether the FFN is quantized (moved as rows, not bundles).
    pub fn is_quantized(&self) -> bool {
        self.quantized.is_some()
    }

    /// Bytes of one neuron's bundle (float FFNs), or of its gate and up rows and its column
    /// of a gathered compact down matrix (quantized), in layer `li`.
    pub fn bundle_bytes(&self, li: usize) -> Result<usize> {
        let [.., gate, up, _] = self.layer(li)?.dtypes;
        let h = self.hidden;
        Ok(match &self.quantized {
            Some((down, _)) => gate.bytes_for(h) + up.bytes_for(h) + down.bytes_for(h),
            None => self.dtype.bytes_for(3 * h),
        })
    }

    /// Layer `li`'s matrix types (see [`HostLayer::dtypes`]).
    pub fn dtypes(&self, li: usize) -> Result<[DType; 7]> {
        Ok(self.layer(li)?.dtypes)
    }

    /// What a full pass over a resident subset streams for layer `li`, `kept` (ascending)
    /// being that subset. Float FFNs: the runs of the bundles of every neuron NOT in
    /// `kept`, adjacent neurons forming one piece. Quantized: the runs of those neurons' gate
    /// rows, then the same runs of their up rows, then the whole down matrix.
    pub fn complement(&self, li: usize, kept: &[u32]) -> Result<Vec<HostSlice>> {
        let rest = complement_ids(kept, self.neurons).map_err(|e| in_layer(li, e))?;
        if !self.is_quantized() {
            return self.neuron_runs(li, &rest);
        }
        let layer = self.layer(li)?;
        let [gate, up, down] = &layer.dense_ffn;
        let [.., gate_type, up_type, _] = layer.dtypes;
        let mut pieces = Vec::new();
        for (m, dtype) in [(gate, gate_type), (up, up_type)] {
            let row = dtype.bytes_for(self.hidden);
            let runs = neuron_byte_runs(&rest, self.neurons, row).map_err(|e| in_layer(li, e))?;
            pieces.extend(runs.iter().map(|r| HostSlice {
                map: Arc::clone(&m.map),
                range: m.range.start + r.start..m.range.start + r.end,
            }));
        }
        pieces.push(down.clone());
        Ok(pieces)
    }

    /// Runs of the bundles of neurons `ids` (ascending) of layer `li`, adjacent neurons
    /// merged into one piece: what copying that subset moves (float FFNs only).
    pub fn neuron_runs(&self, li: usize, ids: &[u32]) -> Result<Vec<HostSlice>> {
        let bundles = self.bundles(li)?;
        let runs = neuron_byte_runs(ids, self.neurons, self.bundle_bytes(li)?)
            .map_err(|e| in_layer(li, e))?;
        Ok(runs
            .into_iter()
            .map(|range| HostSlice {
                map: Arc::clone(bundles),
                range,
            })
            .collect())
    }

    fn bundles(&self, li: usize) -> Result<&Arc<Mmap>> {
        self.layer(li)?.bundles.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "layer {li}: a quantized FFN has no neuron bundles (its neurons move as rows)"
            ))
        })
    }

    /// Griffin's compact FFN of neurons `ids` (ascending) of layer `li`, gathered on the host:
    /// gate `[k, h]` | up `[k, h]` | down `[h, k]` back to back in one slice (quantized: the
    /// down matrix in the sparse-down format).
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

    /// [`HostStore::gather_sparse`] as three byte vectors (gate, up, down). On a quantized
    /// FFN these are byte for byte what Griffin gathers from the loaded model
    /// (`SparseOps::gather_quantized_ffn` on the CPU), so drafts equal an unconstrained run's.
    pub fn gather_parts(&self, li: usize, ids: &[u32]) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let layer = self.layer(li)?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.neurons) {
            return Err(Error::InvalidArgument(format!(
                "neuron {bad} of layer {li}: the layer has {}",
                self.neurons
            )));
        }
        let Some((down_dtype, pool)) = &self.quantized else {
            return Ok(cpu::gather_ffn(
                self.bundles(li)?,
                self.dtype,
                self.hidden,
                ids,
            ));
        };
        let (h, f) = (self.hidden, self.neurons);
        let [.., tg, tu, td] = layer.dtypes;
        checks::quantized_gather((tg, f, h), (tu, f, h), (td, h, f), ids, *down_dtype)?;
        let [gate, up, down] = &layer.dense_ffn;
        let w = cpu::QuantizedFfn {
            gate: (&gate.map[gate.range.clone()], tg),
            up: (&up.map[up.range.clone()], tu),
            down: (&down.map[down.range.clone()], td),
            hidden: self.hidden,
            neurons: self.neurons,
        };
        Ok(cpu::gather_quantized_ffn(pool, w, ids, *down_dtype))
    }

    fn layer(&self, li: usize) -> Result<&HostLayer> {
        self.layers.get(li).ok_or_else(|| {
            Error::InvalidArgument(format!("layer {li}: the model has {}", self.layers.len()))
        })
    }
}

/// Layer `li`'s wq, wk, wv, wo, gate, up and down: checkpoint names and `[rows, cols]`.
pub fn layer_matrices(c: &ModelConfig, li: usize) -> [(String, [usize; 2]); 7] {
    let (h, f, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let (a, m) = (
        format!("model.layers.{li}.self_attn"),
        format!("model.layers.{li}.mlp"),
    );
    [
        (format!("{a}.q_proj.weight"), [q, h]),
        (format!("{a}.k_proj.weight"), [kv, h]),
        (format!("{a}.v_proj.weight"), [kv, h]),
        (format!("{a}.o_proj.weight"), [h, q]),
        (format!("{m}.gate_proj.weight"), [f, h]),
        (format!("{m}.up_proj.weight"), [f, h]),
        (format!("{m}.down_proj.weight"), [h, f]),
    ]
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
