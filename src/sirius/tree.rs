//! The tree corrector: the sparse model keeps W beams, the full model
//! verifies the whole draft tree ((K - 1) * W + 1 tokens) in one pass under a tree attention
//! mask, and the longest accepted path in the tree wins; its K/V rows are compacted into
//! place so the cache holds plain sequence rows again.

use std::time::Instant;

use crate::error::Result;
use crate::model::sampler::argmax;
use crate::sirius::config::SiriusConfig;
use crate::sirius::stats::CorrectionStats;
use crate::sirius::window::{check_rows, token_probability, SiriusModel, Verdict};
use crate::tensor::TreeMask;

/// A draft tree, flattened in creation order (parents before children): node `i` sits at
/// cache row `start + i`.
struct DraftTree {
    tokens: Vec<u32>,
    parents: Vec<Option<usize>>,
}

impl DraftTree {
    /// Node indices from the root to `leaf`.
    fn path(&self, leaf: usize) -> Vec<usize> {
        let mut path = vec![leaf];
        let mut node = leaf;
        while let Some(p) = self.parents[node] {
            path.push(p);
            node = p;
        }
        path.reverse();
        path
    }
}

/// A beam: its last node and cumulative log-probability.
#[derive(Clone, Copy)]
struct Beam {
    node: usize,
    score: f64,
}

/// One tree window after x0 (produced, not yet in the cache), K - 1 levels deep.
pub(crate) fn tree_window(
    model: &mut dyn SiriusModel,
    x0: u32,
    k: usize,
    opts: &SiriusConfig,
    stop_ids: &[u32],
    stats: &mut CorrectionStats,
) -> Result<Verdict> {
    let start = model.cache_len();
    let t = Instant::now();
    let tree = draft_tree(model, x0, k, opts, stop_ids)?;
    stats.draft_seconds += t.elapsed().as_secs_f64();
    let drafted = tree.tokens.len() - 1;
    stats.drafted += drafted;

    // Verify the whole tree in one pass; its K/V replace the drafts'.
    model.truncate(start)?;
    let mask = TreeMask::from_parents(start, &tree.parents, 0)?;
    let t = Instant::now();
    let z = model.verify_tree(&tree.tokens, &mask)?;
    stats.verify_seconds += t.elapsed().as_secs_f64();
    check_rows(&z, tree.tokens.len())?;
    stats.verifications += 1;

    let path = tree.path(longest_accepted(&tree, &z, opts));
    let n = path.len() - 1;
    let rows: Vec<usize> = path[..=n].iter().map(|&i| start + i).collect();
    model.keep_rows(start, &rows)?;
    stats.rollback_tokens += drafted - n;
    stats.advanced += n + 1;
    Ok(Verdict {
        accepted: path[1..=n].iter().map(|&i| tree.tokens[i]).collect(),
        next: argmax(&z[path[n]]),
    })
}

/// Drafts K - 1 levels of W beams under x0 with the sparse model (beam search over
/// `log_softmax(logits / T)`: each beam proposes its top W tokens, the global top W by
/// cumulative log-probability are kept, stop ids are never proposed when W > 1).
fn draft_tree(
    model: &mut dyn SiriusModel,
    x0: u32,
    k: usize,
    opts: &SiriusConfig,
    stop_ids: &[u32],
) -> Result<DraftTree> {
    let start = model.cache_len();
    let width = opts.width;
    let mut tree = DraftTree {
        tokens: vec![x0],
        parents: vec![None],
    };
    let mut beams = vec![Beam {
        node: 0,
        score: 0.0,
    }];
    // With one beam there is no choice to protect, so EOS is drafted like any token and the
    // tree is exactly the chain.
    let skip: &[u32] = if width > 1 { stop_ids } else { &[] };
    for _ in 1..k {
        // The beams' last nodes, the newest nodes, are the ones not yet in the cache.
        let batch = tree.tokens.len() - beams.len();
        let mask = TreeMask::from_parents(start, &tree.parents, batch)?;
        let logits = model.draft_tree(&tree.tokens[batch..], &mask)?;
        check_rows(&logits, tree.tokens.len() - batch)?;
        let mut candidates = Vec::with_capacity(beams.len() * width);
        for (b, beam) in beams.iter().enumerate() {
            let z = &logits[beam.node - batch];
            let top = top_log_probs(z, opts.accept_temperature, width, skip);
            for (rank, (token, lp)) in top.into_iter().enumerate() {
                candidates.push((beam.score + lp, b, rank, token));
            }
        }
        // Best cumulative log-probability first; ties keep the earlier beam and rank.
        // (A NaN score, from infinite logits, ranks last: total_cmp keeps the order total.)
        let key = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
        candidates.sort_by(|x, y| {
            key(y.0)
                .total_cmp(&key(x.0))
                .then((x.1, x.2).cmp(&(y.1, y.2)))
        });
        candidates.truncate(width);
        let parents: Vec<usize> = beams.iter().map(|b| b.node).collect();
        beams = candidates
            .into_iter()
            .map(|(score, b, _, token)| {
                tree.tokens.push(token);
                tree.parents.push(Some(parents[b]));
                Beam {
                    node: tree.tokens.len() - 1,
                    score,
                }
            })
            .collect();
    }
    Ok(tree)
}

/// The node ending the longest accepted path: every node whose whole path from the root is
/// accepted is a candidate, including nodes of beams pruned later (the greedy path often is
/// one), so the tree never loses a prefix the chain would have kept while it was in the
/// tree. The earlier node (the better-scored beam) wins ties.
fn longest_accepted(tree: &DraftTree, z: &[Vec<f32>], opts: &SiriusConfig) -> usize {
    let mut depth: Vec<Option<usize>> = vec![None; tree.tokens.len()];
    depth[0] = Some(0);
    let mut best = 0;
    for i in 1..tree.tokens.len() {
        let Some(p) = tree.parents[i] else { continue };
        let Some(d) = depth[p] else { continue };
        if token_probability(&z[p], opts.accept_temperature, tree.tokens[i])
            >= opts.threshold as f64
        {
            depth[i] = Some(d + 1);
            if depth[best].is_some_and(|b| d + 1 > b) {
                best = i;
            }
        }
    }
    best
}

/// The `w` most likely tokens under `log_softmax(z / t)`, best first (ties: lower id), with
/// their log-probabilities; tokens in `skip` are never proposed. NaN logits never win.
fn top_log_probs(z: &[f32], t: f32, w: usize, skip: &[u32]) -> Vec<(u32, f64)> {
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(w + 1);
    for (i, &v) in z.iter().enumerate() {
        let i = i as u32;
        if v.is_nan() || skip.contains(&i) {
            continue;
        }
        // Strictly better than the current w-th: earlier ids win ties.
        if top.len() < w || top.last().is_some_and(|&(last, _)| v > last) {
            let at = top.partition_point(|&(u, _)| u >= v);
            top.insert(at, (v, i));
            top.truncate(w);
        }
    }
    if top.is_empty() {
        // Nothing finite to rank: the chain's argmax would pick token 0.
        return vec![(argmax(z), f64::NEG_INFINITY)];
    }
    let max = top[0].0 as f64;
    let t = t as f64;
    let log_sum = z
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| ((v as f64 - max) / t).exp())
        .sum::<f64>()
        .ln();
    top.into_iter()
        .map(|(v, i)| (i, (v as f64 - max) / t - log_sum))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_log_probs_ranks_and_normalises() {
        let z = [1.0, 3.0, 3.0, f32::NAN, 2.0, -1.0];
        let top = top_log_probs(&z, 1.0, 3, &[]);
        let ids: Vec<u32> = top.iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 2, 4], "ties keep the lower id first");
        let total: f64 = [1.0f64, 3.0, 3.0, 2.0, -1.0].iter().map(|v| v.exp()).sum();
        assert!((top[0].1 - (3.0 - total.ln())).abs() < 1e-12);
        let skipped = top_log_probs(&z, 1.0, 2, &[1]);
        assert_eq!(skipped.iter().map(|p| p.0).collect::<Vec<_>>(), [2, 4]);
        // Width 1 picks what argmax picks.
        assert_eq!(top_log_probs(&z, 0.6, 1, &[])[0].0, argmax(&z));
        let all_nan = [f32::NAN; 3];
        assert_eq!(top_log_probs(&all_nan, 1.0, 2, &[]).len(), 1);
    }
}
