//! Broken model files: directories, config.json fields, generation_config.json, safetensors
//! headers and bytes, shard indexes, tokenizers, chat templates, CATS thresholds, GGUF files
//! and prompt files, each a corrupt copy of a tiny model written here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::common::{
    config_json, random_tensors, safetensors_header_and_data, write_model, RawTensor, TinySpec,
};
use crate::harness::{check_all, run_args, Case};

/// Writes corrupt copies of the tiny model under one temporary directory.
struct Fixtures {
    root: tempfile::TempDir,
    n: usize,
}

type Tensors = BTreeMap<String, RawTensor>;

impl Fixtures {
    fn new() -> Fixtures {
        Fixtures {
            root: tempfile::tempdir().expect("a temporary directory"),
            n: 0,
        }
    }

    /// A fresh, valid tiny model directory.
    fn model(&mut self) -> PathBuf {
        self.n += 1;
        write_model(
            &self.root.path().join(format!("m{}", self.n)),
            &TinySpec::default(),
            1,
        )
    }

    /// A model whose config.json `edit` changed.
    fn config(&mut self, edit: impl FnOnce(&mut Map<String, Value>)) -> PathBuf {
        let dir = self.model();
        let mut config = config_json(&TinySpec::default());
        if let Value::Object(map) = &mut config {
            edit(map);
        }
        write(&dir.join("config.json"), config.to_string().as_bytes());
        dir
    }

    /// A model with config.json's `key` set to `value`.
    fn field(&mut self, key: &str, value: Value) -> PathBuf {
        self.config(|c| {
            c.insert(key.into(), value);
        })
    }

    /// A model whose file `name` holds `bytes`.
    fn file(&mut self, name: &str, bytes: &[u8]) -> PathBuf {
        let dir = self.model();
        write(&dir.join(name), bytes);
        dir
    }

    /// A model whose tensors `edit` changed.
    fn tensors(&mut self, edit: impl FnOnce(&mut Tensors)) -> PathBuf {
        let mut tensors = random_tensors(&TinySpec::default(), 1);
        edit(&mut tensors);
        let bytes = safetensors_with(&tensors, |_| {});
        self.file("model.safetensors", &bytes)
    }

    /// A model whose safetensors header `edit` changed (data as written).
    fn header(&mut self, edit: impl FnOnce(&mut Map<String, Value>)) -> PathBuf {
        let bytes = safetensors_with(&random_tensors(&TinySpec::default(), 1), edit);
        self.file("model.safetensors", &bytes)
    }

    /// A model whose safetensors bytes `edit` changed.
    fn bytes(&mut self, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        let mut bytes = safetensors_with(&random_tensors(&TinySpec::default(), 1), |_| {});
        edit(&mut bytes);
        self.file("model.safetensors", &bytes)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("the fixture is written");
}

/// The safetensors file of `tensors`, its JSON header changed by `edit` first.
fn safetensors_with(tensors: &Tensors, edit: impl FnOnce(&mut Map<String, Value>)) -> Vec<u8> {
    let (mut header, data) = safetensors_header_and_data(tensors);
    edit(&mut header);
    let header = Value::Object(header).to_string().into_bytes();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
}

/// A tensor of `shape` holding `value` everywhere, as `dtype` (F32, F16 or BF16).
fn filled(dtype: &'static str, shape: &[usize], value: f32) -> RawTensor {
    let n: usize = shape.iter().product();
    RawTensor {
        dtype,
        shape: shape.to_vec(),
        data: crate::common::encode(&vec![value; n], dtype),
    }
}

/// The same tensor with element `at` set to `value`.
fn poisoned(t: &RawTensor, at: usize, value: f32) -> RawTensor {
    let size = t.data.len() / t.shape.iter().product::<usize>();
    let mut data = t.data.clone();
    let bytes = crate::common::encode(&[value], t.dtype);
    data[at * size..(at + 1) * size].copy_from_slice(&bytes[..size]);
    RawTensor {
        dtype: t.dtype,
        shape: t.shape.clone(),
        data,
    }
}

fn case(what: &str, model: &Path, extra: &[&str], needles: &[&str]) -> Case {
    let args = run_args(model, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Case::new(what, &args, needles)
}

fn rope(fields: Value) -> impl FnOnce(&mut Map<String, Value>) {
    move |c| {
        let mut scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32});
        if let (Value::Object(s), Value::Object(f)) = (&mut scaling, fields) {
            s.extend(f);
        }
        c.insert("rope_scaling".into(), scaling);
    }
}

fn directory_cases(f: &mut Fixtures) -> Vec<Case> {
    let missing = f.path("no-such-model");
    let empty = f.path("empty");
    std::fs::create_dir_all(&empty).expect("a directory");
    let no_weights = f.model();
    let _ = std::fs::remove_file(no_weights.join("model.safetensors"));
    let no_tokenizer = f.model();
    let _ = std::fs::remove_file(no_tokenizer.join("tokenizer.json"));
    let config_dir = f.model();
    let _ = std::fs::remove_file(config_dir.join("config.json"));
    std::fs::create_dir_all(config_dir.join("config.json")).expect("a directory");
    let plain_file = f.path("weights.bin");
    write(&plain_file, b"not a model");
    vec![
        case(
            "a model that does not exist",
            &missing,
            &[],
            &["no-such-model"],
        ),
        case("an empty directory", &empty, &[], &["config.json"]),
        case("no weights", &no_weights, &[], &["model.safetensors"]),
        case("no tokenizer", &no_tokenizer, &[], &["tokenizer.json"]),
        case(
            "config.json a directory",
            &config_dir,
            &[],
            &["config.json"],
        ),
        case(
            "a plain file as the model",
            &plain_file,
            &[],
            &["weights.bin"],
        ),
    ]
}

fn config_cases(f: &mut Fixtures) -> Vec<Case> {
    let mut c = Vec::new();
    let mut add = |what: &str, dir: PathBuf, needles: &[&str]| {
        c.push(case(what, &dir, &[], needles));
    };
    add(
        "config.json not JSON",
        f.file("config.json", b"{\"hidden_size\": 32,"),
        &["config.json"],
    );
    add(
        "config.json empty",
        f.file("config.json", b""),
        &["config.json"],
    );
    add(
        "config.json a list",
        f.file("config.json", b"[1, 2]"),
        &["config.json"],
    );
    add(
        "no hidden_size",
        f.config(|c| {
            c.remove("hidden_size");
        }),
        &["hidden_size"],
    );
    add(
        "hidden_size a string",
        f.field("hidden_size", json!("32")),
        &["hidden_size"],
    );
    add(
        "hidden_size 0",
        f.field("hidden_size", json!(0)),
        &["hidden_size"],
    );
    add(
        "hidden_size negative",
        f.field("hidden_size", json!(-32)),
        &["hidden_size"],
    );
    add(
        "hidden_size huge",
        f.field("hidden_size", json!(1u64 << 40)),
        &["hidden_size"],
    );
    add(
        "hidden_size of another checkpoint",
        f.field("hidden_size", json!(64)),
        &["embed_tokens", "[64, 64]"],
    );
    add(
        "fewer layers than the checkpoint",
        f.field("num_hidden_layers", json!(1)),
        &["num_hidden_layers is 1", "2 layers"],
    );
    add(
        "more layers than the checkpoint",
        f.field("num_hidden_layers", json!(3)),
        &["model.layers.2.", "missing"],
    );
    add(
        "layers a float",
        f.field("num_hidden_layers", json!(1.5)),
        &["num_hidden_layers"],
    );
    add(
        "heads not dividing hidden_size",
        f.field("num_attention_heads", json!(3)),
        &["num_attention_heads"],
    );
    add(
        "kv heads not dividing heads",
        f.field("num_key_value_heads", json!(3)),
        &["num_key_value_heads"],
    );
    add(
        "heads of another checkpoint",
        f.field("num_attention_heads", json!(8)),
        &["k_proj", "expected"],
    );
    add(
        "intermediate_size of another checkpoint",
        f.field("intermediate_size", json!(64)),
        &["gate_proj", "expected"],
    );
    add(
        "vocab_size of another checkpoint",
        f.field("vocab_size", json!(128)),
        &["embed_tokens", "expected"],
    );
    add(
        "vocab_size below the tokenizer's",
        f.field("vocab_size", json!(32)),
        &["tokenizer.json", "vocab_size 32"],
    );
    add(
        "unknown architecture",
        f.field("architectures", json!(["GPT2LMHeadModel"])),
        &["GPT2LMHeadModel"],
    );
    add(
        "no architecture",
        f.config(|c| {
            c.remove("architectures");
        }),
        &["architectures"],
    );
    add(
        "architectures not a list",
        f.field("architectures", json!("LlamaForCausalLM")),
        &["architectures"],
    );
    add(
        "gelu activation",
        f.field("hidden_act", json!("gelu")),
        &["hidden_act"],
    );
    add(
        "negative rms_norm_eps",
        f.field("rms_norm_eps", json!(-1e-5)),
        &["rms_norm_eps"],
    );
    add(
        "huge rms_norm_eps",
        f.field("rms_norm_eps", json!(5.0)),
        &["rms_norm_eps"],
    );
    add(
        "rope_theta 0",
        f.field("rope_theta", json!(0)),
        &["rope_theta"],
    );
    add("odd head_dim", f.field("head_dim", json!(7)), &["head_dim"]);
    add(
        "max_position_embeddings 0",
        f.field("max_position_embeddings", json!(0)),
        &["max_position_embeddings"],
    );
    add(
        "tie_word_embeddings a string",
        f.field("tie_word_embeddings", json!("yes")),
        &["tie_word_embeddings"],
    );
    add(
        "untied without lm_head",
        f.field("tie_word_embeddings", json!(false)),
        &["lm_head.weight"],
    );
    add(
        "attention_bias without biases",
        f.field("attention_bias", json!(true)),
        &["q_proj.bias"],
    );
    add(
        "mlp_bias without biases",
        f.field("mlp_bias", json!(true)),
        &["gate_proj.bias"],
    );
    add(
        "eos_token_id a word",
        f.field("eos_token_id", json!("x")),
        &["eos_token_id", "\"x\""],
    );
    add(
        "eos_token_id negative",
        f.field("eos_token_id", json!(-1)),
        &["eos_token_id"],
    );
    add(
        "eos_token_id beyond the vocabulary",
        f.field("eos_token_id", json!(1000)),
        &["eos_token_id", "vocab_size"],
    );
    add(
        "eos_token_id list with a word",
        f.field("eos_token_id", json!([2, "a"])),
        &["eos_token_id"],
    );
    add(
        "rope original context 0",
        f.config(rope(json!({"original_max_position_embeddings": 0}))),
        &["original_max_position_embeddings"],
    );
    add(
        "rope factor 0",
        f.config(rope(json!({"factor": 0}))),
        &["factor"],
    );
    add(
        "rope factor negative",
        f.config(rope(json!({"factor": -8}))),
        &["factor"],
    );
    add(
        "rope low above high",
        f.config(rope(
            json!({"low_freq_factor": 4.0, "high_freq_factor": 1.0}),
        )),
        &["high_freq_factor"],
    );
    add(
        "rope type unknown",
        f.config(rope(json!({"rope_type": "yarn"}))),
        &["yarn"],
    );
    add(
        "rope_scaling a string",
        f.field("rope_scaling", json!("llama3")),
        &["rope_scaling"],
    );
    add(
        "rope linear factor 0",
        f.field("rope_scaling", json!({"type": "linear", "factor": 0})),
        &["factor"],
    );
    add(
        "generation_config not JSON",
        f.file("generation_config.json", b"{"),
        &["generation_config.json"],
    );
    add(
        "generation_config eos a word",
        f.file("generation_config.json", br#"{"eos_token_id": "x"}"#),
        &["generation_config.json", "eos_token_id"],
    );
    c
}

fn safetensors_cases(f: &mut Fixtures) -> Vec<Case> {
    let mut c = Vec::new();
    let mut add = |what: &str, dir: PathBuf, extra: &[&str], needles: &[&str]| {
        c.push(case(what, &dir, extra, needles));
    };
    const ST: &str = "model.safetensors";
    add("empty file", f.file(ST, b""), &[], &[ST, "too short"]);
    add("four bytes", f.file(ST, b"abcd"), &[], &[ST]);
    add(
        "header length huge",
        f.bytes(|b| b[..8].copy_from_slice(&u64::MAX.to_le_bytes())),
        &[],
        &[ST, "header"],
    );
    add(
        "header length past the end",
        f.bytes(|b| b[..8].copy_from_slice(&1_000_000u64.to_le_bytes())),
        &[],
        &[ST, "header"],
    );
    add(
        "header not JSON",
        f.bytes(|b| b[8] = b'x'),
        &[],
        &[ST, "JSON header"],
    );
    add(
        "header not UTF-8",
        f.bytes(|b| b[9] = 0xff),
        &[],
        &[ST, "UTF-8"],
    );
    add(
        "data cut short",
        f.bytes(|b| b.truncate(b.len() - 10)),
        &[],
        &[ST, "truncated"],
    );
    add(
        "data too long",
        f.bytes(|b| b.extend_from_slice(&[0; 16])),
        &[],
        &[ST, "belong to none"],
    );
    add(
        "offsets of the wrong length",
        f.header(|h| {
            h["model.norm.weight"]["shape"] = json!([31]);
        }),
        &[],
        &["model.norm.weight", "needs 62 bytes"],
    );
    add(
        "overlapping offsets",
        f.header(|h| {
            let end = h["model.layers.0.input_layernorm.weight"]["data_offsets"][1]
                .as_u64()
                .unwrap_or(0);
            h["model.layers.0.mlp.down_proj.weight"]["data_offsets"] =
                json!([end - 64, end - 64 + 48 * 32 * 2]);
        }),
        &[],
        &[ST, "overlap"],
    );
    add(
        "shape overflowing",
        f.header(|h| {
            h["model.norm.weight"]["shape"] = json!([1u64 << 62, 8]);
        }),
        &[],
        &["model.norm.weight", "too large"],
    );
    add(
        "unknown dtype",
        f.header(|h| {
            h["model.norm.weight"]["dtype"] = json!("Q9");
        }),
        &[],
        &["model.norm.weight", "Q9"],
    );
    add(
        "offsets missing",
        f.header(|h| {
            if let Some(t) = h["model.norm.weight"].as_object_mut() {
                t.remove("data_offsets");
            }
        }),
        &[],
        &["model.norm.weight", "data_offsets"],
    );
    add(
        "integer dtype",
        f.tensors(|t| {
            t.insert(
                "model.layers.0.mlp.gate_proj.weight".into(),
                RawTensor {
                    dtype: "I8",
                    shape: vec![48, 32],
                    data: vec![0; 48 * 32],
                },
            );
        }),
        &[],
        &["model.layers.0.mlp.gate_proj.weight", "I8"],
    );
    add(
        "one f16 matrix among bf16",
        f.tensors(|t| {
            t.insert(
                "model.layers.1.self_attn.o_proj.weight".into(),
                filled("F16", &[32, 32], 0.01),
            );
        }),
        &[],
        &["model.layers.1.self_attn.o_proj.weight", "f16", "bf16"],
    );
    add(
        "an f32 embedding among bf16",
        f.tensors(|t| {
            t.insert(
                "model.embed_tokens.weight".into(),
                filled("F32", &[64, 32], 0.01),
            );
        }),
        &[],
        &["model.embed_tokens.weight", "f32"],
    );
    add(
        "a tensor no model uses",
        f.tensors(|t| {
            t.insert(
                "vision_tower.proj.weight".into(),
                filled("BF16", &[4, 4], 0.0),
            );
        }),
        &[],
        &["vision_tower.proj.weight", "not used"],
    );
    add(
        "a third layer",
        f.tensors(|t| {
            t.insert(
                "model.layers.2.input_layernorm.weight".into(),
                filled("BF16", &[32], 1.0),
            );
        }),
        &[],
        &["3 layers", "num_hidden_layers is 2"],
    );
    add(
        "a bias the config does not enable",
        f.tensors(|t| {
            t.insert(
                "model.layers.0.self_attn.q_proj.bias".into(),
                filled("BF16", &[32], 0.0),
            );
        }),
        &[],
        &["q_proj.bias", "attention_bias"],
    );
    add(
        "a missing tensor",
        f.tensors(|t| {
            t.remove("model.layers.1.mlp.up_proj.weight");
        }),
        &[],
        &["model.layers.1.mlp.up_proj.weight", "missing"],
    );
    add(
        "a transposed matrix",
        f.tensors(|t| {
            if let Some(k) = t.get_mut("model.layers.0.self_attn.k_proj.weight") {
                k.shape = vec![32, 16];
            }
        }),
        &[],
        &["k_proj", "[32, 16]", "[16, 32]"],
    );
    add(
        "NaN in model.norm.weight",
        f.tensors(|t| {
            let bad = poisoned(&t["model.norm.weight"], 5, f32::NAN);
            t.insert("model.norm.weight".into(), bad);
        }),
        &[],
        &["model.norm.weight", "NaN", "element 5"],
    );
    add(
        "infinity in a layer norm",
        f.tensors(|t| {
            let name = "model.layers.1.post_attention_layernorm.weight";
            let bad = poisoned(&t[name], 0, f32::INFINITY);
            t.insert(name.into(), bad);
        }),
        &[],
        &["post_attention_layernorm", "inf"],
    );
    add(
        "NaN in a matrix, --check-weights",
        f.tensors(|t| {
            let name = "model.layers.1.mlp.down_proj.weight";
            let bad = poisoned(&t[name], 100, f32::NAN);
            t.insert(name.into(), bad);
        }),
        &["--check-weights"],
        &["model.layers.1.mlp.down_proj.weight", "NaN"],
    );
    c
}

/// A model split into two shards under `model.safetensors.index.json`, the index changed by
/// `edit`.
fn sharded(
    f: &mut Fixtures,
    edit: impl FnOnce(&mut Map<String, Value>, &mut Tensors, &mut Tensors),
) -> PathBuf {
    let dir = f.model();
    let _ = std::fs::remove_file(dir.join("model.safetensors"));
    let all = random_tensors(&TinySpec::default(), 1);
    let (mut a, mut b): (Tensors, Tensors) = (BTreeMap::new(), BTreeMap::new());
    let mut map = Map::new();
    for (i, (name, t)) in all.into_iter().enumerate() {
        let shard = if i % 2 == 0 {
            "a.safetensors"
        } else {
            "b.safetensors"
        };
        map.insert(name.clone(), json!(shard));
        if i % 2 == 0 {
            a.insert(name, t);
        } else {
            b.insert(name, t);
        }
    }
    edit(&mut map, &mut a, &mut b);
    write(&dir.join("a.safetensors"), &safetensors_with(&a, |_| {}));
    write(&dir.join("b.safetensors"), &safetensors_with(&b, |_| {}));
    let index = json!({"metadata": {}, "weight_map": map});
    write(
        &dir.join("model.safetensors.index.json"),
        index.to_string().as_bytes(),
    );
    dir
}

fn shard_cases(f: &mut Fixtures) -> Vec<Case> {
    const INDEX: &str = "model.safetensors.index.json";
    let not_json = sharded(f, |_, _, _| {});
    write(&not_json.join(INDEX), b"{");
    let no_map = sharded(f, |_, _, _| {});
    write(&no_map.join(INDEX), br#"{"metadata": {}}"#);
    let empty_map = sharded(f, |_, _, _| {});
    write(&empty_map.join(INDEX), br#"{"weight_map": {}}"#);
    vec![
        case("index not JSON", &not_json, &[], &[INDEX]),
        case(
            "index without weight_map",
            &no_map,
            &[],
            &[INDEX, "weight_map"],
        ),
        case(
            "index with an empty weight_map",
            &empty_map,
            &[],
            &[INDEX, "weight_map"],
        ),
        case(
            "index pointing outside the directory",
            &sharded(f, |m, _, _| {
                m.insert(
                    "model.norm.weight".into(),
                    json!("../elsewhere.safetensors"),
                );
            }),
            &[],
            &["model.norm.weight", "../elsewhere.safetensors"],
        ),
        case(
            "index naming a missing shard",
            &sharded(f, |m, _, _| {
                m.insert("model.norm.weight".into(), json!("c.safetensors"));
            }),
            &[],
            &["c.safetensors"],
        ),
        case(
            "index entry not a name",
            &sharded(f, |m, _, _| {
                m.insert("model.norm.weight".into(), json!(3));
            }),
            &[],
            &[INDEX, "model.norm.weight"],
        ),
        case(
            "a tensor in two shards",
            &sharded(f, |_, a, b| {
                if let Some(t) = a.get("model.embed_tokens.weight") {
                    let copy = RawTensor {
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        data: t.data.clone(),
                    };
                    b.insert("model.embed_tokens.weight".into(), copy);
                }
            }),
            &[],
            &["model.embed_tokens.weight", "also in"],
        ),
    ]
}

fn text_cases(f: &mut Fixtures) -> Vec<Case> {
    const TOK: &str = "tokenizer.json";
    const TCFG: &str = "tokenizer_config.json";
    let mut big_vocab = crate::common::tokenizer_json(64);
    if let Some(vocab) = big_vocab["model"]["vocab"].as_object_mut() {
        for i in 64..80 {
            vocab.insert(format!("w{i}"), i.into());
        }
    }
    let no_template = f.model();
    let _ = std::fs::remove_file(no_template.join(TCFG));
    let template = |t: Value| json!({"chat_template": t, "eos_token": "</s>"}).to_string();
    let prompt_dir = f.path("prompt-dir");
    std::fs::create_dir_all(&prompt_dir).expect("a directory");
    let latin1 = f.path("latin1.txt");
    write(&latin1, b"caf\xe9");
    let model = f.model();
    let (pd, l1) = (
        prompt_dir.to_string_lossy().into_owned(),
        latin1.to_string_lossy().into_owned(),
    );
    let missing_prompt = f.path("no-prompt.txt").to_string_lossy().into_owned();
    vec![
        case("tokenizer not JSON", &f.file(TOK, b"{"), &[], &[TOK]),
        case("tokenizer empty", &f.file(TOK, b""), &[], &[TOK]),
        case(
            "tokenizer without a model",
            &f.file(TOK, b"{}"),
            &[],
            &[TOK],
        ),
        case(
            "tokenizer larger than the vocabulary",
            &f.file(TOK, big_vocab.to_string().as_bytes()),
            &[],
            &[TOK, "vocab_size"],
        ),
        case(
            "tokenizer_config not JSON, --chat",
            &f.file(TCFG, b"{"),
            &["--chat"],
            &[TCFG],
        ),
        case(
            "template syntax error, --chat",
            &f.file(TCFG, template(json!("{% for m in %}")).as_bytes()),
            &["--chat"],
            &["chat template"],
        ),
        case(
            "template raising, --chat",
            &f.file(
                TCFG,
                template(json!("{{ raise_exception('no system role') }}")).as_bytes(),
            ),
            &["--chat"],
            &["no system role"],
        ),
        case(
            "template not a string, --chat",
            &f.file(TCFG, template(json!(123)).as_bytes()),
            &["--chat"],
            &["chat_template"],
        ),
        case(
            "no template, --chat",
            &no_template,
            &["--chat"],
            &["tokenizer_config.json"],
        ),
        case(
            "prompt file missing",
            &model,
            &["--prompt-file", &missing_prompt],
            &["no-prompt.txt"],
        ),
        case(
            "prompt file a directory",
            &model,
            &["--prompt-file", &pd],
            &["prompt-dir"],
        ),
        case(
            "prompt file not UTF-8",
            &model,
            &["--prompt-file", &l1],
            &["latin1.txt"],
        ),
        case(
            "prompt longer than the context",
            &model,
            &["--prompt", &"w3 ".repeat(100)],
            &["context"],
        ),
    ]
}

/// A CATS thresholds file for the tiny model, changed by `edit`.
fn thresholds(f: &mut Fixtures, name: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut t = json!({
        "model": {"architecture": "Llama", "hidden_size": 32, "intermediate_size": 48,
                  "num_layers": 2, "vocab_size": 64},
        "keep": 0.5, "thresholds": [0.01, 0.01], "calibration_kept": [0.5, 0.5],
        "calibration_tokens": 10, "calibration_text": "x"
    });
    edit(&mut t);
    let path = f.path(name);
    write(&path, t.to_string().as_bytes());
    path.to_string_lossy().into_owned()
}

fn cats_cases(f: &mut Fixtures) -> Vec<Case> {
    let model = f.model();
    let mut c = Vec::new();
    let mut add = |what: &str, path: String, needles: &[&str]| {
        c.push(case(
            what,
            &model,
            &[
                "--sparsity",
                "cats",
                "--cats-thresholds",
                &path,
                "--temperature",
                "0",
            ],
            needles,
        ));
    };
    add(
        "thresholds missing",
        f.path("none.json").to_string_lossy().into_owned(),
        &["none.json"],
    );
    let not_json = f.path("not-json.json");
    write(&not_json, b"{");
    add(
        "thresholds not JSON",
        not_json.to_string_lossy().into_owned(),
        &["not-json.json"],
    );
    add(
        "thresholds keeping nothing",
        thresholds(f, "high.json", |t| t["thresholds"] = json!([1e38, 0.01])),
        &["high.json", "layer 0", "keep no neuron"],
    );
    add(
        "a negative threshold",
        thresholds(f, "neg.json", |t| t["thresholds"] = json!([0.01, -1])),
        &["neg.json", "layer 1"],
    );
    add(
        "a null threshold",
        thresholds(f, "null.json", |t| t["thresholds"] = json!([0.01, null])),
        &["null.json"],
    );
    add(
        "one threshold for two layers",
        thresholds(f, "short.json", |t| t["thresholds"] = json!([0.01])),
        &["short.json", "one threshold per layer"],
    );
    add(
        "thresholds of another model",
        thresholds(f, "other.json", |t| t["model"]["hidden_size"] = json!(64)),
        &["other.json", "hidden_size"],
    );
    add(
        "thresholds with keep 0",
        thresholds(f, "keep.json", |t| t["keep"] = json!(0)),
        &["keep.json", "keep"],
    );
    let good = thresholds(f, "good.json", |_| {});
    c.push(case(
        "thresholds without --sparsity cats",
        &model,
        &["--cats-thresholds", &good],
        &["--sparsity cats"],
    ));
    c
}

fn gguf_cases(f: &mut Fixtures) -> Vec<Case> {
    let source = crate::common::fixtures_dir().join("tiny-mixed.gguf");
    let bytes = std::fs::read(&source).expect("the GGUF fixture");
    let mut c = Vec::new();
    let mut add = |what: &str, name: &str, data: &[u8], needles: &[&str]| {
        let path = f.path(name);
        write(&path, data);
        c.push(case(what, &path, &[], needles));
    };
    add("empty GGUF", "empty.gguf", b"", &["empty.gguf"]);
    add(
        "GGUF with a bad magic",
        "magic.gguf",
        &[b"GGUX", &bytes[4..]].concat(),
        &["magic.gguf"],
    );
    add(
        "GGUF of version 99",
        "version.gguf",
        &[&bytes[..4], &99u32.to_le_bytes(), &bytes[8..]].concat(),
        &["version.gguf"],
    );
    add(
        "GGUF cut in its header",
        "cut-header.gguf",
        &bytes[..40],
        &["cut-header.gguf"],
    );
    add(
        "GGUF cut in its metadata",
        "cut-meta.gguf",
        &bytes[..400],
        &["cut-meta.gguf"],
    );
    add(
        "GGUF cut in its data",
        "cut-data.gguf",
        &bytes[..bytes.len() / 2],
        &["cut-data.gguf"],
    );
    add(
        "GGUF with a huge tensor count",
        "count.gguf",
        &[&bytes[..8], &u64::MAX.to_le_bytes(), &bytes[16..]].concat(),
        &["count.gguf"],
    );
    c.push(case(
        "GGUF that does not exist",
        &f.path("none.gguf"),
        &[],
        &["none.gguf"],
    ));
    c
}

#[test]
fn broken_model_files_are_one_line_errors_naming_the_culprit() {
    let mut f = Fixtures::new();
    let mut cases = directory_cases(&mut f);
    cases.extend(config_cases(&mut f));
    cases.extend(safetensors_cases(&mut f));
    cases.extend(shard_cases(&mut f));
    cases.extend(text_cases(&mut f));
    cases.extend(cats_cases(&mut f));
    cases.extend(gguf_cases(&mut f));
    check_all("model files", &cases);
}
