//! Matmul for n_tokens > 1 (Sirius verification windows, prompts) with the weights streamed
//! like the decode matvec: 4 long row streams, converted in registers, and each group of 4
//! rows applied to every token, `Tier::STREAM_TOKENS` per pass, while it sits in L1. DRAM
//! traffic stays one pass over the weights: up to ~4 tokens this is as fast as one (memory
//! bound); for long prompts on AVX-512 it measured faster than converting weight blocks to f32
//! and tiling them (`gemm`), reaching ~88% of FMA peak.
//!
//! Between ~2 and ~8 tokens the loop is neither purely memory nor purely FMA bound, and the
//! hardware prefetchers alone no longer keep DRAM busy while the core computes: each row
//! stream is also prefetched into L2 `PREFETCH_BYTES` ahead on the first pass.

use super::{elem_size, load_block, load_block_partial, prefetch_l2, with_dtype};
use crate::backend::cpu::kernels::StridedRows;
use crate::backend::cpu::tier::Tier;
use crate::tensor::DType;

/// How far ahead of the current column each row stream is prefetched into L2, in bytes.
/// Measured on Zen4 (SmolLM2 shapes, 2 threads, weights from DRAM): 4-24 KiB all gain ~5-10%
/// for 2-16 tokens over the hardware prefetchers alone; L1 prefetches (T0) gain less.
const PREFETCH_BYTES: usize = 8 << 10;

/// `y[t * ldy + r] = dot(row r, x row t)` for `r < rows`, `t < x.n`: rows of `cols = x.cols`
/// elements (`cols * size` bytes apart) in `w`; x rows prepared by `Kernels::prep_x_tokens`.
///
/// # Safety
/// `y` valid for writes at every `t * ldy + r` above and not accessed by anyone else during
/// the call.
#[inline(always)]
pub(in crate::backend::cpu) unsafe fn matmul_tokens<T: Tier>(
    t: T,
    w: &[u8],
    dtype: DType,
    rows: usize,
    x: StridedRows,
    y: *mut f32,
    ldy: usize,
) {
    let StridedRows {
        data: xs,
        stride: xstride,
        cols,
        n,
    } = x;
    if rows == 0 || n == 0 {
        return;
    }
    assert!(w.len() >= dtype.bytes_for(rows * cols));
    assert!(
        xstride >= cols.div_ceil(T::BF16_BLOCK) * T::BF16_BLOCK
            && xs.len() >= (n - 1) * xstride + xstride
    );
    let row_bytes = dtype.bytes_for(cols);
    let xp = |t: usize| xs[t * xstride..].as_ptr();
    // Rows j, q + j, 2q + j, 3q + j together: 4 long sequential streams (see `rows::row_groups`).
    let q = rows / 4;
    // SAFETY (every pass): rows and tokens in bounds (asserted above); outputs per contract.
    with_dtype!(dtype, D => {
        for j in 0..q {
            let rs = [j, q + j, 2 * q + j, 3 * q + j];
            let wp = rs.map(|r| w[r * row_bytes..].as_ptr());
            for t0 in (0..n).step_by(T::STREAM_TOKENS) {
                // The first pass brings the rows in from memory; later ones find them in L1.
                unsafe {
                    if t0 == 0 {
                        tokens_pass::<T, D, 4, true>(t, wp, rs, cols, &xp, t0, n, y, ldy);
                    } else {
                        tokens_pass::<T, D, 4, false>(t, wp, rs, cols, &xp, t0, n, y, ldy);
                    }
                }
            }
        }
        for r in 4 * q..rows {
            let wp = [w[r * row_bytes..].as_ptr()];
            for t0 in (0..n).step_by(T::STREAM_TOKENS) {
                unsafe { tokens_pass::<T, D, 1, false>(t, wp, [r], cols, &xp, t0, n, y, ldy) };
            }
        }
    })
}

/// Rows `rs` (at `wp`) against tokens `t0..t0 + min(STREAM_TOKENS, n - t0)`, written to `y`.
///
/// # Safety
/// As [`matmul_tokens`], for these rows and tokens.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tokens_pass<T: Tier, const D: u8, const R: usize, const PF: bool>(
    t: T,
    wp: [*const u8; R],
    rs: [usize; R],
    cols: usize,
    xp: &impl Fn(usize) -> *const f32,
    t0: usize,
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    const { assert!(T::STREAM_TOKENS <= 4) };
    let nt = (n - t0).min(T::STREAM_TOKENS);
    // SAFETY: forwarded contract. The token counts past the tier's are cut at compile time
    // (from `min` alone the optimizer kept them, and their dead loops cost registers in the
    // live ones).
    unsafe {
        if nt == 1 {
            let acc = rows_tokens::<T, D, R, 1, PF>(t, wp, cols, [xp(t0)]);
            store(t, acc, rs, t0, y, ldy)
        } else if nt == 2 || T::STREAM_TOKENS < 3 {
            let acc = rows_tokens::<T, D, R, 2, PF>(t, wp, cols, [xp(t0), xp(t0 + 1)]);
            store(t, acc, rs, t0, y, ldy)
        } else if nt == 3 || T::STREAM_TOKENS < 4 {
            let x = [0, 1, 2].map(|i| xp(t0 + i));
            let acc = rows_tokens::<T, D, R, 3, PF>(t, wp, cols, x);
            store(t, acc, rs, t0, y, ldy)
        } else {
            let x = [0, 1, 2, 3].map(|i| xp(t0 + i));
            let acc = rows_tokens::<T, D, R, 4, PF>(t, wp, cols, x);
            store(t, acc, rs, t0, y, ldy)
        }
    }
}

/// Unreduced partial sums `acc[t][r]` of rows `w[r]` (`cols` long) with prepared tokens `x[t]`
/// (padded to whole blocks). With `PF`, each row is also prefetched into L2.
///
/// # Safety
/// Every `w[r]` readable for `cols` elements of dtype `D`, every `x[t]` for `cols` rounded up
/// to whole blocks.
#[inline(always)]
unsafe fn rows_tokens<T: Tier, const D: u8, const R: usize, const NT: usize, const PF: bool>(
    t: T,
    w: [*const u8; R],
    cols: usize,
    x: [*const f32; NT],
) -> [[T::V; R]; NT] {
    let block = T::BF16_BLOCK;
    let mut acc = [[t.zero(); R]; NT];
    let full = cols / block * block;
    // SAFETY: caller contract; the last block's weights are read only up to `cols`.
    unsafe {
        for c in (0..full).step_by(block) {
            block_step::<T, D, R, NT, PF>(t, &mut acc, &w, &x, c, block);
        }
        if full < cols {
            block_step::<T, D, R, NT, PF>(t, &mut acc, &w, &x, full, cols - full);
        }
    }
    acc
}

/// The block of [`rows_tokens`] at column `c`: its first `n` columns (all if `n` is the block
/// size). Each row's two weight vectors are loaded right before use: with all rows at once
/// AVX2's 16 registers would not hold them.
///
/// # Safety
/// As [`rows_tokens`], for this block.
#[inline(always)]
unsafe fn block_step<T: Tier, const D: u8, const R: usize, const NT: usize, const PF: bool>(
    t: T,
    acc: &mut [[T::V; R]; NT],
    w: &[*const u8; R],
    x: &[*const f32; NT],
    c: usize,
    n: usize,
) {
    let esz = elem_size(D);
    let block_bytes = T::BF16_BLOCK * esz;
    if PF {
        // One prefetch per 64-byte line of the block; a block of less than a line asks for
        // the line where one starts. Addresses past a row's end are only formed (wrapping),
        // never dereferenced.
        for &p in w {
            for off in (0..block_bytes).step_by(64) {
                if block_bytes >= 64 || (c * esz + off).is_multiple_of(64) {
                    prefetch_l2(p.wrapping_add(c * esz + off + PREFETCH_BYTES));
                }
            }
        }
    }
    // SAFETY: caller contract.
    unsafe {
        let mut xv = [(t.zero(), t.zero()); NT];
        for (v, &xt) in xv.iter_mut().zip(x) {
            *v = (t.load(xt.add(c)), t.load(xt.add(c + T::LANES)));
        }
        for r in 0..R {
            let p = w[r].add(c * esz);
            let (wl, wh) = if n >= T::BF16_BLOCK {
                load_block::<T, D>(t, p)
            } else {
                load_block_partial::<T, D>(t, p, n)
            };
            for (a, &(xl, xh)) in acc.iter_mut().zip(&xv) {
                a[r] = t.mul_add(wh, xh, t.mul_add(wl, xl, a[r]));
            }
        }
    }
}

/// Reduces and writes `acc[t][i]` to `y[(t0 + t) * ldy + rs[i]]`.
///
/// # Safety
/// As [`matmul_tokens`], for these outputs.
#[inline(always)]
unsafe fn store<T: Tier, const R: usize, const NT: usize>(
    t: T,
    acc: [[T::V; R]; NT],
    rs: [usize; R],
    t0: usize,
    y: *mut f32,
    ldy: usize,
) {
    let mut sums = [[0f32; R]; NT];
    if R == 4 && NT == 4 {
        // A full tile: the tier may reduce it faster than one vector at a time.
        let mut tile = [[t.zero(); 4]; 4];
        for (tt, at) in tile.iter_mut().zip(&acc) {
            tt.copy_from_slice(&at[..4]);
        }
        let s = t.sum_4x4(tile);
        for (st, s) in sums.iter_mut().zip(s) {
            st.copy_from_slice(&s[..R]);
        }
    } else {
        for (st, at) in sums.iter_mut().zip(&acc) {
            for (s, &a) in st.iter_mut().zip(at) {
                *s = t.sum(a);
            }
        }
    }
    for (tok, st) in sums.iter().enumerate() {
        for (&s, &r) in st.iter().zip(&rs) {
            // SAFETY: caller contract.
            unsafe { *y.add((t0 + tok) * ldy + r) = s };
        }
    }
}

/// One token's x in the layout of the bf16 kernels: `dst[b * BLOCK..][..BLOCK]` holds block
/// b's even columns, then its odd ones (`src` zero padded to whole blocks). Two permutes per
/// block; element by element measured ~0.6 ns per value, 1-5% of a forward.
#[inline(always)]
pub(in crate::backend::cpu) fn split_bf16_x<T: Tier>(t: T, src: &[f32], dst: &mut [f32]) {
    let (block, l) = (T::BF16_BLOCK, T::LANES);
    let nb = src.len().div_ceil(block);
    assert!(dst.len() >= nb * block);
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for b in 0..nb {
        let c = b * block;
        let rest = src.len() - c;
        // SAFETY: loads within src (partial at its end), stores within dst (asserted).
        unsafe {
            let (lo, hi) = if rest >= block {
                (t.load(s.add(c)), t.load(s.add(c + l)))
            } else if rest > l {
                (t.load(s.add(c)), t.load_partial(s.add(c + l), rest - l))
            } else {
                (t.load_partial(s.add(c), rest), t.zero())
            };
            let (even, odd) = t.split_even_odd(lo, hi);
            t.store(d.add(c), even);
            t.store(d.add(c + l), odd);
        }
    }
}
