//! Parses and validates a Hugging Face `config.json` for the Llama family.

use std::path::Path;

use serde::Deserialize;

pub use crate::config::rope_scaling::RopeScaling;
use crate::config::rope_scaling::{parse_rope_scaling, short};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

/// The validated shape and numerics of a model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection carries a bias (Llama with `attention_bias`; not Qwen2).
    pub o_bias: bool,
    /// gate/up/down carry biases (`mlp_bias`).
    pub mlp_bias: bool,
    /// Attention looks back at most this many positions (Mistral `sliding_window`, Qwen2 with
    /// `use_sliding_window`). The runtime caps the context at it, which keeps results exact.
    pub sliding_window: Option<usize>,
    pub eos_token_ids: Vec<u32>,
}

/// Upper bounds on config values: far above any real model, low enough that sizes computed
/// from them cannot overflow or ask for absurd allocations before the tensors are checked.
const MAX_WIDTH: usize = 1 << 17;
const MAX_LAYERS: usize = 1024;
const MAX_HEADS: usize = 1024;
const MAX_HEAD_DIM: usize = 1024;
const MAX_VOCAB: usize = 1 << 23;
const MAX_POSITIONS: usize = 1 << 26;

/// `eos_token_id` (of config.json or generation_config.json at `path`): a token id, a list of
/// them, or null; ids must be below `vocab` when it is known.
pub(crate) fn token_ids(
    value: &serde_json::Value,
    path: &Path,
    vocab: Option<usize>,
) -> Result<Vec<u32>> {
    use serde_json::Value;
    let one = |v: &Value| -> Result<u32> {
        let id = v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
            Error::config(
                path,
                format!(
                    "`eos_token_id` must be a token id (a whole number from 0) or a list of them, found {}",
                    short(v)
                ),
            )
        })?;
        match vocab {
            Some(vocab) if id as usize >= vocab => Err(Error::config(
                path,
                format!("`eos_token_id` {id} is not in the vocabulary (vocab_size {vocab})"),
            )),
            _ => Ok(id),
        }
    };
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(ids) => ids.iter().map(one).collect(),
        v => one(v).map(|id| vec![id]),
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    eos_token_id: Option<serde_json::Value>,
}

impl ModelConfig {
    /// Reads `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<ModelConfig> {
        let raw = parse_raw(text, path)?;
        let f = Fields { path };
        let architecture = f.architecture(&raw)?;
        let hidden_size = f.bounded(raw.hidden_size, "hidden_size", MAX_WIDTH)?;
        let (num_heads, num_kv_heads, head_dim) = f.heads(&raw, hidden_size)?;
        if let Some(act) = raw
            .hidden_act
            .as_ref()
            .filter(|a| *a != "silu" && *a != "swish")
        {
            return Err(Error::config(
                path,
                format!("hidden_act {act:?} is not supported (only silu)"),
            ));
        }
        let rope_scaling = match &raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_rope_scaling(v, path)?),
        };
        let rms_norm_eps = f.positive(raw.rms_norm_eps.unwrap_or(1e-6), "rms_norm_eps")?;
        // An epsilon is a guard against dividing by zero: one near 1 swamps the activations.
        if rms_norm_eps > 0.1 {
            return Err(Error::config(
                path,
                format!(
                    "rms_norm_eps must be small (real models use 1e-5 or 1e-6), got {}",
                    crate::units::format_number(rms_norm_eps)
                ),
            ));
        }
        let rope_theta = f.positive(raw.rope_theta.unwrap_or(10_000.0), "rope_theta")?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let sliding_window = match architecture {
            Architecture::Mistral => raw.sliding_window,
            Architecture::Qwen2 if raw.use_sliding_window == Some(true) => raw.sliding_window,
            _ => None,
        }
        .filter(|&w| w > 0);
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: f.bounded(raw.intermediate_size, "intermediate_size", MAX_WIDTH)?,
            num_layers: f.bounded(raw.num_hidden_layers, "num_hidden_layers", MAX_LAYERS)?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: f.bounded(raw.vocab_size, "vocab_size", MAX_VOCAB)?,
            max_position_embeddings: f.bounded(
                raw.max_position_embeddings.or(Some(4096)),
                "max_position_embeddings",
                MAX_POSITIONS,
            )?,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta: rope_theta as f32,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture != Architecture::Qwen2 && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            eos_token_ids: match &raw.eos_token_id {
                Some(v) => token_ids(v, path, raw.vocab_size)?,
                None => Vec::new(),
            },
        })
    }

    /// Width of the query projection output (num_heads * head_dim).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of each of the key and value projection outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parameter count of the whole model (embedding and head included, the head once if tied).
    pub fn parameter_count(&self) -> usize {
        let (h, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let attn = h * self.q_dim() + 2 * h * self.kv_dim() + self.q_dim() * h;
        let per_layer = attn + self.layer_bias_count() + 3 * h * f + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + head + h + self.num_layers * per_layer
    }

    /// Bias elements of one layer (Qwen2's q/k/v, `attention_bias`, `mlp_bias`).
    pub fn layer_bias_count(&self) -> usize {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let qkv = if self.qkv_bias {
            self.q_dim() + 2 * self.kv_dim()
        } else {
            0
        };
        qkv + if self.o_bias { h } else { 0 } + if self.mlp_bias { 2 * f + h } else { 0 }
    }
}

/// The raw fields; a field of the wrong type is named (serde alone names only the type).
fn parse_raw(text: &str, path: &Path) -> Result<RawConfig> {
    let json = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(json).map_err(|e| {
        let field = e.path().to_string();
        let source = e.into_inner();
        match source.classify() {
            serde_json::error::Category::Data if field != "." => {
                Error::config(path, format!("field `{field}`: {source}"))
            }
            _ => Error::Json {
                path: path.to_path_buf(),
                source,
            },
        }
    })
}

/// Reads the fields of one config.json (`path`, for error messages).
struct Fields<'a> {
    path: &'a Path,
}

impl Fields<'_> {
    /// The architecture named by `architectures` (or `model_type`).
    fn architecture(&self, raw: &RawConfig) -> Result<Architecture> {
        let name = (raw.architectures.as_ref())
            .and_then(|a| a.first().cloned())
            .or_else(|| raw.model_type.clone())
            .ok_or_else(|| {
                Error::config(self.path, "neither `architectures` nor `model_type` is set")
            })?;
        match name.as_str() {
            "LlamaForCausalLM" | "llama" => Ok(Architecture::Llama),
            "MistralForCausalLM" | "mistral" => Ok(Architecture::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Ok(Architecture::Qwen2),
            _ => Err(Error::UnsupportedArchitecture {
                path: self.path.to_path_buf(),
                arch: name,
            }),
        }
    }

    /// A required count `key`: present, positive and at most `max`.
    fn bounded(&self, v: Option<usize>, key: &str, max: usize) -> Result<usize> {
        match v {
            Some(0) => Err(Error::config(
                self.path,
                format!("`{key}` must be positive, got 0"),
            )),
            Some(v) if v > max => Err(Error::config(
                self.path,
                format!("`{key}` = {v} is beyond the supported maximum {max}"),
            )),
            Some(v) => Ok(v),
            None => Err(Error::config(
                self.path,
                format!("missing required key `{key}`"),
            )),
        }
    }

    /// A number `key` that is positive and stays so as the f32 the forward pass computes
    /// with (1e-300 would become 0, 1e300 infinity).
    fn positive(&self, v: f64, key: &str) -> Result<f64> {
        match positive_f32(v) {
            Some(_) => Ok(v),
            None => Err(Error::config(
                self.path,
                format!(
                    "{key} must be a positive number within f32 range (about 1e-38 to 3e38), \
                     got {}",
                    crate::units::format_number(v)
                ),
            )),
        }
    }

    /// Attention heads, KV heads (a divisor of the heads) and the head width (even, for
    /// RoPE; `hidden_size / heads` unless given).
    fn heads(&self, raw: &RawConfig, hidden_size: usize) -> Result<(usize, usize, usize)> {
        let path = self.path;
        let num_heads = self.bounded(raw.num_attention_heads, "num_attention_heads", MAX_HEADS)?;
        let num_kv_heads = self.bounded(
            raw.num_key_value_heads.or(Some(num_heads)),
            "num_key_value_heads",
            MAX_HEADS,
        )?;
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(Error::config(
                path,
                format!("num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => self.bounded(Some(d), "head_dim", MAX_HEAD_DIM)?,
            None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
            None => {
                return Err(Error::config(
                    path,
                    format!("hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) and no head_dim is given"),
                ))
            }
        };
        if head_dim > MAX_HEAD_DIM {
            return Err(Error::config(
                path,
                format!("head_dim {head_dim} is beyond the supported maximum {MAX_HEAD_DIM}"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(Error::config(
                path,
                format!("head_dim must be even for RoPE, got {head_dim}"),
            ));
        }
        Ok((num_heads, num_kv_heads, head_dim))
    }
}

/// `v` as an f32 when it stays finite and positive there (1e-300 would become 0, 1e300
/// infinity).
fn positive_f32(v: f64) -> Option<f32> {
    let as_f32 = v as f32;
    (v > 0.0 && as_f32 > 0.0 && as_f32.is_finite()).then_some(as_f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(text, Path::new("config.json"))
    }

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
        "intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"vocab_size":128,"eos_token_id":[2,3]}"#;

    #[test]
    fn parses_llama_with_defaults() {
        let c = parse(LLAMA).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.rope_theta, 10_000.0);
        assert!(!c.qkv_bias);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = parse(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("GPT2LMHeadModel") && msg.contains("LlamaForCausalLM"),
            "{msg}"
        );
    }

    #[test]
    fn missing_key_is_named() {
        let err = parse(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64}"#).unwrap_err();
        assert!(err.to_string().contains("num_attention_heads"), "{err}");
    }

    #[test]
    fn bad_gqa_ratio_is_rejected() {
        let text = LLAMA.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(parse(&text).unwrap_err().to_string().contains("multiple"));
    }

    #[test]
    fn llama3_rope_scaling_parses() {
        let text = LLAMA.replace(
            "\"vocab_size\":128",
            "\"vocab_size\":128,\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\
             \"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}",
        );
        let c = parse(&text).unwrap();
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0)
        );
    }

    #[test]
    fn absurd_sizes_are_rejected_before_allocation() {
        for (key, value) in [
            ("num_hidden_layers", "100000000000000000"),
            ("vocab_size", "1000000000000"),
            ("hidden_size", "9999999999"),
        ] {
            let text = LLAMA.replacen(
                &format!("\"{key}\":"),
                &format!("\"{key}\":{value},\"x_{key}\":"),
                1,
            );
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("maximum"), "{err}");
        }
        let text = LLAMA.replace(
            "\"vocab_size\":128",
            "\"vocab_size\":128,\"head_dim\":9223372036854775808",
        );
        assert!(parse(&text).is_err());
    }

    #[test]
    fn biases_and_sliding_window_are_read() {
        let c = parse(&LLAMA.replace(
            "\"vocab_size\":128",
            "\"vocab_size\":128,\"attention_bias\":true,\"mlp_bias\":true",
        ))
        .unwrap();
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias && c.sliding_window.is_none());
        let mistral = LLAMA
            .replace("LlamaForCausalLM", "MistralForCausalLM")
            .replace(
                "\"vocab_size\":128",
                "\"vocab_size\":128,\"sliding_window\":4096",
            );
        assert_eq!(parse(&mistral).unwrap().sliding_window, Some(4096));
        let qwen = LLAMA
            .replace("LlamaForCausalLM", "Qwen2ForCausalLM")
            .replace(
                "\"vocab_size\":128",
                "\"vocab_size\":128,\"sliding_window\":4096,\"use_sliding_window\":false",
            );
        let q = parse(&qwen).unwrap();
        assert!(q.sliding_window.is_none() && q.qkv_bias && !q.o_bias);
    }

    #[test]
    fn bad_json_is_an_error() {
        assert!(matches!(parse("{not json"), Err(Error::Json { .. })));
    }

    #[test]
    fn smollm2_parameter_count_matches_hand_count() {
        // SmolLM2-135M: hidden 576, 30 layers, 9 heads / 3 kv heads of 64, FFN 1536, vocab 49152, tied.
        let c = parse(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
            "num_key_value_heads":3,"vocab_size":49152,"tie_word_embeddings":true}"#,
        )
        .unwrap();
        // per layer: q 576*576 + k,v 2*576*192 + o 576*576 + ffn 3*576*1536 + 2 norms of 576
        let per_layer = 576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576;
        assert_eq!(c.parameter_count(), 49152 * 576 + 576 + 30 * per_layer);
        assert_eq!(c.parameter_count(), 134_515_008);
    }
}
