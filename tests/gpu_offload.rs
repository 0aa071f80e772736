//! The offloading runtime on CUDA (issue 6, item 3; `run --device cuda --gpu-mem`): an
//! offloaded Sirius run with a budget below the model's size gives the tokens of the
//! unconstrained CUDA run and of the CPU's offloaded run, and streams over the copy engine.
//! Skips with a visible SKIPPED line without a GPU (fails under SIRIUS_REQUIRE_GPU=1).
#![cfg(feature = "cuda")]

mod common;

use sirius_offload::backend::CpuBackend;
use sirius_offload::engine::{generate_sirius, GenerationOutput, SiriusOptions};
use sirius_offload::model::Llama;
use sirius_offload::offload::placement::plan;
use sirius_offload::offload::runtime::{OffloadOptions, OffloadRuntime};
use sirius_offload::offload::sirius_model::{generate_sirius_offloaded, offload_plan_input};
use sirius_offload::sparsity::{Sparsity, SparsityMode};

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

/// A third of the way from the plan's minimum to everything resident (some sparse FFNs
/// overflow), checked to be below the checkpoint's weight bytes.
fn budget_below_the_model(t: &Tiny, s: SiriusOptions) -> u64 {
    let model = Llama::load(&t.path, CpuBackend::new(2)).unwrap();
    let (input, _) = offload_plan_input(
        &model,
        &PROMPT,
        &options(40),
        &s,
        &offload(1 << 40, s.period, None),
    )
    .unwrap();
    let p = plan(&input).unwrap();
    let (fit, minimum) = (p.resident_bytes, p.minimum_bytes);
    let budget = minimum + (fit - minimum) / 3;
    let weights = model.weight_bytes() as u64;
    assert!(
        budget < weights,
        "budget {budget} (minimum {minimum}, fit {fit}) is not below the weights' {weights}"
    );
    budget
}

fn offloaded<B: sirius_offload::offload::offload_backend::OffloadBackend>(
    t: &Tiny,
    backend: B,
    s: SiriusOptions,
    budget: u64,
    trace: Option<&std::path::Path>,
) -> GenerationOutput {
    let mut model = Llama::load(&t.path, backend).unwrap();
    generate_sirius_offloaded(
        &mut model,
        &t.tokenizer,
        &PROMPT,
        &options(40),
        s,
        offload(budget, s.period, None),
        trace,
        &mut |_| true,
    )
    .unwrap()
}

#[test]
fn offloaded_sirius_on_cuda_below_the_model_size_gives_the_unconstrained_tokens() {
    let Some(g) = gpu() else { return };
    let t = tiny();
    let mut g = Some(g);
    for (period, width) in [(4, 1), (5, 3)] {
        let s = sirius(period, width);
        let budget = budget_below_the_model(&t, s);
        // The unconstrained CUDA run: every weight on the GPU, Griffin + Sirius.
        let backend = g.take().unwrap_or_else(|| open_backend().unwrap());
        let model = Llama::load(&t.path, backend).unwrap();
        let sparsity = Sparsity::new(&model, SparsityMode::Griffin, KEEP, None).unwrap();
        let full = generate_sirius(
            &model,
            &sparsity,
            &t.tokenizer,
            &PROMPT,
            &options(40),
            s,
            &mut |_| true,
        )
        .unwrap();
        drop((sparsity, model));
        let cpu = offloaded(&t, CpuBackend::new(2), s, budget, None);
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace.json");
        let gpu = offloaded(
            &t,
            open_backend().unwrap().with_host_weights(),
            s,
            budget,
            Some(&trace),
        );
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
        assert_eq!(o.full_passes, verifications + 2, "{label}");
        // Same schedule as the CPU runtime: the same bytes cross the link. On a first request
        // the CPU stages every chosen neuron's bundle through the engine and CUDA uploads the
        // compact FFN gathered on the host: the same bytes either way.
        let c = cpu.offload.as_ref().unwrap();
        assert_eq!(o.streamed_bytes, c.streamed_bytes, "{label}");
        let trace: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
        let spans = trace["traceEvents"].as_array().unwrap().len();
        assert!(spans > 30, "{label}: {spans} trace events");
    }
}

#[test]
fn cuda_offloading_refuses_a_model_already_on_the_gpu_and_a_link_cap() {
    let Some(g) = gpu() else { return };
    let t = tiny();
    let s = sirius(4, 1);
    let budget = budget_below_the_model(&t, s);
    let mut model = Llama::load(&t.path, g).unwrap();
    let (input, opts) =
        offload_plan_input(&model, &PROMPT, &options(40), &s, &offload(budget, 4, None)).unwrap();
    let err = OffloadRuntime::new(&mut model, input, &opts)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("with_host_weights"), "{err}");
    let mut model = Llama::load(&t.path, open_backend().unwrap().with_host_weights()).unwrap();
    let capped = OffloadOptions {
        link_gbps: Some(8.0),
        ..offload(budget, 4, None)
    };
    let (input, opts) = offload_plan_input(&model, &PROMPT, &options(40), &s, &capped).unwrap();
    let err = OffloadRuntime::new(&mut model, input, &opts)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("link cap"), "{err}");
}

/// Two requests on one runtime of `backend`, prefilled in chunks of `chunk` tokens.
fn two_requests<B: sirius_offload::offload::offload_backend::OffloadBackend>(
    t: &Tiny,
    backend: B,
    s: SiriusOptions,
    budget: u64,
    chunk: usize,
    prompts: [&[u32]; 2],
) -> [GenerationOutput; 2] {
    use sirius_offload::offload::sirius_model::generate_on_runtime;
    let opts = sirius_offload::engine::GenerateOptions {
        prefill_chunk: chunk,
        ..options(40)
    };
    let mut model = Llama::load(&t.path, backend).unwrap();
    let (input, o) = offload_plan_input(
        &model,
        prompts[0],
        &opts,
        &s,
        &offload(budget, s.period, None),
    )
    .unwrap();
    let rt = OffloadRuntime::new(&mut model, input, &o).unwrap();
    let run = |rt, prompt| {
        generate_on_runtime(
            &model,
            rt,
            &t.tokenizer,
            prompt,
            &opts,
            s,
            None,
            &mut |_| true,
        )
        .unwrap()
    };
    let (first, rt) = run(rt, prompts[0]);
    let (second, _) = run(rt, prompts[1]);
    [first, second]
}

/// Prefill chunks of 48 rows (cuBLAS GemmEx on the staged views: batches above 16 rows)
/// and a second request on the same runtime (only new neurons move in; the old compact FFN
/// is freed before the new one is uploaded): the tokens of the CPU's offloaded runs.
#[test]
fn cuda_offload_with_wide_prefill_chunks_and_a_second_request() {
    let Some(g) = gpu() else { return };
    let t = tiny();
    let s = sirius(4, 1);
    let first: Vec<u32> = (0..48).map(|i| (i * 11 % 120) as u32 + 3).collect();
    let second: Vec<u32> = first.iter().map(|&x| (x * 7 + 5) % 120 + 3).collect();
    // As `budget_below_the_model`, for these prompts and chunks (larger activations).
    let wide = sirius_offload::engine::GenerateOptions {
        prefill_chunk: 48,
        ..options(40)
    };
    let cpu_model = Llama::load(&t.path, CpuBackend::new(2)).unwrap();
    let (input, _) = offload_plan_input(
        &cpu_model,
        &first,
        &wide,
        &s,
        &offload(1 << 40, s.period, None),
    )
    .unwrap();
    let p = plan(&input).unwrap();
    let budget = p.minimum_bytes + (p.resident_bytes - p.minimum_bytes) / 3;
    let prompts = [&first[..], &second[..]];
    let gpu = two_requests(&t, g.with_host_weights(), s, budget, 48, prompts);
    let cpu = two_requests(&t, CpuBackend::new(2), s, budget, 48, prompts);
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
