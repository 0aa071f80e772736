//! The neuron-bundle layout of the FFN weights.
//!
//! Checkpoints store the FFN as three matrices: gate `[f, h]`, up `[f, h]`, down `[h, f]`.
//! Neuron i is gate row i, up row i and down *column* i, so a neuron subset touches three
//! separate places, one of them strided. A bundle stores those `3h` weights contiguously
//! (row i of a `[f, 3h]` matrix: gate row, up row, down column, in the checkpoint dtype):
//! any neuron subset is then a list of contiguous runs, cheap to gather for Griffin, cheap to
//! read for CATS, and exactly what the offloading runtime copies over PCIe.

use std::ops::Range;
use std::time::Instant;

use crate::backend::{Backend, BundleLayout, SparseOps};
use crate::error::{Error, Result};
use crate::progress::progress_bar;
use crate::tensor::{DType, TensorRef};

/// One layer's FFN tensors in the checkpoint, as the model lists them.
#[derive(Debug, Clone)]
pub struct FfnTensors {
    pub gate: TensorRef,              // [f, h]
    pub up: TensorRef,                // [f, h]
    pub down: TensorRef,              // [h, f]
    pub gate_bias: Option<TensorRef>, // [f] (mlp_bias)
    pub up_bias: Option<TensorRef>,   // [f]
    /// The RMS norm's weight in front of the FFN (`post_attention_layernorm`), `[h]`.
    pub norm: TensorRef,
}

/// One layer's FFN in bundle form.
pub struct LayerBundles<B: Backend> {
    /// `[f, parts * h]`: row i = (gate row i |) up row i | down column i.
    pub matrix: B::Matrix,
    /// Per-neuron biases (`mlp_bias` models, gate|up|down layout), host copies for gathering.
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
}

/// Every layer's FFN as neuron bundles, built once at load.
pub struct NeuronBundles<B: Backend> {
    pub layers: Vec<LayerBundles<B>>,
    /// Gate|up|down (Griffin, offloading) or up|down (CATS, whose gate stays dense).
    pub layout: BundleLayout,
    pub hidden: usize,
    pub neurons: usize,
    pub dtype: DType,
    /// Seconds the build took (reported at load).
    pub build_seconds: f64,
}

impl<B: SparseOps> NeuronBundles<B> {
    /// Rearranges every layer's checkpoint FFN (`layers`) into bundles of `layout`.
    pub fn build(backend: &B, layout: BundleLayout, layers: &[FfnTensors]) -> Result<Self> {
        let t0 = Instant::now();
        let Some(first) = layers.first() else {
            return Err(Error::InvalidArgument(
                "a model without layers has no FFN to bundle".into(),
            ));
        };
        let dtype = first.gate.dtype;
        if let Some(q) = layers
            .iter()
            .flat_map(|l| [&l.gate, &l.up, &l.down])
            .find(|t| t.dtype.is_quantized() || t.dtype != dtype)
        {
            let fix = match q.dtype.is_quantized() {
                true => "load the model with --weights bf16 (Griffin, --sparsity griffin, and offloading run on quantized weights)",
                false => "load the model with --weights bf16",
            };
            return Err(Error::InvalidArgument(format!(
                "CATS reads neuron bundles of one float type; `{}` is {} (the first \
                 gate is {dtype}): {fix}",
                q.name, q.dtype
            )));
        }
        let (f, h) = match first.gate.shape[..] {
            [f, h] => (f, h),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "FFN gate `{}` is not a matrix",
                    first.gate.name
                )))
            }
        };
        let bar = progress_bar(layers.len() as u64, "bundling FFN");
        let mut out = Vec::with_capacity(layers.len());
        for l in layers {
            let gate_bytes = (layout == BundleLayout::GateUpDown).then(|| l.gate.bytes());
            let bytes = interleave(gate_bytes, l.up.bytes(), l.down.bytes(), h, f, dtype.size());
            let matrix = backend.upload_matrix(bytes, dtype, f, layout.parts() * h)?;
            // Host copies for Griffin's gather; CATS reads the layer's own bias buffers.
            let bias = |t: &Option<TensorRef>| {
                t.as_ref()
                    .filter(|_| layout == BundleLayout::GateUpDown)
                    .map(TensorRef::to_f32)
            };
            out.push(LayerBundles {
                matrix,
                gate_bias: bias(&l.gate_bias),
                up_bias: bias(&l.up_bias),
            });
            bar.inc(1);
        }
        bar.finish_and_clear();
        let build_seconds = t0.elapsed().as_secs_f64();
        let bundles = NeuronBundles {
            layers: out,
            layout,
            hidden: h,
            neurons: f,
            dtype,
            build_seconds,
        };
        tracing::info!(
            "FFN neuron bundles ({layout:?}): {} layers x {f} neurons, {:.1} MB, built in {:.0} ms",
            layers.len(),
            bundles.total_bytes() as f64 / 1e6,
            build_seconds * 1e3
        );
        Ok(bundles)
    }
}

impl<B: Backend> NeuronBundles<B> {
    /// Bytes of one neuron's bundle.
    pub fn bundle_bytes(&self) -> usize {
        self.layout.parts() * self.dtype.bytes_for(self.hidden)
    }

    /// Bytes of all bundles (the extra memory the layout costs next to the mapped checkpoint).
    pub fn total_bytes(&self) -> usize {
        self.layers.len() * self.neurons * self.bundle_bytes()
    }

    /// Byte ranges, within one layer's bundle matrix, of the neurons in `ids` (ascending),
    /// adjacent neurons merged into one run: what a copy of that subset has to move.
    pub fn byte_runs(&self, ids: &[u32]) -> Result<Vec<Range<usize>>> {
        neuron_byte_runs(ids, self.neurons, self.bundle_bytes())
    }
}

/// Byte ranges of the bundles (`bundle_bytes` each, `neurons` of them) of the neurons in
/// `ids` (ascending), adjacent neurons merged into one run.
pub fn neuron_byte_runs(
    ids: &[u32],
    neurons: usize,
    bundle_bytes: usize,
) -> Result<Vec<Range<usize>>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    let mut prev: Option<u32> = None;
    for &i in ids {
        if i as usize >= neurons || prev.is_some_and(|p| p >= i) {
            return Err(Error::InvalidArgument(format!(
                "neuron ids must be ascending and below {neurons}, got {i} after {prev:?}"
            )));
        }
        let start = i as usize * bundle_bytes;
        match runs.last_mut() {
            Some(last) if last.end == start => last.end += bundle_bytes,
            _ => runs.push(start..start + bundle_bytes),
        }
        prev = Some(i);
    }
    Ok(runs)
}

/// The neurons of `0..neurons` not in `kept` (ascending).
pub fn complement_ids(kept: &[u32], neurons: usize) -> Result<Vec<u32>> {
    let mut next_kept = kept.iter().peekable();
    let mut rest = Vec::with_capacity(neurons.saturating_sub(kept.len()));
    for i in 0..neurons as u32 {
        if next_kept.peek() == Some(&&i) {
            next_kept.next();
        } else {
            rest.push(i);
        }
    }
    if next_kept.next().is_some() {
        return Err(Error::InvalidArgument(format!(
            "kept neuron ids must be ascending and below {neurons}"
        )));
    }
    Ok(rest)
}

/// Bundles of one layer from its gate `[f, h]`, up `[f, h]` and down `[h, f]` (raw bytes,
/// `esz` bytes per element): `[f, 3h]` gate|up|down with a gate, `[f, 2h]` up|down without.
pub fn interleave(
    gate: Option<&[u8]>,
    up: &[u8],
    down: &[u8],
    h: usize,
    f: usize,
    esz: usize,
) -> Vec<u8> {
    let row = h * esz;
    let lead = if gate.is_some() { row } else { 0 };
    let bundle = lead + 2 * row;
    let mut out = vec![0u8; f * bundle];
    for (i, b) in out.chunks_exact_mut(bundle).enumerate() {
        if let Some(gate) = gate {
            b[..row].copy_from_slice(&gate[i * row..(i + 1) * row]);
        }
        b[lead..lead + row].copy_from_slice(&up[i * row..(i + 1) * row]);
    }
    // down[r, i] goes to bundle i, element r of its last part: read down row by row
    // (sequential), write one element into each bundle.
    for (r, down_row) in down.chunks_exact(f * esz).enumerate() {
        for (i, e) in down_row.chunks_exact(esz).enumerate() {
            let at = i * bundle + lead + row + r * esz;
            out[at..at + esz].copy_from_slice(e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;

    #[test]
    fn byte_runs_merge_adjacent_neurons_and_refuse_bad_ids() {
        let b: NeuronBundles<CpuBackend> = NeuronBundles {
            layers: Vec::new(),
            layout: BundleLayout::GateUpDown,
            hidden: 4,
            neurons: 10,
            dtype: DType::BF16,
            build_seconds: 0.0,
        };
        let bb = 3 * 4 * 2;
        assert_eq!(
            b.byte_runs(&[1, 2, 3, 7, 9]).unwrap(),
            vec![bb..4 * bb, 7 * bb..8 * bb, 9 * bb..10 * bb]
        );
        assert!(b.byte_runs(&[]).unwrap().is_empty());
        assert!(b.byte_runs(&[3, 2]).is_err(), "descending ids");
        assert!(b.byte_runs(&[2, 2]).is_err(), "repeated id");
        assert!(b.byte_runs(&[10]).is_err(), "id past the last neuron");
    }

    #[test]
    fn bundles_hold_gate_up_rows_and_down_columns() {
        let (h, f, esz) = (3, 4, 2);
        // Element values encode (matrix, row, col) so misplacement shows.
        let enc = |m: u16, r: usize, c: usize| (m * 100 + r as u16 * 10 + c as u16).to_le_bytes();
        let mat = |m: u16, rows: usize, cols: usize| -> Vec<u8> {
            (0..rows)
                .flat_map(|r| (0..cols).flat_map(move |c| enc(m, r, c)))
                .collect()
        };
        // Each bundle i: the listed parts in order, a (matrix, row, col) element per column.
        let check = |out: Vec<u8>, parts: &[(u16, bool)]| {
            let width = parts.len() * h;
            assert_eq!(out.len(), f * width * esz);
            for i in 0..f {
                let b = &out[i * width * esz..(i + 1) * width * esz];
                let el = |j: usize| u16::from_le_bytes([b[2 * j], b[2 * j + 1]]);
                for (p, &(m, column)) in parts.iter().enumerate() {
                    for c in 0..h {
                        let want = if column { enc(m, c, i) } else { enc(m, i, c) };
                        assert_eq!(el(p * h + c), u16::from_le_bytes(want), "part {p}");
                    }
                }
            }
        };
        let (gate, up, down) = (mat(1, f, h), mat(2, f, h), mat(3, h, f));
        check(
            interleave(Some(&gate), &up, &down, h, f, esz),
            &[(1, false), (2, false), (3, true)],
        );
        // Without the gate: up row then down column.
        check(
            interleave(None, &up, &down, h, f, esz),
            &[(2, false), (3, true)],
        );
    }
}
