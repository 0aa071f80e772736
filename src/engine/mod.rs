//! The engine: one owner of a loaded model (its tokenizer, sparse FFN and, when offloaded,
//! the runtime streaming its weights) that runs requests through one loop.
//!
//! A request is plain decoding (dense or sparse, `plain`), Sirius (`sirius`) or Sirius with
//! offloaded weights (`offloaded`); each is a [`decode::Request`] (a prefill, then steps), and
//! [`decode::run`] drives all of them: the stopping rules, the text stream, the statistics.
//! `run`, `eval`, `bench` and `calibrate` are thin clients of [`Engine`]; the evaluation
//! harnesses (`perplexity`, `gsm`, `faithfulness`, `bench`, `calibrate`) live here too.

pub mod bench;
pub mod bench_sirius;
pub mod calibrate;
pub mod decode;
pub mod faithfulness;
mod generate;
pub mod gsm;
pub mod llama_sirius;
pub mod offloaded;
pub mod output;
pub mod perplexity;
pub mod plain;
pub mod prefill;
pub mod prefix;
pub mod sirius;
mod stop;
mod text;

use std::path::{Path, PathBuf};

use crate::backend::offload::{OffloadBackend, ResidentMemory};
use crate::error::{Error, Result};
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::{Llama, ModelFiles, SamplingParams, Tokenizer, WeightsChoice};
use crate::offload::runtime::{OffloadConfig, OffloadRuntime};
use crate::sirius::SiriusConfig;
use crate::sparsity::{Sparsity, SparsityConfig, SparsityMode};
use crate::tensor::KvDType;

pub use crate::offload::prefill::PrefillChunk;
pub use output::{GenerationOutput, SiriusReport, StopReason};
pub use prefix::PromptPrefix;

/// How an engine is set up around its model.
#[derive(Clone)]
pub struct EngineConfig {
    /// The sparse FFN requests decode with (`Decoding::Sparse`, Sirius's drafts).
    pub sparsity: SparsityConfig,
    /// Offloading within a memory budget (Sirius with Griffin only): the engine plans a
    /// runtime at its first request and reuses it while later requests fit.
    pub offload: Option<OffloadConfig>,
    /// How the weight matrices are kept (quantized GGUF blocks as stored by default).
    pub weights: WeightsChoice,
    /// How KV caches store their rows.
    pub kv_dtype: KvDType,
}

impl EngineConfig {
    /// The dense model, nothing offloaded.
    pub fn dense() -> Self {
        EngineConfig {
            sparsity: SparsityConfig::dense(),
            offload: None,
            weights: WeightsChoice::AsStored,
            kv_dtype: KvDType::default(),
        }
    }
}

/// How one request decodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// The full model at every step, whatever the engine's sparsity.
    Dense,
    /// The engine's sparse FFN at every decode step (the prompt always runs dense).
    Sparse,
    /// Sparse drafts corrected by the full model (greedy).
    Sirius(SiriusConfig),
}

/// What one request asks, besides its prompt.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Text that ends generation (not included in the output).
    pub stop_strings: Vec<String>,
    /// Stop at the model's EOS ids (off: generate exactly `max_tokens`).
    pub stop_at_eos: bool,
    /// Context cap in tokens (`None`: the model's own limit).
    pub context: Option<usize>,
    /// Prompt tokens per prefill forward (bounds scratch memory): fixed, or growing where
    /// an offloaded request's budget pays for longer ones (`offload::prefill`).
    pub prefill_chunk: PrefillChunk,
    /// A progress bar for long prefills (on a terminal).
    pub show_progress: bool,
}

impl RequestOptions {
    /// Greedy, at most `max_tokens`, stopping at EOS, in the model's context.
    pub fn greedy(max_tokens: usize) -> Self {
        RequestOptions {
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop_strings: Vec::new(),
            stop_at_eos: true,
            context: None,
            prefill_chunk: PrefillChunk::Grow(crate::engine::prefill::DEFAULT_PREFILL_CHUNK),
            show_progress: false,
        }
    }
}

/// A prompt as the model's chat template renders it: an optional system message, then the
/// user's.
#[derive(Debug, Clone)]
pub struct ChatPrompt {
    pub system: Option<String>,
}

/// A loaded model and what its requests share.
pub struct Engine<B: OffloadBackend> {
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
    /// Where the model was loaded from (a directory or a GGUF file).
    pub path: PathBuf,
    /// The ids that end a generation (config.json and generation_config.json, or the GGUF's
    /// EOS and end-of-turn tokens).
    pub stop_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
    sparsity: Sparsity<B>,
    offload: Option<Offload<B>>,
    /// A prompt prefix requests share, computed once ([`Engine::set_prompt_prefix`]), or
    /// the last request's prompt ([`Engine::remember_prompts`]).
    prefix: Option<PromptPrefix<B>>,
    remember_prompts: bool,
}

/// The keep of a dense offloaded engine: any positive fraction rounds up to one neuron (one
/// block of 32 on quantized weights), the smallest sparse set a runtime places.
const DENSE_OFFLOAD_KEEP: f32 = 1e-6;

/// `config` with an automatic offloading budget (`--gpu-mem auto`) read from `backend`.
fn with_budget<B: OffloadBackend>(config: &EngineConfig, backend: &B) -> Result<EngineConfig> {
    let mut config = config.clone();
    if let Some(o) = config.offload.as_mut().filter(|o| o.auto_budget) {
        o.budget = backend.auto_budget()?;
        o.auto_budget = false;
        tracing::info!(
            "--gpu-mem auto: {} (free device memory and the driver context)",
            crate::units::format_bytes(o.budget)
        );
    }
    Ok(config)
}

/// An engine's offloading: its configuration and, once planned, the runtime.
struct Offload<B: OffloadBackend> {
    config: OffloadConfig,
    keep: f32,
    /// Loaded without sparsity: requests run the dense model, the rest streamed every token.
    dense: bool,
    runtime: Option<OffloadRuntime<B>>,
}

impl<B: OffloadBackend> Engine<B> {
    /// Loads the model at `path` (HF directory or GGUF file) on `backend`, its tokenizer (refused when it has
    /// ids the model cannot embed) and EOS ids, and builds the sparse FFN.
    pub fn load(path: &Path, backend: B, config: &EngineConfig) -> Result<Self> {
        config.sparsity.validate()?;
        let config = &with_budget(config, &backend)?;
        let offload = match &config.offload {
            Some(o) => {
                let s = &config.sparsity;
                let dense = s.mode == SparsityMode::None;
                if !(dense || s.mode == SparsityMode::Griffin) || s.cats_thresholds.is_some() {
                    return Err(Error::InvalidArgument(
                        "offloading runs Sirius with Griffin sparsity (--sparsity griffin) or \
                         the dense model (no --sparsity)"
                            .into(),
                    ));
                }
                Some(Offload {
                    // One format for the compact down matrices, however the caller set it.
                    config: OffloadConfig {
                        griffin_down: s.griffin_down,
                        // Float FFN bundles are cached beside the model, built once.
                        bundle_cache: o.bundle_cache.clone().or(Some(path.to_path_buf())),
                        ..o.clone()
                    },
                    // The dense model resides as the smallest sparse set plus the rest (see
                    // `generate`): the placement of a full pass, attention first, then whole
                    // FFN layers.
                    keep: if dense { DENSE_OFFLOAD_KEEP } else { s.keep },
                    dense,
                    runtime: None,
                })
            }
            None => None,
        };
        let loaded = std::time::Instant::now();
        let device_offload =
            config.offload.is_some() && B::RESIDENT_MEMORY == ResidentMemory::Device;
        let files = ModelFiles::open_with(path, weights_for(config, path, device_offload))?;
        let text = files.text;
        let mut model = Llama::from_store(files.config, files.weights, backend)?;
        model.kv_dtype = config.kv_dtype;
        tracing::info!(model = %path.display(), backend = %model.backend_description(), dtype = %model.dtype,
            weight_bytes = model.weight_bytes(), seconds = loaded.elapsed().as_secs_f64(), "model loaded");
        // Offloading keeps its own host copy of the FFN and places the sparse set itself.
        let sparsity = match offload {
            Some(_) => Sparsity::None,
            None => model.sparsity(&config.sparsity)?,
        };
        Ok(Engine {
            model,
            tokenizer: text.tokenizer,
            path: path.to_path_buf(),
            stop_ids: text.stop_ids,
            chat_template: text.chat_template,
            sparsity,
            offload,
            prefix: None,
            remember_prompts: false,
        })
    }

    /// Computes the KV cache (and Griffin's scores) of `tokens` once: later requests whose
    /// prompts continue them start from a copy and prefill only the rest. Not on an
    /// offloaded engine, whose full passes stream weights the model does not hold.
    pub fn set_prompt_prefix(
        &mut self,
        tokens: &[u32],
        chunk: usize,
        progress: bool,
    ) -> Result<()> {
        if self.offload.is_some() {
            return Err(Error::InvalidArgument(
                "prompt prefix reuse is not implemented for offloaded engines".into(),
            ));
        }
        // A prefix is never a whole prompt: a request that continues it needs a position more.
        if tokens.len() >= self.context() {
            return Err(Error::PromptTooLong {
                prompt_tokens: tokens.len(),
                context: self.context(),
            });
        }
        self.prefix = None;
        self.prefix = Some(PromptPrefix::build(&self.model, tokens, chunk, progress)?);
        Ok(())
    }

    /// Forgets the shared prompt prefix.
    pub fn clear_prompt_prefix(&mut self) {
        self.prefix = None;
    }

    /// The sparse FFN requests decode with.
    pub fn sparsity(&self) -> &Sparsity<B> {
        &self.sparsity
    }

    /// Decodes with `config` from now on (the old sparse FFN's bundles are dropped before
    /// the new ones are built, so when building fails the engine is left decoding dense).
    /// Not on an offloaded engine, whose runtime owns its neurons.
    pub fn set_sparsity(&mut self, config: &SparsityConfig) -> Result<()> {
        if self.offload.is_some() {
            return Err(Error::InvalidArgument(
                "an offloaded engine's sparsity is fixed at load".into(),
            ));
        }
        self.sparsity = Sparsity::None;
        self.sparsity = self.model.sparsity(config)?;
        Ok(())
    }

    /// Positions a request may use: the position limit and any sliding window.
    pub fn context(&self) -> usize {
        prefill::model_context(&self.model.config)
    }

    /// Whether requests stream what does not fit in the resident budget.
    pub fn is_offloaded(&self) -> bool {
        self.offload.is_some()
    }

    /// Gives back the offloading runtime's resident memory (its arena and copy engine) and
    /// the model its checkpoint weights; the next request plans again. Lets several offloaded
    /// engines take turns within one budget (`bench --sirius --resident-mem`).
    pub fn release_offload_runtime(&mut self) {
        if let Some(runtime) = self.offload.as_mut().and_then(|o| o.runtime.take()) {
            runtime.restore_model(&mut self.model);
        }
    }

    /// The offloading runtime, once the first offloaded request planned it.
    pub fn offload_runtime(&self) -> Option<&OffloadRuntime<B>> {
        self.offload.as_ref().and_then(|o| o.runtime.as_ref())
    }

    /// The token ids of `text`: as is (special tokens written in it are recognised, a BOS
    /// added if the tokenizer adds one), or rendered as a user turn by the model's chat
    /// template.
    pub fn encode(&self, text: &str, chat: Option<&ChatPrompt>) -> Result<Vec<u32>> {
        let Some(chat) = chat else {
            return self.tokenizer.encode(text, true);
        };
        let mut messages = Vec::new();
        if let Some(system) = &chat.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: text.to_string(),
        });
        self.encode_chat(&messages)
    }

    /// The token ids of a conversation as the model's chat template renders it, the
    /// assistant's turn opened.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let Some(template) = self.chat_template.as_ref() else {
            // A directory without tokenizer_config.json: say which file is missing.
            let file = self.path.join("tokenizer_config.json");
            if self.path.is_dir() {
                ChatTemplate::from_tokenizer_config(&file)?;
            }
            return Err(Error::config(
                &self.path,
                "the model has no chat_template: give the prompt as plain text (run without \
                 --chat; on a server, /v1/completions)",
            ));
        };
        let rendered = template.render(messages)?;
        tracing::debug!(%rendered, "rendered chat prompt");
        // The template writes any BOS itself.
        self.tokenizer.encode(&rendered, false)
    }

    /// Whether the model has a chat template (chat requests need one).
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Keeps each in-memory request's prompt KV cache (and Griffin's scores of it) after the
    /// request, so that a next prompt that continues it (the next turn of a conversation)
    /// prefills only its new tokens. The kept prompt replaces any prefix set before. Off by
    /// default: evaluations set one shared prefix for all their requests.
    pub fn remember_prompts(&mut self, on: bool) {
        self.remember_prompts = on;
    }
}

/// The weights an engine loads: as `config` asks, except that CATS (which computes on float
/// neuron bundles) and offloading to a device (whose kernels are float: `device_offload`) get
/// a GGUF's quantized matrices de-quantized to bf16 (a model directory's float weights load as
/// stored). Griffin and offloading on the CPU work on quantized matrices.
fn weights_for(config: &EngineConfig, path: &Path, device_offload: bool) -> WeightsChoice {
    let needs_float = config.sparsity.mode == SparsityMode::Cats || device_offload;
    match config.weights {
        WeightsChoice::AsStored if needs_float && crate::config::is_gguf(path) => {
            tracing::info!(
                "CATS and offloading to a device compute on float weights: quantized GGUF \
                 matrices are de-quantized to bf16"
            );
            WeightsChoice::Convert(crate::tensor::DType::BF16)
        }
        other => other,
    }
}
