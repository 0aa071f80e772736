//! Register-tiled f32 block product for the `gemm` path of `matmul` (long prompts on tiers
//! whose streamed kernel stops paying off, see `Tier::STREAMED_MAX_TOKENS`).

// Kernels index several per-row accumulator arrays in lockstep; `for i in 0..R` reads best.
#![allow(clippy::needless_range_loop)]

use crate::backend::cpu::kernels::StridedRows;
use crate::backend::cpu::tier::Tier;

/// Micro-tile: weight rows x tokens. On AVX2 (the tier that runs this path), 12 accumulators
/// + 3 token vectors + 1 weight vector fill the 16 ymm registers.
const RT: usize = 4;
const TT: usize = 3;

/// RT rows of `a` x TT rows of `b` dot products over `k`; result `[t][r]`.
///
/// # Safety
/// `a` rows readable to `k` rounded up to whole vectors (zero padded), `b` rows to `k`.
#[inline(always)]
unsafe fn tile<T: Tier>(
    t: T,
    a: [*const f32; RT],
    b: [*const f32; TT],
    k: usize,
) -> [[f32; RT]; TT] {
    let mut acc = [[t.zero(); RT]; TT];
    let full = k / T::LANES * T::LANES;
    // SAFETY: caller contract.
    unsafe {
        for c in (0..full).step_by(T::LANES) {
            tile_step(t, &mut acc, &a, &b, c, T::LANES);
        }
        if full < k {
            tile_step(t, &mut acc, &a, &b, full, k - full);
        }
    }
    let mut out = [[0f32; RT]; TT];
    for j in 0..TT {
        for r in 0..RT {
            out[j][r] = t.sum(acc[j][r]);
        }
    }
    out
}

/// One vector of columns at `c` of [`tile`]: `n` of them valid in `b` (all if `n >= LANES`),
/// `a` zero padded.
///
/// # Safety
/// As [`tile`], for these columns.
#[inline(always)]
unsafe fn tile_step<T: Tier>(
    t: T,
    acc: &mut [[T::V; RT]; TT],
    a: &[*const f32; RT],
    b: &[*const f32; TT],
    c: usize,
    n: usize,
) {
    // SAFETY: caller contract.
    unsafe {
        let mut bv = [t.zero(); TT];
        for j in 0..TT {
            bv[j] = if n >= T::LANES {
                t.load(b[j].add(c))
            } else {
                t.load_partial(b[j].add(c), n)
            };
        }
        for r in 0..RT {
            let av = t.load(a[r].add(c));
            for j in 0..TT {
                acc[j][r] = t.mul_add(av, bv[j], acc[j][r]);
            }
        }
    }
}

/// Tiled (`gemm`) block: `y[t * ldy + r] (+)= dot(a row r, x row t)` for `r < a.n`,
/// `t < x.n`, over `k = a.cols` columns; `a` rows zero padded to `k` rounded up to whole
/// vectors.
///
/// # Safety
/// `y` valid for writes at every `t * ldy + r` above and not accessed by anyone else during
/// the call.
#[inline(always)]
pub(in crate::backend::cpu) unsafe fn gemm_block<T: Tier>(
    t: T,
    a: StridedRows,
    x: StridedRows,
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
) {
    assert_eq!(a.cols, x.cols);
    let (n_rows, lda, k) = (a.n, a.stride, a.cols);
    let (n_tok, ldx, (a, x)) = (x.n, x.stride, (a.data, x.data));
    if n_rows == 0 || n_tok == 0 {
        return;
    }
    assert!(lda >= k.div_ceil(T::LANES) * T::LANES && a.len() >= n_rows * lda);
    assert!(x.len() >= (n_tok - 1) * ldx + k);
    for t0 in (0..n_tok).step_by(TT) {
        // Partial tiles repeat the last valid token/row and drop those results.
        let mut bp = [x.as_ptr(); TT];
        for (j, p) in bp.iter_mut().enumerate() {
            *p = x[(t0 + j).min(n_tok - 1) * ldx..].as_ptr();
        }
        let nt = TT.min(n_tok - t0);
        for r0 in (0..n_rows).step_by(RT) {
            let mut ap = [a.as_ptr(); RT];
            for (i, p) in ap.iter_mut().enumerate() {
                *p = a[(r0 + i).min(n_rows - 1) * lda..].as_ptr();
            }
            // SAFETY: pointers derived from in-bounds rows per the asserts above.
            let res = unsafe { tile(t, ap, bp, k) };
            for (j, row) in res.iter().enumerate().take(nt) {
                for (i, &v) in row.iter().enumerate().take(RT.min(n_rows - r0)) {
                    // SAFETY: exclusive, in-bounds element per the contract.
                    let o = unsafe { &mut *y.add((t0 + j) * ldy + r0 + i) };
                    *o = if accumulate { *o + v } else { v };
                }
            }
        }
    }
}
