//! Driving the model: the generation loop, perplexity evaluation (and, later, the request
//! queue and step loop).

pub mod faithfulness;
pub mod generate;
pub mod gsm;
pub mod perplexity;
pub(crate) mod request;
pub mod sirius_generate;
pub mod stop;

pub use generate::{generate, GenerateOptions, GenerationOutput, StopReason};
pub use sirius_generate::{generate_sirius, SiriusOptions, SiriusReport};
