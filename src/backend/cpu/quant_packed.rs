//! Q4_0, Q4_1 (and, for the LM head, Q8_0) matrices repacked for decode: 8 rows
//! interleaved per block of 32 columns.
//!
//! In the stored layout a SIMD dot product works on one row at a time: each block's 32
//! products are summed across lanes (`madd`), converted to f32 and scaled by that row's own
//! scale, and the `maddubs`/`madd` pair per block saturates the one port that multiplies
//! integers on Zen 1. Interleaved, one 32-byte load holds 4 weights of each of 8 rows, a
//! lane pair accumulates one row, the 16-bit partial sums of a whole block add up without
//! overflow (|sum| <= 8 x 2 x 15 x 128 = 30720), and one `madd`, one conversion and one
//! scale vector serve 8 rows. Measured on a 2-vCPU EPYC (Zen 1, AVX2) over 66 MB of Q4_1
//! rows, one thread: 1.85x the row-at-a-time kernel.
//!
//! Layout of group `g` (rows `8g..8g+8`), block `b`, at byte `(g * blocks + b) * group_block`:
//! the 8 rows' f16 scales, then (Q4_1) their 8 f16 minima or (Q8_0) the 8 rows' L1 norms
//! in the block as f16 rounded up (the LM head's error bounds), then chunks of 32 bytes (4 of
//! them, 8 for Q8_0): chunk `j` holds, for row `r`, bytes `4j..4j+4` of that row's stored
//! quants at `4r..4r+4` (Q4: low nibbles are elements `4j..4j+4`, high nibbles elements
//! `16+4j..16+4j+4`; Q8_0: elements `4j..4j+4`).

use super::pool::ThreadPool;
use super::util::SharedMut;
use crate::tensor::DType;

/// Rows interleaved per group.
pub(super) const GROUP: usize = 8;
/// Bytes of one row's quants in a block: 32 nibbles, or 32 bytes for Q8_0.
fn quant_bytes(dtype: DType) -> usize {
    if dtype == DType::Q8_0 {
        32
    } else {
        16
    }
}

/// A `[rows, cols]` Q4_0, Q4_1 or Q8_0 matrix in the interleaved layout above.
pub struct PackedRows {
    bytes: Box<[u8]>,
    dtype: DType,
    rows: usize,
    blocks: usize,
}

/// Bytes of one (group, block) cell: scales, minima (Q4_1), quants.
pub(super) fn group_block_bytes(dtype: DType) -> usize {
    scale_bytes(dtype) + GROUP * quant_bytes(dtype)
}

/// Bytes of a cell's scales and minima or norms.
fn scale_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Q4_1 | DType::Q8_0 => 4 * GROUP,
        _ => 2 * GROUP,
    }
}

/// `sum_i |w_i|` of a Q8_0 block as f16 bits, rounded up (an upper bound).
fn block_norm_q8(blk: &[u8]) -> u16 {
    let sum: u32 = blk[2..34]
        .iter()
        .map(|&q| (q as i8).unsigned_abs() as u32)
        .sum();
    let norm = crate::tensor::quant::f16_at(blk, 0).abs() * sum as f32;
    let h = half::f16::from_f32(norm);
    if h.to_f32() < norm {
        h.to_bits() + 1
    } else {
        h.to_bits()
    }
}

/// Groups `g0..` of `src` (blocks of 32 per row) into `out`, whole groups.
fn pack_groups(dtype: DType, src: &[u8], blocks: usize, g0: usize, out: &mut [u8]) {
    let (block_bytes, cell, head) = (
        dtype.block().1,
        group_block_bytes(dtype),
        scale_bytes(dtype),
    );
    for (g, group_out) in out.chunks_exact_mut(blocks * cell).enumerate() {
        for (b, out) in group_out.chunks_exact_mut(cell).enumerate() {
            for r in 0..GROUP {
                let at = (((g0 + g) * GROUP + r) * blocks + b) * block_bytes;
                let blk = &src[at..at + block_bytes];
                out[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                let second = &mut out[2 * GROUP + 2 * r..2 * GROUP + 2 * r + 2];
                match dtype {
                    DType::Q4_1 => second.copy_from_slice(&blk[2..4]),
                    DType::Q8_0 => second.copy_from_slice(&block_norm_q8(blk).to_le_bytes()),
                    _ => {}
                }
                let quants = &blk[block_bytes - quant_bytes(dtype)..];
                for (j, four) in quants.chunks_exact(4).enumerate() {
                    let to = head + 32 * j + 4 * r;
                    out[to..to + 4].copy_from_slice(four);
                }
            }
        }
    }
}

impl PackedRows {
    /// `src` (`rows x cols` of `dtype`, stored layout) interleaved, or `None` for a format or
    /// shape the layout does not cover (other formats, rows not a multiple of 8).
    pub fn pack(dtype: DType, src: &[u8], rows: usize, cols: usize) -> Option<PackedRows> {
        Self::pack_on(&ThreadPool::new(1), dtype, src, rows, cols)
    }

    /// [`PackedRows::pack`] split over `pool`'s threads (a decode step's first product of
    /// a matrix packs it: ~0.5 s for SmolLM2 in Q8_0 on one Zen 1 core).
    pub fn pack_on(
        pool: &ThreadPool,
        dtype: DType,
        src: &[u8],
        rows: usize,
        cols: usize,
    ) -> Option<PackedRows> {
        if !matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
            || rows == 0
            || !rows.is_multiple_of(GROUP)
            || !cols.is_multiple_of(32)
            || src.len() != dtype.bytes_for(rows * cols)
        {
            return None;
        }
        let blocks = cols / 32;
        let per_group = blocks * group_block_bytes(dtype);
        let groups = rows / GROUP;
        let mut bytes = vec![0u8; groups * per_group].into_boxed_slice();
        let tasks = (pool.n_threads() * 4).min(groups);
        let chunk = groups.div_ceil(tasks);
        let out = SharedMut::new(&mut bytes);
        pool.run(groups.div_ceil(chunk), &|task| {
            let g0 = task * chunk;
            let ng = chunk.min(groups - g0);
            // SAFETY: task `task` alone owns groups g0..g0 + ng.
            let part = unsafe { out.slice(g0 * per_group, ng * per_group) };
            pack_groups(dtype, src, blocks, g0, part);
        });
        Some(PackedRows {
            bytes,
            dtype,
            rows,
            blocks,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Blocks of 32 per row.
    pub(super) fn blocks(&self) -> usize {
        self.blocks
    }

    /// The bytes of groups `g0..g0 + n`.
    pub(super) fn groups(&self, g0: usize, n: usize) -> &[u8] {
        let per_group = self.blocks * group_block_bytes(self.dtype);
        &self.bytes[g0 * per_group..(g0 + n) * per_group]
    }

    /// Bytes held.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Row `row` back in the stored layout (the tests' check that packing loses nothing).
    #[cfg(test)]
    pub(super) fn unpack_row(&self, row: usize) -> Vec<u8> {
        let (cell, head, block_bytes) = (
            group_block_bytes(self.dtype),
            scale_bytes(self.dtype),
            self.dtype.block().1,
        );
        let (g, r) = (row / GROUP, row % GROUP);
        let mut out = vec![0u8; self.blocks * block_bytes];
        for (b, blk) in out.chunks_exact_mut(block_bytes).enumerate() {
            let cell = &self.groups(g, 1)[b * cell..(b + 1) * cell];
            blk[..2].copy_from_slice(&cell[2 * r..2 * r + 2]);
            if self.dtype == DType::Q4_1 {
                blk[2..4].copy_from_slice(&cell[2 * GROUP + 2 * r..2 * GROUP + 2 * r + 2]);
            }
            let quants = quant_bytes(self.dtype);
            for j in 0..quants / 4 {
                let from = head + 32 * j + 4 * r;
                blk[block_bytes - quants + 4 * j..][..4].copy_from_slice(&cell[from..from + 4]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::quant::tests::reference_blocks;

    #[test]
    fn packing_keeps_every_row() {
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            let (rows, cols) = (16, 96);
            let src = reference_blocks(dtype, rows * cols / 32);
            let p = PackedRows::pack(dtype, &src, rows, cols).expect("packs");
            let extra = if dtype == DType::Q8_0 {
                2 * rows * cols / 32
            } else {
                0
            };
            assert_eq!(p.byte_len(), src.len() + extra, "{dtype}");
            let row_bytes = dtype.bytes_for(cols);
            for r in 0..rows {
                assert_eq!(
                    p.unpack_row(r),
                    src[r * row_bytes..(r + 1) * row_bytes],
                    "{dtype} row {r}"
                );
            }
        }
    }

    #[test]
    fn shapes_outside_the_layout_are_not_packed() {
        let src = reference_blocks(DType::Q4_1, 12 * 2);
        assert!(
            PackedRows::pack(DType::Q4_1, &src, 12, 64).is_none(),
            "12 rows"
        );
        let k = reference_blocks(DType::Q4K, 8);
        assert!(PackedRows::pack(DType::Q4K, &k, 8, 256).is_none(), "Q4_K");
    }
}
