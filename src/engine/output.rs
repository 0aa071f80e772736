//! What a request produces: its tokens and text, why it stopped, and its statistics (the
//! stats JSON of `run --stats-json`).

use serde::Serialize;

use crate::offload::runtime::OffloadReport;
use crate::sparsity::SparsityReport;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
    /// The consumer of the text stopped listening (e.g. a closed pipe).
    Cancelled,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Eos => "eos",
            StopReason::StopString => "stop_string",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Cancelled => "cancelled",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationOutput {
    pub text: String,
    pub prompt_tokens: usize,
    /// Leading prompt tokens taken from a prefix computed once (not prefilled again).
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    pub generated_token_ids: Vec<u32>,
    pub stop_reason: StopReason,
    /// Prompt tokens per prefill pass (the last pass may be shorter): the request's chunk, or
    /// in an offloaded run the longest the budget's spare bytes pay for (as `plan` says).
    pub prefill_chunk: usize,
    /// Seconds of the prompt's forward passes (the sparse setup excluded).
    pub prefill_seconds: f64,
    /// Seconds of the decode steps (forwards, drafts and verifications; not the time spent
    /// handing text to its consumer).
    pub decode_seconds: f64,
    /// Prompt tokens prefilled (the cached prefix excluded) per prefill second.
    pub prefill_tokens_per_s: f64,
    /// Tokens the decode steps produced (those after the first, which comes from the prompt
    /// pass, and a stop id that ended the request) per decode second.
    pub decode_tokens_per_s: f64,
    /// Kernel launches (cuBLAS calls included) the decode steps queued per token counted
    /// in `decode_tokens_per_s` (CUDA; absent on the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_launches_per_token: Option<f64>,
    /// Device allocations the decode steps made (CUDA; absent on the CPU): 0 once the
    /// per-op temporaries' region holds what the steps need.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_device_allocations: Option<u64>,
    /// Seconds spent picking and placing Griffin's neurons after the prompt (0 otherwise).
    pub sparse_setup_seconds: f64,
    #[serde(flatten)]
    pub sparsity: SparsityReport,
    /// Correction statistics of a Sirius request.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub sirius: Option<SiriusReport>,
    /// Streaming statistics of an offloaded request (`run --resident-mem` / `--gpu-mem`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub offload: Option<OffloadReport>,
}

/// Correction statistics of a request (AAL, effective density, where the time went).
#[derive(Debug, Clone, Serialize)]
pub struct SiriusReport {
    /// K (with `adaptive`, the longest window allowed).
    pub period: usize,
    /// Windows chose their K from measured costs (`--period auto`).
    pub adaptive: bool,
    /// Mean tokens verified per window.
    pub mean_period: f64,
    /// Tree width W (1 = the chain).
    pub width: usize,
    pub verifications: usize,
    /// Average advance length per verification (at most `period`).
    pub aal: f64,
    /// ((K - 1) * density + 1) / AAL (adaptive: at the mean K).
    pub effective_density: f64,
    pub rollback_tokens: usize,
    pub draft_seconds: f64,
    pub verify_seconds: f64,
    /// Decode seconds outside drafts and verifications (acceptance, rollback, argmax).
    pub other_seconds: f64,
}

/// Tokens per second (0 for no time).
pub(crate) fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}
