//! The offloading runtime on CUDA (issue 6, item 3; `run --device cuda --gpu-mem`): an
//! offloaded Sirius run with a budget below the model's size gives the tokens of the
//! unconstrained CUDA run and of the CPU's offloaded run, and streams over the copy engine.
//! Skips with a visible SKIPPED line without a GPU (fails under SIRIUS_REQUIRE_GPU=1).
#![cfg(feature = "cuda")]

mod common;

use sirius_offload::backend::offload::OffloadBackend;
use sirius_offload::backend::CpuBackend;
use sirius_offload::engine::{
    Decoding, Engine, EngineConfig, GenerationOutput, PrefillChunk, RequestOptions,
};
use sirius_offload::model::Llama;
use sirius_offload::offload::prefill::prefill_passes;
use sirius_offload::offload::runtime::{OffloadConfig, OffloadRuntime};
use sirius_offload::sirius::SiriusConfig;
use sirius_offload::sparsity::{SparsityConfig, SparsityMode};

use common::gpu::*;
use common::offload::{offload, options, sirius, tiny_model, Tiny, KEEP, PROMPT};

/// Large enough that the weights outweigh the KV cache and activations, so that a budget
/// between the plan's minimum and "everything resident" is below the model's size.
fn spec() -> common::TinySpec {
    common::TinySpec {
        hidden: 128,
        layers: 6,
        heads: 4,
        kv_heads: 2,
        ffn: 512,
        vocab: 128,
        max_pos: 256,
        ..Default::default()
    }
}

fn tiny() -> Tiny {
    tiny_model(&spec(), 31)
}

/// An engine on the tiny model with Griffin at `KEEP` on `backend`, offloaded as `o` says.
fn engine<B: OffloadBackend>(t: &Tiny, backend: B, o: Option<OffloadConfig>) -> Engine<B> {
    let config = EngineConfig {
        sparsity: SparsityConfig::new(SparsityMode::Griffin, KEEP),
        offload: o,
        ..EngineConfig::dense()
    };
    Engine::load(&t.path, backend, &config).unwrap()
}

/// A third of the way from the plan's minimum to everything resident (some sparse FFNs
/// overflow) for requests like `opts` on `prompt`.
fn budget_third(t: &Tiny, s: SiriusConfig, prompt: &[u32], opts: &RequestOptions) -> u64 {
    let e = engine(t, CpuBackend::new(2), Some(offload(1 << 40, None)));
    let p = e.offload_plan(prompt, opts, &s).unwrap();
    p.minimum_bytes + (p.resident_bytes - p.minimum_bytes) / 3
}

/// [`budget_third`] for this suite's usual request, checked to be below the checkpoint's
/// weight bytes.
fn budget_below_the_model(t: &Tiny, s: SiriusConfig) -> u64 {
    let budget = budget_third(t, s, &PROMPT, &options(40));
    let weights = Llama::load(&t.path, CpuBackend::new(1))
        .unwrap()
        .weight_bytes() as u64;
    assert!(
        budget < weights,
        "budget {budget} is not below the weights' {weights}"
    );
    budget
}

/// Sirius requests on `prompts`, one after another on one engine of `backend` offloaded
/// within `budget` (with a trace when `trace` is given, written after the last).
fn offloaded<B: OffloadBackend>(
    t: &Tiny,
    backend: B,
    s: SiriusConfig,
    budget: u64,
    opts: &RequestOptions,
    prompts: &[&[u32]],
    trace: Option<&std::path::Path>,
) -> Vec<GenerationOutput> {
    let mut e = engine(t, backend, Some(offload(budget, None)));
    let outs = prompts
        .iter()
        .map(|p| {
            e.generate(p, opts, Decoding::Sirius(s), &mut |_| true)
                .unwrap()
        })
        .collect();
    if let (Some(path), Some(trace)) = (trace, e.offload_runtime().and_then(|r| r.trace())) {
        trace.write_chrome_json(path).unwrap();
    }
    outs
}

#[test]
fn offloaded_sirius_on_cuda_below_the_model_size_gives_the_unconstrained_tokens() {
    let Some(g) = gpu() else { return };
    let t = tiny();
    let mut g = Some(g);
    for (period, width) in [(4, 1), (5, 3)] {
        let s = sirius(period, width);
        let opts = options(40);
        let budget = budget_below_the_model(&t, s);
        // The unconstrained CUDA run: every weight on the GPU, Griffin + Sirius.
        let backend = g.take().unwrap_or_else(|| open_backend().unwrap());
        let mut e = engine(&t, backend, None);
        let full = e
            .generate(&PROMPT, &opts, Decoding::Sirius(s), &mut |_| true)
            .unwrap();
        drop(e);
        let prompts: [&[u32]; 1] = [&PROMPT];
        let cpu = offloaded(&t, CpuBackend::new(2), s, budget, &opts, &prompts, None).remove(0);
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace.json");
        let gpu = open_backend().unwrap().with_host_weights();
        let gpu = offloaded(&t, gpu, s, budget, &opts, &prompts, Some(&trace)).remove(0);
        let label = format!("K={period} W={width} budget {budget}");
        let o = gpu.offload.clone().expect("offload statistics");
        let same = gpu.generated_token_ids == full.generated_token_ids
            && gpu.generated_token_ids == cpu.generated_token_ids;
        say(&format!(
            "OFFLOAD cuda {label} tokens={} streamed_bytes={} overlap={:.2} link_gbps={:.2} \
             stall_s={:.4} full_passes={} {}",
            gpu.generated_tokens,
            o.streamed_bytes,
            o.overlap,
            o.achieved_link_gbps,
            o.copy_wait_s,
            o.full_passes,
            if same { "ok" } else { "FAIL" }
        ));
        assert_eq!(
            gpu.generated_token_ids, full.generated_token_ids,
            "{label}: offloaded CUDA tokens differ from the unconstrained CUDA run"
        );
        assert_eq!(
            gpu.generated_token_ids, cpu.generated_token_ids,
            "{label}: offloaded CUDA tokens differ from the offloaded CPU run"
        );
        assert!(o.streamed_bytes > 0, "{label}: nothing streamed");
        assert!(o.resident_bytes <= budget, "{label}: {o:?}");
        assert!(o.overflow_ffn_layers > 0, "{label}: nothing overflowed");
        assert!((0.0..=1.0).contains(&o.overlap), "{label}: {o:?}");
        // The planner models a GPU run: its prediction is always reported.
        assert!(o.predicted_ms_per_token.is_some(), "{label}: {o:?}");
        let verifications = gpu.sirius.as_ref().unwrap().verifications as u64;
        let prefill = prefill_passes(PROMPT.len(), gpu.prefill_chunk) as u64;
        assert_eq!(o.full_passes, verifications + prefill, "{label}");
        // Same schedule as the CPU runtime: the same bytes cross the link (on both, the
        // chosen neurons' bundles come through the copy engine and the compact FFN is built
        // from them in resident memory).
        let c = cpu.offload.as_ref().unwrap();
        assert_eq!(o.streamed_bytes, c.streamed_bytes, "{label}");
        assert_eq!(o.moved_neurons, c.moved_neurons, "{label}");
        // CUDA counts its launches; the CPU has none to count.
        assert!(
            o.launches_per_token.is_some_and(|l| l > 0.0),
            "{label}: {o:?}"
        );
        assert!(c.launches_per_token.is_none(), "{label}: {c:?}");
        // The per-op temporaries' region is sized before the request from the budgeted
        // bound: the decode steps allocate nothing on the device.
        assert_eq!(gpu.decode_device_allocations, Some(0), "{label}");
        assert_eq!(cpu.decode_device_allocations, None, "{label}");
        let trace: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
        let spans = trace["traceEvents"].as_array().unwrap().len();
        assert!(spans > 30, "{label}: {spans} trace events");
    }
}

#[test]
fn cuda_offloading_refuses_a_model_already_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let t = tiny();
    let s = sirius(4, 1);
    let budget = budget_below_the_model(&t, s);
    let shape = engine(&t, CpuBackend::new(2), Some(offload(budget, None)))
        .offload_request_shape(&PROMPT, &options(40), &s)
        .unwrap();
    let mut model = Llama::load(&t.path, g).unwrap();
    let err = OffloadRuntime::new(&mut model, &offload(budget, None), shape)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("with_host_weights"), "{err}");
}

/// Prefill chunks of 48 rows (cuBLAS GemmEx on the staged views: batches above 16 rows)
/// and a second request on the same runtime (only new neurons move in, through the copy
/// engine, and `kernels/assemble.cu` builds the new compact FFN from the old one and them):
/// the tokens and link bytes of the CPU's offloaded runs.
#[test]
fn cuda_offload_with_wide_prefill_chunks_and_a_second_request() {
    let Some(g) = gpu() else { return };
    let t = tiny();
    let s = sirius(4, 1);
    let first: Vec<u32> = (0..48).map(|i| (i * 11 % 120) as u32 + 3).collect();
    let second: Vec<u32> = first.iter().map(|&x| (x * 7 + 5) % 120 + 3).collect();
    // As `budget_below_the_model`, for these prompts and chunks (larger activations).
    let wide = RequestOptions {
        prefill_chunk: PrefillChunk::Grow(48),
        ..options(40)
    };
    let budget = budget_third(&t, s, &first, &wide);
    let prompts = [&first[..], &second[..]];
    let gpu = offloaded(&t, g.with_host_weights(), s, budget, &wide, &prompts, None);
    let cpu = offloaded(&t, CpuBackend::new(2), s, budget, &wide, &prompts, None);
    for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        let o = g.offload.as_ref().expect("offload statistics");
        say(&format!(
            "OFFLOAD cuda chunk 48 request {i} tokens={} streamed_bytes={} moved={} gather_s={:.4} {}",
            g.generated_tokens,
            o.streamed_bytes,
            o.moved_neurons,
            o.host_gather_s,
            if g.generated_token_ids == c.generated_token_ids { "ok" } else { "FAIL" }
        ));
        assert_eq!(
            g.generated_token_ids, c.generated_token_ids,
            "request {i}: offloaded CUDA tokens differ from the offloaded CPU run"
        );
        assert!(o.resident_bytes <= budget, "request {i}: {o:?}");
        let co = c.offload.as_ref().expect("offload statistics");
        assert_eq!(o.moved_neurons, co.moved_neurons, "request {i}");
        assert_eq!(o.streamed_bytes, co.streamed_bytes, "request {i}");
    }
    let (a, b) = (
        gpu[0].offload.as_ref().unwrap(),
        gpu[1].offload.as_ref().unwrap(),
    );
    assert!(
        b.moved_neurons < a.moved_neurons,
        "second request moved {} of {}",
        b.moved_neurons,
        a.moved_neurons
    );
}
