//! Griffin: one neuron selection per request, from the prompt.
//!
//! During the (dense) prefill every layer accumulates `s_j^2 = sum_t (z_tj / |z_t|)^2` with
//! `z_t = SiLU(gate . x_t) * (up . x_t)`; afterwards the top `kept_neurons(keep, f)` neurons
//! by `s_j` are gathered from the bundles into a compact FFN that the rest of the request
//! decodes with, reading only those bytes.

use crate::backend::{Backend, BundleLayout, SparseOps};
use crate::error::{Error, Result};
use crate::sparsity::bundles::NeuronBundles;
use crate::sparsity::ffn::{DenseTap, FfnDims, FfnMatrices, FfnStep, FfnStrategy, StreamedFfn};
use crate::sparsity::kept_aligned;

/// Per-layer score accumulators, filled during the dense prefill: as an [`FfnStrategy`] the
/// scores run the dense FFN and accumulate each layer's activations.
pub struct GriffinScores<B: Backend> {
    /// `[f]` per layer: sum over tokens of the squared normalised activations.
    pub layers: Vec<B::Buf>,
    neurons: usize,
    /// Tokens scored so far.
    pub tokens: usize,
}

impl<B: Backend> GriffinScores<B> {
    pub fn new(backend: &B, dims: FfnDims) -> Result<Self> {
        let layers = (0..dims.layers)
            .map(|_| backend.alloc(dims.neurons))
            .collect::<Result<_>>()?;
        Ok(GriffinScores {
            layers,
            neurons: dims.neurons,
            tokens: 0,
        })
    }

    /// Adds `other`'s sums (scores of other tokens of the same prompt) to these.
    pub fn add(&mut self, backend: &B, other: &GriffinScores<B>) -> Result<()> {
        if other.layers.len() != self.layers.len() || other.neurons != self.neurons {
            return Err(Error::InvalidArgument(
                "Griffin scores of another model shape".into(),
            ));
        }
        for (acc, add) in self.layers.iter_mut().zip(&other.layers) {
            backend.add(acc, add, self.neurons)?;
        }
        self.tokens += other.tokens;
        Ok(())
    }

    /// The scores `s_j` per layer, on the host.
    pub fn scores(&self, backend: &B) -> Result<Vec<Vec<f32>>> {
        self.layers
            .iter()
            .map(|buf| {
                let mut host = vec![0f32; self.neurons];
                backend.read(buf, 0, &mut host)?;
                host.iter_mut().for_each(|v| *v = v.sqrt());
                Ok(host)
            })
            .collect()
    }

    /// The top `kept_neurons(keep, f)` neurons of every layer, that count rounded up to a
    /// multiple of `align` (at most f).
    pub fn select(&self, backend: &B, keep: f32, align: usize) -> Result<GriffinSelection> {
        if self.tokens == 0 {
            return Err(Error::InvalidArgument(
                "Griffin needs at least one prompt token to select neurons".into(),
            ));
        }
        let k = kept_aligned(keep, self.neurons, align);
        let layers = self
            .scores(backend)?
            .iter()
            .map(|s| top_k_ascending(s, k))
            .collect();
        Ok(GriffinSelection { layers })
    }
}

/// Kept neuron ids per layer, ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GriffinSelection {
    pub layers: Vec<Vec<u32>>,
}

/// Ids of the `k` largest scores (NaN ranks lowest; ties: lower id first), ascending.
pub fn top_k_ascending(scores: &[f32], k: usize) -> Vec<u32> {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let mut ids: Vec<u32> = (0..scores.len() as u32).collect();
    let k = k.min(ids.len());
    if k < ids.len() && k > 0 {
        ids.select_nth_unstable_by(k - 1, |&a, &b| {
            key(scores[b as usize])
                .total_cmp(&key(scores[a as usize]))
                .then(a.cmp(&b))
        });
    }
    ids.truncate(k);
    ids.sort_unstable();
    ids
}

/// The compact FFN of one layer: the selected neurons gathered from their bundles into the
/// checkpoint layout, so decode runs the ordinary dense matmuls over k instead of f neurons.
pub struct GriffinLayer<B: Backend> {
    /// gate `[k, h]`, up `[k, h]`, down `[h, k]`.
    pub ffn: FfnMatrices<B>,
    pub gate_bias: Option<B::Buf>, // [k]
    pub up_bias: Option<B::Buf>,   // [k]
}

/// A request's Griffin FFN: every layer's selected neurons as a compact bundle matrix.
pub struct GriffinFfn<B: Backend> {
    /// Per layer; `None` where offloading could not keep the layer's subset resident (it is
    /// streamed in every pass instead, see `crate::offload`).
    pub layers: Vec<Option<GriffinLayer<B>>>,
    pub selection: GriffinSelection,
}

impl<B: SparseOps> GriffinFfn<B> {
    /// Gathers `selection` out of `bundles`.
    pub fn gather(
        backend: &B,
        bundles: &NeuronBundles<B>,
        selection: GriffinSelection,
    ) -> Result<Self> {
        if bundles.layout != BundleLayout::GateUpDown {
            return Err(Error::InvalidArgument(
                "Griffin gathers whole neurons: it needs gate|up|down bundles".into(),
            ));
        }
        check_layers(selection.layers.len(), bundles.layers.len())?;
        let layers = bundles
            .layers
            .iter()
            .zip(&selection.layers)
            .map(|(l, ids)| {
                let ffn = backend.gather_ffn(&l.matrix, ids)?;
                GriffinLayer::new(backend, ffn, [&l.gate_bias, &l.up_bias], ids).map(Some)
            })
            .collect::<Result<_>>()?;
        Ok(GriffinFfn { layers, selection })
    }
}

/// A selection covers every layer of the model.
pub(crate) fn check_layers(selected: usize, layers: usize) -> Result<()> {
    if selected != layers {
        return Err(Error::InvalidArgument(format!(
            "selection for {selected} layers, model has {layers}"
        )));
    }
    Ok(())
}

impl<B: SparseOps> GriffinLayer<B> {
    /// A layer's gathered `[gate, up, down]` with the kept neurons' entries of its per-neuron
    /// biases (`[gate, up]`, host copies), uploaded.
    pub(crate) fn new(
        backend: &B,
        [gate, up, down]: [B::Matrix; 3],
        [gate_bias, up_bias]: [&Option<Vec<f32>>; 2],
        ids: &[u32],
    ) -> Result<Self> {
        let gather = |bias: &Option<Vec<f32>>| {
            bias.as_ref()
                .map(|b| backend.upload(&ids.iter().map(|&i| b[i as usize]).collect::<Vec<_>>()))
                .transpose()
        };
        Ok(GriffinLayer {
            ffn: FfnMatrices { gate, up, down },
            gate_bias: gather(gate_bias)?,
            up_bias: gather(up_bias)?,
        })
    }
}

impl<B: Backend> GriffinFfn<B> {
    /// Neurons kept per layer.
    pub fn kept(&self) -> Vec<usize> {
        self.selection.layers.iter().map(Vec::len).collect()
    }
}

impl<B: SparseOps> FfnStrategy<B> for GriffinScores<B> {
    fn apply(&mut self, mut step: FfnStep<'_, B>) -> Result<()> {
        step.dense(self)
    }
}

impl<B: SparseOps> DenseTap<B> for GriffinScores<B> {
    /// Adds the layer's `z_t / |z_t|` squares to its scores.
    fn activation(&mut self, step: &FfnStep<'_, B>) -> Result<()> {
        let li = step.layer;
        let acc = self
            .layers
            .get_mut(li)
            .ok_or_else(|| Error::InvalidArgument(format!("no Griffin scores for layer {li}")))?;
        let (n, f) = (step.n_tokens, step.dims.neurons);
        step.backend
            .accumulate_neuron_scores(&step.scratch.gate, n, f, acc)?;
        if li + 1 == step.dims.layers {
            self.tokens += n;
        }
        Ok(())
    }
}

/// Decode with the request's neurons: the dense FFN over k gathered neurons (resident, or
/// streamed for this pass where offloading could not keep them).
impl<B: Backend> FfnStrategy<B> for GriffinFfn<B> {
    fn apply(&mut self, mut step: FfnStep<'_, B>) -> Result<()> {
        self.compact_ffn(&mut step)
    }
}

impl<B: Backend> GriffinFfn<B> {
    /// `step.out` = the layer's compact FFN of the request's neurons.
    pub fn compact_ffn(&self, step: &mut FfnStep<'_, B>) -> Result<()> {
        self.compact_activations(step)?;
        let (m, _, _) = self.compact_matrices(step.layer, step.streamed)?;
        step.down(&m.down)
    }

    /// `step.scratch.gate` = the activations of the layer's k kept neurons (rows `[n, k]`).
    pub fn compact_activations(&self, step: &mut FfnStep<'_, B>) -> Result<()> {
        let (m, gate_bias, up_bias) = self.compact_matrices(step.layer, step.streamed)?;
        let k = self.selection.layers[step.layer].len();
        step.gate_up(&m.gate, &m.up, gate_bias, up_bias)?;
        step.activate(k)
    }

    /// Layer `li`'s compact FFN (resident, or streamed this pass) and its biases.
    #[allow(clippy::type_complexity)]
    fn compact_matrices<'m>(
        &'m self,
        li: usize,
        streamed: Option<&'m StreamedFfn<B>>,
    ) -> Result<(&'m FfnMatrices<B>, Option<&'m B::Buf>, Option<&'m B::Buf>)> {
        let resident = self
            .layers
            .get(li)
            .ok_or_else(|| Error::InvalidArgument(format!("no Griffin FFN for layer {li}")))?;
        let streamed = streamed.and_then(|s| s.sparse.as_ref());
        match (resident, streamed) {
            (Some(l), _) => Ok((&l.ffn, l.gate_bias.as_ref(), l.up_bias.as_ref())),
            (None, Some(st)) => Ok((st, None, None)),
            (None, None) => Err(Error::InvalidArgument(format!(
                "layer {li}'s Griffin FFN is neither resident nor streamed"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_by_lower_id_and_sorts() {
        let s = [0.5, 0.9, 0.5, f32::NAN, 0.1, 0.5];
        assert_eq!(top_k_ascending(&s, 2), vec![0, 1]);
        assert_eq!(top_k_ascending(&s, 3), vec![0, 1, 2]);
        assert_eq!(top_k_ascending(&s, 6), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(top_k_ascending(&s, 0), Vec::<u32>::new());
    }
}
