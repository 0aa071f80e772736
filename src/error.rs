//! The library's error type. Every message names the file, tensor or option at fault and, where
//! there is one, what to do about it.

use std::path::PathBuf;

use crate::units::{format_bytes, SizeError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot run {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A config file parsed but says something we cannot use (missing key, bad value).
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error(
        "{path}: unsupported architecture {arch:?}; supported: LlamaForCausalLM, \
         MistralForCausalLM, Qwen2ForCausalLM"
    )]
    UnsupportedArchitecture { path: PathBuf, arch: String },

    #[error("model {name:?} not found: {hint}")]
    ModelNotFound { name: String, hint: String },

    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("{path}: not a valid GGUF file: {msg}")]
    Gguf { path: PathBuf, msg: String },

    #[error("tensor `{name}` is missing (looked in {searched})")]
    MissingTensor { name: String, searched: String },

    #[error(
        "{path}: tensor `{name}` has shape {actual:?}, expected {expected:?} from the model's \
         config: the config and the weights disagree"
    )]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },

    #[error("{path}: tensor `{name}` has dtype {dtype}, supported: F32, F16, BF16")]
    UnsupportedDType {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    #[error("{path}: tensor `{name}` is {actual}, but the model's other weights are {expected}")]
    MixedDType {
        path: PathBuf,
        name: String,
        /// The tensor's dtype and the model's, as written (`bf16`, `f32`, ...).
        actual: String,
        expected: String,
    },

    /// A NaN or infinity in a weight: every output computed from it would be garbage.
    #[error(
        "{path}: tensor `{name}` holds {value} at element {index}: the checkpoint is corrupt; \
         download or convert it again"
    )]
    NonFiniteWeight {
        path: PathBuf,
        name: String,
        index: usize,
        value: f32,
    },

    /// A tensor of the checkpoint that the model's config has no use for: the config and the
    /// weights disagree, and running would silently compute another model.
    #[error("{path}: tensor `{name}` is not used by the model: {why}")]
    UnusedTensor {
        path: PathBuf,
        name: String,
        why: String,
    },

    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error(
        "the prompt has {prompt_tokens} tokens but the context holds {context} (the smallest of \
         --ctx-size, the model's max_position_embeddings and its sliding window): shorten the prompt"
    )]
    PromptTooLong {
        prompt_tokens: usize,
        context: usize,
    },

    #[error("the KV cache is full: {needed} positions needed, {capacity} available")]
    ContextFull { needed: usize, capacity: usize },

    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A memory budget below what any plan needs (the CLI names the option that set it).
    #[error(
        "a memory budget of {} is below the minimum of {} this model needs resident ({needs}): give at least {minimum} bytes, or shorten the context (the KV cache grows with it)",
        format_bytes(*budget),
        format_bytes(*minimum)
    )]
    BudgetBelowMinimum {
        budget: u64,
        minimum: u64,
        /// What the minimum is made of, e.g. "KV cache 94 MiB, head 54 MiB, ...".
        needs: String,
    },

    /// An input of the offloading planner out of range. `field` names the `PlanInput` field
    /// (`keep`, `aal`, `link_gbps`, ...): the CLI words it as the option that set it.
    #[error("plan input `{field}` {problem}")]
    PlanInput {
        field: &'static str,
        problem: String,
    },

    /// A byte size that cannot be read (`--gpu-mem lots`).
    #[error("invalid argument: {0}")]
    Size(#[from] SizeError),

    /// The resident arena refused an allocation: the plan and the execution disagree.
    #[error(
        "resident memory budget exceeded: {label} needs {}, {} of {} already in use",
        format_bytes(*requested),
        format_bytes(*used),
        format_bytes(*budget)
    )]
    ArenaFull {
        label: String,
        requested: u64,
        used: u64,
        budget: u64,
    },

    /// The copy engine failed (its thread stopped, or a buffer was used out of order).
    #[error("copy engine: {0}")]
    CopyEngine(String),

    /// The HTTP server could not start or stopped (`serve`).
    #[error("server: {0}")]
    Serve(String),

    /// A CUDA library, header or kernel compilation failed (the message says what to do).
    #[error("CUDA: {0}")]
    Cuda(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A GGUF file's error (its message made one line: [`one_line`]).
    pub(crate) fn gguf(path: impl Into<PathBuf>, msg: impl AsRef<str>) -> Error {
        Error::Gguf {
            path: path.into(),
            msg: one_line(msg.as_ref()),
        }
    }

    /// A tokenizer's error (its message made one line: [`one_line`]).
    pub(crate) fn tokenizer(path: impl Into<PathBuf>, msg: impl AsRef<str>) -> Error {
        Error::Tokenizer {
            path: path.into(),
            msg: one_line(msg.as_ref()),
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// A message that quotes names, keys or tokens read from a file, which a corrupt file fills
/// with control bytes (newlines) or whole kilobytes: control characters escaped, and a long
/// message shortened to its start and its end (the reason), so it stays one line.
fn one_line(msg: &str) -> String {
    const MAX_CHARS: usize = 400;
    let escaped: Vec<char> = msg
        .chars()
        .flat_map(|c| {
            let plain = !c.is_control();
            plain
                .then_some(c)
                .into_iter()
                .chain((!plain).then(|| c.escape_default()).into_iter().flatten())
        })
        .collect();
    if escaped.len() <= MAX_CHARS {
        return escaped.into_iter().collect();
    }
    let head: String = escaped[..MAX_CHARS / 2].iter().collect();
    let tail: String = escaped[escaped.len() - MAX_CHARS / 2..].iter().collect();
    format!("{head} [...] {tail}")
}
