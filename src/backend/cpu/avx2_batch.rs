//! AVX2 counterpart of `avx512_batch`: n_tokens > 1 with the weights streamed like the decode
//! matvec (4 long row streams, converted in registers) and each group of 4 rows applied to
//! every token, 2 tokens per pass, while it sits in L1. Each row stream is also prefetched
//! into L2 ahead of use on the first pass, as in `avx512_batch`.
//!
//! Same safety contract as `avx2`: callable only when the AVX2 tier is supported.

use std::arch::x86_64::*;

use super::avx2::{hsum, BF16_BLOCK};
use crate::dtype::DType;

/// Tokens per pass over a row group: 4 rows x 2 tokens accumulators + 2 x 2 token vectors +
/// 2 weight vectors use 14 of the 16 ymm registers.
const TOKENS: usize = 2;

/// How far ahead of the current column each row stream is prefetched into L2, in bytes (see
/// `avx512_batch::PREFETCH_BYTES`).
const PREFETCH_BYTES: usize = 8 << 10;

const BF16: u8 = 0;
const F16: u8 = 1;
const F32: u8 = 2;

/// 16 consecutive weights of a row as two f32 vectors in the order of the prepared x: bf16
/// even then odd columns (see `avx2::bf16_rows`), f16 and f32 first then second half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load16<const DT: u8>(p: *const u8) -> (__m256, __m256) {
    // SAFETY: the caller guarantees 16 readable elements at p.
    unsafe {
        match DT {
            BF16 => {
                let v = _mm256_loadu_si256(p as *const __m256i);
                let top = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
                (
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                    _mm256_castsi256_ps(_mm256_and_si256(v, top)),
                )
            }
            F16 => (
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
            ),
            _ => (
                _mm256_loadu_ps(p as *const f32),
                _mm256_loadu_ps(p.add(32) as *const f32),
            ),
        }
    }
}

/// Unreduced partial sums `acc[t][r]` of rows `w[r]` (`cols` long) with prepared tokens `x[t]`
/// (padded to whole 16-column blocks). With `PF`, each row is also prefetched into L2
/// `PREFETCH_BYTES` ahead (past its end too: prefetches never fault, and the addresses are
/// only formed with wrapping arithmetic, never dereferenced).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_tokens<const DT: u8, const R: usize, const NT: usize, const PF: bool>(
    w: [*const u8; R],
    cols: usize,
    x: [*const f32; NT],
) -> [[__m256; R]; NT] {
    let esz = if DT == F32 { 4 } else { 2 };
    let mut acc = [[_mm256_setzero_ps(); R]; NT];
    // A macro rather than a closure taking the row loader: each row's two weight vectors are
    // loaded right before use (all 4 rows at once would not fit the 16 registers).
    macro_rules! step {
        ($c:expr, |$r:ident| $load:expr) => {{
            let c = $c;
            // One 64-byte line per row every 32 columns of bf16/f16, every 16 of f32.
            if PF && (c * esz) % 64 == 0 {
                for p in w {
                    let a = p.wrapping_add(c * esz + PREFETCH_BYTES) as *const i8;
                    _mm_prefetch::<_MM_HINT_T1>(a);
                }
            }
            // SAFETY: x is padded to whole blocks (caller contract).
            let xv: [(__m256, __m256); NT] = std::array::from_fn(|t| unsafe {
                (
                    _mm256_loadu_ps(x[t].add(c)),
                    _mm256_loadu_ps(x[t].add(c + 8)),
                )
            });
            for $r in 0..R {
                let (wl, wh) = $load;
                for t in 0..NT {
                    acc[t][$r] =
                        _mm256_fmadd_ps(wh, xv[t].1, _mm256_fmadd_ps(wl, xv[t].0, acc[t][$r]));
                }
            }
        }};
    }
    let full = cols / BF16_BLOCK * BF16_BLOCK;
    for c in (0..full).step_by(BF16_BLOCK) {
        // SAFETY: c + 16 <= cols inside every row (caller contract).
        step!(c, |r| unsafe { load16::<DT>(w[r].add(c * esz)) });
    }
    if full < cols {
        // No 16-bit masked loads in AVX2: copy each row's tail into a zeroed block.
        let n = (cols - full) * esz;
        let mut bufs = [[0u8; 4 * BF16_BLOCK]; R];
        for (r, b) in bufs.iter_mut().enumerate() {
            // SAFETY: the row's last cols - full elements.
            b[..n].copy_from_slice(unsafe { std::slice::from_raw_parts(w[r].add(full * esz), n) });
        }
        // SAFETY: local buffers of a whole block.
        step!(full, |r| unsafe { load16::<DT>(bufs[r].as_ptr()) });
    }
    acc
}

/// `y[t * ldy + r] = dot(row r, x_t)` for `r < rows`, `t < n`: rows of `cols` elements
/// (`cols * size` bytes apart) in `w`; token t's prepared x at `xs[t * xstride..]`.
///
/// # Safety
/// AVX2 tier supported; `y` valid for writes at every `t * ldy + r` above and not accessed by
/// anyone else during the call.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
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
#[target_feature(enable = "avx2,fma,f16c")]
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
#[target_feature(enable = "avx2,fma,f16c")]
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
        if n - t0 == 1 {
            store(
                rows_tokens::<DT, R, 1, PF>(wp, cols, [xp(t0)]),
                rs,
                t0,
                y,
                ldy,
            );
        } else {
            store(
                rows_tokens::<DT, R, 2, PF>(wp, cols, [xp(t0), xp(t0 + 1)]),
                rs,
                t0,
                y,
                ldy,
            );
        }
    }
}

/// Reduces and writes `acc[t][i]` to `y[(t0 + t) * ldy + rs[i]]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store<const R: usize, const NT: usize>(
    acc: [[__m256; R]; NT],
    rs: [usize; R],
    t0: usize,
    y: *mut f32,
    ldy: usize,
) {
    for (t, at) in acc.iter().enumerate() {
        for (a, &r) in at.iter().zip(&rs) {
            // SAFETY: caller contract.
            unsafe { *y.add((t0 + t) * ldy + r) = hsum(*a) };
        }
    }
}

/// One token's x in the layout of the bf16 kernels: `dst[b * 16..][..16]` holds block b's
/// even columns, then its odd ones (`src` zero padded to whole blocks); see
/// `avx512_batch::split_even_odd`.
///
/// # Safety
/// AVX2 tier supported.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn split_even_odd(src: &[f32], dst: &mut [f32]) {
    let nb = src.len().div_ceil(BF16_BLOCK);
    assert!(dst.len() >= nb * BF16_BLOCK);
    let full = src.len() / BF16_BLOCK;
    // [a0 a2 b0 b2 | a4 a6 b4 b6] -> [a0 a2 a4 a6 | b0 b2 b4 b6] (64-bit lanes 0, 2, 1, 3).
    let split = |p: *const f32, d: *mut f32| {
        // SAFETY: callers pass 16 readable values at p and 16 writable ones at d.
        unsafe {
            let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
            let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            let fix = |v: __m256| {
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
            };
            _mm256_storeu_ps(d, fix(e));
            _mm256_storeu_ps(d.add(8), fix(o));
        }
    };
    for b in 0..full {
        // SAFETY: whole blocks inside src and dst.
        unsafe {
            split(
                src.as_ptr().add(b * BF16_BLOCK),
                dst.as_mut_ptr().add(b * BF16_BLOCK),
            )
        };
    }
    if full < nb {
        let mut padded = [0f32; BF16_BLOCK];
        padded[..src.len() - full * BF16_BLOCK].copy_from_slice(&src[full * BF16_BLOCK..]);
        // SAFETY: a local block; the last block of dst (asserted).
        unsafe { split(padded.as_ptr(), dst.as_mut_ptr().add(full * BF16_BLOCK)) };
    }
}
