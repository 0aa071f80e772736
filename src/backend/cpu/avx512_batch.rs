//! AVX-512 matmul for n_tokens > 1 (Sirius verification windows, prompts).
//!
//! Weights are streamed like the decode matvec (4 long row streams, converted in registers)
//! and each group of 4 rows is applied to every token, 4 tokens per pass, while it sits in
//! L1, so DRAM traffic stays one pass over the weights. Up to ~4 tokens this is as fast as
//! one (memory bound); for long prompts it measured faster than converting weight blocks to
//! f32 and tiling them (`gemm`), reaching ~88% of FMA peak.
//!
//! Between ~2 and ~8 tokens the loop is neither purely memory nor purely FMA bound, and the
//! hardware prefetchers alone no longer keep DRAM busy while the core computes: each row
//! stream is also prefetched into L2 `PREFETCH_BYTES` ahead (see `rows_tokens`).
//!
//! Same safety contract as `avx512`: callable only when the AVX-512 tier is supported.

use std::arch::x86_64::*;

use super::avx512::{reduce16, BF16_BLOCK};
use crate::dtype::DType;

/// Tokens per pass over a row group: 4 rows x 4 tokens accumulators + 8 weight vectors + 2
/// token vectors use 26 of the 32 zmm registers. Larger tiles (2 rows x 8 tokens, 4 x 6)
/// measured 40-50% slower (the accumulators no longer stay in registers), and the bf16
/// conversion redone per pass is not the bottleneck: replacing it by a second load made the
/// loop slower, not faster.
const TOKENS: usize = 4;

/// How far ahead of the current column each row stream is prefetched into L2, in bytes, on
/// the first pass over a row group. Measured on Zen4 (SmolLM2 shapes, 2 threads, weights from
/// DRAM): 4-24 KiB all gain ~5-10% for 2-16 tokens over the hardware prefetchers alone; L1
/// prefetches (T0) gain less.
const PREFETCH_BYTES: usize = 8 << 10;

const BF16: u8 = 0;
const F16: u8 = 1;
const F32: u8 = 2;

/// 32 consecutive weights of a row (fewer under mask `m`; masked lanes read as 0) as two f32
/// vectors in the order of the prepared x: bf16 even then odd columns (see `bf16_rows`), f16 and
/// f32 first then second half.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn load32<const DT: u8>(p: *const u8, m: __mmask32) -> (__m512, __m512) {
    let (lo, hi) = (m as __mmask16, (m >> 16) as __mmask16);
    // SAFETY: the caller guarantees the unmasked elements are readable; masked-off lanes are
    // neither read nor faulted on, so the address past the row end is never dereferenced.
    unsafe {
        match DT {
            BF16 => {
                let v = _mm512_maskz_loadu_epi16(m, p as *const i16);
                let top = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
                (
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                    _mm512_castsi512_ps(_mm512_and_si512(v, top)),
                )
            }
            F16 => (
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lo, p as *const i16)),
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    hi,
                    p.wrapping_add(32) as *const i16,
                )),
            ),
            _ => (
                _mm512_maskz_loadu_ps(lo, p as *const f32),
                _mm512_maskz_loadu_ps(hi, p.wrapping_add(64) as *const f32),
            ),
        }
    }
}

/// Unreduced partial sums `acc[t][r]` of rows `w[r]` (`cols` long) with prepared tokens `x[t]`
/// (padded to whole 32-column blocks). With `PF`, each row is also prefetched into L2
/// `PREFETCH_BYTES` ahead (past its end too: prefetches never fault, and the addresses are
/// only formed with wrapping arithmetic, never dereferenced).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn rows_tokens<const DT: u8, const R: usize, const NT: usize, const PF: bool>(
    w: [*const u8; R],
    cols: usize,
    x: [*const f32; NT],
) -> [[__m512; R]; NT] {
    let esz = match DT {
        F32 => 4,
        _ => 2,
    };
    let mut acc = [[_mm512_setzero_ps(); R]; NT];
    let mut step = |c: usize, m: __mmask32| {
        if PF {
            for &p in &w {
                // 32 columns: one 64-byte line of bf16/f16, two of f32.
                let a = p.wrapping_add(c * esz + PREFETCH_BYTES) as *const i8;
                _mm_prefetch::<_MM_HINT_T1>(a);
                if DT == F32 {
                    _mm_prefetch::<_MM_HINT_T1>(a.wrapping_add(64));
                }
            }
        }
        // SAFETY: caller contract (rows of `cols` elements, x padded to whole blocks).
        let wv: [(__m512, __m512); R] =
            std::array::from_fn(|r| unsafe { load32::<DT>(w[r].add(c * esz), m) });
        for (t, at) in acc.iter_mut().enumerate() {
            let (xl, xh) = unsafe {
                (
                    _mm512_loadu_ps(x[t].add(c)),
                    _mm512_loadu_ps(x[t].add(c + 16)),
                )
            };
            for (a, &(wl, wh)) in at.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(wh, xh, _mm512_fmadd_ps(wl, xl, *a));
            }
        }
    };
    let full = cols / BF16_BLOCK * BF16_BLOCK;
    for c in (0..full).step_by(BF16_BLOCK) {
        step(c, u32::MAX);
    }
    if full < cols {
        step(full, (1u32 << (cols - full)) - 1);
    }
    acc
}

/// `y[t * ldy + r] = dot(row r, x_t)` for `r < rows`, `t < n`: rows of `cols` elements
/// (`cols * size` bytes apart) in `w`; token t's prepared x at `xs[t * xstride..]`.
///
/// # Safety
/// AVX-512 tier supported; `y` valid for writes at every `t * ldy + r` above and not accessed
/// by anyone else during the call.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn matmul_tokens(
    w: &[u8],
    dtype: DType,
    rows: usize,
    cols: usize,
    xs: &[f32],
    xstride: usize,
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    if rows == 0 || n == 0 {
        return;
    }
    assert!(w.len() >= rows * cols * dtype.size());
    assert!(
        xstride >= cols.div_ceil(BF16_BLOCK) * BF16_BLOCK
            && xs.len() >= (n - 1) * xstride + xstride
    );
    // SAFETY: forwarded contract; bounds asserted above.
    unsafe {
        match dtype {
            DType::BF16 => by_dtype::<BF16>(w, 2, rows, cols, xs, xstride, n, y, ldy),
            DType::F16 => by_dtype::<F16>(w, 2, rows, cols, xs, xstride, n, y, ldy),
            DType::F32 => by_dtype::<F32>(w, 4, rows, cols, xs, xstride, n, y, ldy),
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn by_dtype<const DT: u8>(
    w: &[u8],
    esz: usize,
    rows: usize,
    cols: usize,
    xs: &[f32],
    xstride: usize,
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    let row_bytes = cols * esz;
    let xp = |t: usize| xs[t * xstride..].as_ptr();
    // Rows j, q + j, 2q + j, 3q + j together: 4 long sequential streams (see for_row_groups).
    let q = rows / 4;
    for j in 0..q {
        let rs = [j, q + j, 2 * q + j, 3 * q + j];
        let wp = rs.map(|r| w[r * row_bytes..].as_ptr());
        for t0 in (0..n).step_by(TOKENS) {
            // The first pass brings the rows in from memory; later ones find them in L1.
            // SAFETY: rows and tokens in bounds (asserted by the caller); outputs per contract.
            unsafe {
                if t0 == 0 {
                    tokens_pass::<DT, 4, true>(wp, rs, cols, &xp, t0, n, y, ldy);
                } else {
                    tokens_pass::<DT, 4, false>(wp, rs, cols, &xp, t0, n, y, ldy);
                }
            }
        }
    }
    for r in 4 * q..rows {
        let wp = [w[r * row_bytes..].as_ptr()];
        for t0 in (0..n).step_by(TOKENS) {
            // SAFETY: as above.
            unsafe { tokens_pass::<DT, 1, false>(wp, [r], cols, &xp, t0, n, y, ldy) };
        }
    }
}

/// Rows `rs` (at `wp`) against tokens `t0..t0 + min(TOKENS, n - t0)`, written to `y`.
///
/// # Safety
/// As [`matmul_tokens`], for these rows and tokens.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tokens_pass<const DT: u8, const R: usize, const PF: bool>(
    wp: [*const u8; R],
    rs: [usize; R],
    cols: usize,
    xp: &impl Fn(usize) -> *const f32,
    t0: usize,
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match n - t0 {
            1 => store(
                rows_tokens::<DT, R, 1, PF>(wp, cols, [xp(t0)]),
                rs,
                t0,
                y,
                ldy,
            ),
            2 => store(
                rows_tokens::<DT, R, 2, PF>(wp, cols, [xp(t0), xp(t0 + 1)]),
                rs,
                t0,
                y,
                ldy,
            ),
            3 => store(
                rows_tokens::<DT, R, 3, PF>(wp, cols, [0, 1, 2].map(|i| xp(t0 + i))),
                rs,
                t0,
                y,
                ldy,
            ),
            _ => store(
                rows_tokens::<DT, R, 4, PF>(wp, cols, [0, 1, 2, 3].map(|i| xp(t0 + i))),
                rs,
                t0,
                y,
                ldy,
            ),
        }
    }
}

/// Reduces and writes `acc[t][i]` to `y[(t0 + t) * ldy + rs[i]]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn store<const R: usize, const NT: usize>(
    acc: [[__m512; R]; NT],
    rs: [usize; R],
    t0: usize,
    y: *mut f32,
    ldy: usize,
) {
    if R * NT == 16 {
        // A full 4 x 4 tile: one shuffle tree instead of 16 reductions.
        let flat: [__m512; 16] = std::array::from_fn(|k| acc[k / R][k % R]);
        let mut lanes = [0f32; 16];
        // SAFETY: local buffer; reduce16 puts the sum of flat[k] in lane 4 * (k % 4) + k / 4.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), reduce16(flat)) };
        for k in 0..16 {
            // SAFETY: caller contract.
            unsafe { *y.add((t0 + k / R) * ldy + rs[k % R]) = lanes[4 * (k % 4) + k / 4] };
        }
        return;
    }
    for (t, at) in acc.iter().enumerate() {
        for (a, &r) in at.iter().zip(&rs) {
            // SAFETY: caller contract.
            unsafe { *y.add((t0 + t) * ldy + r) = _mm512_reduce_add_ps(*a) };
        }
    }
}

/// One token's x in the layout of the bf16 kernels: `dst[b * 32..][..32]` holds block b's
/// even columns, then its odd ones (`src` zero padded to whole blocks). Two permutes per
/// block; the element-by-element split measured ~0.6 ns per value, 1-5% of a forward.
///
/// # Safety
/// AVX-512 tier supported.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn split_even_odd(src: &[f32], dst: &mut [f32]) {
    let nb = src.len().div_ceil(BF16_BLOCK);
    assert!(dst.len() >= nb * BF16_BLOCK);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for b in 0..nb {
        let c = b * BF16_BLOCK;
        let rest = src.len() - c;
        let (ml, mh) = (
            super::avx512::mask16(rest),
            super::avx512::mask16(rest.saturating_sub(16)),
        );
        // SAFETY: masked loads stay within src (masked-off lanes are not read, and their
        // addresses are formed with wrapping arithmetic); stores within dst (asserted).
        unsafe {
            let lo = _mm512_maskz_loadu_ps(ml, s.wrapping_add(c));
            let hi = _mm512_maskz_loadu_ps(mh, s.wrapping_add(c + 16));
            _mm512_storeu_ps(d.add(c), _mm512_permutex2var_ps(lo, even, hi));
            _mm512_storeu_ps(d.add(c + 16), _mm512_permutex2var_ps(lo, odd, hi));
        }
    }
}
