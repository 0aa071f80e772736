//! Down projections of neuron bundles, whose down columns are stored as rows: `out += sum_r
//! coeff[r] * row_r`, in natural column order or, for bf16 on tiers with
//! `Tier::BF16_SPLIT_DOWN`, in the de-interleaved layout of x; and the fused CATS kernel that
//! computes a token's kept neurons (up dot products and down accumulation) in one pass.

// Kernels index several per-row accumulator arrays in lockstep; `for i in 0..R` reads best.
#![allow(clippy::needless_range_loop)]

use super::rows::bf16_rows;
use super::{load_w, load_w_partial, prefetch_l2, with_dtype};
use crate::backend::cpu::neurons::Bundles;
use crate::backend::cpu::tier::Tier;
use crate::tensor::DType;

/// Output vectors held in registers while all rows stream past them.
const VECS: usize = 4;

/// `out[c] += sum_r coeffs[r] * row_r[c]` for `c < out.len()`, row r starting at the byte
/// offset `offsets[r]` of `w` (natural column order, any dtype). `VECS` vectors of output
/// columns stay in registers while all rows stream past them; the last partial vector is
/// accumulated with `Tier::tail_mul_add`.
#[inline(always)]
pub(in crate::backend::cpu) fn accumulate_rows<T: Tier>(
    t: T,
    w: &[u8],
    offsets: &[usize],
    dtype: DType,
    coeffs: &[f32],
    out: &mut [f32],
) {
    let cols = out.len();
    let esz = dtype.size();
    assert!(
        offsets.len() >= coeffs.len()
            && offsets[..coeffs.len()]
                .iter()
                .all(|&o| o + cols * esz <= w.len())
    );
    let full = cols / T::LANES * T::LANES;
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    // SAFETY (all loads and stores): rows hold `cols` elements from their offsets (asserted);
    // `out` holds `cols`; whole vectors stay below `full`, the tail is partial.
    with_dtype!(dtype, D => unsafe {
        let mut c = 0;
        while c < full {
            let nv = ((full - c) / T::LANES).min(VECS);
            let mut acc = [t.zero(); VECS];
            for v in 0..nv {
                acc[v] = t.load(op.add(c + v * T::LANES));
            }
            for (r, &coef) in coeffs.iter().enumerate() {
                let a = t.splat(coef);
                let p = wp.add(offsets[r] + c * esz);
                for v in 0..nv {
                    let x = load_w::<T, D>(t, p.add(v * T::LANES * esz));
                    acc[v] = t.mul_add(x, a, acc[v]);
                }
            }
            for v in 0..nv {
                t.store(op.add(c + v * T::LANES), acc[v]);
            }
            c += nv * T::LANES;
        }
        if full < cols {
            let n = cols - full;
            let mut acc = t.load_partial(op.add(full), n);
            for (r, &coef) in coeffs.iter().enumerate() {
                let x = load_w_partial::<T, D>(t, wp.add(offsets[r] + full * esz), n);
                acc = t.tail_mul_add(x, t.splat(coef), acc);
            }
            t.store_partial(op.add(full), n, acc);
        }
    })
}

/// [`accumulate_rows`] of `cols`-wide rows into `out` in the layout `Kernels::acc_split_block`
/// names: split blocks for bf16 on tiers with `Tier::BF16_SPLIT_DOWN`, else natural order in
/// `out[..cols]`.
#[inline(always)]
pub(in crate::backend::cpu) fn accumulate_rows_in<T: Tier>(
    t: T,
    w: &[u8],
    offsets: &[usize],
    dtype: DType,
    cols: usize,
    coeffs: &[f32],
    out: &mut [f32],
) {
    if T::BF16_SPLIT_DOWN && dtype == DType::BF16 {
        accumulate_rows_split(t, w, offsets, cols, coeffs, out);
    } else {
        accumulate_rows(t, w, offsets, dtype, coeffs, &mut out[..cols]);
    }
}

/// [`accumulate_rows`] for bf16 with `out` in the de-interleaved layout (per block: the even
/// columns, then the odd ones; `out` holds whole blocks), so that one load feeds two FMAs
/// through the split of `Tier::load_bf16_split`. `VECS` blocks stay in registers.
#[inline(always)]
fn accumulate_rows_split<T: Tier>(
    t: T,
    w: &[u8],
    offsets: &[usize],
    cols: usize,
    coeffs: &[f32],
    out: &mut [f32],
) {
    let block = T::BF16_BLOCK;
    let nb = cols.div_ceil(block);
    assert!(out.len() >= nb * block);
    assert!(
        offsets.len() >= coeffs.len()
            && offsets[..coeffs.len()]
                .iter()
                .all(|&o| o + cols * 2 <= w.len())
    );
    let (op, wp) = (out.as_mut_ptr(), w.as_ptr());
    let mut b0 = 0;
    while b0 < nb {
        let nblk = (nb - b0).min(VECS);
        let mut ae = [t.zero(); VECS];
        let mut ao = [t.zero(); VECS];
        for v in 0..nblk {
            // SAFETY: out holds whole blocks up to nb (asserted).
            unsafe {
                ae[v] = t.load(op.add((b0 + v) * block));
                ao[v] = t.load(op.add((b0 + v) * block + T::LANES));
            }
        }
        for (r, &coef) in coeffs.iter().enumerate() {
            let a = t.splat(coef);
            for v in 0..nblk {
                let c0 = (b0 + v) * block;
                // SAFETY: partial to the row's `cols` elements (asserted inside `w`).
                let (e, o) =
                    unsafe { t.load_bf16_split_partial(wp.add(offsets[r] + 2 * c0), cols - c0) };
                ae[v] = t.mul_add(e, a, ae[v]);
                ao[v] = t.mul_add(o, a, ao[v]);
            }
        }
        for v in 0..nblk {
            // SAFETY: as for the loads.
            unsafe {
                t.store(op.add((b0 + v) * block), ae[v]);
                t.store(op.add((b0 + v) * block + T::LANES), ao[v]);
            }
        }
        b0 += VECS;
    }
}

/// Neurons per stream prefetched ahead of the one being computed.
const PREFETCH_AHEAD: usize = 4;
/// Neurons an eighth of the list apart go together, in two groups of four: eight ascending
/// streams through memory.
const STREAMS: usize = 8;

/// One token's CATS up/down over the kept neurons `ids` of a bf16 bundle matrix in one fused
/// pass, on tiers with `Tier::BF16_SPLIT_DOWN`; false (nothing done) otherwise, and the caller
/// takes the generic path. `out += sum_i coeff[i] * (up_i . x + up_bias[i]) * down_i`; `xp`
/// and `out` in the de-interleaved layout (whole blocks).
///
/// The up row and down column of a neuron are adjacent in its bundle, so each neuron is one
/// contiguous 2h-element read, prefetched into L2 a few neurons ahead (kept neurons are
/// scattered, and the hardware prefetchers stop at each jump).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(in crate::backend::cpu) fn kept_up_down<T: Tier>(
    t: T,
    b: Bundles,
    ids: &[u32],
    coeff: &[f32],
    up_bias: Option<&[f32]>,
    xp: &[f32],
    out: &mut [f32],
) -> bool {
    if !(T::BF16_SPLIT_DOWN && b.dtype == DType::BF16) {
        return false;
    }
    let (w, hidden) = (b.bytes, b.hidden);
    let (parts, up_at) = (b.layout.parts(), b.layout.up_offset(hidden));
    let row = hidden * 2;
    let bundle = parts * row;
    assert!(parts >= 2 && up_at * 2 + 2 * row <= bundle);
    let padded = hidden.div_ceil(T::BF16_BLOCK) * T::BF16_BLOCK;
    assert!(out.len() >= padded && xp.len() >= padded);
    assert!(ids
        .iter()
        .all(|&i| (i as usize + 1) * bundle <= w.len() && (i as usize) < coeff.len()));
    assert!(up_bias.is_none_or(|b| ids.iter().all(|&i| (i as usize) < b.len())));
    let base = w.as_ptr();
    // SAFETY (all pointer arithmetic below): every id's bundle lies inside `w` (asserted).
    let up = |i: u32| unsafe { base.add(i as usize * bundle + up_at * 2) };
    let act = |i: u32, dot: f32| coeff[i as usize] * (dot + up_bias.map_or(0.0, |b| b[i as usize]));
    let prefetch = |i: u32| {
        // Every other line: the adjacent-line prefetcher brings its pair (measured as good
        // as every line, with half the prefetch instructions).
        for off in (0..2 * row).step_by(128) {
            prefetch_l2(up(i).wrapping_add(off));
        }
    };
    let n = ids.len();
    let q = n / STREAMS;
    for s in 0..STREAMS {
        for j in 0..PREFETCH_AHEAD.min(q) {
            prefetch(ids[s * q + j]);
        }
    }
    for j in 0..q {
        if j + PREFETCH_AHEAD < q {
            for s in 0..STREAMS {
                prefetch(ids[s * q + j + PREFETCH_AHEAD]);
            }
        }
        for s0 in (0..STREAMS).step_by(4) {
            let nid: [u32; 4] = std::array::from_fn(|s| ids[(s0 + s) * q + j]);
            let rows = nid.map(up);
            // SAFETY: rows of `hidden` bf16 inside `w`; xp padded to whole blocks (asserted);
            // the down columns follow the up rows inside each bundle.
            unsafe {
                let dots = bf16_rows::<T, 4>(t, rows, hidden, xp.as_ptr());
                let a: [f32; 4] = std::array::from_fn(|s| act(nid[s], dots[s]));
                accumulate_split::<T, 4>(t, rows.map(|p| p.add(row)), a, hidden, out);
            }
        }
    }
    for &i in &ids[STREAMS * q..] {
        // SAFETY: as above, one neuron.
        unsafe {
            let dot = bf16_rows::<T, 1>(t, [up(i)], hidden, xp.as_ptr());
            accumulate_split::<T, 1>(t, [up(i).add(row)], [act(i, dot[0])], hidden, out);
        }
    }
    true
}

/// `out += sum_r a[r] * row_r` for R bf16 rows of `cols`, `out` in the split layout.
///
/// # Safety
/// Each row must hold `cols` readable bf16; `out` whole blocks covering `cols`.
#[inline(always)]
unsafe fn accumulate_split<T: Tier, const R: usize>(
    t: T,
    rows: [*const u8; R],
    a: [f32; R],
    cols: usize,
    out: &mut [f32],
) {
    let block = T::BF16_BLOCK;
    let mut av = [t.zero(); R];
    for r in 0..R {
        av[r] = t.splat(a[r]);
    }
    let op = out.as_mut_ptr();
    for b in 0..cols.div_ceil(block) {
        let c0 = b * block;
        // SAFETY: out holds whole blocks; loads are partial to the row's columns.
        unsafe {
            let mut e = t.load(op.add(c0));
            let mut o = t.load(op.add(c0 + T::LANES));
            for r in 0..R {
                let (we, wo) = t.load_bf16_split_partial(rows[r].add(2 * c0), cols - c0);
                e = t.mul_add(we, av[r], e);
                o = t.mul_add(wo, av[r], o);
            }
            t.store(op.add(c0), e);
            t.store(op.add(c0 + T::LANES), o);
        }
    }
}
