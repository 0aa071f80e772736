//! The Sirius chain corrector: scripted fake models for the window mechanics, and the
//! Sirius invariants on a tiny real model (keep 1.0 and a threshold nobody
//! reaches both give full greedy decoding; after correction the KV cache equals a plain full
//! run over the same tokens).

mod common;

use common::sirius::{correct, correct_adaptive, CorrectorOptions};
use sirius_offload::backend::CpuBackend;
use sirius_offload::engine::llama_sirius::LlamaSirius;
use sirius_offload::model::Pass;
use sirius_offload::model::{Llama, Logits, Scratch};
use sirius_offload::sirius::SiriusModel;
use sirius_offload::sparsity::Dense;
use sirius_offload::sparsity::{SparsityConfig, SparsityMode};
use sirius_offload::Result;

const V: usize = 16;

/// A Markov "model": the next token depends only on the last one. The cache records which
/// model wrote each entry so KV correction can be checked.
struct Fake {
    full: fn(u32) -> u32,
    sparse: fn(u32) -> u32,
    cache: Vec<(u32, bool)>, // (token, written by the full model)
    capacity: usize,
    verified: Vec<Vec<u32>>,
}

fn one_hot(t: u32) -> Vec<f32> {
    let mut z = vec![0.0; V];
    z[t as usize] = 10.0;
    z
}

impl SiriusModel for Fake {
    fn cache_len(&self) -> usize {
        self.cache.len()
    }
    fn cache_room(&self) -> usize {
        self.capacity - self.cache.len()
    }
    fn truncate(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len);
        Ok(())
    }
    fn draft(&mut self, token: u32) -> Result<Vec<f32>> {
        self.cache.push((token, false));
        Ok(one_hot((self.sparse)(token)))
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.verified.push(tokens.to_vec());
        self.cache.extend(tokens.iter().map(|&t| (t, true)));
        Ok(tokens.iter().map(|&t| one_hot((self.full)(t))).collect())
    }
}

fn fake(full: fn(u32) -> u32, sparse: fn(u32) -> u32) -> Fake {
    Fake {
        full,
        sparse,
        cache: vec![(0, true); 3],
        capacity: 1000,
        verified: Vec::new(),
    }
}

fn greedy(f: fn(u32) -> u32, first: u32, n: usize, stop: &[u32]) -> Vec<u32> {
    let mut out = vec![first];
    while out.len() < n {
        let next = f(*out.last().unwrap());
        if stop.contains(&next) {
            break;
        }
        out.push(next);
    }
    out
}

fn next(t: u32) -> u32 {
    (t * 5 + 3) % V as u32
}
fn wrong(t: u32) -> u32 {
    (next(t) + 1) % V as u32
}

fn opts(period: usize, max_tokens: usize) -> CorrectorOptions {
    CorrectorOptions {
        period,
        threshold: 0.1,
        accept_temperature: 0.6,
        width: 1,
        max_tokens,
    }
}

#[test]
fn all_drafts_accepted_plus_bonus() {
    let mut m = fake(next, next);
    let (out, stats) = correct(&mut m, 1, &[], &opts(4, 13)).unwrap();
    assert_eq!(out, greedy(next, 1, 13, &[]));
    // Windows of 4 advance by 4 (3 accepted + the full model's bonus token).
    assert_eq!(stats.verifications, 3);
    assert_eq!(stats.aal(), 4.0);
    assert_eq!(stats.rollback_tokens, 0);
    assert!(
        m.cache.iter().all(|&(_, full)| full),
        "every kept entry must be the full model's"
    );
}

#[test]
fn first_draft_rejected_every_window() {
    let mut m = fake(next, wrong);
    let (out, stats) = correct(&mut m, 1, &[], &opts(5, 9)).unwrap();
    assert_eq!(
        out,
        greedy(next, 1, 9, &[]),
        "corrections must reproduce full greedy"
    );
    assert_eq!(stats.aal(), 1.0);
    // Every draft is thrown away (windows shrink to the budget near the end).
    assert_eq!(stats.rollback_tokens, stats.drafted);
    assert!(stats.drafted > 0);
    assert!(m.cache.iter().all(|&(_, full)| full));
    // The cache holds the prompt (3) and every output token but the last (never fed).
    assert_eq!(m.cache.len(), 3 + out.len() - 1);
}

#[test]
fn eos_inside_a_window_ends_at_the_boundary() {
    // The full sequence from 1: 1, 8, 11, 10, 5, 12, 15, ... ; stop on 10.
    let mut m = fake(next, next);
    let (out, _) = correct(&mut m, 1, &[10], &opts(8, 50)).unwrap();
    assert_eq!(out, vec![1, 8, 11]);
}

#[test]
fn max_tokens_reached_mid_window() {
    let mut m = fake(next, next);
    let (out, stats) = correct(&mut m, 1, &[], &opts(16, 6)).unwrap();
    assert_eq!(out, greedy(next, 1, 6, &[]));
    assert_eq!(stats.verifications, 1);
    // Only as many drafts as the budget needs.
    assert_eq!(m.verified[0].len(), 6);
}

/// Adaptive windows (`--period auto:K`) vary K between windows, first trying the lengths
/// 1, 1 (the first window's seconds are not kept), 2, 4, ...: the mechanics must hold at every length, and where the sparse model agrees
/// (or never does) the output is still full greedy, whatever K the timing picks.
#[test]
fn adaptive_windows_keep_the_mechanics() {
    for sparse in [next as fn(u32) -> u32, wrong] {
        let mut m = fake(next, sparse);
        let (out, stats) = correct_adaptive(&mut m, 1, &[], &opts(8, 60)).unwrap();
        assert_eq!(out, greedy(next, 1, 60, &[]));
        assert!(m.cache.iter().all(|&(_, full)| full));
        // The prompt (3) and every output token but the last (a last window that made one
        // token more than the budget keeps its cache row).
        assert!((3 + out.len() - 1..=3 + out.len()).contains(&m.cache.len()));
        // The first windows are the probes, shortest first: 1, 2, then longer ones while
        // they look worth it (timing decides which).
        let lengths: Vec<usize> = m.verified.iter().map(|w| w.len()).collect();
        assert_eq!(&lengths[..3], &[1, 1, 2]);
        assert!(lengths.iter().all(|k| (1..=8).contains(k)), "{lengths:?}");
        // Tokens advanced: every output token but the first (one more if the last window
        // overshot the budget).
        assert!((out.len() - 1..=out.len()).contains(&stats.advanced));
        assert!(
            (stats.mean_period()
                - (stats.drafted + stats.verifications) as f64 / stats.verifications as f64)
                .abs()
                < 1e-12
        );
    }
}

#[test]
fn bad_options_are_errors() {
    let mut m = fake(next, next);
    for o in [
        CorrectorOptions {
            period: 0,
            ..opts(4, 4)
        },
        CorrectorOptions {
            threshold: f32::NAN,
            ..opts(4, 4)
        },
        CorrectorOptions {
            accept_temperature: 0.0,
            ..opts(4, 4)
        },
    ] {
        assert!(correct(&mut m, 1, &[], &o).is_err());
    }
}

#[test]
fn on_a_real_model_sirius_invariants_hold() {
    let dir = common::fixtures_dir()
        .join("tiny")
        .join("llama-tied-gqa-bf16");
    let model = Llama::load(&dir, CpuBackend::new(2)).unwrap();
    let prompt: Vec<u32> = vec![5, 17, 42, 99, 3, 64, 7, 120];
    let n = 24;
    let want = common::full_greedy(&model, &prompt, n);
    let cases = [
        (SparsityMode::Griffin, 1.0, 0.1), // keep 1.0: the sparse model is the full one
        (SparsityMode::Cats, 1.0, 0.1),
        (SparsityMode::Griffin, 0.25, 1.5), // nothing is ever accepted
        (SparsityMode::Cats, 0.25, 1.5),
        (SparsityMode::Griffin, 0.5, 0.1), // real corrections: only the cache invariant applies
    ];
    for (mode, keep, threshold) in cases {
        let sparsity = model.sparsity(&SparsityConfig::new(mode, keep)).unwrap();
        let o = CorrectorOptions {
            period: 6,
            threshold,
            accept_temperature: 0.6,
            width: 1,
            max_tokens: n,
        };
        let mut m = LlamaSirius::new(&model, &sparsity, prompt.len() + n, &o.config()).unwrap();
        let first = m.prefill(&prompt, 4, false).unwrap().first;
        let (out, stats) = correct(&mut m, first, &[], &o).unwrap();
        if keep == 1.0 || threshold > 1.0 {
            assert_eq!(out, want, "{mode} keep {keep} thr {threshold}");
        }
        if keep == 1.0 {
            assert_eq!(stats.aal(), 6.0, "{mode} keep 1.0 accepts every draft");
        }
        if threshold > 1.0 {
            assert_eq!(stats.aal(), 1.0);
        }
        // KV correction: the cache equals a plain full run over the same tokens.
        let len = m.cache_len();
        let tokens: Vec<u32> = prompt.iter().chain(&out).copied().take(len).collect();
        let mut fresh = model.new_cache(len).unwrap();
        let mut scratch = Scratch::new(&model, len).unwrap();
        model
            .forward(
                Pass::new(&tokens, Logits::None, &mut Dense),
                &mut fresh,
                &mut scratch,
            )
            .unwrap();
        let kv = model.config.kv_dim();
        for li in 0..model.config.num_layers {
            let d =
                common::sirius::cache_layer_excess(&model.backend, &m.cache, &fresh, li, len, kv);
            assert!(
                d < 1e-4,
                "{mode} keep {keep}: layer {li} cache differs by {d}"
            );
        }
    }
}
