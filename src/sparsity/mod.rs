//! Contextual sparsity of the FFN (see ../shared/SIRIUS.md, "Contextual sparsity"):
//! Griffin (one neuron set per request, from the prompt) and CATS (per token, from
//! |SiLU(gate)|), both reading real neuron subsets through the bundle layout rather than
//! masking a dense computation.
//!
//! The forward pass stays the one in `model::llama`; this module supplies what its FFN step
//! reads ([`crate::model::llama::Ffn`]): bundles built at load, per-request Griffin state,
//! CATS rules and the density bookkeeping.

pub mod bundles;
pub mod calibrate;
pub mod cats;
pub mod griffin;

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::backend::{Backend, BundleLayout};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::llama::Ffn;
use crate::model::Llama;

pub use bundles::NeuronBundles;
pub use cats::{CatsRule, CatsThresholds};
pub use griffin::{GriffinFfn, GriffinScores, GriffinSelection};

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
            "--keep must be a fraction in (0, 1], got {keep}"
        )))
    }
}

/// Neurons kept out of `d_ff` at fraction `keep`: `round(keep * d_ff)` (half away from zero),
/// at least 1 and at most `d_ff`.
pub fn kept_neurons(keep: f32, d_ff: usize) -> usize {
    ((keep as f64 * d_ff as f64).round() as usize).clamp(1.min(d_ff), d_ff)
}

/// The sparse FFN a loaded model decodes with (built once, shared by requests).
pub enum Sparsity<B: Backend> {
    None,
    Griffin {
        keep: f32,
        bundles: NeuronBundles<B>,
    },
    Cats {
        keep: f32,
        bundles: NeuronBundles<B>,
        rule: CatsRule,
    },
}

impl<B: Backend> Sparsity<B> {
    /// Sets up `mode` for `model`: validates `keep` and builds the bundles. `thresholds`
    /// (CATS only) replaces per-token top-k with calibrated per-layer thresholds.
    pub fn new(
        model: &Llama<B>,
        mode: SparsityMode,
        keep: f32,
        thresholds: Option<CatsThresholds>,
    ) -> Result<Self> {
        let keep = validate_keep(keep)?;
        if thresholds.is_some() && mode != SparsityMode::Cats {
            return Err(Error::InvalidArgument(
                "CATS thresholds need --sparsity cats".into(),
            ));
        }
        Ok(match mode {
            SparsityMode::None => Sparsity::None,
            SparsityMode::Griffin => Sparsity::Griffin {
                keep,
                bundles: NeuronBundles::build(model, BundleLayout::GateUpDown)?,
            },
            SparsityMode::Cats => {
                let rule = match thresholds {
                    Some(t) => CatsRule::Thresholds(t),
                    None => CatsRule::TopK(kept_neurons(keep, model.config.intermediate_size)),
                };
                Sparsity::Cats {
                    keep,
                    bundles: NeuronBundles::build(model, BundleLayout::UpDown)?,
                    rule,
                }
            }
        })
    }

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
            Sparsity::Griffin { bundles, .. } | Sparsity::Cats { bundles, .. } => Some(bundles),
        }
    }

    /// Starts one request.
    pub fn request(&self, model: &Llama<B>) -> Result<SparseRequest<'_, B>> {
        let scores = match self {
            Sparsity::Griffin { .. } => Some(GriffinScores::new(model)?),
            _ => None,
        };
        Ok(SparseRequest {
            sparsity: self,
            scores,
            griffin: None,
            counter: NeuronCounter::new(model.config.num_layers),
        })
    }
}

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

/// Per-request sparse state: Griffin scores, then the gathered FFN; CATS counts.
pub struct SparseRequest<'s, B: Backend> {
    sparsity: &'s Sparsity<B>,
    scores: Option<GriffinScores<B>>,
    griffin: Option<GriffinFfn<B>>,
    counter: NeuronCounter,
}

impl<'s, B: Backend> SparseRequest<'s, B> {
    /// The FFN of the (dense) prefill: Griffin scores the prompt's neurons there.
    pub fn prefill_ffn(&mut self) -> Ffn<'_, B> {
        match &mut self.scores {
            Some(scores) => Ffn::DenseScoring(scores),
            None => Ffn::Dense,
        }
    }

    /// After the prompt: Griffin picks and gathers its neurons.
    pub fn finish_prefill(&mut self, model: &Llama<B>) -> Result<()> {
        if let (Sparsity::Griffin { keep, bundles }, Some(scores)) = (self.sparsity, &self.scores) {
            let selection = scores.select(&model.backend, *keep)?;
            self.griffin = Some(GriffinFfn::gather(&model.backend, bundles, selection)?);
        }
        Ok(())
    }

    /// The FFN of decode steps. Griffin needs `finish_prefill` first (running dense
    /// instead would silently report a sparse run).
    pub fn decode_ffn(&mut self) -> Result<Ffn<'_, B>> {
        self.batch_ffn(false)
    }

    /// [`Self::decode_ffn`] for a batch of tree beams: with `shared_cats`, CATS picks one
    /// neuron set for the whole batch (SIRIUS.md, "Tree").
    pub fn batch_ffn(&mut self, shared_cats: bool) -> Result<Ffn<'_, B>> {
        match (self.sparsity, &self.griffin) {
            (Sparsity::Griffin { .. }, Some(g)) => Ok(Ffn::Griffin(g)),
            (Sparsity::Griffin { .. }, None) => Err(Error::InvalidArgument(
                "Griffin decodes only after the prompt chose its neurons (finish_prefill)".into(),
            )),
            (Sparsity::Cats { bundles, rule, .. }, _) => Ok(Ffn::Cats {
                bundles,
                rule,
                counter: &mut self.counter,
                shared: shared_cats,
            }),
            (Sparsity::None, _) => Ok(Ffn::Dense),
        }
    }

    /// Counts decode tokens that ran a Griffin FFN (CATS counts itself in the forward).
    pub fn count_decode(&mut self, n_tokens: usize) {
        if let Some(g) = &self.griffin {
            let last = g.layers.len().saturating_sub(1);
            for (li, k) in g.kept().into_iter().enumerate() {
                self.counter.kept[li] += (k * n_tokens) as u64;
                if li == last {
                    self.counter.tokens += n_tokens as u64;
                }
            }
        }
    }

    /// What the request's sparse steps read.
    pub fn report(&self, config: &ModelConfig) -> SparsityReport {
        SparsityReport::new(
            self.sparsity.mode(),
            self.sparsity.keep(),
            &self.counter,
            config,
        )
    }
}

/// Sparsity statistics of a request.
#[derive(Debug, Clone, Serialize)]
pub struct SparsityReport {
    pub sparsity: SparsityMode,
    pub keep: f32,
    /// Parameters read per sparse token / all parameters (SIRIUS.md: embedding and head
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

    /// SIRIUS.md's figures: Llama-3-8B at 50% FFN sparsity, Griffin 0.649, CATS 0.766.
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
