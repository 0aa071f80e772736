//! The tree corrector (width W > 1) on a scripted fake model: beams, one verification pass
//! over the flattened tree, the longest accepted path compacted into place; and width 1
//! through the tree code equals the chain.

mod common;

use common::sirius::{correct, correct_tree, CorrectorOptions};
use sirius_offload::sirius::SiriusModel;
use sirius_offload::tensor::TreeMask;
use sirius_offload::Result;

const V: usize = 16;

/// A Markov model: after token t the full model's logits are `confident(full(t))`, the
/// sparse model's `sparse(t)`. Every cache row records (token, written by the full model).
struct Fake {
    full: fn(u32) -> u32,
    sparse: fn(u32) -> Vec<f32>,
    cache: Vec<(u32, bool)>,
    capacity: usize,
    /// Sizes of the verification passes.
    verified: Vec<usize>,
    /// Sizes of the draft batches.
    drafted: Vec<usize>,
    /// Every drafted tree node (the tree minus its root, as verified).
    tree_drafts: Vec<u32>,
}

/// Most weight on `best`, some on `best + 1` (p = 0.03 at T = 0.6: rejected).
fn confident(best: u32) -> Vec<f32> {
    let mut z = vec![0.0; V];
    z[best as usize] = 6.0;
    z[(best as usize + 1) % V] = 4.0;
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
        self.drafted.push(1);
        self.cache.push((token, false));
        Ok((self.sparse)(token))
    }
    fn verify(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.verified.push(tokens.len());
        self.cache.extend(tokens.iter().map(|&t| (t, true)));
        Ok(tokens.iter().map(|&t| confident((self.full)(t))).collect())
    }
    fn draft_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        assert_eq!(
            mask.first_row(),
            self.cache.len(),
            "batch appended at the end"
        );
        self.drafted.push(tokens.len());
        self.cache.extend(tokens.iter().map(|&t| (t, false)));
        Ok(tokens.iter().map(|&t| (self.sparse)(t)).collect())
    }
    fn verify_tree(&mut self, tokens: &[u32], mask: &TreeMask) -> Result<Vec<Vec<f32>>> {
        assert_eq!(mask.first_row(), self.cache.len());
        assert_eq!(mask.n_tokens(), tokens.len(), "the whole tree in one pass");
        self.verified.push(tokens.len());
        self.tree_drafts.extend(&tokens[1..]);
        self.cache.extend(tokens.iter().map(|&t| (t, true)));
        Ok(tokens.iter().map(|&t| confident((self.full)(t))).collect())
    }
    fn keep_rows(&mut self, start: usize, rows: &[usize]) -> Result<()> {
        let kept: Vec<(u32, bool)> = rows.iter().map(|&r| self.cache[r]).collect();
        self.cache.truncate(start);
        self.cache.extend(kept);
        Ok(())
    }
}

fn fake(full: fn(u32) -> u32, sparse: fn(u32) -> Vec<f32>) -> Fake {
    Fake {
        full,
        sparse,
        cache: vec![(0, true); 3],
        capacity: 1000,
        verified: Vec::new(),
        drafted: Vec::new(),
        tree_drafts: Vec::new(),
    }
}

fn opts(period: usize, width: usize, max_tokens: usize) -> CorrectorOptions {
    CorrectorOptions {
        period,
        threshold: 0.1,
        accept_temperature: 0.6,
        width,
        max_tokens,
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

/// The full model: 1, 8, 11, 10, 5, 12, 15, 14, 9, 0, 3, 2, 13, 4, 7, 6, 1, ...
fn next(t: u32) -> u32 {
    (t * 5 + 3) % V as u32
}
/// A sparse model that agrees with the full one.
fn agrees(t: u32) -> Vec<f32> {
    confident(next(t))
}
/// Agrees, except after token 1, where it slightly prefers 7 to the right 8: the chain's
/// draft is rejected there, while a second beam through 8 stays in the tree (its later
/// steps are confident) and is accepted.
fn unsure_at_one(t: u32) -> Vec<f32> {
    if t == 1 {
        let mut z = vec![0.0; V];
        z[7] = 5.0;
        z[8] = 4.9;
        z
    } else {
        agrees(t)
    }
}
/// Never close to what the full model wants.
fn far(t: u32) -> Vec<f32> {
    confident((next(t) + 7) % V as u32)
}

#[test]
fn a_tree_of_agreeing_models_accepts_every_level_plus_bonus() {
    let mut m = fake(next, agrees);
    let (out, stats) = correct(&mut m, 1, &[], &opts(4, 3, 13)).unwrap();
    assert_eq!(out, greedy(next, 1, 13, &[]));
    assert_eq!(stats.verifications, 3);
    assert_eq!(stats.aal(), 4.0);
    // (K - 1) * W + 1 tokens per verification; drafting: x0 alone, then W beams per level.
    assert_eq!(m.verified, vec![10, 10, 10]);
    assert_eq!(&m.drafted[..3], &[1, 3, 3]);
    // Each window drafted 9 nodes and kept 3 of them.
    assert_eq!(stats.drafted, 27);
    assert_eq!(stats.rollback_tokens, 27 - 9);
    assert!(
        m.cache.iter().all(|&(_, full)| full),
        "only full-model rows stay"
    );
    assert_eq!(m.cache.len(), 3 + out.len() - 1);
}

#[test]
fn the_second_beam_wins_where_the_chain_fails() {
    let mut chain = fake(next, unsure_at_one);
    let (want, chain_stats) = correct(&mut chain, 1, &[], &opts(5, 1, 20)).unwrap();
    let mut tree = fake(next, unsure_at_one);
    let (out, stats) = correct(&mut tree, 1, &[], &opts(5, 2, 20)).unwrap();
    assert_eq!(want, greedy(next, 1, 20, &[]));
    assert_eq!(
        out, want,
        "the tree output is the full model's greedy output too"
    );
    assert!(
        stats.aal() > chain_stats.aal(),
        "the tree (AAL {}) should accept along its second beam where the chain (AAL {}) fails",
        stats.aal(),
        chain_stats.aal()
    );
    assert_eq!(stats.aal(), 5.0, "every window accepts all of one beam");
    // The compacted cache is exactly the produced text (all of it, or all but the last
    // token when that came from the full model), written by the full model.
    let tokens: Vec<u32> = tree.cache[3..].iter().map(|r| r.0).collect();
    assert!(tokens.len() + 1 >= out.len() && out.starts_with(&tokens));
    assert!(tree.cache.iter().all(|&(_, full)| full));
}

#[test]
fn rejected_trees_still_give_full_greedy_output() {
    let mut m = fake(next, far);
    let (out, stats) = correct(&mut m, 1, &[], &opts(6, 4, 11)).unwrap();
    assert_eq!(out, greedy(next, 1, 11, &[]));
    assert!(stats.aal() < 1.5, "AAL {}", stats.aal());
    assert_eq!(
        stats.rollback_tokens,
        stats.drafted - (stats.advanced - stats.verifications)
    );
}

#[test]
fn width_one_through_the_tree_is_the_chain() {
    type Case = (fn(u32) -> Vec<f32>, &'static [u32], usize, usize);
    let cases: [Case; 4] = [
        (agrees, &[], 4, 13),
        (unsure_at_one, &[], 5, 40),
        (far, &[], 3, 9),
        (agrees, &[10], 8, 50), // the stop id is drafted (and accepted) inside the window
    ];
    for (sparse, stop, period, max) in cases {
        let mut chain = fake(next, sparse);
        let mut tree = fake(next, sparse);
        let o = opts(period, 1, max);
        let (a, sa) = correct(&mut chain, 1, stop, &o).unwrap();
        let (b, sb) = correct_tree(&mut tree, 1, stop, &o).unwrap();
        assert_eq!(a, b, "period {period}");
        assert_eq!(
            (
                sa.verifications,
                sa.advanced,
                sa.drafted,
                sa.rollback_tokens
            ),
            (
                sb.verifications,
                sb.advanced,
                sb.drafted,
                sb.rollback_tokens
            )
        );
        assert_eq!(chain.cache, tree.cache);
        assert_eq!(chain.verified, tree.verified);
    }
}

#[test]
fn wide_trees_never_draft_a_stop_id_and_stop_at_the_boundary() {
    // Full sequence from 1: 1, 8, 11, 10, 5, ...; 10 is a stop id, so output ends at 11.
    let mut m = fake(next, agrees);
    let (out, stats) = correct(&mut m, 1, &[10], &opts(8, 3, 50)).unwrap();
    assert_eq!(out, vec![1, 8, 11]);
    // The beams skip 10 where the sparse model prefers it, so the full model's own token
    // (10) ends the request at a boundary.
    assert!(!m.tree_drafts.is_empty() && !m.tree_drafts.contains(&10));
    assert!(stats.verifications >= 1);
}

#[test]
fn max_tokens_and_a_small_cache_shrink_the_tree() {
    let mut m = fake(next, agrees);
    let (out, stats) = correct(&mut m, 1, &[], &opts(16, 4, 6)).unwrap();
    assert_eq!(out, greedy(next, 1, 6, &[]));
    assert_eq!(stats.verifications, 1);
    assert_eq!(
        m.verified,
        vec![(6 - 1) * 4 + 1],
        "only the levels the budget needs"
    );

    // 3 prompt rows + room for 12: one tree of (4 - 1) * 3 + 1 = 10 nodes, then smaller ones.
    let mut m = fake(next, agrees);
    m.capacity = 15;
    let (out, _) = correct(&mut m, 1, &[], &opts(4, 3, 100)).unwrap();
    assert!(m.cache.len() <= 15);
    assert_eq!(out, greedy(next, 1, out.len(), &[]));
    assert!(m.verified.iter().all(|&n| n <= 12));
    assert!(
        out.len() >= 12,
        "the cache is used up, got {} tokens",
        out.len()
    );
}

#[test]
fn widths_beyond_the_limit_are_errors() {
    let mut m = fake(next, agrees);
    for w in [0, 17] {
        let err = correct(&mut m, 1, &[], &opts(4, w, 10)).unwrap_err();
        assert!(err.to_string().contains("--width"), "{err}");
    }
}
