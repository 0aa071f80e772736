//! Driving the model: the generation loop, perplexity evaluation (and, later, the request
//! queue and step loop).

pub mod generate;
pub mod perplexity;
pub mod stop;

pub use generate::{generate, GenerateOptions, GenerationOutput, StopReason};
