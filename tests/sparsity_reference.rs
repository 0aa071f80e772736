//! Griffin and CATS against the independent numpy reference (tools/reference/sparsity_ref.py)
//! on the tiny random models: Griffin's scores and selection, Griffin decode logits, CATS
//! top-k logits (batched and token by token), and keep = 1.0 equal to the dense model.

mod common;

use common::fixtures_dir;
use serde::Deserialize;
use sirius_offload::backend::{BundleLayout, CpuBackend};
use sirius_offload::model::Pass;
use sirius_offload::model::{Llama, Logits, Scratch};
use sirius_offload::sparsity::Dense;
use sirius_offload::sparsity::{
    CatsFfn, CatsRule, GriffinFfn, GriffinScores, NeuronBundles, NeuronCounter,
};

#[derive(Deserialize)]
struct Fixture {
    prompt_ids: Vec<u32>,
    continuation_ids: Vec<u32>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    keep: f32,
    k: usize,
    griffin_scores: Vec<Vec<f64>>,
    griffin_selection: Vec<Vec<u32>>,
    griffin_logits: Vec<Vec<f64>>,
    cats_logits: Vec<Vec<f64>>,
}

const MODELS: [&str; 4] = [
    "llama-tied-gqa-bf16",
    "llama-untied-f32",
    "qwen2-bias-f16",
    "mistral-headdim-bf16",
];

fn load(name: &str, threads: usize) -> (Llama<CpuBackend>, Fixture) {
    let dir = fixtures_dir().join("tiny").join(name);
    let text = std::fs::read_to_string(dir.join("sparsity.json")).unwrap();
    let mut model = Llama::load(&dir, CpuBackend::new(threads)).unwrap();
    // The float64 reference keeps K and V unrounded and these checks are at 1e-4: the f16
    // cache's rounding (~7e-4 of the logits, tests/forward.rs) is not what they test.
    model.kv_dtype = sirius_offload::tensor::KvDType::F32;
    (model, serde_json::from_str(&text).unwrap())
}

/// Max |a - b| relative to the largest |b| (at least 1).
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn griffin_scores_selection_and_logits_match_reference() {
    for (i, name) in MODELS.iter().enumerate() {
        let (model, fx) = load(name, 1 + i % 3);
        let bundles = NeuronBundles::build(
            &model.backend,
            BundleLayout::GateUpDown,
            &model.ffn_tensors().unwrap(),
        )
        .unwrap();
        for case in &fx.cases {
            let mut cache = model
                .new_cache(fx.prompt_ids.len() + fx.continuation_ids.len())
                .unwrap();
            let mut scratch = Scratch::new(&model, fx.prompt_ids.len()).unwrap();
            let mut scores = GriffinScores::new(&model.backend, model.ffn_dims()).unwrap();
            model
                .forward(
                    Pass::new(&fx.prompt_ids, Logits::None, &mut scores),
                    &mut cache,
                    &mut scratch,
                )
                .unwrap();
            let got = scores.scores(&model.backend).unwrap();
            for (l, (g, want)) in got.iter().zip(&case.griffin_scores).enumerate() {
                let e = rel_err(g, want);
                assert!(
                    e < 1e-4,
                    "{name} keep {}: layer {l} scores differ by {e}",
                    case.keep
                );
            }
            let selection = scores.select(&model.backend, case.keep, 1).unwrap();
            assert_eq!(
                selection.layers, case.griffin_selection,
                "{name} keep {}: selection",
                case.keep
            );
            assert!(selection.layers.iter().all(|l| l.len() == case.k));
            let mut griffin = GriffinFfn::gather(&model.backend, &bundles, selection).unwrap();
            for (t, (&tok, want)) in fx
                .continuation_ids
                .iter()
                .zip(&case.griffin_logits)
                .enumerate()
            {
                let got = model
                    .forward(
                        Pass::new(&[tok], Logits::Last, &mut griffin),
                        &mut cache,
                        &mut scratch,
                    )
                    .unwrap();
                let e = rel_err(&got, want);
                assert!(
                    e < 1e-4,
                    "{name} keep {}: Griffin logits of continuation token {t} differ by {e}",
                    case.keep
                );
            }
        }
    }
}

#[test]
fn griffin_keep_one_gives_dense_logits() {
    let (model, fx) = load("llama-tied-gqa-bf16", 2);
    let bundles = NeuronBundles::build(
        &model.backend,
        BundleLayout::GateUpDown,
        &model.ffn_tensors().unwrap(),
    )
    .unwrap();
    let all: Vec<u32> = fx
        .prompt_ids
        .iter()
        .chain(&fx.continuation_ids)
        .copied()
        .collect();
    let mut cache = model.new_cache(all.len()).unwrap();
    let mut scratch = Scratch::new(&model, all.len()).unwrap();
    let dense = model
        .forward(
            Pass::new(&all, Logits::All, &mut Dense),
            &mut cache,
            &mut scratch,
        )
        .unwrap();
    let vocab = model.config.vocab_size;
    let n_prompt = fx.prompt_ids.len();
    cache.truncate(0);
    let mut scores = GriffinScores::new(&model.backend, model.ffn_dims()).unwrap();
    model
        .forward(
            Pass::new(&fx.prompt_ids, Logits::None, &mut scores),
            &mut cache,
            &mut scratch,
        )
        .unwrap();
    let mut griffin = GriffinFfn::gather(
        &model.backend,
        &bundles,
        scores.select(&model.backend, 1.0, 1).unwrap(),
    )
    .unwrap();
    assert!(griffin
        .kept()
        .iter()
        .all(|&k| k == model.config.intermediate_size));
    for (t, &tok) in fx.continuation_ids.iter().enumerate() {
        let got = model
            .forward(
                Pass::new(&[tok], Logits::Last, &mut griffin),
                &mut cache,
                &mut scratch,
            )
            .unwrap();
        let want: Vec<f64> = dense[(n_prompt + t) * vocab..(n_prompt + t + 1) * vocab]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let e = rel_err(&got, &want);
        assert!(
            e < 1e-5,
            "token {t}: Griffin keep 1.0 differs from dense by {e}"
        );
    }
}

#[test]
fn cats_top_k_logits_match_reference_batched_and_one_by_one() {
    for (i, name) in MODELS.iter().enumerate() {
        let (model, fx) = load(name, 1 + (i + 1) % 3);
        // CATS runs on up|down bundles; the gate|up|down ones must give the same.
        for layout in [BundleLayout::UpDown, BundleLayout::GateUpDown] {
            let bundles =
                NeuronBundles::build(&model.backend, layout, &model.ffn_tensors().unwrap())
                    .unwrap();
            let ids: Vec<u32> = fx
                .prompt_ids
                .iter()
                .chain(&fx.continuation_ids)
                .copied()
                .collect();
            let vocab = model.config.vocab_size;
            for case in &fx.cases {
                let rule = CatsRule::TopK(case.k);
                // Batched: every token at once.
                let mut cache = model.new_cache(ids.len()).unwrap();
                let mut scratch = Scratch::new(&model, ids.len()).unwrap();
                let mut ffn = CatsFfn {
                    bundles: &bundles,
                    rule: &rule,
                    counter: NeuronCounter::new(model.config.num_layers),
                    shared: false,
                };
                let batched = model
                    .forward(
                        Pass::new(&ids, Logits::All, &mut ffn),
                        &mut cache,
                        &mut scratch,
                    )
                    .unwrap();
                for (t, want) in case.cats_logits.iter().enumerate() {
                    let e = rel_err(&batched[t * vocab..(t + 1) * vocab], want);
                    assert!(
                        e < 1e-4,
                        "{name} keep {}: batched CATS logits of token {t} differ by {e}",
                        case.keep
                    );
                }
                // One by one, as decoding runs it.
                cache.truncate(0);
                for (t, (&tok, want)) in ids.iter().zip(&case.cats_logits).enumerate() {
                    let got = model
                        .forward(
                            Pass::new(&[tok], Logits::Last, &mut ffn),
                            &mut cache,
                            &mut scratch,
                        )
                        .unwrap();
                    let e = rel_err(&got, want);
                    assert!(
                        e < 1e-4,
                        "{name} keep {}: CATS logits of token {t} differ by {e}",
                        case.keep
                    );
                }
                // Top-k keeps exactly k per token and layer.
                let fractions = ffn.counter.kept_fraction(model.config.intermediate_size);
                let want = case.k as f64 / model.config.intermediate_size as f64;
                assert!(
                    fractions.iter().all(|f| (f - want).abs() < 1e-12),
                    "{name}: kept fractions {fractions:?}, want {want}"
                );
            }
        }
    }
}
