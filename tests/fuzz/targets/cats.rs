//! CATS thresholds files (`calibrate --out`) mutated field by field, read by
//! `CatsThresholds::load` against the model they were made for.

use std::path::Path;

use serde_json::Value;
use sirius_offload::config::ModelConfig;
use sirius_offload::sparsity::cats::{CatsRule, CatsThresholds, ModelShape};

use crate::common::{config_json, TinySpec};
use crate::fuzz::{json as fjson, one_line, Case, Rng, Target, Verdict};

const KEYS: &[&str] = &[
    "model",
    "architecture",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "vocab_size",
    "keep",
    "thresholds",
    "calibration_kept",
    "calibration_tokens",
    "calibration_text",
];

pub struct Cats {
    config: ModelConfig,
    seed: Value,
}

impl Cats {
    pub fn new() -> Cats {
        let spec = TinySpec {
            layers: 3,
            ..TinySpec::default()
        };
        let text = config_json(&spec).to_string();
        let config = ModelConfig::from_json(&text, Path::new("config.json"))
            .unwrap_or_else(|e| panic!("the fuzz loop's config: {e}"));
        let t = CatsThresholds {
            model: ModelShape::of(&config),
            keep: 0.5,
            thresholds: vec![0.125, 0.25, 0.0],
            calibration_kept: vec![0.5, 0.49, 0.51],
            calibration_tokens: 512,
            calibration_text: "calibration.txt".into(),
        };
        let seed = serde_json::to_value(&t).unwrap_or_default();
        Cats { config, seed }
    }
}

impl Target for Cats {
    const NAME: &'static str = "cats_thresholds";

    fn make(&self, rng: &mut Rng) -> Case {
        Case::one("thresholds.json", fjson::mutate(rng, &self.seed, KEYS))
    }

    fn check(&self, _case: &Case, dir: &Path) -> Result<Verdict, String> {
        let t = match CatsThresholds::load(&dir.join("thresholds.json"), &self.config) {
            Ok(t) => t,
            Err(e) => return one_line(&e.to_string(), "thresholds.json"),
        };
        let c = &self.config;
        if t.model != ModelShape::of(c) || t.thresholds.len() != c.num_layers {
            return Err(format!(
                "accepted thresholds of another model: {:?}",
                t.model
            ));
        }
        if !(t.keep > 0.0 && t.keep <= 1.0) {
            return Err(format!("accepted keep {}", t.keep));
        }
        if let Some(v) = t.thresholds.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return Err(format!("accepted a threshold of {v}"));
        }
        let rule = CatsRule::Thresholds(t);
        for li in 0..c.num_layers {
            let _ = rule.for_layer(li);
        }
        Ok(Verdict::Accepted)
    }

    fn min_accepted(&self) -> f64 {
        0.02
    }
}
