//! CUDA backend end to end (issue 6, item 5): greedy tokens of tiny random models and of a
//! real model (SmolLM2, or `SIRIUS_GPU_MODEL_DIR`) equal the CPU backend's, and the Sirius
//! invariants hold on the GPU. Op-by-op parity is `tests/gpu_parity.rs`; the skip rule and
//! the comparison are shared (`tests/common/gpu.rs`).
#![cfg(feature = "cuda")]

mod common;

use common::sirius::{correct, correct_tree, CorrectorOptions};
use sirius_offload::backend::CpuBackend;
use sirius_offload::engine::llama_sirius::LlamaSirius;
use sirius_offload::model::Llama;
use sirius_offload::sparsity::{SparsityConfig, SparsityMode};

use common::gpu::*;
use common::{Rng, TinySpec};

use common::greedy_with_prompt_logits as greedy;

/// Greedy tokens of the model in `dir` on both backends; the prompt's logits are compared
/// too (a long prompt runs through the GEMM path). Equal tokens are asserted on the f32 GEMM
/// path, the CPU's arithmetic: with activations rounded to bf16 a near tie between two
/// logits may break the other way, which is no bug. The bf16 path (the default) gets its
/// prompt logits checked at [`LOGITS_BF16`] and its tokens reported, for prompts over 16
/// tokens (shorter ones never reach a GEMM, so both paths are the same kernels).
fn same_greedy(dir: &std::path::Path, prompt: &[u32], n: usize, label: &str) {
    let c = Llama::load(dir, CpuBackend::new(4)).unwrap();
    let (ct, cl) = greedy(&c, prompt, n);
    // gpu() already said the device works: more backends open the same way.
    let g = Llama::load(dir, open_backend_with(GemmPrecision::F32).unwrap()).unwrap();
    let (gt, gl) = greedy(&g, prompt, n);
    check("prompt_logits", label, &gl, &cl, LOGITS);
    let same = gt.iter().zip(&ct).take_while(|(a, b)| a == b).count();
    let verdict = if gt == ct { "ok" } else { "FAIL" };
    say(&format!(
        "PARITY greedy_tokens {label} same={same}/{n} {verdict}"
    ));
    assert_eq!(gt, ct, "{label}: greedy tokens differ from token {same}");
    if prompt.len() <= 16 {
        return;
    }
    drop(g);
    let g = Llama::load(dir, open_backend_with(GemmPrecision::Bf16).unwrap()).unwrap();
    let (bt, bl) = greedy(&g, prompt, n);
    check("prompt_logits_bf16", label, &bl, &cl, LOGITS_BF16);
    let same = bt.iter().zip(&ct).take_while(|(a, b)| a == b).count();
    say(&format!(
        "PARITY greedy_tokens_bf16 {label} same={same}/{n} info"
    ));
}

fn tiny_specs() -> Vec<(&'static str, TinySpec)> {
    let base = TinySpec {
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        ffn: 96,
        vocab: 128,
        max_pos: 128,
        ..TinySpec::default()
    };
    vec![
        ("llama-bf16-tied-gqa", base.clone()),
        (
            "llama-f16-untied",
            TinySpec {
                dtype: "F16",
                tied: false,
                kv_heads: 4,
                ..base.clone()
            },
        ),
        (
            "qwen2-f32-bias",
            TinySpec {
                arch: "Qwen2ForCausalLM",
                dtype: "F32",
                qkv_bias: true,
                ..base
            },
        ),
    ]
}

fn prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..len)
        .map(|_| 3 + ((rng.next_f32() + 1.0) / 2.0 * (vocab - 4) as f32) as u32)
        .collect()
}

#[test]
fn tiny_models_decode_the_same_tokens() {
    if gpu().is_none() {
        return;
    }
    for (label, spec) in tiny_specs() {
        let dir = tempfile::tempdir().unwrap();
        let model = common::write_model(dir.path(), &spec, 21);
        // 40 prompt tokens in one forward: the GEMM path; then decode steps: the matvec.
        same_greedy(&model, &prompt(40, spec.vocab, 5), 24, label);
    }
}

/// `SIRIUS_GPU_MODEL_DIR` (a real model gpu-check was given) or the fetched SmolLM2.
#[test]
fn a_real_model_decodes_the_same_tokens() {
    if gpu().is_none() {
        return;
    }
    let dir = match std::env::var_os("SIRIUS_GPU_MODEL_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => match common::smollm2_dir("gpu parity") {
            Some(d) => d,
            None => return,
        },
    };
    // "The capital of France is" style prompts from the SmolLM2 fixture.
    for (i, p) in [
        &[504u32, 808, 3772, 9552, 2966, 359][..],
        &[33580, 14870, 314, 260, 980, 411, 527],
    ]
    .iter()
    .enumerate()
    {
        same_greedy(&dir, p, 24, &format!("{} prompt{i}", dir.display()));
    }
}

/// The Sirius invariants on the GPU: keep 1.0 through the chain, and a threshold no draft
/// reaches (chain and tree), both give exactly the full model's greedy tokens.
#[test]
fn sirius_invariants_hold_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, spec) = tiny_specs().remove(0);
    let path = common::write_model(dir.path(), &spec, 22);
    let model = Llama::load(&path, g).unwrap();
    let p = prompt(8, spec.vocab, 6);
    let n = 24;
    let (want, _) = greedy(&model, &p, n);
    for mode in [SparsityMode::Griffin, SparsityMode::Cats] {
        let runs = [(1.0, 1, 0.1), (0.25, 1, 1.5), (0.25, 3, 1.5)];
        for (keep, width, threshold) in runs {
            let sparsity = model.sparsity(&SparsityConfig::new(mode, keep)).unwrap();
            let o = CorrectorOptions {
                period: 6,
                threshold,
                accept_temperature: 0.6,
                width,
                max_tokens: n,
            };
            let rows = p.len() + n + 1 + (o.period - 1) * (o.width - 1);
            let mut m = LlamaSirius::new(&model, &sparsity, rows, &o.config()).unwrap();
            let first = m.prefill(&p, 4, false).unwrap().first;
            let (out, stats) = if width > 1 {
                correct_tree(&mut m, first, &[], &o).unwrap()
            } else {
                correct(&mut m, first, &[], &o).unwrap()
            };
            let label = format!("{mode} keep {keep} W {width} thr {threshold}");
            let verdict = if out == want { "ok" } else { "FAIL" };
            say(&format!(
                "PARITY sirius {label} aal={:.2} {verdict}",
                stats.aal()
            ));
            assert_eq!(out, want, "{label}: not the full model's greedy tokens");
            let aal = if keep == 1.0 { 6.0 } else { 1.0 };
            assert_eq!(stats.aal(), aal, "{label}: average advance");
        }
    }
}
