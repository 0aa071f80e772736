//! CATS: dense gate, and up/down only for the neurons whose |SiLU(gate)| survives, chosen
//! per token: the top k, or those at or above a per-layer threshold calibrated on sample text
//! (`sirius-offload calibrate`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::NeuronRule;
use crate::config::ModelConfig;
use crate::error::{Error, Result};

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
        if t.model != expected {
            return Err(Error::config(
                path,
                format!(
                    "thresholds were calibrated for another model ({:?}), this one is {:?}; run `sirius-offload calibrate` for it",
                    t.model, expected
                ),
            ));
        }
        if t.thresholds.len() != config.num_layers
            || t.thresholds.iter().any(|v| !v.is_finite() || *v < 0.0)
        {
            return Err(Error::config(
                path,
                format!(
                    "needs {} finite, non-negative thresholds (one per layer), found {:?}",
                    config.num_layers,
                    t.thresholds.len()
                ),
            ));
        }
        Ok(t)
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
