//! sirius-offload: Llama-family inference with contextual sparsity, Sirius correction and
//! offloading. The library holds everything; `main.rs` is only the CLI entry.

pub mod backend;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod model;
pub mod offload;
pub mod progress;
pub mod serve;
pub mod sirius;
pub mod sparsity;
pub mod tensor;
pub mod transfer;
pub mod units;

pub use error::{Error, Result};
