//! An engine that remembers prompts (`Engine::remember_prompts`, what `serve` and the chat
//! turn on): a request whose prompt continues the previous one's prefills only its new
//! tokens, and decodes as the whole prompt would alone (float weights: the sums differ only
//! in order), for plain, Griffin and Sirius decoding; a prompt that does not continue it
//! starts afresh.

mod common;

use sirius_offload::backend::CpuBackend;
use sirius_offload::engine::{Decoding, Engine, EngineConfig, GenerationOutput, RequestOptions};
use sirius_offload::sirius::SiriusConfig;
use sirius_offload::sparsity::{SparsityConfig, SparsityMode};

fn engine(dir: &std::path::Path, sparsity: &SparsityConfig) -> Engine<CpuBackend> {
    let config = EngineConfig {
        sparsity: sparsity.clone(),
        ..EngineConfig::dense()
    };
    Engine::load(dir, CpuBackend::new(1), &config).unwrap()
}

fn generate(e: &mut Engine<CpuBackend>, prompt: &[u32], decoding: Decoding) -> GenerationOutput {
    let opts = RequestOptions {
        stop_at_eos: false,
        ..RequestOptions::greedy(12)
    };
    e.generate(prompt, &opts, decoding, &mut |_| true).unwrap()
}

#[test]
fn a_continued_prompt_reuses_the_kept_one_and_decodes_as_alone() {
    let root = tempfile::tempdir().unwrap();
    let spec = common::TinySpec {
        max_pos: 256,
        ..common::TinySpec::default()
    };
    let dir = common::write_model(&root.path().join("tiny"), &spec, 11);
    let first: Vec<u32> = (0..40).map(|i| 3 + (i * 7) % 60).collect();
    let second: Vec<u32> = first
        .iter()
        .copied()
        .chain((0..20).map(|i| 3 + (i * 5) % 60))
        .collect();
    let other: Vec<u32> = (0..30).map(|i| 3 + (i * 11) % 60).collect();
    let griffin = SparsityConfig::new(SparsityMode::Griffin, 0.5);
    let sirius = Decoding::Sirius(SiriusConfig {
        period: 4,
        ..SiriusConfig::default()
    });
    for (name, sparsity, decoding) in [
        ("dense", SparsityConfig::dense(), Decoding::Dense),
        ("griffin", griffin.clone(), Decoding::Sparse),
        ("sirius", griffin, sirius),
    ] {
        let alone = generate(&mut engine(&dir, &sparsity), &second, decoding);
        let mut e = engine(&dir, &sparsity);
        e.remember_prompts(true);
        let before = generate(&mut e, &first, decoding);
        assert_eq!(before.cached_prompt_tokens, 0, "{name}");
        let continued = generate(&mut e, &second, decoding);
        assert_eq!(
            continued.cached_prompt_tokens,
            first.len(),
            "{name}: the first prompt is reused"
        );
        assert_eq!(
            continued.generated_token_ids, alone.generated_token_ids,
            "{name}: a continued prompt decodes as the whole prompt alone"
        );
        if decoding != Decoding::Dense {
            assert_eq!(continued.sparsity.density, alone.sparsity.density, "{name}");
        }
        // Not a continuation of the kept (second) prompt: prefilled whole.
        let fresh = generate(&mut e, &other, decoding);
        assert_eq!(fresh.cached_prompt_tokens, 0, "{name}");
        // The same prompt again is not a continuation either (it needs a token after it).
        let again = generate(&mut e, &other, decoding);
        assert_eq!(again.cached_prompt_tokens, 0, "{name}");
        assert_eq!(
            again.generated_token_ids, fresh.generated_token_ids,
            "{name}"
        );
        // Without remember_prompts nothing is kept.
        let mut plain = engine(&dir, &sparsity);
        generate(&mut plain, &first, decoding);
        assert_eq!(
            generate(&mut plain, &second, decoding).cached_prompt_tokens,
            0,
            "{name}"
        );
    }
}
