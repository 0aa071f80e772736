//! Shared setup of the offloaded-run tests (tests/offload_run.rs on the CPU,
//! tests/gpu_offload.rs on CUDA): generation, Sirius and offload options, the prompt and a
//! tiny model written to a temp dir. Each suite keeps its own model spec.

use sirius_offload::engine::{PrefillChunk, RequestOptions};
use sirius_offload::model::Tokenizer;
use sirius_offload::offload::runtime::OffloadConfig;
use sirius_offload::sirius::SiriusConfig;
use sirius_offload::transfer::DelayFn;

use super::{write_model, TinySpec};

/// Griffin's keep fraction in every offloaded test.
pub const KEEP: f32 = 0.5;

pub const PROMPT: [u32; 20] = [
    5, 17, 42, 9, 3, 64, 7, 80, 11, 23, 31, 47, 52, 60, 71, 88, 90, 13, 29, 37,
];

/// Greedy generation of `max_tokens` tokens, prefill in chunks of 16, no EOS.
pub fn options(max_tokens: usize) -> RequestOptions {
    RequestOptions {
        stop_at_eos: false,
        context: Some(256),
        prefill_chunk: PrefillChunk::Grow(16),
        ..RequestOptions::greedy(max_tokens)
    }
}

pub fn sirius(period: usize, width: usize) -> SiriusConfig {
    SiriusConfig {
        period,
        threshold: 0.1,
        accept_temperature: 0.6,
        width,
        adaptive: false,
    }
}

/// Offloading within `budget`, no link cap, traced; `delay` delays each copy job.
pub fn offload(budget: u64, delay: Option<DelayFn>) -> OffloadConfig {
    OffloadConfig {
        budget,
        auto_budget: false,
        link_gbps: None,
        mem_gbps: Some(20.0),
        compute_gflops: None,
        trace: true,
        delay,
        griffin_down: sirius_offload::tensor::DType::Q8_0,
        bundle_cache: None,
    }
}

/// A tiny model in a temp dir (removed on drop) and its tokenizer.
pub struct Tiny {
    pub _dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
    pub tokenizer: Tokenizer,
}

pub fn tiny_model(spec: &TinySpec, seed: u64) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), spec, seed);
    let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json")).unwrap();
    Tiny {
        _dir: dir,
        path,
        tokenizer,
    }
}
