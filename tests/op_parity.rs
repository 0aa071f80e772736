//! Per-op parity of the CPU backend's SIMD tiers: every op of the parity table
//! (`common::parity`, the harness the CUDA backend also runs) on each tier this machine has
//! (AVX2, AVX-512) against the portable scalar tier, over the same random inputs, outputs
//! poisoned past what an op writes. A machine without a SIMD tier says so and passes (the
//! scalar tier has nothing to be compared with).

mod common;

use sirius_offload::backend::cpu::Isa;
use sirius_offload::backend::CpuBackend;

use common::parity::{self, say, Pair};

/// Runs `check` for every SIMD tier of this machine against the scalar tier.
fn for_each_tier(check: impl Fn(&Pair<CpuBackend, CpuBackend>)) {
    let reference = CpuBackend::with_isa(2, Isa::Scalar).expect("the scalar tier runs anywhere");
    let tiers: Vec<Isa> = Isa::available()
        .into_iter()
        .filter(|&i| i != Isa::Scalar)
        .collect();
    if tiers.is_empty() {
        say("SKIPPED (op parity): this CPU has no SIMD tier to compare with the scalar one");
    }
    for isa in tiers {
        let cand = CpuBackend::with_isa(2, isa).expect("an available tier");
        check(&Pair {
            cand: &cand,
            reference: &reference,
            label: isa.name(),
        });
    }
}

#[test]
fn embed_and_rows_match_scalar() {
    for_each_tier(|p| {
        parity::embed(p);
        parity::rows(p);
    });
}

#[test]
fn norms_and_elementwise_ops_match_scalar() {
    for_each_tier(|p| {
        parity::rmsnorm(p);
        parity::elementwise(p);
        parity::rope(p);
    });
}

/// Decode (1 token), small batches and the multi-token paths (streamed, tiled) of each tier.
#[test]
fn matmul_matches_scalar() {
    for_each_tier(|p| parity::matmul(p, &[1, 3, 16, 17, 40, 128]));
}

#[test]
fn attention_matches_scalar() {
    for_each_tier(|p| {
        parity::attention(p);
        parity::tree_attention(p);
    });
}

#[test]
fn sparsity_ops_match_scalar() {
    for_each_tier(|p| {
        parity::bundle_ffn(p);
        parity::gather_ffn(p);
        parity::neuron_scores(p);
        parity::neuron_selection(p);
    });
}
