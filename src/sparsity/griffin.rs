//! Griffin: one neuron selection per request, from the prompt.
//!
//! During the (dense) prefill every layer accumulates `s_j^2 = sum_t (z_tj / |z_t|)^2` with
//! `z_t = SiLU(gate . x_t) * (up . x_t)`; afterwards the top `kept_neurons(keep, f)` neurons
//! by `s_j` are gathered from the bundles into a compact FFN that the rest of the request
//! decodes with, reading only those bytes.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::sparsity::bundles::NeuronBundles;
use crate::sparsity::kept_neurons;

/// Per-layer score accumulators, filled by a dense forward with `Ffn::DenseScoring`.
pub struct GriffinScores<B: Backend> {
    /// `[f]` per layer: sum over tokens of the squared normalised activations.
    pub layers: Vec<B::Buf>,
    neurons: usize,
    /// Tokens scored so far.
    pub tokens: usize,
}

impl<B: Backend> GriffinScores<B> {
    pub fn new(model: &Llama<B>) -> Result<Self> {
        let f = model.config.intermediate_size;
        let layers = (0..model.config.num_layers)
            .map(|_| model.backend.alloc(f))
            .collect::<Result<_>>()?;
        Ok(GriffinScores {
            layers,
            neurons: f,
            tokens: 0,
        })
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

    /// The top `kept_neurons(keep, f)` neurons of every layer.
    pub fn select(&self, backend: &B, keep: f32) -> Result<GriffinSelection> {
        if self.tokens == 0 {
            return Err(Error::InvalidArgument(
                "Griffin needs at least one prompt token to select neurons".into(),
            ));
        }
        let k = kept_neurons(keep, self.neurons);
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
    pub gate: B::Matrix,           // [k, h]
    pub up: B::Matrix,             // [k, h]
    pub down: B::Matrix,           // [h, k]
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

impl<B: Backend> GriffinFfn<B> {
    /// Gathers `selection` out of `bundles`.
    pub fn gather(
        backend: &B,
        bundles: &NeuronBundles<B>,
        selection: GriffinSelection,
    ) -> Result<Self> {
        if bundles.layout != crate::backend::BundleLayout::GateUpDown {
            return Err(Error::InvalidArgument(
                "Griffin gathers whole neurons: it needs gate|up|down bundles".into(),
            ));
        }
        if selection.layers.len() != bundles.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "selection for {} layers, model has {}",
                selection.layers.len(),
                bundles.layers.len()
            )));
        }
        let gather_bias = |bias: &Option<Vec<f32>>, ids: &[u32]| -> Result<Option<B::Buf>> {
            bias.as_ref()
                .map(|b| backend.upload(&ids.iter().map(|&i| b[i as usize]).collect::<Vec<_>>()))
                .transpose()
        };
        let layers = bundles
            .layers
            .iter()
            .zip(&selection.layers)
            .map(|(l, ids)| {
                let [gate, up, down] = backend.gather_ffn(&l.matrix, ids)?;
                Ok(Some(GriffinLayer {
                    gate,
                    up,
                    down,
                    gate_bias: gather_bias(&l.gate_bias, ids)?,
                    up_bias: gather_bias(&l.up_bias, ids)?,
                }))
            })
            .collect::<Result<_>>()?;
        Ok(GriffinFfn { layers, selection })
    }

    /// Neurons kept per layer.
    pub fn kept(&self) -> Vec<usize> {
        self.selection.layers.iter().map(Vec::len).collect()
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
