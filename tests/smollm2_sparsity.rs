//! Sparsity on the real SmolLM2-135M: keep = 1.0 decodes exactly like the dense model, and
//! the density a run reports equals the hand count (see `sparsity::tests`).

mod common;

use sirius_offload::backend::CpuBackend;
use sirius_offload::config::generation::stop_token_ids;
use sirius_offload::engine::{generate, GenerateOptions, GenerationOutput};
use sirius_offload::model::{Llama, SamplingParams, Tokenizer};
use sirius_offload::sparsity::{Sparsity, SparsityMode};

const PROMPT: &str = "The history of the printing press begins";

fn run(
    model: &Llama<CpuBackend>,
    sparsity: &Sparsity<CpuBackend>,
    tok: &Tokenizer,
    n: usize,
) -> GenerationOutput {
    let dir = common::smollm2_dir("SmolLM2 sparsity").expect("checked by the caller");
    let opts = GenerateOptions {
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        stop_token_ids: stop_token_ids(&dir, &model.config.eos_token_ids).unwrap(),
        stop_strings: vec![],
        context: 512,
        prefill_chunk: 256,
        show_progress: false,
    };
    let ids = tok.encode(PROMPT, true).unwrap();
    generate(model, sparsity, tok, &ids, &opts, &mut |_| true).unwrap()
}

#[test]
fn keep_one_decodes_like_dense_and_density_matches_hand_count() {
    let Some(dir) = common::smollm2_dir("SmolLM2 sparsity") else {
        return;
    };
    let model = Llama::load(&dir, CpuBackend::new(2)).unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let dense = run(&model, &Sparsity::None, &tok, 16);
    assert_eq!(
        dense.generated_tokens, 16,
        "the prompt should not hit EOS this early: {:?}",
        dense.text
    );
    assert_eq!(dense.sparsity.density, 1.0);
    for mode in [SparsityMode::Griffin, SparsityMode::Cats] {
        let full = Sparsity::new(&model, mode, 1.0, None).unwrap();
        let out = run(&model, &full, &tok, 16);
        assert_eq!(
            out.generated_token_ids, dense.generated_token_ids,
            "{mode} keep 1.0: {:?} vs {:?}",
            out.text, dense.text
        );
        assert!((out.sparsity.density - 1.0).abs() < 1e-12);

        let half = Sparsity::new(&model, mode, 0.5, None).unwrap();
        let out = run(&model, &half, &tok, 8);
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
