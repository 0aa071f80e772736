//! Writes a random-weights Llama model of a real shape into a directory, for timing runs on
//! machines that real weights cannot reach (tools/gpu-check.sh: the GPU machine has no network
//! and the pack must stay under 64 MiB, so the weights are made there).
//!
//!     random_model OUT_DIR [hidden=576 layers=30 heads=9 kv_heads=3 ffn=1536 vocab=49152
//!                           tied=1 dtype=bf16 seed=1]
//!
//! The defaults are SmolLM2-135M's shape (bf16, tied embeddings). The tokenizer is word
//! level: `<unk>`, `<s>`, `</s>`, then `w3`, `w4`, ... so any prompt of space-separated `wN`
//! words (N < vocab) is valid. Weights are uniform in +-1/sqrt(fan-in), norms 1: activations
//! stay in range through every layer, the text is meaningless.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    tied: bool,
    dtype: &'static str,
    seed: u64,
}

fn parse(args: &[String]) -> Result<(PathBuf, Shape)> {
    let usage = "usage: random_model OUT_DIR [hidden=N layers=N heads=N kv_heads=N ffn=N \
                 vocab=N tied=0|1 dtype=bf16|f16|f32 seed=N]";
    let dir = args.first().ok_or(usage)?;
    let mut s = Shape {
        hidden: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        ffn: 1536,
        vocab: 49152,
        tied: true,
        dtype: "BF16",
        seed: 1,
    };
    for arg in &args[1..] {
        let (key, value) = arg.split_once('=').ok_or(usage)?;
        let n = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{key}={value}: {e}"))
        };
        match key {
            "hidden" => s.hidden = n()?,
            "layers" => s.layers = n()?,
            "heads" => s.heads = n()?,
            "kv_heads" => s.kv_heads = n()?,
            "ffn" => s.ffn = n()?,
            "vocab" => s.vocab = n()?,
            "tied" => s.tied = n()? != 0,
            "seed" => s.seed = n()? as u64,
            "dtype" => {
                s.dtype = match value {
                    "bf16" => "BF16",
                    "f16" => "F16",
                    "f32" => "F32",
                    other => return Err(format!("dtype={other}: bf16, f16 or f32").into()),
                }
            }
            other => return Err(format!("unknown setting {other}: {usage}").into()),
        }
    }
    if s.heads == 0
        || s.kv_heads == 0
        || !s.hidden.is_multiple_of(s.heads)
        || !s.heads.is_multiple_of(s.kv_heads)
    {
        return Err("hidden must divide by heads, heads by kv_heads".into());
    }
    if s.vocab < 4 {
        return Err("vocab must be at least 4".into());
    }
    Ok((PathBuf::from(dir), s))
}

/// Tensor name, shape and how it is filled: None = ones (norms), Some(scale) = uniform.
fn tensors(s: &Shape) -> Vec<(String, Vec<usize>, Option<f32>)> {
    let hd = s.hidden / s.heads;
    let (h, q, kv, f) = (s.hidden, s.heads * hd, s.kv_heads * hd, s.ffn);
    let fan = |n: usize| Some(1.0 / (n as f32).sqrt());
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![s.vocab, h],
        Some(1.0),
    )];
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h], None));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            None,
        ));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h], fan(h)));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h], fan(h)));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h], fan(h)));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q], fan(q)));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h], fan(h)));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h], fan(h)));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f], fan(f)));
    }
    out.push(("model.norm.weight".to_string(), vec![h], None));
    if !s.tied {
        out.push(("lm_head.weight".to_string(), vec![s.vocab, h], fan(h)));
    }
    out
}

/// xorshift64: fast enough for 10^8 values and needs no RNG state from a crate.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn element_size(dtype: &str) -> usize {
    if dtype == "F32" {
        4
    } else {
        2
    }
}

/// Streams the safetensors file (header, then each tensor) without holding the weights.
fn write_safetensors(path: &Path, s: &Shape) -> Result<u64> {
    let list = tensors(s);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, _) in &list {
        let bytes = shape.iter().product::<usize>() * element_size(s.dtype);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": s.dtype, "shape": shape,
                               "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut w = BufWriter::with_capacity(1 << 22, File::create(path)?);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    let mut rng = Rng(s.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut buf = Vec::with_capacity(1 << 22);
    for (_, shape, fill) in &list {
        let n: usize = shape.iter().product();
        for chunk in (0..n).step_by(1 << 20) {
            buf.clear();
            for _ in chunk..n.min(chunk + (1 << 20)) {
                let v = fill.map_or(1.0, |scale| scale * rng.uniform());
                match s.dtype {
                    "F32" => buf.extend_from_slice(&v.to_le_bytes()),
                    "F16" => buf.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
                    _ => buf.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
                }
            }
            w.write_all(&buf)?;
        }
    }
    w.flush()?;
    Ok(8 + header.len() as u64 + offset as u64)
}

fn config(s: &Shape) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "vocab_size": s.vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": s.tied,
        "hidden_act": "silu",
        "torch_dtype": match s.dtype { "F32" => "float32", "F16" => "float16", _ => "bfloat16" },
        "bos_token_id": 1,
        "eos_token_id": 2,
    })
}

/// Word-level tokenizer (as tests/common's): `<unk>`, `<s>`, `</s>`, `w3` .. `w{vocab-1}`.
fn tokenizer(vocab: usize) -> serde_json::Value {
    let mut words = serde_json::Map::new();
    for (i, w) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        words.insert(w.to_string(), i.into());
    }
    for i in 3..vocab {
        words.insert(format!("w{i}"), i.into());
    }
    serde_json::json!({
        "version": "1.0",
        "added_tokens": [{"id": 2, "content": "</s>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"}
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, shape) = parse(&args)?;
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config(&shape))?,
    )?;
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tokenizer(shape.vocab))?,
    )?;
    let tok_cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"});
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec(&tok_cfg)?,
    )?;
    let bytes = write_safetensors(&dir.join("model.safetensors"), &shape)?;
    println!(
        "wrote {} ({} layers, hidden {}, {} MB of {} weights)",
        dir.display(),
        shape.layers,
        shape.hidden,
        bytes / 1_000_000,
        shape.dtype
    );
    Ok(())
}
