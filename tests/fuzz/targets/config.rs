//! config.json: the four fixture configs and a Llama 3 one (rope scaling, an EOS list),
//! mutated field by field, read by `ModelConfig::from_file`.

use std::path::Path;

use serde_json::{json, Value};
use sirius_offload::config::{ModelConfig, RopeScaling};

use crate::fuzz::{json as fjson, one_line, Case, Rng, Target, Verdict};

/// Every key the parser reads, and the rope scaling's.
pub const KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
    "hidden_act",
    "eos_token_id",
    "rope_type",
    "type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
];

pub struct Config {
    seeds: Vec<Value>,
}

impl Config {
    pub fn new() -> Config {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        let mut seeds: Vec<Value> = std::fs::read_dir(&fixtures)
            .map(|dirs| {
                dirs.filter_map(|d| std::fs::read(d.ok()?.path().join("config.json")).ok())
                    .filter_map(|text| serde_json::from_slice(&text).ok())
                    .collect()
            })
            .unwrap_or_default();
        seeds.push(json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
            "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "attention_bias": true, "mlp_bias": true,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "eos_token_id": [128001, 128008, 128009]
        }));
        seeds.push(json!({
            "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 128,
            "use_sliding_window": true, "sliding_window": 32,
            "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": 5
        }));
        Config { seeds }
    }
}

/// What an accepted config must satisfy: sizes positive and in range, heads that divide,
/// numbers finite and positive as the forward pass reads them (f32).
pub fn consistent(c: &ModelConfig) -> Result<(), String> {
    let counts = [
        ("hidden_size", c.hidden_size, 1 << 17),
        ("intermediate_size", c.intermediate_size, 1 << 17),
        ("num_layers", c.num_layers, 1024),
        ("num_heads", c.num_heads, 1024),
        ("num_kv_heads", c.num_kv_heads, 1024),
        ("head_dim", c.head_dim, 1024),
        ("vocab_size", c.vocab_size, 1 << 23),
    ];
    for (name, v, max) in counts {
        if v == 0 || v > max {
            return Err(format!("accepted {name} = {v}"));
        }
    }
    if !c.num_heads.is_multiple_of(c.num_kv_heads) || !c.head_dim.is_multiple_of(2) {
        return Err(format!(
            "accepted heads {} / {} of {}",
            c.num_heads, c.num_kv_heads, c.head_dim
        ));
    }
    if c.max_position_embeddings == 0 || c.sliding_window == Some(0) {
        return Err("accepted a context or sliding window of 0".into());
    }
    for (name, v) in [
        ("rms_norm_eps", c.rms_norm_eps),
        ("rope_theta", c.rope_theta),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(format!("accepted {name} = {v} (as f32)"));
        }
    }
    match c.rope_scaling {
        Some(RopeScaling::Linear { factor }) if !(factor.is_finite() && factor > 0.0) => {
            Err(format!("accepted a linear rope scaling factor {factor}"))
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original,
        }) if !([factor, low, high].iter().all(|v| v.is_finite() && *v > 0.0)
            && high > low
            && original > 0) =>
        {
            Err(format!(
                "accepted llama3 rope scaling factor {factor}, low {low}, high {high}, original {original}"
            ))
        }
        _ => {
            let _ = c.parameter_count();
            Ok(())
        }
    }
}

impl Target for Config {
    const NAME: &'static str = "config_json";

    fn make(&self, rng: &mut Rng) -> Case {
        let seed = rng.pick(&self.seeds);
        Case::one("config.json", fjson::mutate(rng, seed, KEYS))
    }

    fn check(&self, _case: &Case, dir: &Path) -> Result<Verdict, String> {
        match ModelConfig::from_file(&dir.join("config.json")) {
            Ok(c) => consistent(&c).map(|()| Verdict::Accepted),
            Err(e) => one_line(&e.to_string(), "config.json"),
        }
    }

    fn min_accepted(&self) -> f64 {
        0.05
    }
}
