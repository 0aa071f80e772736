//! Rotary position embedding: cos/sin tables of the frequencies the model gives, and the
//! rotation of heads to their positions.

use std::sync::RwLock;

/// Per-pair inverse frequencies of one head (head_dim / 2 of them). Pair i rotates elements
/// (i, i + head_dim/2): the Hugging Face "rotate_half" convention.
///
/// cos/sin of every position seen so far are kept (head_dim floats per position, grown on
/// demand): every layer rotates q and k at the same positions, so computing them once per
/// position instead of 2 x layers times saves work, and memory stays far below the KV cache's.
#[derive(Debug)]
pub struct RopeTable {
    pub head_dim: usize,
    pub inv_freq: Vec<f32>,
    cos_sin: RwLock<Vec<f32>>,
}

impl RopeTable {
    /// The table of a head of `head_dim` elements rotating pair i at `inv_freq[i]` radians per
    /// position (`head_dim / 2` of them; the model computes them from its config).
    pub fn new(head_dim: usize, inv_freq: Vec<f32>) -> RopeTable {
        RopeTable {
            head_dim,
            inv_freq,
            cos_sin: RwLock::new(Vec::new()),
        }
    }

    /// Rotates `n_heads` heads of each of `n_rows` rows of `x` in place, row t at position
    /// `start_pos + t`.
    pub fn rotate_rows(&self, x: &mut [f32], n_heads: usize, start_pos: usize, n_rows: usize) {
        self.rotate_at(x, n_heads, start_pos..start_pos + n_rows);
    }

    /// Rotates row `t` of `x` (`n_heads` heads each) to position `positions[t]`.
    pub fn rotate_at(
        &self,
        x: &mut [f32],
        n_heads: usize,
        positions: impl Iterator<Item = usize> + Clone,
    ) {
        let Some(last) = positions.clone().max() else {
            return;
        };
        self.ensure_positions(last + 1);
        // A poisoned lock only means another thread panicked mid-growth; the data written
        // before is still valid, so keep going with it.
        let table = self.cos_sin.read().unwrap_or_else(|e| e.into_inner());
        let width = n_heads * self.head_dim;
        for (row, pos) in x.chunks_exact_mut(width).zip(positions) {
            self.rotate_row(
                row,
                n_heads,
                &table[pos * self.head_dim..(pos + 1) * self.head_dim],
            );
        }
    }

    /// cos/sin of positions 0..n, `head_dim` floats per position (cos of every pair, then
    /// sin), computed as [`RopeTable::rotate_at`] uses them: the CUDA backend's device copy.
    pub fn cos_sin_rows(&self, n: usize) -> Vec<f32> {
        self.ensure_positions(n);
        let table = self.cos_sin.read().unwrap_or_else(|e| e.into_inner());
        table[..n * self.head_dim].to_vec()
    }

    /// Makes sure cos/sin are known for positions 0..n.
    fn ensure_positions(&self, n: usize) {
        let hd = self.head_dim;
        if self.cos_sin.read().unwrap_or_else(|e| e.into_inner()).len() >= n * hd {
            return;
        }
        let mut table = self.cos_sin.write().unwrap_or_else(|e| e.into_inner());
        let half = hd / 2;
        for pos in table.len() / hd..n {
            let start = table.len();
            table.resize(start + hd, 0.0);
            let (cos, sin) = table[start..].split_at_mut(half);
            for i in 0..half {
                // f64 angle: positions reach 10^5 and f32 products lose the low bits there.
                let angle = pos as f64 * self.inv_freq[i] as f64;
                cos[i] = angle.cos() as f32;
                sin[i] = angle.sin() as f32;
            }
        }
    }

    /// Rotates one row given its position's cos/sin (head_dim floats: cos then sin per pair).
    fn rotate_row(&self, row: &mut [f32], n_heads: usize, cos_sin: &[f32]) {
        let half = self.head_dim / 2;
        let (cos, sin) = cos_sin.split_at(half);
        for h in 0..n_heads {
            let head = &mut row[h * self.head_dim..(h + 1) * self.head_dim];
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * cos[i] - b * sin[i];
                x2[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}
