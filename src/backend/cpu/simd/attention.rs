//! The two products of attention over a KV-cache slice: scores (`K q`) and the weighted sum of
//! values (`P V`), for the query heads that share one KV head.

// Kernels index several per-head accumulator arrays in lockstep; `for h in 0..H` reads best.
#![allow(clippy::needless_range_loop)]

use super::rows::matvec;
use crate::backend::cpu::kernels::{RowStarts, StridedRows};
use crate::backend::cpu::tier::Tier;
use crate::tensor::DType;

/// Attention scores: see `Tier::scores`, which picks the algorithm.
#[inline(always)]
pub(in crate::backend::cpu) fn scores<T: Tier>(t: T, keys: StridedRows, q: &[f32], s: &mut [f32]) {
    if keys.n > 0 {
        t.scores(keys, q, s);
    }
}

/// `Tier::scores` as one matvec per head over the key rows.
#[inline(always)]
pub(in crate::backend::cpu) fn scores_by_rows<T: Tier>(
    t: T,
    keys: StridedRows,
    q: &[f32],
    s: &mut [f32],
) {
    // Viewing f32s as bytes is always valid, and x86_64 is little-endian as the byte kernel
    // expects.
    let bytes = {
        // SAFETY: the same memory, as initialized bytes.
        unsafe {
            std::slice::from_raw_parts(keys.data.as_ptr() as *const u8, size_of_val(keys.data))
        }
    };
    let (rows, cols) = (RowStarts::Strided(keys.stride), keys.cols);
    for (h, sh) in s.chunks_exact_mut(keys.n).enumerate() {
        matvec(
            t,
            bytes,
            DType::F32,
            rows,
            cols,
            &q[h * cols..(h + 1) * cols],
            sh,
        );
    }
}

/// Attention's P·V for the `g = w.len() / v.n` heads sharing one KV head:
/// `out[h * v.cols + c] = sum_p w[h * v.n + p] * (value row p)[c]`. `Tier::WSUM_HEADS` heads
/// share each load of a value row; `Tier::WSUM_VECS` vectors of each head's output columns
/// stay in registers over all positions.
#[inline(always)]
pub(in crate::backend::cpu) fn weighted_sum<T: Tier>(
    t: T,
    v: StridedRows,
    w: &[f32],
    out: &mut [f32],
) {
    let (np, cols) = (v.n, v.cols);
    if np == 0 {
        out.fill(0.0);
        return;
    }
    let g = w.len() / np;
    assert!(v.data.len() >= (np - 1) * v.stride + cols && out.len() >= g * cols);
    const { assert!(T::WSUM_HEADS <= 4 && T::WSUM_VECS <= MAX_VECS) };
    for h0 in (0..g).step_by(T::WSUM_HEADS) {
        let wp = w[h0 * np..].as_ptr();
        let op = out[h0 * cols..].as_mut_ptr();
        let nh = (g - h0).min(T::WSUM_HEADS);
        // SAFETY: heads h0.. of this step have their weights and outputs inside `w` / `out`.
        // Head counts past the tier's are cut at compile time (see `tokens::tokens_pass`).
        unsafe {
            if nh == 1 || T::WSUM_HEADS < 2 {
                heads::<T, 1>(t, v, wp, op)
            } else if nh == 2 || T::WSUM_HEADS < 3 {
                heads::<T, 2>(t, v, wp, op)
            } else if nh == 3 || T::WSUM_HEADS < 4 {
                heads::<T, 3>(t, v, wp, op)
            } else {
                heads::<T, 4>(t, v, wp, op)
            }
        }
    }
}

/// Most vectors per head that [`columns`] holds (the largest `Tier::WSUM_VECS`).
const MAX_VECS: usize = 8;

/// `H` heads of [`weighted_sum`]; weights at `w + h * v.n`, outputs at `out + h * v.cols`.
///
/// # Safety
/// `H` heads' weights and outputs inside the caller's slices; `v` holds its rows.
#[inline(always)]
unsafe fn heads<T: Tier, const H: usize>(t: T, v: StridedRows, w: *const f32, out: *mut f32) {
    let l = T::LANES;
    let full = v.cols / l * l;
    let mut c = 0;
    // SAFETY: forwarded contract.
    unsafe {
        // Whole blocks of WSUM_VECS vectors (a constant count, fully unrolled), then fewer.
        while c + T::WSUM_VECS * l <= full {
            columns::<T, H>(t, v, c, T::WSUM_VECS, w, out);
            c += T::WSUM_VECS * l;
        }
        if c < full {
            columns::<T, H>(t, v, c, (full - c) / l, w, out);
        }
        if full < v.cols {
            tail_columns::<T, H>(t, v, full, v.cols - full, w, out);
        }
    }
}

/// Output columns `c..c + nv * LANES` (whole vectors) of `H` heads.
///
/// # Safety
/// As [`heads`], with those columns below `v.cols`.
#[inline(always)]
unsafe fn columns<T: Tier, const H: usize>(
    t: T,
    v: StridedRows,
    c: usize,
    nv: usize,
    w: *const f32,
    out: *mut f32,
) {
    let (l, np, cols) = (T::LANES, v.n, v.cols);
    let mut acc = [[t.zero(); MAX_VECS]; H];
    let mut vv = [t.zero(); MAX_VECS];
    // SAFETY: caller contract (row p, columns c..c + nv * l inside `v`).
    unsafe {
        for p in 0..np {
            let base = v.data.as_ptr().add(p * v.stride + c);
            for j in 0..nv {
                vv[j] = t.load(base.add(j * l));
            }
            for h in 0..H {
                let s = t.splat(*w.add(h * np + p));
                for j in 0..nv {
                    acc[h][j] = t.mul_add(s, vv[j], acc[h][j]);
                }
            }
        }
        for h in 0..H {
            for j in 0..nv {
                t.store(out.add(h * cols + c + j * l), acc[h][j]);
            }
        }
    }
}

/// The last `n` (< LANES) output columns from `c` of `H` heads, accumulated with
/// `Tier::tail_mul_add`.
///
/// # Safety
/// As [`heads`].
#[inline(always)]
unsafe fn tail_columns<T: Tier, const H: usize>(
    t: T,
    v: StridedRows,
    c: usize,
    n: usize,
    w: *const f32,
    out: *mut f32,
) {
    let (np, cols) = (v.n, v.cols);
    let mut acc = [t.zero(); H];
    // SAFETY: caller contract; loads and stores partial to `cols`.
    unsafe {
        for p in 0..np {
            let vv = t.load_partial(v.data.as_ptr().add(p * v.stride + c), n);
            for h in 0..H {
                let s = t.splat(*w.add(h * np + p));
                acc[h] = t.tail_mul_add(s, vv, acc[h]);
            }
        }
        for h in 0..H {
            t.store_partial(out.add(h * cols + c), n, acc[h]);
        }
    }
}
