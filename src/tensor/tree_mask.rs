//! Attention over a token tree (Sirius with width W > 1).
//!
//! The nodes of a draft tree are flattened into consecutive cache rows after the accepted
//! text (the *prefix*): row `prefix + i` holds node `i`, whose parent is an earlier node. A
//! node attends to the whole prefix and to its own ancestors (itself included), never to its
//! siblings or cousins, and its rotary position is `prefix + depth`, not its row. A chain (every
//! node the child of the one before) is plain causal attention.

use crate::error::{Error, Result};

/// The visibility of tree rows for the last `n` nodes of a tree (one forward batch), and their
/// rotary positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeMask {
    prefix: usize,
    /// Tree rows in the cache once the batch is in (the batch is the last `n` of them).
    span: usize,
    /// 64-bit words per batch row.
    words: usize,
    /// `[n, words]`: bit `j` of row `t` = batch token `t` sees tree row `j`.
    bits: Vec<u64>,
    positions: Vec<usize>,
}

impl TreeMask {
    /// The mask of nodes `batch_start..parents.len()` of a tree whose node `i` has parent
    /// `parents[i]` (an earlier node; `None` for a root, which hangs off the prefix).
    pub fn from_parents(
        prefix: usize,
        parents: &[Option<usize>],
        batch_start: usize,
    ) -> Result<TreeMask> {
        let span = parents.len();
        if batch_start >= span {
            return Err(Error::InvalidArgument(format!(
                "tree batch starts at node {batch_start} of a tree of {span}"
            )));
        }
        if let Some(i) = parents
            .iter()
            .enumerate()
            .position(|(i, p)| p.is_some_and(|p| p >= i))
        {
            return Err(Error::InvalidArgument(format!(
                "tree node {i} has parent {:?}: parents must come before their children",
                parents[i]
            )));
        }
        let words = span.div_ceil(64);
        let n = span - batch_start;
        let mut bits = vec![0u64; n * words];
        let mut positions = Vec::with_capacity(n);
        for (t, row) in bits.chunks_exact_mut(words).enumerate() {
            let mut node = Some(batch_start + t);
            let mut depth = 0;
            while let Some(i) = node {
                row[i / 64] |= 1 << (i % 64);
                node = parents[i];
                depth += 1;
            }
            positions.push(prefix + depth - 1);
        }
        Ok(TreeMask {
            prefix,
            span,
            words,
            bits,
            positions,
        })
    }

    /// Cache rows every node sees.
    pub fn prefix(&self) -> usize {
        self.prefix
    }

    /// Tree rows in the cache once the batch is in.
    pub fn span(&self) -> usize {
        self.span
    }

    /// Tokens in the batch.
    pub fn n_tokens(&self) -> usize {
        self.positions.len()
    }

    /// Cache row of the batch's first token.
    pub fn first_row(&self) -> usize {
        self.prefix + self.span - self.n_tokens()
    }

    /// Rotary position of each batch token.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// 64-bit words per batch row of [`TreeMask::bits`].
    pub fn words(&self) -> usize {
        self.words
    }

    /// The visibility bits, `[n_tokens, words]`: bit `j` of row `t` = token `t` sees tree
    /// row `j` (the CUDA backend uploads them for its attention kernel).
    pub fn bits(&self) -> &[u64] {
        &self.bits
    }

    /// Whether batch token `t` sees cache row `row`.
    #[inline]
    pub fn visible(&self, t: usize, row: usize) -> bool {
        if row < self.prefix {
            return true;
        }
        let j = row - self.prefix;
        j < self.span && self.bits[t * self.words + j / 64] >> (j % 64) & 1 == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_is_causal() {
        let parents = [None, Some(0), Some(1), Some(2)];
        let m = TreeMask::from_parents(10, &parents, 1).unwrap();
        assert_eq!(m.n_tokens(), 3);
        assert_eq!(m.first_row(), 11);
        assert_eq!(m.positions(), &[11, 12, 13]);
        for t in 0..3 {
            for row in 0..20 {
                assert_eq!(m.visible(t, row), row <= 11 + t, "t {t} row {row}");
            }
        }
    }

    #[test]
    fn siblings_do_not_see_each_other() {
        // 0 -> {1, 2}; 1 -> 3; 2 -> 4
        let parents = [None, Some(0), Some(0), Some(1), Some(2)];
        let m = TreeMask::from_parents(5, &parents, 0).unwrap();
        assert_eq!(m.positions(), &[5, 6, 6, 7, 7]);
        let sees = |t: usize| (0..5).filter(|&j| m.visible(t, 5 + j)).collect::<Vec<_>>();
        assert_eq!(sees(0), [0]);
        assert_eq!(sees(2), [0, 2]);
        assert_eq!(sees(3), [0, 1, 3]);
        assert_eq!(sees(4), [0, 2, 4]);
        assert!(m.visible(4, 4), "the prefix is visible to all");
    }

    #[test]
    fn wide_trees_use_several_words() {
        // A root with 100 children, then one grandchild under child 70.
        let mut parents = vec![None];
        parents.extend((0..100).map(|_| Some(0)));
        parents.push(Some(70));
        let m = TreeMask::from_parents(0, &parents, 101).unwrap();
        let seen: Vec<usize> = (0..102).filter(|&j| m.visible(0, j)).collect();
        assert_eq!(seen, [0, 70, 101]);
        assert_eq!(m.positions(), &[2]);
    }

    #[test]
    fn bad_trees_are_errors() {
        assert!(TreeMask::from_parents(0, &[None, Some(1)], 0).is_err());
        assert!(TreeMask::from_parents(0, &[None, Some(3)], 0).is_err());
        assert!(TreeMask::from_parents(0, &[None], 1).is_err());
    }
}
