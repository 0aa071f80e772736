//! Driving the model: the generation loop (and, later, the request queue and step loop).

pub mod generate;
pub mod stop;

pub use generate::{generate, GenerateOptions, GenerationOutput, StopReason};
