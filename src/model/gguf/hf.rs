//! The Hugging Face documents a GGUF's metadata stands for: `config.json`, `tokenizer.json`,
//! the chat template and the EOS ids. Building the same documents a model directory holds lets
//! a GGUF go through the very parsers and checks a directory goes through (one config
//! validation, one tokenizer loader), instead of a second reading of each field.

use serde_json::{json, Map, Value as Json};

use super::{GgufFile, Value};

type Res<T> = std::result::Result<T, String>;

/// The architectures whose GGUF tensors and metadata this loader knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    /// `llama` (Llama 1-3, Mistral-style, SmolLM): llama.cpp permuted the Q/K rows.
    Llama,
    /// `qwen2`: q/k/v biases, Q/K rows as in the original checkpoint.
    Qwen2,
}

impl GgufArch {
    pub fn of(file: &GgufFile) -> Res<GgufArch> {
        match file.string("general.architecture") {
            Some("llama") => Ok(GgufArch::Llama),
            Some("qwen2") => Ok(GgufArch::Qwen2),
            Some(other) => Err(format!(
                "architecture `{other}` is not supported (llama, qwen2)"
            )),
            None => Err("general.architecture is missing".into()),
        }
    }

    fn key(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2 => "qwen2",
        }
    }
}

/// `config.json` for a GGUF whose embedding table has `vocab_rows` rows.
pub fn config_json(file: &GgufFile, arch: GgufArch, vocab_rows: u64) -> Res<Json> {
    let p = arch.key();
    let need = |k: &str| {
        file.uint(&format!("{p}.{k}"))
            .ok_or_else(|| format!("{p}.{k} is missing or not an unsigned integer"))
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = file
        .uint(&format!("{p}.attention.head_count_kv"))
        .unwrap_or(heads);
    let head_dim = match file.uint(&format!("{p}.attention.key_length")) {
        Some(d) => d,
        None if heads > 0 => hidden / heads,
        None => return Err(format!("{p}.attention.head_count is 0")),
    };
    if let Some(rope_dim) = file.uint(&format!("{p}.rope.dimension_count")) {
        if rope_dim != head_dim {
            return Err(format!(
                "partial rotary embeddings (rope dimension {rope_dim}, head dimension {head_dim}) are not supported"
            ));
        }
    }
    if file.tensor("rope_freqs.weight").is_some() {
        return Err("the file carries rope_freqs.weight (Llama 3.1-style rope scaling), which this loader does not apply yet".into());
    }
    let rope_scaling = match file.string(&format!("{p}.rope.scaling.type")) {
        None | Some("none") => Json::Null,
        Some("linear") => {
            let factor = file
                .float(&format!("{p}.rope.scaling.factor"))
                .ok_or_else(|| format!("{p}.rope.scaling.factor is missing"))?;
            json!({"rope_type": "linear", "factor": factor})
        }
        Some(other) => return Err(format!("rope scaling type `{other}` is not supported")),
    };
    let (architectures, model_type) = match arch {
        GgufArch::Llama => ("LlamaForCausalLM", "llama"),
        GgufArch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    // GGUF stores eps as f32: print it the way configs write it (1e-05, not 9.99999e-06).
    let eps = file
        .float(&format!("{p}.attention.layer_norm_rms_epsilon"))
        .unwrap_or(1e-5);
    let eps: f64 = format!("{eps:.6e}").parse().unwrap_or(eps);
    Ok(json!({
        "architectures": [architectures],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": file.uint(&format!("{p}.context_length")).unwrap_or(2048),
        "rms_norm_eps": eps,
        "rope_theta": file.float(&format!("{p}.rope.freq_base")).unwrap_or(10_000.0),
        "rope_scaling": rope_scaling,
        "vocab_size": vocab_rows,
        "tie_word_embeddings": file.tensor("output.weight").is_none(),
        "eos_token_id": file.uint("tokenizer.ggml.eos_token_id"),
    }))
}

/// llama.cpp's token types: 3 control (matched whole, special), 4 user-defined (matched
/// whole, ordinary text).
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

/// The pre-tokenizer split patterns of the byte-level BPE families llama.cpp names in
/// `tokenizer.ggml.pre` (the same regexes their Hugging Face tokenizers use).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer's vocabulary (`tokenizer.ggml.tokens`).
pub fn tokens(file: &GgufFile) -> Res<Vec<&str>> {
    let items = file
        .array("tokenizer.ggml.tokens")
        .ok_or("tokenizer.ggml.tokens is missing")?;
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            _ => Err("tokenizer.ggml.tokens holds a value that is not a string".to_string()),
        })
        .collect()
}

/// `tokenizer.json` rebuilt from the `tokenizer.ggml.*` metadata (byte-level BPE).
pub fn tokenizer_json(file: &GgufFile) -> Res<Json> {
    let model = file.string("tokenizer.ggml.model").unwrap_or("(missing)");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer type `{model}` is not supported: only byte-level BPE (`gpt2`: SmolLM, Qwen2, Llama 3); \
             SentencePiece vocabularies (`llama`: Llama 2, Mistral) need the model's tokenizer.json"
        ));
    }
    let tokens = tokens(file)?;
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert(token.to_string(), json!(id)).is_some() {
            return Err(format!(
                "token `{token}` appears twice in tokenizer.ggml.tokens"
            ));
        }
    }
    let merges = file
        .array("tokenizer.ggml.merges")
        .ok_or("tokenizer.ggml.merges is missing")?
        .iter()
        .map(|v| match v {
            Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| format!("merge `{s}` is not two tokens separated by a space")),
            _ => Err("tokenizer.ggml.merges holds a value that is not a string".into()),
        })
        .collect::<Res<Vec<_>>>()?;
    let unk = match file.uint("tokenizer.ggml.unknown_token_id") {
        Some(id) => Json::from(token_at(&tokens, id, "unknown")?),
        None => Json::Null,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(file, &tokens)?,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(file.string("tokenizer.ggml.pre").unwrap_or("default"))?,
        "post_processor": post_processor(file, &tokens)?,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    }))
}

fn token_at<'t>(tokens: &[&'t str], id: u64, what: &str) -> Res<&'t str> {
    usize::try_from(id)
        .ok()
        .and_then(|i| tokens.get(i).copied())
        .ok_or_else(|| {
            format!(
                "the {what} token id {id} is past the vocabulary ({} tokens)",
                tokens.len()
            )
        })
}

fn added_tokens(file: &GgufFile, tokens: &[&str]) -> Res<Vec<Json>> {
    let Some(types) = file.array("tokenizer.ggml.token_type") else {
        return Ok(Vec::new());
    };
    if types.len() != tokens.len() {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    Ok(types
        .iter()
        .zip(tokens)
        .enumerate()
        .filter_map(|(id, (kind, token))| {
            let special = match kind.as_u64() {
                Some(TOKEN_CONTROL) => true,
                Some(TOKEN_USER_DEFINED) => false,
                _ => return None,
            };
            Some(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": special,
            }))
        })
        .collect())
}

fn pre_tokenizer(pre: &str) -> Res<Json> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Ok(match pre {
        "default" | "gpt2" => byte_level(true),
        // SmolLM: every digit its own piece, then GPT-2's split.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "qwen2" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})
        }
        "llama-bpe" | "llama3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        other => {
            return Err(format!(
                "pre-tokenizer `{other}` is not supported (gpt2, smollm, qwen2, llama-bpe)"
            ))
        }
    })
}

/// A BOS in front of every encoded text when the file asks for one.
fn post_processor(file: &GgufFile, tokens: &[&str]) -> Res<Json> {
    if !file.flag("tokenizer.ggml.add_bos_token").unwrap_or(false) {
        return Ok(
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        );
    }
    let id = file
        .uint("tokenizer.ggml.bos_token_id")
        .ok_or("add_bos_token is set but tokenizer.ggml.bos_token_id is missing")?;
    let bos = token_at(tokens, id, "BOS")?;
    let piece = |seq: &str| json!({"Sequence": {"id": seq, "type_id": 0}});
    let special = json!({"SpecialToken": {"id": bos, "type_id": 0}});
    Ok(json!({
        "type": "TemplateProcessing",
        "single": [special, piece("A")],
        "pair": [special, piece("A"), special, piece("B")],
        "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}},
    }))
}

/// The `tokenizer_config.json` fields the chat template needs (template, BOS, EOS text).
pub fn tokenizer_config_json(file: &GgufFile) -> Res<Json> {
    let tokens = tokens(file)?;
    let name = |key: &str| -> Res<Json> {
        Ok(match file.uint(key) {
            Some(id) => Json::from(token_at(&tokens, id, key)?),
            None => Json::Null,
        })
    };
    Ok(json!({
        "bos_token": name("tokenizer.ggml.bos_token_id")?,
        "eos_token": name("tokenizer.ggml.eos_token_id")?,
        "chat_template": file.string("tokenizer.chat_template"),
    }))
}

/// Every id that ends a generation: the declared EOS and end-of-turn tokens, and the chat and
/// document ends the vocabulary has (what `generation_config.json` lists for these models).
pub fn stop_ids(file: &GgufFile) -> Res<Vec<u32>> {
    let tokens = tokens(file)?;
    let mut ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = file.uint(key) {
            token_at(&tokens, id, key)?;
            ids.push(id as u32);
        }
    }
    for end in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
        if let Some(id) = tokens.iter().position(|t| *t == end) {
            ids.push(id as u32);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A file description with a small llama model's metadata (no tensors).
    fn llama_file() -> GgufFile {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("general.architecture", Value::String("llama".into()));
        put("llama.embedding_length", Value::U32(64));
        put("llama.feed_forward_length", Value::U32(128));
        put("llama.block_count", Value::U32(2));
        put("llama.attention.head_count", Value::U32(4));
        put("llama.attention.head_count_kv", Value::U32(2));
        put("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
        put("tokenizer.ggml.model", Value::String("gpt2".into()));
        put("tokenizer.ggml.tokens", strings(&["a", "b", "ab", "<eos>"]));
        put(
            "tokenizer.ggml.token_type",
            Value::Array(vec![
                Value::I32(1),
                Value::I32(1),
                Value::I32(1),
                Value::I32(3),
            ]),
        );
        put("tokenizer.ggml.merges", strings(&["a b"]));
        put("tokenizer.ggml.eos_token_id", Value::U32(3));
        GgufFile {
            version: 3,
            metadata: m,
            tensors: Vec::new(),
            data_start: 0,
        }
    }

    #[test]
    fn a_llama_file_gives_a_config_and_a_tokenizer() {
        let f = llama_file();
        let config = config_json(&f, GgufArch::of(&f).unwrap(), 4).unwrap();
        assert_eq!(config["head_dim"], 16);
        assert_eq!(config["rms_norm_eps"], 1e-5);
        assert_eq!(config["tie_word_embeddings"], true);
        let tok = tokenizer_json(&f).unwrap();
        assert_eq!(tok["model"]["merges"], json!([["a", "b"]]));
        assert_eq!(tok["added_tokens"][0]["content"], "<eos>");
        assert_eq!(stop_ids(&f).unwrap(), [3]);
    }

    #[test]
    fn what_the_loader_cannot_read_is_named() {
        let cases: [(&str, Value, &str); 6] = [
            (
                "general.architecture",
                Value::String("falcon".into()),
                "architecture `falcon`",
            ),
            (
                "tokenizer.ggml.model",
                Value::String("llama".into()),
                "tokenizer type `llama`",
            ),
            (
                "tokenizer.ggml.pre",
                Value::String("deepseek".into()),
                "pre-tokenizer `deepseek`",
            ),
            ("tokenizer.ggml.merges", strings(&["ab"]), "merge `ab`"),
            (
                "tokenizer.ggml.tokens",
                strings(&["a", "a", "b", "c"]),
                "appears twice",
            ),
            (
                "tokenizer.ggml.eos_token_id",
                Value::U32(9),
                "past the vocabulary",
            ),
        ];
        for (key, value, needle) in cases {
            let mut f = llama_file();
            f.metadata.insert(key.to_string(), value);
            let err = GgufArch::of(&f)
                .and_then(|a| config_json(&f, a, 4))
                .and_then(|_| tokenizer_json(&f))
                .and_then(|_| stop_ids(&f))
                .expect_err(key);
            assert!(err.contains(needle), "{key}: {err}");
        }
        let mut f = llama_file();
        f.metadata.remove("llama.block_count");
        let err = config_json(&f, GgufArch::Llama, 4).unwrap_err();
        assert!(err.contains("llama.block_count is missing"), "{err}");
    }
}
