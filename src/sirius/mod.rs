//! Sirius correction (../shared/SIRIUS.md, "The Sirius loop"): the sparse model drafts, the
//! full model verifies each window in one pass, keeps the likely prefix, corrects the first
//! bad token and rewrites the KV cache.
//!
//! The corrector (`corrector`: the chain, width 1; `tree`: W beams verified as one tree) is
//! written against the narrow [`SiriusModel`] interface; `llama_model` implements it over the
//! one `Llama` forward and `engine::sirius_generate` drives it for `run --sirius`.

pub mod corrector;
pub mod llama_model;
pub mod tree;

pub use corrector::{correct, correct_streaming, CorrectionStats, CorrectorOptions, SiriusModel};
pub use llama_model::LlamaSirius;
pub use tree::correct_tree;
