//! Contextual sparsity of the FFN: Griffin (one neuron set per request, from the prompt)
//! and CATS (per token, from |SiLU(gate)|), both reading real neuron subsets (through the
//! bundle layout, or for Griffin on quantized weights straight from the matrices, see
//! `griffin_source`) rather than masking a dense computation.
//!
//! - Griffin: during the dense prefill every layer scores neuron j by
//!   `s_j = sqrt(sum_t (z_tj / |z_t|)^2)`, `z_t = SiLU(W_gate x_t) * (W_up x_t)`; the top
//!   `round(keep * d_ff)` neurons per layer are gathered into a compact FFN for the rest of
//!   the request.
//! - CATS: the gate runs densely each token; up and down only for the neurons with the
//!   largest |SiLU(gate)| (per-token top-k), or those above per-layer thresholds calibrated
//!   on sample text.
//!
//! The forward pass stays the one in `model::llama`; this module supplies the FFN strategies
//! it calls ([`ffn::FfnStrategy`]: dense, Griffin, CATS, the offloaded split, and the
//! statistics taps), the bundles built at load, the per-request state ([`SparseRequest`]) and
//! the density bookkeeping ([`SparsityReport`]).

pub mod bundles;
pub mod calibrate;
pub mod cats;
pub mod ffn;
pub mod griffin;
pub mod griffin_source;
mod report;
mod request;
pub mod split;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;

use crate::backend::{Backend, BundleLayout, SparseOps};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tensor::DType;

pub use bundles::{FfnTensors, NeuronBundles};
pub use cats::{CatsFfn, CatsRule, CatsThresholds};
pub use ffn::{Dense, FfnDims, FfnStrategy, FfnWeights};
pub use griffin::{GriffinFfn, GriffinScores, GriffinSelection};
pub use griffin_source::{GriffinSource, QuantizedNeurons};
pub use report::{density, NeuronCounter, SparsityReport};
pub use request::SparseRequest;
pub use split::SplitDense;

/// Which sparse FFN the decode steps use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SparsityMode {
    #[value(alias = "dense")]
    None,
    Griffin,
    Cats,
}

impl fmt::Display for SparsityMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SparsityMode::None => "none",
            SparsityMode::Griffin => "griffin",
            SparsityMode::Cats => "cats",
        })
    }
}

impl FromStr for SparsityMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "dense" => Ok(SparsityMode::None),
            "griffin" => Ok(SparsityMode::Griffin),
            "cats" => Ok(SparsityMode::Cats),
            _ => Err(Error::InvalidArgument(format!(
                "unknown sparsity `{s}`: expected none, griffin or cats"
            ))),
        }
    }
}

/// Checks a keep fraction: finite, in (0, 1].
pub fn validate_keep(keep: f32) -> Result<f32> {
    if keep.is_finite() && keep > 0.0 && keep <= 1.0 {
        Ok(keep)
    } else {
        Err(Error::InvalidArgument(format!(
            "--keep must be a fraction in (0, 1], got {}",
            crate::units::format_number(keep)
        )))
    }
}

/// Neurons kept out of `d_ff` at fraction `keep`: `round(keep * d_ff)` (half away from zero),
/// at least 1 and at most `d_ff`.
pub fn kept_neurons(keep: f32, d_ff: usize) -> usize {
    ((keep as f64 * d_ff as f64).round() as usize).clamp(1.min(d_ff), d_ff)
}

/// [`kept_neurons`] rounded up to a multiple of `align` (whole blocks of a quantized compact
/// down matrix), at most `d_ff`.
pub fn kept_aligned(keep: f32, d_ff: usize, align: usize) -> usize {
    kept_neurons(keep, d_ff)
        .next_multiple_of(align.max(1))
        .min(d_ff)
}

/// Which sparsity a model decodes with: the typed form of `--sparsity --keep
/// --cats-thresholds`.
#[derive(Debug, Clone, PartialEq)]
pub struct SparsityConfig {
    pub mode: SparsityMode,
    /// Fraction of FFN neurons kept, in (0, 1].
    pub keep: f32,
    /// CATS per-layer thresholds (a `calibrate` file) instead of per-token top-k.
    pub cats_thresholds: Option<PathBuf>,
    /// Griffin on quantized weights: the format its compact down matrices are re-encoded in.
    pub griffin_down: DType,
}

/// `griffin_down`'s default: Q8_0 adds at most half a step of 1/127 of a block's largest
/// value to the down weights, at 1.06 bytes per weight (f32 is exact at 4).
pub const DEFAULT_GRIFFIN_DOWN: DType = DType::Q8_0;

impl SparsityConfig {
    /// `mode` keeping `keep` of the neurons (per-token top-k for CATS).
    pub fn new(mode: SparsityMode, keep: f32) -> Self {
        SparsityConfig {
            mode,
            keep,
            cats_thresholds: None,
            griffin_down: DEFAULT_GRIFFIN_DOWN,
        }
    }

    /// The dense model.
    pub fn dense() -> Self {
        SparsityConfig {
            mode: SparsityMode::None,
            keep: 1.0,
            cats_thresholds: None,
            griffin_down: DEFAULT_GRIFFIN_DOWN,
        }
    }

    /// Checks what can be checked without a model.
    pub fn validate(&self) -> Result<()> {
        validate_keep(self.keep)?;
        if self.cats_thresholds.is_some() && self.mode != SparsityMode::Cats {
            return Err(Error::InvalidArgument(
                "CATS thresholds need --sparsity cats".into(),
            ));
        }
        Ok(())
    }
}

/// The sparse FFN a loaded model decodes with (built once, shared by requests).
pub enum Sparsity<B: Backend> {
    None,
    Griffin {
        keep: f32,
        source: GriffinSource<B>,
    },
    Cats {
        keep: f32,
        bundles: NeuronBundles<B>,
        rule: CatsRule,
    },
}

impl<B: SparseOps> Sparsity<B> {
    /// Sets up `cfg` for a model of `config` whose layers' FFN tensors are `ffn`: loads the
    /// thresholds file (checked against the model) and builds the bundles.
    pub fn new(
        backend: &B,
        config: &ModelConfig,
        ffn: &[FfnTensors],
        cfg: &SparsityConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        let thresholds = (cfg.cats_thresholds.as_deref())
            .map(|p| {
                let t = CatsThresholds::load(p, config)?;
                let bounds: Vec<f32> = ffn.iter().map(cats::activation_bound).collect();
                t.check_reachable(p, &bounds)?;
                Ok::<_, Error>(t)
            })
            .transpose()?;
        Ok(match cfg.mode {
            SparsityMode::None => Sparsity::None,
            SparsityMode::Griffin => Sparsity::Griffin {
                keep: cfg.keep,
                source: GriffinSource::new(backend, ffn, cfg.griffin_down)?,
            },
            SparsityMode::Cats => {
                let rule = match thresholds {
                    Some(t) => CatsRule::Thresholds(t),
                    None => CatsRule::TopK(kept_neurons(cfg.keep, config.intermediate_size)),
                };
                Sparsity::Cats {
                    keep: cfg.keep,
                    bundles: NeuronBundles::build(backend, BundleLayout::UpDown, ffn)?,
                    rule,
                }
            }
        })
    }
}

impl<B: Backend> Sparsity<B> {
    pub fn mode(&self) -> SparsityMode {
        match self {
            Sparsity::None => SparsityMode::None,
            Sparsity::Griffin { .. } => SparsityMode::Griffin,
            Sparsity::Cats { .. } => SparsityMode::Cats,
        }
    }

    /// The keep fraction (1 for dense; the calibration target for thresholds).
    pub fn keep(&self) -> f32 {
        match self {
            Sparsity::None => 1.0,
            Sparsity::Griffin { keep, .. } => *keep,
            Sparsity::Cats {
                rule: CatsRule::Thresholds(t),
                ..
            } => t.keep,
            Sparsity::Cats { keep, .. } => *keep,
        }
    }

    pub fn bundles(&self) -> Option<&NeuronBundles<B>> {
        match self {
            Sparsity::None => None,
            Sparsity::Griffin { source, .. } => source.bundles(),
            Sparsity::Cats { bundles, .. } => Some(bundles),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M's shapes, and its density counted by hand:
    /// embedding 49152 x 576 = 28,311,552 (tied: the head reads the same matrix);
    /// per layer attention 576*576*2 + 192*576*2 = 884,736, FFN 3 * 576 * 1536 = 2,654,208,
    /// norms 1,152, so 30 layers = 106,202,880; final norm 576; total 134,515,008.
    /// Griffin keep 0.5 keeps 768 of 1536 neurons: skips 30 * 768 * 3 * 576 = 39,813,120.
    /// CATS keep 0.5 keeps the gate: skips 30 * 768 * 2 * 576 = 26,542,080.
    #[test]
    fn smollm2_density_matches_the_hand_count() {
        let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "vocab_size": 49152,
            "tie_word_embeddings": true}"#;
        let c = ModelConfig::from_json(json, std::path::Path::new("smollm2/config.json")).unwrap();
        assert_eq!(c.parameter_count(), 134_515_008);
        let total = 134_515_008f64;
        let half = vec![0.5; 30];
        assert_eq!(kept_neurons(0.5, 1536), 768);
        let griffin = density(SparsityMode::Griffin, &half, &c);
        assert!(
            (griffin - (total - 39_813_120.0) / total).abs() < 1e-12,
            "griffin {griffin}"
        );
        let cats = density(SparsityMode::Cats, &half, &c);
        assert!(
            (cats - (total - 26_542_080.0) / total).abs() < 1e-12,
            "cats {cats}"
        );
        assert_eq!(density(SparsityMode::None, &[], &c), 1.0);
        // keep 1.0 reads everything.
        assert!((density(SparsityMode::Griffin, &[1.0; 30], &c) - 1.0).abs() < 1e-15);
    }

    /// The Sirius paper's figures: Llama-3-8B at 50% FFN sparsity, Griffin 0.649, CATS 0.766.
    #[test]
    fn llama3_8b_density_matches_the_paper() {
        let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256,
            "tie_word_embeddings": false}"#;
        let c =
            ModelConfig::from_json(json, std::path::Path::new("llama3-8b/config.json")).unwrap();
        let half = vec![0.5; 32];
        let griffin = density(SparsityMode::Griffin, &half, &c);
        let cats = density(SparsityMode::Cats, &half, &c);
        assert!((griffin - 0.649).abs() < 5e-4, "griffin {griffin}");
        assert!((cats - 0.766).abs() < 5e-4, "cats {cats}");
        // Nothing ran sparse yet: the nominal density, not "every neuron skipped".
        let report = SparsityReport::new(SparsityMode::Griffin, 0.5, &NeuronCounter::new(32), &c);
        assert!(
            (report.density - griffin).abs() < 1e-12,
            "{}",
            report.density
        );
    }

    #[test]
    fn keep_must_be_a_fraction() {
        for bad in [0.0, -0.5, 1.01, f32::NAN, f32::INFINITY] {
            assert!(validate_keep(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(validate_keep(1.0).unwrap(), 1.0);
        assert_eq!(kept_neurons(0.5, 1536), 768);
        assert_eq!(kept_neurons(1e-6, 10), 1);
        assert_eq!(kept_neurons(1.0, 10), 10);
    }
}
