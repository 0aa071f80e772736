//! CATS: dense gate, and up/down only for the neurons whose |SiLU(gate)| survives, chosen
//! per token: the top k, or those at or above a per-layer threshold calibrated on sample text
//! (`sirius-offload calibrate`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BundleSelection, NeuronRule, SparseOps};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::sparsity::bundles::{FfnTensors, NeuronBundles};
use crate::sparsity::ffn::{FfnStep, FfnStrategy};
use crate::sparsity::NeuronCounter;
use crate::tensor::TensorRef;

/// How a CATS model picks each token's neurons.
#[derive(Debug, Clone)]
pub enum CatsRule {
    /// The `k` largest |SiLU(gate)| per token and layer.
    TopK(usize),
    /// Per-layer thresholds.
    Thresholds(CatsThresholds),
}

impl CatsRule {
    /// The rule of layer `li`.
    pub fn for_layer(&self, li: usize) -> NeuronRule {
        match self {
            CatsRule::TopK(k) => NeuronRule::TopK(*k),
            CatsRule::Thresholds(t) => {
                NeuronRule::Threshold(t.thresholds.get(li).copied().unwrap_or(0.0))
            }
        }
    }
}

/// A request's CATS FFN: dense gate, then up/down over the bundles of the neurons `rule`
/// keeps per token (with `shared`, one set for the whole batch: the beams of a Sirius tree).
pub struct CatsFfn<'s, B: Backend> {
    pub bundles: &'s NeuronBundles<B>,
    pub rule: &'s CatsRule,
    /// Neurons kept so far (density statistics).
    pub counter: NeuronCounter,
    pub shared: bool,
}

impl<B: SparseOps> FfnStrategy<B> for CatsFfn<'_, B> {
    fn apply(&mut self, step: FfnStep<'_, B>) -> Result<()> {
        let (b, li, n) = (step.backend, step.layer, step.n_tokens);
        let f = step.dims.neurons;
        let l = (self.bundles.layers.get(li))
            .ok_or_else(|| Error::InvalidArgument(format!("no bundles for layer {li}")))?;
        let w = step.weights;
        let s = step.scratch;
        b.matmul(&w.gate, step.x, n, &mut s.gate)?;
        if let Some(bias) = &w.gate_bias {
            b.add_bias(&mut s.gate, bias, n)?;
        }
        b.silu(&mut s.gate, n * f)?;
        let rule = self.rule.for_layer(li);
        b.select_neurons(&mut s.gate, n, f, rule, self.shared, &mut s.kept)?;
        self.counter.add(li, s.kept.total(), n);
        let sel = BundleSelection::PerToken {
            coeff: &s.gate,
            kept: &s.kept,
            up_bias: w.up_bias.as_ref(),
        };
        b.bundle_ffn(&l.matrix, self.bundles.layout, step.x, n, sel, step.out)
    }
}

/// Which model a thresholds file belongs to: files for another model are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
}

impl ModelShape {
    /// "field: file value vs model value" for every field that differs.
    pub fn differences(&self, model: &ModelShape) -> Vec<String> {
        let mut out = Vec::new();
        if self.architecture != model.architecture {
            out.push(format!(
                "architecture {} vs {}",
                self.architecture, model.architecture
            ));
        }
        for (name, a, b) in [
            ("hidden_size", self.hidden_size, model.hidden_size),
            (
                "intermediate_size",
                self.intermediate_size,
                model.intermediate_size,
            ),
            ("num_layers", self.num_layers, model.num_layers),
            ("vocab_size", self.vocab_size, model.vocab_size),
        ] {
            if a != b {
                out.push(format!("{name} {a} in the file vs {b} in the model"));
            }
        }
        out
    }

    pub fn of(c: &ModelConfig) -> Self {
        ModelShape {
            architecture: format!("{:?}", c.architecture),
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_layers,
            vocab_size: c.vocab_size,
        }
    }
}

/// A calibrated thresholds file (`calibrate --out`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatsThresholds {
    pub model: ModelShape,
    /// Target fraction of neurons kept.
    pub keep: f32,
    /// |SiLU(gate)| threshold per layer.
    pub thresholds: Vec<f32>,
    /// Fraction kept per layer on the calibration text.
    pub calibration_kept: Vec<f64>,
    pub calibration_tokens: usize,
    /// Where the calibration text came from (path as given).
    pub calibration_text: String,
}

impl CatsThresholds {
    /// Reads a thresholds file and checks that it was made for a model of `config`'s shape.
    pub fn load(path: &Path, config: &ModelConfig) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let t: CatsThresholds = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        let expected = ModelShape::of(config);
        let differences = t.model.differences(&expected);
        if !differences.is_empty() {
            return Err(Error::config(
                path,
                format!(
                    "thresholds were calibrated for another model ({}); run `sirius-offload calibrate` for this one",
                    differences.join(", ")
                ),
            ));
        }
        crate::sparsity::validate_keep(t.keep).map_err(|_| {
            Error::config(
                path,
                format!(
                    "`keep` must be in (0, 1], found {}",
                    crate::units::format_number(t.keep)
                ),
            )
        })?;
        if t.thresholds.len() != config.num_layers {
            return Err(Error::config(
                path,
                format!(
                    "needs one threshold per layer ({}), found {}",
                    config.num_layers,
                    t.thresholds.len()
                ),
            ));
        }
        if let Some((layer, v)) = t
            .thresholds
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite() || **v < 0.0)
        {
            return Err(Error::config(
                path,
                format!(
                    "threshold of layer {layer} is {v}: thresholds must be finite and non-negative"
                ),
            ));
        }
        Ok(t)
    }

    /// `Err` when a layer's threshold is at or above the largest |SiLU(gate)| that layer can
    /// produce for any input (`bounds`, from [`activation_bound`]): it would keep no neuron,
    /// and decoding would run without its FFN while reporting a density.
    pub fn check_reachable(&self, path: &Path, bounds: &[f32]) -> Result<()> {
        let unreachable =
            (self.thresholds.iter().zip(bounds).enumerate()).find(|(_, (&t, &bound))| t >= bound);
        match unreachable {
            Some((layer, (&t, &bound))) => Err(Error::config(
                path,
                format!(
                    "the threshold of layer {layer} is {}, but no input can make that layer's \
                     |SiLU(gate)| exceed {bound:.3}: it would keep no neuron; run `sirius-offload \
                     calibrate` again",
                    crate::units::format_number(t)
                ),
            )),
            None => Ok(()),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        std::fs::write(path, text + "\n").map_err(|e| Error::Write {
            path: path.to_path_buf(),
            source: e,
        })
    }
}

/// An upper bound on |SiLU(gate)| of one FFN layer over every input: the FFN reads
/// `norm * x / rms(x)`, whose 2-norm is at most `sqrt(h) * |norm|` element-wise, so
/// |gate_j| <= sqrt(h) * ||w_j * norm|| + |b_j| (Cauchy-Schwarz); SiLU(z) < z above zero
/// and |SiLU(z)| < 0.279 below it. Reads the gate matrix a row at a time.
pub fn activation_bound(ffn: &FfnTensors) -> f32 {
    /// The largest |SiLU(z)| of a negative z (at z = -1.278).
    const SILU_NEGATIVE_MAX: f32 = 0.279;
    let norm = ffn.norm.to_f32();
    let bias = ffn.gate_bias.as_ref().map(TensorRef::to_f32);
    let h = norm.len();
    let row_bytes = ffn.gate.dtype.bytes_for(h);
    let mut row = vec![0.0f32; h];
    let mut bound = SILU_NEGATIVE_MAX;
    for (j, bytes) in ffn.gate.bytes().chunks_exact(row_bytes.max(1)).enumerate() {
        if !crate::tensor::quant::dequantize(ffn.gate.dtype, bytes, &mut row) {
            // Unreadable rows bound nothing: keep every threshold reachable.
            return f32::INFINITY;
        }
        let scaled: f64 = (row.iter().zip(&norm))
            .map(|(w, g)| f64::from(w * g).powi(2))
            .sum();
        let b = bias
            .as_ref()
            .and_then(|b| b.get(j))
            .map_or(0.0, |b| b.abs());
        let z = ((scaled * h as f64).sqrt() as f32) + b;
        bound = bound.max(z);
    }
    // Rounding in the kernels' sums: a hair of margin.
    bound * 1.001
}
