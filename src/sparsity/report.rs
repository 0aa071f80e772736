//! Density bookkeeping: neurons the sparse FFN kept per layer, and the parameters a sparse
//! token reads.

use serde::Serialize;

use crate::config::ModelConfig;
use crate::sparsity::{kept_neurons, SparsityMode};

/// Neurons a sparse FFN kept, summed over the tokens it ran.
#[derive(Debug, Clone, Default)]
pub struct NeuronCounter {
    /// Per layer: kept neurons summed over tokens.
    pub kept: Vec<u64>,
    /// Token-layers counted per layer (tokens).
    pub tokens: u64,
}

impl NeuronCounter {
    pub fn new(layers: usize) -> Self {
        NeuronCounter {
            kept: vec![0; layers],
            tokens: 0,
        }
    }

    /// Records layer `li` keeping `kept` neurons over `n_tokens` tokens. Call with the last
    /// layer to finish a pass (tokens are counted there).
    pub fn add(&mut self, li: usize, kept: usize, n_tokens: usize) {
        if let Some(k) = self.kept.get_mut(li) {
            *k += kept as u64;
        }
        if li + 1 == self.kept.len() {
            self.tokens += n_tokens as u64;
        }
    }

    /// Mean fraction of the `d_ff` neurons kept per layer.
    pub fn kept_fraction(&self, d_ff: usize) -> Vec<f64> {
        self.kept
            .iter()
            .map(|&k| {
                if self.tokens == 0 {
                    0.0
                } else {
                    k as f64 / (self.tokens as f64 * d_ff as f64)
                }
            })
            .collect()
    }
}

/// Sparsity statistics of a request.
#[derive(Debug, Clone, Serialize)]
pub struct SparsityReport {
    pub sparsity: SparsityMode,
    pub keep: f32,
    /// Parameters read per sparse token / all parameters (embedding and head
    /// included, the embedding counted whole as the paper does). 1.0 for dense.
    pub density: f64,
    /// Mean fraction of FFN neurons kept per layer over the sparse tokens (empty for dense;
    /// the nominal `kept_neurons(keep, d_ff) / d_ff` when no token ran sparse yet).
    pub kept_per_layer: Vec<f64>,
    /// Tokens that ran the sparse FFN.
    pub sparse_tokens: u64,
}

impl SparsityReport {
    pub fn new(mode: SparsityMode, keep: f32, counter: &NeuronCounter, c: &ModelConfig) -> Self {
        let f = c.intermediate_size;
        let kept = if mode == SparsityMode::None {
            Vec::new()
        } else if counter.tokens == 0 {
            vec![kept_neurons(keep, f) as f64 / f.max(1) as f64; c.num_layers]
        } else {
            counter.kept_fraction(f)
        };
        let density = density(mode, &kept, c);
        SparsityReport {
            sparsity: mode,
            keep,
            density,
            kept_per_layer: kept,
            sparse_tokens: counter.tokens,
        }
    }
}

/// Density of a sparse FFN keeping fraction `kept[l]` of layer l's neurons, from the
/// parameter count: a skipped Griffin neuron saves its gate row, up row and down column
/// (plus gate/up biases); a skipped CATS neuron saves only up and down (the gate is dense).
pub fn density(mode: SparsityMode, kept: &[f64], c: &ModelConfig) -> f64 {
    let h = c.hidden_size as f64;
    let f = c.intermediate_size as f64;
    let bias = if c.mlp_bias { 1.0 } else { 0.0 };
    let per_neuron = match mode {
        SparsityMode::None => return 1.0,
        SparsityMode::Griffin => 3.0 * h + 2.0 * bias,
        SparsityMode::Cats => 2.0 * h + bias,
    };
    let skipped: f64 = kept.iter().map(|k| (1.0 - k) * f * per_neuron).sum();
    let total = c.parameter_count() as f64;
    (total - skipped) / total
}
