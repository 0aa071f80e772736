//! Sirius correction: the sparse model drafts, the full model verifies each window in one
//! pass, keeps the likely prefix, corrects the first bad token and rewrites the KV cache.
//!
//! One window (the chain, width W = 1): after x0 (the last token produced, not yet in the
//! cache) the sparse model drafts K - 1 tokens; the full model runs the K tokens in one pass,
//! overwriting their K/V entries; drafted token i is accepted while
//! `softmax(z_{i-1} / T)[d_i] >= threshold` holds for it and every earlier one; the cache
//! rolls back to x0 and the accepted drafts, and the full model's argmax after them is the
//! next token (a correction, or a bonus token when every draft was accepted). Metrics: AAL =
//! tokens advanced per verification, effective density = ((K - 1) * D_sparse + 1) / AAL.
//! With W > 1 the sparse model keeps W beams and the full model verifies the whole tree
//! under a tree attention mask (`tree`); the longest accepted path wins.
//!
//! Everything here works through the narrow [`SiriusModel`] interface (drafts, verification,
//! cache rollback), so it is tested with scripted fakes; the engine implements it over the
//! one Llama forward (in memory or offloaded) and drives the windows with its request loop.

pub mod adaptive;
pub mod config;
pub mod corrector;
pub mod stats;
pub mod tree;
pub mod window;

pub use adaptive::PeriodPlanner;
pub use config::{Period, SiriusConfig, MAX_PERIOD, MAX_WIDTH};
pub use corrector::{Corrector, WindowKind};
pub use stats::{effective_density, CorrectionStats};
pub use window::{token_probability, SiriusModel};
