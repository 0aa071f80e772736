//! Sirius correction (../shared/SIRIUS.md, "The Sirius loop"): the sparse model drafts, the
//! full model verifies each window in one pass, keeps the likely prefix, corrects the first
//! bad token and rewrites the KV cache.
//!
//! Status: the chain corrector (width 1), the model adapter over `Llama` and `run --sirius`
//! (`engine::sirius_generate`); the tree (width > 1) and the evaluation are later steps of the
//! corrector issue.

pub mod corrector;
pub mod llama_model;

pub use corrector::{correct, correct_streaming, CorrectionStats, CorrectorOptions, SiriusModel};
pub use llama_model::LlamaSirius;
