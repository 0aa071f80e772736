//! AVX-512 CATS kernel for bf16 bundles: the up dot products and down accumulation of one
//! token's kept neurons in one pass, with no per-neuron calls or checks.
//!
//! Eight neurons an eighth of the list apart are computed together, in two groups of four
//! (eight ascending streams through memory); the up row and down column of a neuron are adjacent in its bundle, so
//! each neuron is one contiguous 2h-element read, prefetched into L2 a few neurons ahead
//! (kept neurons are scattered, and the hardware prefetchers stop at each jump).

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx512::{bf16_rows, BF16_BLOCK};

/// Neurons per stream prefetched ahead of the one being computed.
const PREFETCH_AHEAD: usize = 4;
const STREAMS: usize = 8;

/// `out += sum_i coeff[i] * (up_i . x + up_bias[i]) * down_i` over the neurons `ids` of a
/// bf16 bundle matrix `w` (`[f, parts * hidden]`, the up row `up_at` elements into a bundle,
/// the down column right after it). `xp` is x in the de-interleaved layout of
/// `Kernels::prep_x`; `out` is in the same layout (whole blocks of 32).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn kept_up_down_bf16(
    w: &[u8],
    hidden: usize,
    parts: usize,
    up_at: usize,
    ids: &[u32],
    coeff: &[f32],
    up_bias: Option<&[f32]>,
    xp: &[f32],
    out: &mut [f32],
) {
    let row = hidden * 2;
    let bundle = parts * row;
    assert!(parts >= 2 && up_at * 2 + 2 * row <= bundle);
    let padded = hidden.div_ceil(BF16_BLOCK) * BF16_BLOCK;
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
        let p = up(i);
        // Every other line: the adjacent-line prefetcher brings its pair (measured as good
        // as every line, with half the prefetch instructions).
        let mut off = 0;
        while off < 2 * row {
            // SAFETY: a hint at an address inside the neuron's bundle.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.add(off) as *const i8) };
            off += 128;
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
            // SAFETY: rows of `hidden` bf16 inside `w`; xp padded to whole blocks (asserted).
            let dots = unsafe { bf16_rows::<4>(rows, hidden, xp.as_ptr()) };
            let a: [f32; 4] = std::array::from_fn(|s| act(nid[s], dots[s]));
            // SAFETY: the down columns follow the up rows inside each bundle.
            unsafe { accumulate_split::<4>(rows.map(|p| p.add(row)), a, hidden, out) };
        }
    }
    for &i in &ids[STREAMS * q..] {
        // SAFETY: as above, one neuron.
        unsafe {
            let dot = bf16_rows::<1>([up(i)], hidden, xp.as_ptr());
            accumulate_split::<1>([up(i).add(row)], [act(i, dot[0])], hidden, out);
        }
    }
}

/// `out += sum_r a[r] * row_r` for R bf16 rows of `cols`, `out` in the split layout.
///
/// # Safety
/// Each row must hold `cols` readable bf16; `out` whole blocks covering `cols`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn accumulate_split<const R: usize>(
    rows: [*const u8; R],
    a: [f32; R],
    cols: usize,
    out: &mut [f32],
) {
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let av: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(a[r]));
    let op = out.as_mut_ptr();
    let nb = cols.div_ceil(BF16_BLOCK);
    for b in 0..nb {
        let left = cols - b * BF16_BLOCK;
        let m: __mmask32 = if left >= 32 { !0 } else { (1u32 << left) - 1 };
        // SAFETY: out holds whole blocks; loads are masked to the row's columns.
        unsafe {
            let mut e = _mm512_loadu_ps(op.add(b * BF16_BLOCK));
            let mut o = _mm512_loadu_ps(op.add(b * BF16_BLOCK + 16));
            for r in 0..R {
                let x = _mm512_maskz_loadu_epi16(m, rows[r].add(b * 2 * BF16_BLOCK) as *const i16);
                e = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(x)), av[r], e);
                o = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(x, hi)), av[r], o);
            }
            _mm512_storeu_ps(op.add(b * BF16_BLOCK), e);
            _mm512_storeu_ps(op.add(b * BF16_BLOCK + 16), o);
        }
    }
}
