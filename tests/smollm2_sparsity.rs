//! Sparsity on the real SmolLM2-135M: keep = 1.0 decodes exactly like the dense model, and
//! the density a run reports equals the hand count (see `sparsity::tests`).

mod common;

use sirius_offload::backend::CpuBackend;
use sirius_offload::engine::{Decoding, Engine, EngineConfig, GenerationOutput, RequestOptions};
use sirius_offload::sparsity::{SparsityConfig, SparsityMode};

const PROMPT: &str = "The history of the printing press begins";

/// `n` greedy tokens of `engine`'s sparse model.
fn run(engine: &mut Engine<CpuBackend>, n: usize) -> GenerationOutput {
    let opts = RequestOptions {
        context: Some(512),
        ..RequestOptions::greedy(n)
    };
    let ids = engine.encode(PROMPT, None).unwrap();
    engine
        .generate(&ids, &opts, Decoding::Sparse, &mut |_| true)
        .unwrap()
}

#[test]
fn keep_one_decodes_like_dense_and_density_matches_hand_count() {
    let Some(dir) = common::smollm2_dir("SmolLM2 sparsity") else {
        return;
    };
    let mut engine = Engine::load(&dir, CpuBackend::new(2), &EngineConfig::dense()).unwrap();
    let dense = run(&mut engine, 16);
    assert_eq!(
        dense.generated_tokens, 16,
        "the prompt should not hit EOS this early: {:?}",
        dense.text
    );
    assert_eq!(dense.sparsity.density, 1.0);
    for mode in [SparsityMode::Griffin, SparsityMode::Cats] {
        engine
            .set_sparsity(&SparsityConfig::new(mode, 1.0))
            .unwrap();
        let out = run(&mut engine, 16);
        assert_eq!(
            out.generated_token_ids, dense.generated_token_ids,
            "{mode} keep 1.0: {:?} vs {:?}",
            out.text, dense.text
        );
        assert!((out.sparsity.density - 1.0).abs() < 1e-12);

        engine
            .set_sparsity(&SparsityConfig::new(mode, 0.5))
            .unwrap();
        let out = run(&mut engine, 8);
        // Hand count: 134,515,008 parameters; Griffin skips 30 * 768 * 3 * 576, CATS 30 * 768 * 2 * 576.
        let skipped = match mode {
            SparsityMode::Griffin => 39_813_120.0,
            _ => 26_542_080.0,
        };
        let want = (134_515_008.0 - skipped) / 134_515_008.0;
        assert!(
            (out.sparsity.density - want).abs() < 1e-12,
            "{mode}: density {} vs hand count {want}",
            out.sparsity.density
        );
        assert_eq!(out.sparsity.kept_per_layer, vec![0.5; 30], "{mode}");
        // Every decode step after the first (dense) token ran sparse.
        assert_eq!(
            out.sparsity.sparse_tokens as usize,
            out.generated_tokens - 1,
            "{mode}"
        );
    }
}
