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

use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use crate::backend::{checks, cpu, Backend};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::offload::bundle_cache::{cache_paths, open_or_build, CacheKey, HEADER_BYTES};
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
    /// `[f, 3h]` gate|up|down bundles (float FFNs only): a range of the bundle cache file's
    /// mapping (`offload::bundle_cache`), or of anonymous memory without one.
    pub bundles: Option<HostSlice>,
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
    /// Maps every layer's tensors and, for a float FFN, its bundles: from the cache file
    /// beside `model_path` (`offload::bundle_cache`; built on first use, a progress bar),
    /// or, without a path, built in anonymous memory. A quantized FFN's compact down
    /// matrices are gathered in `sparse_down`.
    pub fn build<B: Backend>(
        model: &Llama<B>,
        sparse_down: DType,
        model_path: Option<&Path>,
    ) -> Result<Self> {
        let quantized = model.dtype.is_quantized();
        let c = &model.config;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let mut layers = Vec::with_capacity(c.num_layers);
        for li in 0..c.num_layers {
            layers.push(map_layer(model, li)?);
        }
        if !quantized {
            let bundles = match model_path {
                Some(path) => cached_bundles(&layers, model.dtype, [h, f], path)?,
                None => anonymous_bundles(&layers, model.dtype, [h, f])?,
            };
            for (layer, b) in layers.iter_mut().zip(bundles) {
                layer.bundles = Some(b);
            }
        }
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
        let at = bundles.range.start;
        Ok(runs
            .into_iter()
            .map(|r| HostSlice {
                map: Arc::clone(&bundles.map),
                range: at + r.start..at + r.end,
            })
            .collect())
    }

    fn bundles(&self, li: usize) -> Result<&HostSlice> {
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
            let b = self.bundles(li)?;
            return Ok(cpu::gather_ffn(
                &b.map[b.range.clone()],
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

/// Layer `li`'s matrices as ranges of the checkpoint mapping (bundles come later).
fn map_layer<B: Backend>(model: &Llama<B>, li: usize) -> Result<HostLayer> {
    let store = model.weights();
    let slice = |(name, shape): (String, [usize; 2])| -> Result<(HostSlice, DType)> {
        let t = store.get(&name, &shape)?;
        let (map, range) = t.mapping();
        Ok((HostSlice { map, range }, t.dtype))
    };
    let [q_, k_, v_, o_, g_, u_, d_] = layer_matrices(&model.config, li);
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
    if !model.dtype.is_quantized() && dtypes.iter().any(|&t| t != model.dtype) {
        return Err(Error::InvalidArgument(format!(
            "layer {li} mixes {} with other formats: float FFNs move as bundles of one format \
             (convert at load with --weights bf16)",
            model.dtype
        )));
    }
    Ok(HostLayer {
        attention: [wq, wk, wv, wo],
        dense_ffn: [gate, up, down],
        bundles: None,
        dtypes,
    })
}

/// Layer `layer`'s FFN interleaved into bundles (`[f, 3h]`, see `sparsity::bundles`).
fn layer_bundles(layer: &HostLayer, dtype: DType, [h, f]: [usize; 2]) -> Vec<u8> {
    let [gate, up, down] = &layer.dense_ffn;
    interleave(
        Some(&gate.map[gate.range.clone()]),
        &up.map[up.range.clone()],
        &down.map[down.range.clone()],
        h,
        f,
        dtype.size(),
    )
}

/// Every layer's bundles from the cache file beside `model_path` (built if missing).
fn cached_bundles(
    layers: &[HostLayer],
    dtype: DType,
    [h, f]: [usize; 2],
    model_path: &Path,
) -> Result<Vec<HostSlice>> {
    let layer_bytes = f * dtype.bytes_for(3 * h);
    let shape = [layers.len(), h, f, layer_bytes];
    let key = CacheKey::of_model(model_path, &dtype.to_string(), shape)?;
    let paths = cache_paths(model_path, &dtype.to_string());
    let mut build = |li: usize| -> Result<Vec<u8>> {
        let layer = layers.get(li).ok_or_else(|| {
            Error::InvalidArgument(format!("layer {li}: the model has {}", layers.len()))
        })?;
        Ok(layer_bundles(layer, dtype, [h, f]))
    };
    let (map, path, reused) = open_or_build(&paths, &key, &mut build)?;
    tracing::info!(
        path = %path.display(),
        bytes = map.len(),
        reused,
        "FFN bundles mapped from their cache file"
    );
    Ok((0..layers.len())
        .map(|li| HostSlice {
            map: Arc::clone(&map),
            range: HEADER_BYTES + li * layer_bytes..HEADER_BYTES + (li + 1) * layer_bytes,
        })
        .collect())
}

/// Every layer's bundles in anonymous memory (no cache file: the FFN is held twice).
fn anonymous_bundles(layers: &[HostLayer], dtype: DType, hf: [usize; 2]) -> Result<Vec<HostSlice>> {
    let bar = progress_bar(layers.len() as u64, "FFN bundles");
    let mut out = Vec::with_capacity(layers.len());
    for layer in layers {
        let bytes = layer_bundles(layer, dtype, hf);
        let len = bytes.len();
        out.push(HostSlice {
            map: host_mapping(&bytes)?,
            range: 0..len,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
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
