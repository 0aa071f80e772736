//! Offloaded Sirius runs (`run --resident-mem`) produce the tokens of unconstrained runs,
//! whatever the budget makes overflow and however the copy engine is delayed; budgets below
//! the minimum are clear errors. SmolLM2 (when fetched) checks the same through the CLI.

mod common;

use std::sync::Arc;
use std::time::Duration;

use sirius_offload::backend::CpuBackend;
use sirius_offload::engine::{Decoding, Engine, EngineConfig, GenerationOutput};
use sirius_offload::model::Llama;
use sirius_offload::offload::placement::Plan;
use sirius_offload::offload::prefill::prefill_passes;
use sirius_offload::offload::runtime::{OffloadConfig, OffloadRuntime};
use sirius_offload::sirius::SiriusConfig;
use sirius_offload::sparsity::{SparsityConfig, SparsityMode};
use sirius_offload::Error;

use common::offload::{offload, options, sirius, tiny_model, Tiny, KEEP, PROMPT};

fn spec() -> common::TinySpec {
    common::TinySpec {
        hidden: 64,
        layers: 6,
        heads: 4,
        kv_heads: 2,
        ffn: 160,
        vocab: 96,
        max_pos: 256,
        ..Default::default()
    }
}

fn tiny() -> Tiny {
    tiny_model(&spec(), 11)
}

fn load(t: &Tiny) -> Llama<CpuBackend> {
    Llama::load(&t.path, CpuBackend::new(2)).unwrap()
}

/// An engine on the tiny model with Griffin at `keep`, offloaded as `o` says.
fn engine(
    t: &Tiny,
    keep: f32,
    o: Option<OffloadConfig>,
) -> sirius_offload::Result<Engine<CpuBackend>> {
    let config = EngineConfig {
        sparsity: SparsityConfig::new(SparsityMode::Griffin, keep),
        offload: o,
        ..EngineConfig::dense()
    };
    Engine::load(&t.path, CpuBackend::new(2), &config)
}

/// 40 tokens of Sirius on `e`.
fn sirius_on(
    e: &mut Engine<CpuBackend>,
    prompt: &[u32],
    s: SiriusConfig,
) -> sirius_offload::Result<GenerationOutput> {
    e.generate(prompt, &options(40), Decoding::Sirius(s), &mut |_| true)
}

/// The plan's resident bytes when everything fits, and its minimum, for this request.
fn budgets(t: &Tiny, s: SiriusConfig) -> (u64, u64) {
    let p = plan_at(t, s, 1 << 40);
    (p.resident_bytes, p.minimum_bytes)
}

fn plan_at(t: &Tiny, s: SiriusConfig, budget: u64) -> Plan {
    let e = engine(t, KEEP, Some(offload(budget, None))).unwrap();
    e.offload_plan(&PROMPT, &options(40), &s).unwrap()
}

fn unconstrained(t: &Tiny, prompt: &[u32], s: SiriusConfig) -> GenerationOutput {
    sirius_on(&mut engine(t, KEEP, None).unwrap(), prompt, s).unwrap()
}

/// The prefill passes `out` took: its prompt in its chunks.
fn prompt_passes(out: &GenerationOutput) -> u64 {
    prefill_passes(out.prompt_tokens, out.prefill_chunk) as u64
}

/// One request of 40 tokens on `e` (offloaded), whose tokens must equal the unconstrained
/// run's.
fn request_on(
    e: &mut Engine<CpuBackend>,
    t: &Tiny,
    prompt: &[u32],
    s: SiriusConfig,
) -> GenerationOutput {
    let out = sirius_on(e, prompt, s).unwrap();
    assert_eq!(
        out.generated_token_ids,
        unconstrained(t, prompt, s).generated_token_ids
    );
    out
}

fn offloaded(
    t: &Tiny,
    prompt: &[u32],
    s: SiriusConfig,
    o: OffloadConfig,
) -> sirius_offload::Result<GenerationOutput> {
    sirius_on(&mut engine(t, KEEP, Some(o))?, prompt, s)
}

/// A runtime planned for this test's request under `budget`, on a model of its own.
fn runtime(
    t: &Tiny,
    s: SiriusConfig,
    budget: u64,
) -> (Llama<CpuBackend>, OffloadRuntime<CpuBackend>) {
    let o = offload(budget, None);
    let e = engine(t, KEEP, Some(o.clone())).unwrap();
    let shape = e.offload_request_shape(&PROMPT, &options(40), &s).unwrap();
    let mut model = load(t);
    let rt = OffloadRuntime::new(&mut model, &o, shape).unwrap();
    (model, rt)
}

#[test]
fn offloaded_tokens_equal_unconstrained_tokens_at_every_budget() {
    let t = tiny();
    for (period, width) in [(4, 1), (5, 3)] {
        let s = sirius(period, width);
        let reference = unconstrained(&t, &PROMPT, s);
        assert!(reference.generated_tokens > 10);
        let (fit, minimum) = budgets(&t, s);
        // Everything resident, half the layers' sparse FFNs overflowing, attention too, and
        // the bare minimum (every layer streams attention and FFN every pass).
        let mut seen_overflow = 0;
        for budget in [
            fit + (1 << 20),
            (fit + minimum) / 2,
            minimum + (minimum / 20),
            minimum,
        ] {
            let out = offloaded(&t, &PROMPT, s, offload(budget, None))
                .unwrap_or_else(|e| panic!("budget {budget} (fit {fit}, minimum {minimum}): {e}"));
            assert_eq!(
                out.generated_token_ids, reference.generated_token_ids,
                "budget {budget}, K={period} W={width}"
            );
            let o = out.offload.as_ref().expect("offload statistics");
            // The arena's peak is exactly what the plan said would be resident.
            assert_eq!(
                o.resident_bytes,
                plan_at(&t, s, budget).resident_bytes,
                "budget {budget}"
            );
            assert!(
                o.resident_bytes <= budget,
                "{} > {budget}",
                o.resident_bytes
            );
            assert!(o.streamed_bytes > 0);
            // The prefill's chunks (16 tokens, or the whole prompt where the spare budget
            // pays for it), then one full pass per verification.
            let verifications = out.sirius.as_ref().unwrap().verifications as u64;
            assert_eq!(o.full_passes, verifications + prompt_passes(&out));
            if budget > fit {
                assert_eq!(out.prefill_chunk, PROMPT.len(), "budget {budget}: one pass");
            }
            seen_overflow += usize::from(o.overflow_ffn_layers > 0);
        }
        assert!(seen_overflow >= 2, "the small budgets must overflow");
    }
}

#[test]
fn random_copy_delays_never_change_the_output() {
    let t = tiny();
    let s = sirius(4, 1);
    let reference = unconstrained(&t, &PROMPT, s);
    let (fit, minimum) = budgets(&t, s);
    for seed in 1..=3u64 {
        let delay: sirius_offload::transfer::DelayFn = Arc::new(move |job: u64| {
            // A cheap hash of (seed, job): 0-2 ms, different per job and per seed.
            let x = (job.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9))
                >> 40;
            Duration::from_micros(x % 2000)
        });
        let out = offloaded(&t, &PROMPT, s, offload((fit + minimum) / 2, Some(delay))).unwrap();
        assert_eq!(
            out.generated_token_ids, reference.generated_token_ids,
            "seed {seed}"
        );
    }
}

#[test]
fn a_budget_below_the_minimum_names_the_minimum() {
    let t = tiny();
    let s = sirius(4, 1);
    // The minimum of the plan with every byte to spare (its prefill in one chunk): at least
    // the request's own, which prefills in the shortest chunk when nothing is to spare.
    let (_, minimum) = budgets(&t, s);
    let Err(err) = offloaded(&t, &PROMPT, s, offload(minimum / 2, None)) else {
        panic!("a budget below the minimum must fail");
    };
    let msg = err.to_string();
    assert!(msg.contains("minimum"), "{msg}");
    let Error::BudgetBelowMinimum { minimum: named, .. } = err else {
        panic!("not a minimum-budget error: {msg}");
    };
    assert!(named <= minimum && named > minimum / 2, "{msg}");
    // The minimum it names is enough.
    let out = offloaded(&t, &PROMPT, s, offload(named, None)).unwrap();
    assert_eq!(
        out.generated_token_ids,
        unconstrained(&t, &PROMPT, s).generated_token_ids
    );
}

#[test]
fn a_new_request_copies_in_only_the_neurons_not_yet_resident() {
    use sirius_offload::sparsity::GriffinSelection;
    let t = tiny();
    let s = sirius(4, 1);
    let (fit, minimum) = budgets(&t, s);
    let (model, mut rt) = runtime(&t, s, (fit + minimum) / 2);
    let resident: Vec<bool> = rt
        .plan
        .layers
        .iter()
        .map(|l| l.sparse_ffn_resident)
        .collect();
    assert!(resident.iter().any(|&r| r) && resident.iter().any(|&r| !r));
    let f = model.config.intermediate_size as u32;
    let first: Vec<Vec<u32>> = (0..6)
        .map(|l| (0..f).filter(|i| (i + l) % 2 == 0).collect())
        .collect();
    // The second request keeps every third neuron of the first and takes new ones.
    let second: Vec<Vec<u32>> = (0..6)
        .map(|l| {
            (0..f)
                .filter(|i| (i + l) % 2 == 0 && i % 3 == 0 || (i + l) % 2 == 1 && i % 3 != 0)
                .collect()
        })
        .collect();
    let moved = |a: &[Vec<u32>], b: &[Vec<u32>]| -> u64 {
        (0..6)
            .filter(|&l| resident[l])
            .map(|l| b[l].iter().filter(|i| !a[l].contains(i)).count() as u64)
            .sum()
    };
    let backend = &model.backend;
    rt.choose_neurons(
        backend,
        GriffinSelection {
            layers: first.clone(),
        },
    )
    .unwrap();
    assert_eq!(
        rt.moved_neurons(),
        moved(&[vec![], vec![], vec![], vec![], vec![], vec![]], &first)
    );
    let before = rt.moved_neurons();
    let g = rt
        .choose_neurons(
            backend,
            GriffinSelection {
                layers: second.clone(),
            },
        )
        .unwrap();
    assert_eq!(rt.moved_neurons() - before, moved(&first, &second));
    assert!(
        rt.moved_neurons() - before
            < moved(&[vec![], vec![], vec![], vec![], vec![], vec![]], &second)
    );
    // The reassembled resident FFN is byte for byte a fresh gather of the new set.
    let fresh = model
        .sparsity(&SparsityConfig::new(SparsityMode::Griffin, KEEP))
        .unwrap();
    let bundles = fresh.bundles().unwrap();
    for l in 0..6 {
        match &g.layers[l] {
            Some(layer) => {
                let [gate, up, down] = backend_gather(&model, bundles, l, &second[l]);
                assert_eq!(layer.ffn.gate.bytes(), gate.bytes(), "layer {l} gate");
                assert_eq!(layer.ffn.up.bytes(), up.bytes(), "layer {l} up");
                assert_eq!(layer.ffn.down.bytes(), down.bytes(), "layer {l} down");
            }
            None => assert!(!resident[l]),
        }
    }
}

fn backend_gather(
    model: &Llama<CpuBackend>,
    bundles: &sirius_offload::sparsity::NeuronBundles<CpuBackend>,
    layer: usize,
    ids: &[u32],
) -> [sirius_offload::backend::CpuMatrix; 3] {
    use sirius_offload::backend::SparseOps;
    model
        .backend
        .gather_ffn(&bundles.layers[layer].matrix, ids)
        .unwrap()
}

#[test]
fn a_second_request_on_the_same_runtime_reuses_resident_neurons() {
    use sirius_offload::engine::llama_sirius::LlamaSirius;
    let t = tiny();
    let s = sirius(4, 1);
    let (fit, minimum) = budgets(&t, s);
    let mut e = engine(&t, KEEP, Some(offload((fit + minimum) / 2, None))).unwrap();
    let first = request_on(&mut e, &t, &PROMPT, s);
    // Same length, different tokens: the request fits the runtime's plan.
    let second_prompt: Vec<u32> = PROMPT.iter().map(|&x| (x * 7 + 3) % 96).collect();
    let second = request_on(&mut e, &t, &second_prompt, s);
    let (a, b) = (first.offload.unwrap(), second.offload.as_ref().unwrap());
    assert!(a.moved_neurons > 0);
    assert!(
        b.moved_neurons < a.moved_neurons,
        "second request moved {} of {}",
        b.moved_neurons,
        a.moved_neurons
    );
    // Statistics are per request.
    let verifications = second.sirius.as_ref().unwrap().verifications as u64;
    assert_eq!(b.full_passes, verifications + prompt_passes(&second));
    // A request longer than a runtime was planned for is refused by it, not run over budget;
    // the engine plans a new runtime for it instead.
    let long: Vec<u32> = (0..60).map(|i| (i * 5 % 90) as u32 + 3).collect();
    let long_shape = e.offload_request_shape(&long, &options(40), &s).unwrap();
    let (model, mut rt) = runtime(&t, s, fit);
    let err = LlamaSirius::offloaded(&model, &mut rt, &long_shape, &s)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("plan a new runtime"), "{err}");
    let before = e.offload_runtime().unwrap().plan.context;
    request_on(&mut e, &t, &long, s);
    assert!(e.offload_runtime().unwrap().plan.context > before);
}

#[test]
fn keep_one_resident_streams_nothing_at_verification() {
    let t = tiny();
    let s = sirius(4, 1);
    let reference = sirius_on(&mut engine(&t, 1.0, None).unwrap(), &PROMPT, s).unwrap();
    let mut e = engine(&t, 1.0, Some(offload(1 << 30, None))).unwrap();
    let out = sirius_on(&mut e, &PROMPT, s).unwrap();
    assert_eq!(out.generated_token_ids, reference.generated_token_ids);
    // The spare budget takes the whole prompt in one pass.
    assert_eq!(out.prefill_chunk, PROMPT.len());
    let stats = out.offload.unwrap();
    // Only the prefill streamed (whole FFN layers), then the chosen neurons came in;
    // verification found every neuron resident.
    let per_prefill = 6 * 3 * 64 * 160 * 2;
    assert_eq!(
        stats.streamed_bytes,
        per_prefill as u64 + stats.moved_neurons * 3 * 64 * 2
    );
}

#[test]
fn a_budget_that_holds_every_layer_whole_streams_only_the_prompt() {
    let t = tiny();
    let s = sirius(4, 1);
    let (fit, _) = budgets(&t, s);
    let mut e = engine(&t, KEEP, Some(offload(fit, None))).unwrap();
    let first = request_on(&mut e, &t, &PROMPT, s);
    let plan = &e.offload_runtime().unwrap().plan;
    assert!(plan.layers.iter().all(|l| l.complement_resident));
    let passes = prompt_passes(&first);
    let a = first.offload.unwrap();
    // Each prefill pass streams whole FFN layers; after that nothing crosses the link but
    // the first copy-in (every neuron of every layer, through the copy engine or not).
    let per_prefill = 6 * 3 * 64 * 160 * 2 * passes;
    assert_eq!(a.moved_neurons, 6 * 160);
    assert!(a.streamed_bytes <= per_prefill + a.moved_neurons * 3 * 64 * 2);
    // A second request finds every neuron resident: nothing moves.
    let second_prompt: Vec<u32> = PROMPT.iter().map(|&x| (x * 7 + 3) % 96).collect();
    let second = request_on(&mut e, &t, &second_prompt, s);
    let b = second.offload.unwrap();
    assert_eq!(b.moved_neurons, 0);
    assert_eq!(b.streamed_bytes, per_prefill);
}

/// Qwen2's q/k/v biases stay resident beside the norms (the arena books them there, as the
/// plan does): offloaded tokens equal the unconstrained ones at a budget that streams
/// attention too, and the arena's peak equals the plan's resident bytes.
#[test]
fn a_model_with_attention_biases_offloads_like_it_runs_unconstrained() {
    let t = tiny_model(
        &common::TinySpec {
            arch: "Qwen2ForCausalLM",
            qkv_bias: true,
            ..spec()
        },
        12,
    );
    let s = sirius(4, 1);
    let reference = unconstrained(&t, &PROMPT, s);
    let (fit, minimum) = budgets(&t, s);
    for budget in [fit, minimum] {
        let out = offloaded(&t, &PROMPT, s, offload(budget, None)).unwrap();
        assert_eq!(
            out.generated_token_ids, reference.generated_token_ids,
            "budget {budget}"
        );
        let o = out.offload.expect("offload statistics");
        assert_eq!(
            o.resident_bytes,
            plan_at(&t, s, budget).resident_bytes,
            "budget {budget} (fit {fit}, minimum {minimum})"
        );
        if budget == minimum {
            assert!(
                o.overflow_attention_layers > 0,
                "the minimum streams attention"
            );
        }
    }
    // The biases are in the plan: 6 layers x (q 64 + k 32 + v 32) f32 on top of the norms.
    let plan = plan_at(&t, s, fit);
    assert_eq!(
        plan.sizes.norm_bytes,
        ((2 * 6 + 1) * 64 + 6 * 128) as u64 * 4
    );
}

/// The dense model offloaded (no Sirius, no sparsity): every token is one full pass over the
/// resident part and the streamed rest, the tokens are the unconstrained dense run's, nothing
/// drafts, and the arena's peak equals the plan's resident bytes at each budget.
#[test]
fn the_dense_model_offloaded_gives_the_dense_tokens() {
    let t = tiny();
    let dense_engine = |o: Option<OffloadConfig>| {
        let config = EngineConfig {
            offload: o,
            ..EngineConfig::dense()
        };
        Engine::load(&t.path, CpuBackend::new(2), &config).unwrap()
    };
    let generate = |e: &mut Engine<CpuBackend>| {
        e.generate(&PROMPT, &options(40), Decoding::Dense, &mut |_| true)
            .unwrap()
    };
    let reference = generate(&mut dense_engine(None));
    let window = sirius(1, 1);
    let planned = |budget| {
        let e = dense_engine(Some(offload(budget, None)));
        e.offload_plan(&PROMPT, &options(40), &window).unwrap()
    };
    let all = planned(1 << 40);
    for budget in [
        all.resident_bytes,
        (all.resident_bytes + all.minimum_bytes) / 2,
        all.minimum_bytes,
    ] {
        let out = generate(&mut dense_engine(Some(offload(budget, None))));
        assert_eq!(
            out.generated_token_ids, reference.generated_token_ids,
            "budget {budget}"
        );
        assert!(out.sirius.is_none(), "reported as the dense model");
        let o = out.offload.as_ref().expect("offload statistics");
        assert_eq!(o.draft_passes, 0);
        // The prefill's passes, then one full pass per generated token after the first.
        let passes = prompt_passes(&out);
        assert_eq!(
            o.full_passes,
            passes + out.generated_tokens as u64 - 1,
            "budget {budget}"
        );
        assert_eq!(
            o.resident_bytes,
            planned(budget).resident_bytes,
            "budget {budget}"
        );
        if budget == all.minimum_bytes {
            // Whole FFN layers stream on every token, not only during the prompt.
            assert!(o.overflow_ffn_layers > 0, "budget {budget}");
            let prompt_only = planned(budget).streamed_bytes_per_prefill * passes;
            assert!(o.streamed_bytes > prompt_only, "budget {budget}");
        }
    }
    // Sampling is refused with what to change.
    let mut e = dense_engine(Some(offload(all.resident_bytes, None)));
    let mut sampled = options(8);
    sampled.sampling.temperature = 0.8;
    let err = e
        .generate(&PROMPT, &sampled, Decoding::Dense, &mut |_| true)
        .unwrap_err();
    assert!(err.to_string().contains("--temperature 0"), "{err}");
}

/// An adaptive request starts from the planner's window costs where the planner models the
/// run (a link cap on the CPU): one per length up to the maximum, growing with the length,
/// each (K - 1) drafts and a verification; without a cap (memcpy, not modelled) none.
#[test]
fn the_runtime_predicts_a_window_per_length_where_it_models_the_link() {
    let t = tiny();
    let s = sirius(8, 1);
    let (fit, _) = budgets(&t, s);
    let e = engine(&t, KEEP, Some(offload(fit, None))).unwrap();
    let shape = e.offload_request_shape(&PROMPT, &options(40), &s).unwrap();
    let capped = OffloadConfig {
        link_gbps: Some(1.0),
        ..offload(fit, None)
    };
    let mut model = load(&t);
    let rt = OffloadRuntime::new(&mut model, &capped, shape).unwrap();
    let windows = rt.predicted_windows(8);
    assert_eq!(
        windows.iter().map(|w| w.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert!(windows.windows(2).all(|w| w[1].1 > w[0].1), "{windows:?}");
    assert!(windows.iter().all(|w| w.1.is_finite() && w.1 > 0.0));
    // Asked for more than the runtime was planned for: up to its period only.
    assert_eq!(rt.predicted_windows(20).len(), 8);
    rt.restore_model(&mut model);
    let rt = OffloadRuntime::new(&mut model, &offload(fit, None), shape).unwrap();
    assert!(
        rt.predicted_windows(8).is_empty(),
        "uncapped CPU copies are not modelled"
    );
}

#[test]
fn the_runtime_pins_the_ranges_plan_counts() {
    use sirius_offload::offload::placement::pinned_host_bytes;
    use sirius_offload::sparsity::GriffinSelection;
    let t = tiny();
    let s = sirius(4, 1);
    let (fit, minimum) = budgets(&t, s);
    for budget in [minimum, (fit + minimum) / 2, fit] {
        let (model, mut rt) = runtime(&t, s, budget);
        let sizes = rt.plan.sizes.clone();
        let kept = sizes.kept_neurons as u32;
        let f = model.config.intermediate_size as u32;
        let layers = (0..6)
            .map(|l| {
                (0..f)
                    .filter(|i| (i + l) % 2 == 0)
                    .take(kept as usize)
                    .collect()
            })
            .collect();
        rt.choose_neurons(&model.backend, GriffinSelection { layers })
            .unwrap();
        let bytes = |r: Vec<sirius_offload::transfer::HostSlice>| -> u64 {
            r.iter().map(|s| s.len() as u64).sum()
        };
        let want = pinned_host_bytes(&sizes, &rt.plan.layers);
        assert_eq!(bytes(rt.pinned_host_ranges()), want, "budget {budget}");
        // Less than everything the host holds, and more than nothing, except where nothing
        // streams in decode steps.
        let everything = sizes.sum(0..6, |u| u.attention + 2 * u.ffn);
        assert!(want < everything, "budget {budget}: {want}");
        let overflow = rt.plan.layers.iter().any(|l| !l.sparse_ffn_resident);
        assert_eq!(bytes(rt.planned_host_ranges()) < want, overflow);
    }
}
