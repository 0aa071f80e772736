//! What `--model` names, opened: a Hugging Face directory (config.json, safetensors,
//! tokenizer.json, tokenizer_config.json, generation_config.json) or one GGUF file, which
//! carries the same information in its metadata. Everything above the model sees only
//! [`ModelFiles`]: a config, the weights, the tokenizer, the chat template and the stop ids.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::config::generation::stop_token_ids;
use crate::config::{is_gguf, ModelConfig};
use crate::error::{Error, Result};
use crate::model::chat::ChatTemplate;
use crate::model::gguf::hf::{self, GgufArch};
use crate::model::gguf::weights::{weight_store, GgufWeights};
use crate::model::gguf::GgufFile;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::WeightStore;
use crate::tensor::DType;

/// How the weight matrices are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightsChoice {
    /// As the checkpoint stores them (a GGUF's quantized blocks stay quantized).
    #[default]
    AsStored,
    /// Every matrix converted to this type at load where its rows can hold it (block
    /// formats need whole blocks of 32): a GGUF's blocks de-quantized to a float type or
    /// re-quantized, a float checkpoint quantized (q8_0, q4_0) or widened.
    Convert(DType),
}

/// A model's files, opened and checked against each other.
pub struct ModelFiles {
    /// The directory or GGUF file they came from.
    pub path: PathBuf,
    pub config: ModelConfig,
    pub weights: WeightStore,
    pub text: TextFiles,
}

/// What turns text into ids and back: tokenizer, chat template, ids that end a generation.
pub struct TextFiles {
    pub tokenizer: Tokenizer,
    /// `None` when the model has none (then `--chat` is refused).
    pub chat_template: Option<ChatTemplate>,
    pub stop_ids: Vec<u32>,
}

impl ModelFiles {
    /// Opens a model directory or a `.gguf` file, weights as stored.
    pub fn open(path: &Path) -> Result<ModelFiles> {
        Self::open_with(path, WeightsChoice::AsStored)
    }

    /// Opens a model directory or a `.gguf` file with its matrices kept as `weights` says.
    pub fn open_with(path: &Path, weights: WeightsChoice) -> Result<ModelFiles> {
        if is_gguf(path) {
            return open_gguf(path, weights);
        }
        let config = ModelConfig::from_file(&path.join("config.json"))?;
        let weights = dir_store(path, weights)?;
        let tokenizer = checked_tokenizer(
            Tokenizer::from_file(&path.join("tokenizer.json"))?,
            &path.join("tokenizer.json"),
            config.vocab_size,
        )?;
        let template_path = path.join("tokenizer_config.json");
        let chat_template = if template_path.is_file() {
            ChatTemplate::from_tokenizer_config(&template_path)?
        } else {
            None
        };
        let stop_ids = stop_token_ids(path, &config.eos_token_ids)?;
        Ok(ModelFiles {
            path: path.to_path_buf(),
            config,
            weights,
            text: TextFiles {
                tokenizer,
                chat_template,
                stop_ids,
            },
        })
    }

    /// Only the configuration and the weights, what the forward pass needs (no tokenizer:
    /// test fixtures and tools may have none).
    pub fn open_model(path: &Path, weights: WeightsChoice) -> Result<(ModelConfig, WeightStore)> {
        if !is_gguf(path) {
            let config = ModelConfig::from_file(&path.join("config.json"))?;
            return Ok((config, dir_store(path, weights)?));
        }
        let map = Arc::new(map_file(path)?);
        let file = GgufFile::parse(path, &map)?;
        let (config, arch) = gguf_config(path, &file)?;
        let store = gguf_store(path, &file, &map, arch, &config, weights)?;
        Ok((config, store))
    }

    /// Only the model's configuration (cheap: for checks before a long load, and `plan`).
    pub fn read_config(path: &Path) -> Result<ModelConfig> {
        if !is_gguf(path) {
            return ModelConfig::from_file(&path.join("config.json"));
        }
        let map = map_file(path)?;
        let file = GgufFile::parse(path, &map)?;
        gguf_config(path, &file).map(|(config, _)| config)
    }

    /// A GGUF file's stored types of every layer's wq, wk, wv, wo, gate, up and down, and of
    /// its LM head (the embedding when tied), for `plan`; `None` for a model directory.
    pub fn stored_types(path: &Path) -> Result<Option<StoredTypes>> {
        if !is_gguf(path) {
            return Ok(None);
        }
        let map = map_file(path)?;
        let file = GgufFile::parse(path, &map)?;
        let kind = |names: &[&str]| {
            (names.iter().find_map(|n| file.tensor(n)).map(|t| t.kind)).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{}: no tensor {} in this GGUF file",
                    path.display(),
                    names.join(" or ")
                ))
            })
        };
        let mut layers = Vec::new();
        // Every layer that has a gate matrix (a file's tensor count bounds the loop).
        while file
            .tensor(&format!("blk.{}.ffn_gate.weight", layers.len()))
            .is_some()
        {
            let li = layers.len();
            let mut dtypes = [DType::F32; 7];
            for (slot, name) in dtypes.iter_mut().zip(LAYER_MATRICES) {
                *slot = kind(&[&format!("blk.{li}.{name}.weight")])?;
            }
            layers.push(dtypes);
        }
        if layers.is_empty() {
            kind(&["blk.0.ffn_gate.weight"])?;
        }
        let head = kind(&["output.weight", "token_embd.weight"])?;
        Ok(Some((layers, head)))
    }
}

/// Every layer's matrix types (wq, wk, wv, wo, gate, up, down), and the LM head's.
pub type StoredTypes = (Vec<[DType; 7]>, DType);

/// GGUF names of a layer's matrices, in [`StoredTypes`]'s order.
const LAYER_MATRICES: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// A directory's store, converted as `weights` says.
fn dir_store(path: &Path, weights: WeightsChoice) -> Result<WeightStore> {
    let store = WeightStore::open_dir(path)?;
    match weights {
        WeightsChoice::AsStored => Ok(store),
        WeightsChoice::Convert(to) => store.converted(to),
    }
}

fn gguf_store(
    path: &Path,
    file: &GgufFile,
    map: &Arc<Mmap>,
    arch: GgufArch,
    config: &ModelConfig,
    weights: WeightsChoice,
) -> Result<WeightStore> {
    let mode = match weights {
        WeightsChoice::AsStored => GgufWeights::Native,
        WeightsChoice::Convert(dtype) => GgufWeights::Convert(dtype),
    };
    let heads = (config.num_heads, config.num_kv_heads);
    weight_store(path, file, map, arch, heads, mode)
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping; like every mmap-based loader we rely on the file not being
    // truncated by another process while it is mapped.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn gguf_error(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |msg| Error::gguf(path, msg)
}

/// The config a GGUF stands for, checked by the same parser as a config.json.
fn gguf_config(path: &Path, file: &GgufFile) -> Result<(ModelConfig, GgufArch)> {
    let fail = gguf_error(path);
    let arch = GgufArch::of(file).map_err(&fail)?;
    let embed = file
        .tensor("token_embd.weight")
        .ok_or_else(|| fail("there is no token_embd.weight tensor".into()))?;
    let vocab_rows = match embed.dims[..] {
        [_, rows] => rows,
        _ => {
            return Err(fail(format!(
                "token_embd.weight has dimensions {:?}",
                embed.dims
            )))
        }
    };
    let json = hf::config_json(file, arch, vocab_rows).map_err(&fail)?;
    Ok((ModelConfig::from_json(&json.to_string(), path)?, arch))
}

fn open_gguf(path: &Path, weights: WeightsChoice) -> Result<ModelFiles> {
    let fail = gguf_error(path);
    let map = Arc::new(map_file(path)?);
    let file = GgufFile::parse(path, &map)?;
    let (config, arch) = gguf_config(path, &file)?;
    let tokenizer_json = hf::tokenizer_json(&file).map_err(&fail)?;
    let tokenizer = checked_tokenizer(
        Tokenizer::from_json(&tokenizer_json.to_string(), path)?,
        path,
        config.vocab_size,
    )?;
    let chat_json = hf::tokenizer_config_json(&file).map_err(&fail)?;
    let chat_template = ChatTemplate::from_json(&chat_json, path)?;
    let mut stop_ids = hf::stop_ids(&file).map_err(&fail)?;
    stop_ids.extend(&config.eos_token_ids);
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let weights = gguf_store(path, &file, &map, arch, &config, weights)?;
    Ok(ModelFiles {
        path: path.to_path_buf(),
        config,
        weights,
        text: TextFiles {
            tokenizer,
            chat_template,
            stop_ids,
        },
    })
}

/// Refuses a tokenizer with ids the model cannot embed.
fn checked_tokenizer(tokenizer: Tokenizer, path: &Path, vocab_size: usize) -> Result<Tokenizer> {
    if tokenizer.vocab_size() > vocab_size {
        return Err(Error::Tokenizer {
            path: path.to_path_buf(),
            msg: format!(
                "{} tokens, more than the model's vocab_size {vocab_size}",
                tokenizer.vocab_size()
            ),
        });
    }
    Ok(tokenizer)
}
