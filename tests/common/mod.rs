//! Test helpers: tiny random Llama-family models written to a temp dir in HF layout, so tests
//! exercise the real loader (config.json, safetensors, tokenizer.json, tokenizer_config.json).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use sirius_offload::model::Pass;
use sirius_offload::sparsity::Dense;

#[cfg(feature = "cuda")]
pub mod gpu;
pub mod offload;
pub mod parity;
pub mod serve;
pub mod sirius;

/// One tensor to write: name, safetensors dtype string, shape, raw little-endian bytes.
pub struct RawTensor {
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

#[derive(Clone)]
pub struct TinySpec {
    pub arch: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub tied: bool,
    pub qkv_bias: bool,
    pub dtype: &'static str, // "BF16" | "F16" | "F32"
    pub max_pos: usize,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            arch: "LlamaForCausalLM",
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 48,
            vocab: 64,
            tied: true,
            qkv_bias: false,
            dtype: "BF16",
            max_pos: 64,
        }
    }
}

/// Small deterministic generator (xorshift) so tests need no seeded RNG crate state.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

pub fn encode(values: &[f32], dtype: &str) -> Vec<u8> {
    match dtype {
        "F32" => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        "F16" => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        "BF16" => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => panic!("test helper: unknown dtype {other}"),
    }
}

/// All tensors of a random model with this spec, by HF name.
pub fn random_tensors(spec: &TinySpec, seed: u64) -> BTreeMap<String, RawTensor> {
    let mut rng = Rng::new(seed);
    let hd = spec.hidden / spec.heads;
    let (h, q, kv, f, v) = (
        spec.hidden,
        spec.heads * hd,
        spec.kv_heads * hd,
        spec.ffn,
        spec.vocab,
    );
    let mut out = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| offset + scale * rng.next_f32()).collect();
        out.insert(
            name,
            RawTensor {
                dtype: spec.dtype,
                shape,
                data: encode(&values, spec.dtype),
            },
        );
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        0.5,
        0.0,
        &mut rng,
    );
    for i in 0..spec.layers {
        let p = format!("model.layers.{i}");
        add(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            0.1,
            1.0,
            &mut rng,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.1,
            1.0,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, h],
            0.3,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, h],
            0.3,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, h],
            0.3,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q],
            0.3,
            0.0,
            &mut rng,
        );
        if spec.qkv_bias {
            add(
                format!("{p}.self_attn.q_proj.bias"),
                vec![q],
                0.1,
                0.0,
                &mut rng,
            );
            add(
                format!("{p}.self_attn.k_proj.bias"),
                vec![kv],
                0.1,
                0.0,
                &mut rng,
            );
            add(
                format!("{p}.self_attn.v_proj.bias"),
                vec![kv],
                0.1,
                0.0,
                &mut rng,
            );
        }
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![f, h],
            0.3,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            vec![f, h],
            0.3,
            0.0,
            &mut rng,
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, f],
            0.3,
            0.0,
            &mut rng,
        );
    }
    add("model.norm.weight".into(), vec![h], 0.1, 1.0, &mut rng);
    if !spec.tied {
        add("lm_head.weight".into(), vec![v, h], 0.5, 0.0, &mut rng);
    }
    out
}

/// The safetensors JSON header of `tensors` (each entry's data offsets as laid out back to
/// back, in order) and their data.
pub fn safetensors_header_and_data<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a RawTensor)>,
) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, t) in tensors {
        let start = data.len();
        data.extend_from_slice(&t.data);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()]}),
        );
    }
    (header, data)
}

/// Serialises tensors in the safetensors format (8-byte header length, JSON header, data).
pub fn safetensors_bytes(tensors: &BTreeMap<String, RawTensor>) -> Vec<u8> {
    let (header, data) = safetensors_header_and_data(tensors);
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
}

pub fn config_json(spec: &TinySpec) -> serde_json::Value {
    serde_json::json!({
        "architectures": [spec.arch],
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.max_pos,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tied,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    })
}

/// A word-level tokenizer whose vocabulary is `<unk>`, `<s>`, `</s>`, then w3, w4, ... so any
/// text of space-separated `wN` words maps to known ids.
pub fn tokenizer_json(vocab: usize) -> serde_json::Value {
    let mut words = serde_json::Map::new();
    for (i, w) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        words.insert(w.to_string(), i.into());
    }
    for i in 3..vocab {
        words.insert(format!("w{i}"), i.into());
    }
    serde_json::json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"}
    })
}

/// Writes a complete tiny model directory and returns its path (inside `root`).
pub fn write_model(root: &Path, spec: &TinySpec, seed: u64) -> PathBuf {
    write_model_with(root, spec, random_tensors(spec, seed))
}

pub fn write_model_with(
    root: &Path,
    spec: &TinySpec,
    tensors: BTreeMap<String, RawTensor>,
) -> PathBuf {
    let dir = root.to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config_json(spec)).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors_bytes(&tensors)).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tokenizer_json(spec.vocab)).unwrap(),
    )
    .unwrap();
    let tok_cfg = serde_json::json!({
        "chat_template": "{% for m in messages %}w3 {{ m.content }} w4 {% endfor %}{% if add_generation_prompt %}w5{% endif %}",
        "bos_token": "<s>", "eos_token": "</s>"
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec(&tok_cfg).unwrap(),
    )
    .unwrap();
    dir
}

/// Directory of the checked-in fixtures.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// The fetched SmolLM2-135M directory, or None after printing why its tests are skipped
/// (straight to stderr: the harness swallows eprintln!). With SIRIUS_REQUIRE_MODELS=1 a
/// missing model fails the test instead.
pub fn smollm2_dir(what: &str) -> Option<PathBuf> {
    match sirius_offload::config::resolve_model_dir("smollm2-135m") {
        Ok(dir) => Some(dir),
        Err(e) => {
            if std::env::var("SIRIUS_REQUIRE_MODELS").as_deref() == Ok("1") {
                panic!("SIRIUS_REQUIRE_MODELS=1 but SmolLM2 is not available: {e}");
            }
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("SKIPPED ({what}): {e}\n").as_bytes(),
            );
            None
        }
    }
}

/// SmolLM2's Q4_1 GGUF that `tools/fetch-model` keeps beside the converted directory, or
/// None after printing why `what` is skipped (a failure with SIRIUS_REQUIRE_MODELS=1).
pub fn smollm2_gguf(what: &str) -> Option<PathBuf> {
    let gguf = smollm2_dir(what)?.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.is_file() {
        return Some(gguf);
    }
    let why = format!(
        "{} is missing: run tools/fetch-model smollm2-135m --force",
        gguf.display()
    );
    if std::env::var("SIRIUS_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("SIRIUS_REQUIRE_MODELS=1 but {why}");
    }
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("SKIPPED ({what}): {why}\n").as_bytes(),
    );
    None
}

/// The fetched Qwen2.5-Coder-1.5B GGUF (1.1 GB, not part of the default test run), or None
/// after printing why `what` is skipped. SIRIUS_QWEN=1 makes a missing file a failure.
pub fn qwen_gguf(what: &str) -> Option<PathBuf> {
    match sirius_offload::config::resolve_model_dir("qwen2.5-coder-1.5b") {
        Ok(path) => Some(path),
        Err(e) => {
            if std::env::var("SIRIUS_QWEN").as_deref() == Ok("1") {
                panic!("SIRIUS_QWEN=1 but Qwen2.5-Coder-1.5B is not available: {e}");
            }
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!(
                    "SKIPPED ({what}): {e} (a 1.1 GB download, not fetched by .ci/run; \
                     SIRIUS_QWEN=1 makes this a failure)\n"
                )
                .as_bytes(),
            );
            None
        }
    }
}

/// Runs the `sirius-offload` binary of this build with `args` (SIRIUS_LOG cleared).
pub fn run_bin(args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sirius-offload"));
    cmd.env_remove("SIRIUS_LOG");
    cmd.args(args).output().expect("the binary starts")
}

pub fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A non-zero exit whose stderr mentions `needle` and no panic.
pub fn assert_clean_failure(o: &std::process::Output, needle: &str) {
    let err = stderr_of(o);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    assert!(
        err.contains(needle),
        "stderr should mention {needle:?}: {err}"
    );
}

/// [`assert_clean_failure`], and the message is one line.
pub fn assert_one_line_failure(o: &std::process::Output, needle: &str) {
    assert_clean_failure(o, needle);
    let err = stderr_of(o);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

/// The full model's greedy continuation of `prompt` (`n` tokens), one token per forward: the
/// reference the Sirius invariants compare with.
pub fn full_greedy<B: sirius_offload::backend::Backend>(
    model: &sirius_offload::model::Llama<B>,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    greedy_with_prompt_logits(model, prompt, n).0
}

/// [`full_greedy`], and the logits after the prompt (backend parity compares them).
pub fn greedy_with_prompt_logits<B: sirius_offload::backend::Backend>(
    model: &sirius_offload::model::Llama<B>,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<f32>) {
    use sirius_offload::model::{sampler::argmax, Logits, Scratch};
    let mut cache = model.new_cache(prompt.len() + n).unwrap();
    let mut scratch = Scratch::new(model, prompt.len()).unwrap();
    let mut logits = model
        .forward(
            Pass::new(prompt, Logits::Last, &mut Dense),
            &mut cache,
            &mut scratch,
        )
        .unwrap();
    let first = logits.clone();
    let mut out = Vec::new();
    while out.len() < n {
        let t = argmax(&logits);
        out.push(t);
        logits = model
            .forward(
                Pass::new(&[t], Logits::Last, &mut Dense),
                &mut cache,
                &mut scratch,
            )
            .unwrap();
    }
    (out, first)
}

/// The model config of preset `name` (configs/), for planner tests that need no weights.
pub fn preset_config(name: &str) -> sirius_offload::config::ModelConfig {
    sirius_offload::config::Preset::find(name)
        .unwrap()
        .unwrap_or_else(|| panic!("no preset {name}"))
        .model_config()
        .unwrap()
        .unwrap_or_else(|| panic!("preset {name} has no [config]"))
}
