//! sirius-offload: Llama-family inference with contextual sparsity, Sirius correction and
//! offloading. The library holds everything; `main.rs` is only the CLI entry.

pub mod backend;
pub mod dtype;
