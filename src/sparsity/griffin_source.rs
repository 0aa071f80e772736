//! Where Griffin gathers a request's neurons from.
//!
//! A float model's FFN is rearranged once into neuron bundles (`bundles.rs`): a neuron
//! subset is then a list of contiguous runs. A quantized model keeps its matrices as loaded
//! (in the file mapping on the CPU): gate and up rows are whole rows of blocks and are copied
//! as stored, while the down columns, which ggml's formats split across blocks along the
//! neuron axis, are re-encoded per request (see `SparseOps::gather_quantized_ffn`). Bundling a
//! quantized FFN would need that re-encoding anyway, and would keep a second copy of every
//! weight; gathering from the mapping keeps one.

use crate::backend::{Backend, BundleLayout, SparseOps};
use crate::error::Result;
use crate::sparsity::bundles::{FfnTensors, NeuronBundles};
use crate::sparsity::griffin::{GriffinFfn, GriffinLayer, GriffinSelection};
use crate::tensor::{DType, TensorRef};

/// One layer of a quantized model's FFN, as loaded.
pub struct QuantizedLayer<B: Backend> {
    pub gate: B::Matrix, // [f, h]
    pub up: B::Matrix,   // [f, h]
    pub down: B::Matrix, // [h, f]
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
}

/// Griffin's neuron source for a model with quantized FFN matrices.
pub struct QuantizedNeurons<B: Backend> {
    pub layers: Vec<QuantizedLayer<B>>,
    /// What the compact down matrix is re-encoded as.
    pub down_dtype: DType,
}

/// Griffin's neuron source: bundles of a float FFN, or a quantized FFN's own matrices.
pub enum GriffinSource<B: Backend> {
    Bundles(NeuronBundles<B>),
    Quantized(QuantizedNeurons<B>),
}

impl<B: SparseOps> GriffinSource<B> {
    /// Bundles for a float FFN; the matrices themselves when any of them is quantized, whose
    /// compact down matrices will be `down_dtype`.
    pub fn new(backend: &B, layers: &[FfnTensors], down_dtype: DType) -> Result<Self> {
        let quantized = layers
            .iter()
            .flat_map(|l| [&l.gate, &l.up, &l.down])
            .any(|t| t.dtype.is_quantized());
        if !quantized {
            return Ok(GriffinSource::Bundles(NeuronBundles::build(
                backend,
                BundleLayout::GateUpDown,
                layers,
            )?));
        }
        let bias = |t: &Option<TensorRef>| t.as_ref().map(TensorRef::to_f32);
        let layers = layers
            .iter()
            .map(|l| {
                Ok(QuantizedLayer {
                    gate: backend.matrix(&l.gate)?,
                    up: backend.matrix(&l.up)?,
                    down: backend.matrix(&l.down)?,
                    gate_bias: bias(&l.gate_bias),
                    up_bias: bias(&l.up_bias),
                })
            })
            .collect::<Result<_>>()?;
        tracing::info!(
            "Griffin gathers from the quantized FFN as loaded; compact down matrices in {down_dtype}"
        );
        Ok(GriffinSource::Quantized(QuantizedNeurons {
            layers,
            down_dtype,
        }))
    }

    /// The compact FFN of `selection`.
    pub fn gather(&self, backend: &B, selection: GriffinSelection) -> Result<GriffinFfn<B>> {
        match self {
            GriffinSource::Bundles(bundles) => GriffinFfn::gather(backend, bundles, selection),
            GriffinSource::Quantized(q) => q.gather(backend, selection),
        }
    }
}

impl<B: Backend> GriffinSource<B> {
    /// Kept neurons per layer are rounded up to a multiple of this (the compact down rows
    /// must be whole blocks).
    pub fn align(&self) -> usize {
        match self {
            GriffinSource::Bundles(_) => 1,
            GriffinSource::Quantized(q) => q.down_dtype.block().0,
        }
    }

    pub fn bundles(&self) -> Option<&NeuronBundles<B>> {
        match self {
            GriffinSource::Bundles(b) => Some(b),
            GriffinSource::Quantized(_) => None,
        }
    }
}

impl<B: SparseOps> QuantizedNeurons<B> {
    fn gather(&self, backend: &B, selection: GriffinSelection) -> Result<GriffinFfn<B>> {
        crate::sparsity::griffin::check_layers(selection.layers.len(), self.layers.len())?;
        let layers = self
            .layers
            .iter()
            .zip(&selection.layers)
            .map(|(l, ids)| {
                let ffn = backend.gather_quantized_ffn(
                    [&l.gate, &l.up, &l.down],
                    ids,
                    self.down_dtype,
                )?;
                GriffinLayer::new(backend, ffn, [&l.gate_bias, &l.up_bias], ids).map(Some)
            })
            .collect::<Result<_>>()?;
        Ok(GriffinFfn { layers, selection })
    }
}
