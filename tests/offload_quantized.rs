//! Offloading quantized weights (`run --resident-mem` with `--weights q4_0|q8_0` or a GGUF):
//! every budget gives the tokens of the unconstrained quantized run, the arena's peak is the
//! plan's resident bytes, and the plan counts the formats' true bytes. SmolLM2's Q4_1 GGUF
//! (when fetched) checks the same through the CLI.

mod common;

use sirius_offload::backend::CpuBackend;
use sirius_offload::engine::{
    Decoding, Engine, EngineConfig, GenerationOutput, PrefillChunk, RequestOptions,
};
use sirius_offload::model::WeightsChoice;
use sirius_offload::offload::placement::Plan;
use sirius_offload::offload::runtime::OffloadConfig;
use sirius_offload::sirius::SiriusConfig;
use sirius_offload::sparsity::{SparsityConfig, SparsityMode};
use sirius_offload::tensor::DType;

use common::offload::{offload, options, sirius, tiny_model, Tiny, KEEP, PROMPT};

/// hidden 64 and FFN 160: whole blocks of 32 in every matrix.
fn tiny() -> Tiny {
    let spec = common::TinySpec {
        hidden: 64,
        layers: 6,
        heads: 4,
        kv_heads: 2,
        ffn: 160,
        vocab: 96,
        max_pos: 256,
        ..Default::default()
    };
    tiny_model(&spec, 23)
}

fn engine(t: &Tiny, weights: DType, o: Option<OffloadConfig>) -> Engine<CpuBackend> {
    engine_at(t, KEEP, weights, o)
}

fn engine_at(t: &Tiny, keep: f32, weights: DType, o: Option<OffloadConfig>) -> Engine<CpuBackend> {
    let config = EngineConfig {
        sparsity: SparsityConfig::new(SparsityMode::Griffin, keep),
        offload: o,
        weights: WeightsChoice::Convert(weights),
        ..EngineConfig::dense()
    };
    Engine::load(&t.path, CpuBackend::new(2), &config).unwrap()
}

/// 40 tokens, the prompt prefilled in one pass, offloaded or not: quantized matmuls round
/// a pass's activations by its rows (8-bit for short ones), so the tiny model's near-ties
/// would follow the chunking, which the budget sets for an offloaded run.
fn opts() -> RequestOptions {
    RequestOptions {
        prefill_chunk: PrefillChunk::Grow(PROMPT.len()),
        ..options(40)
    }
}

fn generate(e: &mut Engine<CpuBackend>, prompt: &[u32], s: SiriusConfig) -> GenerationOutput {
    e.generate(prompt, &opts(), Decoding::Sirius(s), &mut |_| true)
        .unwrap()
}

fn plan_at(t: &Tiny, weights: DType, s: SiriusConfig, budget: u64) -> Plan {
    let e = engine(t, weights, Some(offload(budget, None)));
    e.offload_plan(&PROMPT, &opts(), &s).unwrap()
}

#[test]
fn quantized_offloaded_tokens_equal_unconstrained_tokens_at_every_budget() {
    let t = tiny();
    for weights in [DType::Q4_0, DType::Q8_0] {
        for (period, width) in [(4, 1), (5, 3)] {
            let s = sirius(period, width);
            let reference = generate(&mut engine(&t, weights, None), &PROMPT, s);
            assert!(reference.generated_tokens > 10);
            let all = plan_at(&t, weights, s, 1 << 40);
            let (fit, minimum) = (all.resident_bytes, all.minimum_bytes);
            let mut overflowed = 0;
            for budget in [fit, (fit + minimum) / 2, minimum + minimum / 20, minimum] {
                let what = format!("{weights} K={period} W={width} budget {budget}");
                let mut e = engine(&t, weights, Some(offload(budget, None)));
                let out = generate(&mut e, &PROMPT, s);
                assert_eq!(
                    out.generated_token_ids, reference.generated_token_ids,
                    "{what}"
                );
                let o = out.offload.expect("offload statistics");
                let plan = plan_at(&t, weights, s, budget);
                assert_eq!(o.resident_bytes, plan.resident_bytes, "{what}");
                assert!(o.resident_bytes <= budget, "{what}");
                assert!(o.streamed_bytes > 0, "{what}");
                overflowed += usize::from(o.overflow_ffn_layers > 0);
                // A second request on the same runtime picks other neurons: still exact.
                let other: Vec<u32> = PROMPT.iter().map(|&x| (x * 7 + 3) % 96).collect();
                let again = generate(&mut e, &other, s);
                let alone = generate(&mut engine(&t, weights, None), &other, s);
                assert_eq!(
                    again.generated_token_ids, alone.generated_token_ids,
                    "{what}, second request"
                );
            }
            assert!(
                overflowed >= 2,
                "{weights}: the small budgets must overflow"
            );
        }
    }
}

/// Keeps that round up to every neuron (whole blocks of 32 of 160): the compact down matrix is
/// re-encoded, so verification must still use the stored one, streamed or held whole.
#[test]
fn keeping_every_neuron_still_verifies_with_the_stored_down_matrix() {
    let t = tiny();
    let s = sirius(4, 1);
    for keep in [1.0, 0.9] {
        let reference = generate(&mut engine_at(&t, keep, DType::Q4_0, None), &PROMPT, s);
        let planned = |budget| {
            let e = engine_at(&t, keep, DType::Q4_0, Some(offload(budget, None)));
            e.offload_plan(&PROMPT, &opts(), &s).unwrap()
        };
        let all = planned(1 << 40);
        assert_eq!(all.sizes.kept_neurons, 160, "keep {keep}");
        for budget in [all.resident_bytes, all.minimum_bytes] {
            let mut e = engine_at(&t, keep, DType::Q4_0, Some(offload(budget, None)));
            let out = generate(&mut e, &PROMPT, s);
            assert_eq!(
                out.generated_token_ids, reference.generated_token_ids,
                "keep {keep}, budget {budget}"
            );
            let o = out.offload.unwrap();
            assert_eq!(o.resident_bytes, planned(budget).resident_bytes);
        }
    }
}

#[test]
fn the_plan_counts_quantized_bytes_and_whole_blocks_of_kept_neurons() {
    let t = tiny();
    let s = sirius(4, 1);
    let (h, f, layers) = (64u64, 160u64, 6u64);
    for (weights, block_bytes) in [(DType::Q4_0, 18u64), (DType::Q8_0, 34)] {
        let sizes = plan_at(&t, weights, s, 1 << 40).sizes;
        // keep 0.5 of 160 = 80, rounded up to whole blocks of the q8_0 compact down: 96.
        assert_eq!(sizes.kept_neurons, 96, "{weights}");
        let row = h / 32 * block_bytes;
        let kept = 96;
        assert_eq!(
            sizes.sparse_ffn_bytes,
            2 * kept * row + h * (kept / 32 * 34),
            "{weights}: gate and up rows as stored, down [h, k] in q8_0"
        );
        assert_eq!(
            sizes.complement_bytes,
            2 * (f - kept) * row + h * (f / 32 * block_bytes),
            "{weights}: the rest's gate and up rows plus the whole down matrix"
        );
        assert_eq!(sizes.ffn_bytes, 3 * f * row);
        assert_eq!(sizes.attention_bytes, (64 + 32 + 32 + 64) * row);
        assert!(sizes.quantized);
        let _ = layers;
    }
}

#[test]
fn smollm2_q4_1_gguf_offloaded_gives_the_unconstrained_tokens() {
    let Some(gguf) = common::smollm2_gguf("offloaded SmolLM2 Q4_1 GGUF") else {
        return;
    };
    let gguf = gguf.to_string_lossy();
    let tmp = tempfile::tempdir().unwrap();
    let prompts = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers and explain why they are prime.",
        "How do I reverse a list in Python?",
    ];
    for (i, prompt) in prompts.iter().enumerate() {
        let run = |extra: &[&str], name: &str| -> serde_json::Value {
            let stats = tmp.path().join(format!("{i}-{name}.json"));
            let mut args = vec![
                "run",
                "-m",
                &gguf,
                "--chat",
                "--prompt",
                prompt,
                "--max-tokens",
                "48",
                "--sirius",
                "--period",
                "16",
                "--sparsity",
                "griffin",
                "--temperature",
                "0",
                "--stats-json",
                stats.to_str().unwrap(),
            ];
            args.extend_from_slice(extra);
            let out = common::run_bin(&args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap()
        };
        let plain = run(&[], "plain");
        let off = run(&["--resident-mem", "60M"], "offloaded");
        assert_eq!(
            off["generated_token_ids"], plain["generated_token_ids"],
            "prompt {i}: offloaded tokens differ"
        );
        assert!(off["resident_bytes"].as_u64().unwrap() <= 60 << 20);
        assert!(off["overflow_ffn_layers"].as_u64().unwrap() > 0);
    }
}

/// A GGUF whose layers mix block formats (`tests/fixtures/tiny-mixed.gguf`, written by
/// `tools/reference/make_mixed_gguf.py`: Q4_0, with the v and down matrices of even layers and
/// layer 3's gate in Q8_0, as llama.cpp's *_K_M files widen some layers): the plan sizes every layer in its own
/// formats, the arena's peak equals it, and every budget gives the unconstrained tokens.
#[test]
fn a_gguf_that_mixes_block_formats_per_layer_offloads_exactly() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-mixed.gguf");
    let load = |o: Option<OffloadConfig>| {
        let config = EngineConfig {
            sparsity: SparsityConfig::new(SparsityMode::Griffin, KEEP),
            offload: o,
            weights: WeightsChoice::AsStored,
            ..EngineConfig::dense()
        };
        Engine::load(&path, CpuBackend::new(2), &config).unwrap()
    };
    let s = sirius(4, 1);
    let planned = |budget| {
        load(Some(offload(budget, None)))
            .offload_plan(&PROMPT, &opts(), &s)
            .unwrap()
    };
    let all = planned(1 << 40);
    // Q4_0 rows of 64 are 36 bytes, Q8_0 rows 68: the even layers' v [32, 64] and down
    // [64, 160] are wider.
    let (q4, q8) = (2 * 18u64, 2 * 34u64);
    let attention = |v_row| (64 + 32 + 64) * q4 + 32 * v_row;
    let (even, odd) = (all.sizes.layer(0), all.sizes.layer(1));
    assert_eq!(
        (even.attention, odd.attention),
        (attention(q8), attention(q4))
    );
    let down = |block: u64| 64 * 5 * block;
    assert_eq!(even.ffn - odd.ffn, down(34) - down(18));
    // Layer 3's gate is Q8_0, its up Q4_0: 160 gate rows wider, the compact set's kept rows too.
    let (three, kept) = (all.sizes.layer(3), all.sizes.kept_neurons as u64);
    assert_eq!(three.ffn - odd.ffn, 160 * (q8 - q4));
    assert_eq!(three.sparse_ffn - odd.sparse_ffn, kept * (q8 - q4));
    let reference = generate(&mut load(None), &PROMPT, s);
    let distinct: std::collections::BTreeSet<_> = reference.generated_token_ids.iter().collect();
    assert!(
        distinct.len() > 3,
        "a degenerate reference: {:?}",
        reference.generated_token_ids
    );
    let mut overflowed = 0;
    for budget in [
        all.resident_bytes,
        (all.resident_bytes + all.minimum_bytes) / 2,
        all.minimum_bytes,
    ] {
        let out = generate(&mut load(Some(offload(budget, None))), &PROMPT, s);
        assert_eq!(
            out.generated_token_ids, reference.generated_token_ids,
            "budget {budget}"
        );
        let o = out.offload.expect("offload statistics");
        assert_eq!(
            o.resident_bytes,
            planned(budget).resident_bytes,
            "budget {budget}"
        );
        overflowed += usize::from(o.overflow_ffn_layers > 0);
    }
    assert!(overflowed >= 1, "the small budgets must overflow");
}
