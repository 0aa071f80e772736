//! Models: checkpoint loading, tokenizer and chat template, the Llama forward pass, KV cache
//! and sampling.

pub mod chat;
pub mod kv_cache;
pub mod llama;
pub mod sampler;
pub mod streamed;
pub mod tokenizer;
pub mod weights;

pub use kv_cache::KvCache;
pub use llama::{Llama, Logits, Scratch};
pub use sampler::{Sampler, SamplingParams};
pub use streamed::{LayerStream, StreamedAttention, StreamedFfn, StreamedLayer};
pub use tokenizer::{TextStream, Tokenizer};
