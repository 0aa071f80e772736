//! Models: checkpoint loading, tokenizer and chat template, the Llama forward pass (the one
//! forward: `llama`), KV cache and sampling.

pub mod chat;
pub(crate) mod convert;
pub mod gguf;
pub mod kv_cache;
pub mod llama;
mod load;
pub mod rope;
mod safetensors_header;
pub mod sampler;
mod scratch;
pub mod source;
pub mod streamed;
pub mod tokenizer;
pub mod weight_checks;
pub mod weights;

/// What a device backend counts of its work (re-exported: the corrector sees backends only
/// through the model).
pub use crate::backend::DeviceCounts;
pub use kv_cache::KvCache;
pub use llama::{Llama, Logits, Pass, ReplacedWeights};
pub use sampler::{Sampler, SamplingParams};
pub use scratch::{scratch_byte_size, Scratch};
pub use source::{ModelFiles, TextFiles, WeightsChoice};
pub use streamed::{LayerStream, StreamedAttention, StreamedLayer};
pub use tokenizer::{TextStream, Tokenizer};
