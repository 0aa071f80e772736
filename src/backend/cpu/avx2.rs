//! AVX2 + FMA + F16C tier. Every function here must only be called after
//! `Isa::Avx2.is_supported()` returned true; that is the safety contract of each `unsafe fn`
//! below on top of the bounds each one asserts.
//!
//! AVX2 has no 16-bit masked loads, so column tails are copied into small zeroed stack buffers
//! and run through the same vector code as full blocks.

// Kernels index several per-row accumulator arrays in lockstep; `for i in 0..R` reads best.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::dtype::DType;

/// bf16 matvec wants x de-interleaved per block of this many columns (see `Kernels::prep_x`).
pub(super) const BF16_BLOCK: usize = 16;
/// Tiled (`gemm`) micro-tile: weight rows x tokens. 12 accumulators + 3 token vectors + 1 weight
/// vector fill the 16 ymm registers.
const RT: usize = 4;
const TT: usize = 3;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Widens 8 bf16 to f32: a bf16 is the top half of the f32 with the same value.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bf16x8(h: __m128i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// `out[i] = src[i]` as f32; `src` holds at least `out.len()` elements of `dtype`, any alignment.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn convert(src: &[u8], dtype: DType, out: &mut [f32]) {
    let n = out.len();
    assert!(src.len() >= n * dtype.size());
    let s = src.as_ptr();
    let o = out.as_mut_ptr();
    let mut i = 0;
    // SAFETY (all loads/stores below): i + 8 <= n and both buffers hold n elements.
    match dtype {
        DType::F32 => unsafe { std::ptr::copy_nonoverlapping(s, o as *mut u8, n * 4) },
        DType::BF16 => unsafe {
            while i + 8 <= n {
                _mm256_storeu_ps(
                    o.add(i),
                    bf16x8(_mm_loadu_si128(s.add(2 * i) as *const __m128i)),
                );
                i += 8;
            }
        },
        DType::F16 => unsafe {
            while i + 8 <= n {
                _mm256_storeu_ps(
                    o.add(i),
                    _mm256_cvtph_ps(_mm_loadu_si128(s.add(2 * i) as *const __m128i)),
                );
                i += 8;
            }
        },
    }
    if i < n {
        super::scalar::convert(
            &src[i * dtype.size()..n * dtype.size()],
            dtype,
            &mut out[i..],
        );
    }
}

/// `R` bf16 rows (at `w[i]`) dotted with the de-interleaved `xp` (same even/odd trick as
/// the AVX-512 tier: `lane << 16` is the even column, `lane & 0xffff0000` the odd one).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_rows<const R: usize>(w: [*const u8; R], cols: usize, xp: *const f32) -> [f32; R] {
    let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut ae = [_mm256_setzero_ps(); R];
    let mut ao = [_mm256_setzero_ps(); R];
    let nb = cols / BF16_BLOCK;
    let step = |ae: &mut [__m256; R], ao: &mut [__m256; R], b: usize, rows: [__m256i; R]| {
        // SAFETY: xp is padded to whole blocks (caller contract).
        let (xe, xo) = unsafe {
            (
                _mm256_loadu_ps(xp.add(BF16_BLOCK * b)),
                _mm256_loadu_ps(xp.add(BF16_BLOCK * b + 8)),
            )
        };
        for i in 0..R {
            let v = rows[i];
            ae[i] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)), xe, ae[i]);
            ao[i] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), xo, ao[i]);
        }
    };
    for b in 0..nb {
        // SAFETY: R rows of `cols` bf16 (caller contract); this block is inside them.
        let rows: [__m256i; R] = std::array::from_fn(|i| unsafe {
            _mm256_loadu_si256(w[i].add(2 * BF16_BLOCK * b) as *const __m256i)
        });
        step(&mut ae, &mut ao, b, rows);
    }
    let tail = cols % BF16_BLOCK;
    if tail != 0 {
        let mut buf = [[0u8; 2 * BF16_BLOCK]; R];
        for (i, row) in buf.iter_mut().enumerate() {
            // SAFETY: the last `tail` elements of row i.
            let src =
                unsafe { std::slice::from_raw_parts(w[i].add(2 * BF16_BLOCK * nb), 2 * tail) };
            row[..2 * tail].copy_from_slice(src);
        }
        let rows: [__m256i; R] = std::array::from_fn(|i| unsafe {
            _mm256_loadu_si256(buf[i].as_ptr() as *const __m256i)
        });
        step(&mut ae, &mut ao, nb, rows);
    }
    std::array::from_fn(|i| hsum(_mm256_add_ps(ae[i], ao[i])))
}

/// `R` f16 or f32 rows (at `w[i]`; `HALF` selects f16) dotted with `x` (natural order).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn wide_rows<const R: usize, const HALF: bool>(
    w: [*const u8; R],
    cols: usize,
    x: *const f32,
) -> [f32; R] {
    let esz = if HALF { 2 } else { 4 };
    // SAFETY: callers pass pointers to 8 readable elements.
    let load = |p: *const u8| unsafe {
        if HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    };
    let mut a0 = [_mm256_setzero_ps(); R];
    let mut a1 = [_mm256_setzero_ps(); R];
    let mut c = 0;
    // SAFETY: c + 16 (then c + 8) <= cols inside R rows of `cols` elements (caller contract).
    unsafe {
        while c + 16 <= cols {
            let x0 = _mm256_loadu_ps(x.add(c));
            let x1 = _mm256_loadu_ps(x.add(c + 8));
            for i in 0..R {
                let p = w[i].add(esz * c);
                a0[i] = _mm256_fmadd_ps(load(p), x0, a0[i]);
                a1[i] = _mm256_fmadd_ps(load(p.add(8 * esz)), x1, a1[i]);
            }
            c += 16;
        }
        if c + 8 <= cols {
            let x0 = _mm256_loadu_ps(x.add(c));
            for i in 0..R {
                a0[i] = _mm256_fmadd_ps(load(w[i].add(esz * c)), x0, a0[i]);
            }
            c += 8;
        }
        if c < cols {
            let t = cols - c;
            let mut xb = [0f32; 8];
            xb[..t].copy_from_slice(std::slice::from_raw_parts(x.add(c), t));
            let x0 = _mm256_loadu_ps(xb.as_ptr());
            for i in 0..R {
                let mut wb = [0u8; 32];
                wb[..t * esz]
                    .copy_from_slice(std::slice::from_raw_parts(w[i].add(esz * c), t * esz));
                a0[i] = _mm256_fmadd_ps(load(wb.as_ptr()), x0, a0[i]);
            }
        }
    }
    std::array::from_fn(|i| hsum(_mm256_add_ps(a0[i], a1[i])))
}

/// `y[r] = dot(row r, x)`; row `r` starts `r * stride` elements into `w` and has `cols`
/// elements. For bf16, `x` must come from `Kernels::prep_x`; otherwise it is plain (len >= cols).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matvec(
    w: &[u8],
    dtype: DType,
    stride: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let rows = y.len();
    if rows == 0 {
        return;
    }
    let esz = dtype.size();
    assert!(w.len() >= ((rows - 1) * stride + cols) * esz);
    let row_bytes = stride * esz;
    let wp = w.as_ptr();
    // SAFETY: every row r < rows lies inside `w` (asserted above).
    unsafe { rows_dot(|r| wp.add(r * row_bytes), dtype, cols, x, y) }
}

/// [`matvec`] over rows that start at the byte offsets `offsets[r]` of `w` (neuron bundles).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matvec_gather(
    w: &[u8],
    offsets: &[usize],
    dtype: DType,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let rows = y.len();
    let row_len = cols * dtype.size();
    assert!(offsets.len() >= rows && offsets[..rows].iter().all(|&o| o + row_len <= w.len()));
    let wp = w.as_ptr();
    // SAFETY: every listed row lies inside `w` (asserted above).
    unsafe { rows_dot(|r| wp.add(offsets[r]), dtype, cols, x, y) }
}

/// `y[r] = dot(row(r), x)` for `r < y.len()`, 4 rows at a time.
///
/// # Safety
/// `row(r)` must point at `cols` readable elements of `dtype` for every `r < y.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_dot(
    row: impl Fn(usize) -> *const u8,
    dtype: DType,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let rows = y.len();
    let xp = x.as_ptr();
    macro_rules! rows_with {
        ($kernel:ident $(, $extra:tt)?) => {
            // SAFETY: the caller's contract covers every row pointer.
            super::util::for_row_groups(rows, &row, y, |p| unsafe {
                $kernel::<4 $(, $extra)?>(p, cols, xp)
            }, |p| unsafe { $kernel::<1 $(, $extra)?>(p, cols, xp) })
        };
    }
    match dtype {
        DType::BF16 => {
            assert!(x.len() >= cols.div_ceil(BF16_BLOCK) * BF16_BLOCK);
            rows_with!(bf16_rows)
        }
        DType::F16 => {
            assert!(x.len() >= cols);
            rows_with!(wide_rows, true)
        }
        DType::F32 => {
            assert!(x.len() >= cols);
            rows_with!(wide_rows, false)
        }
    }
}

/// RT rows of `a` x TT rows of `b` dot products over `k`; result `[t][r]`.
/// `a` rows must be readable to `k` rounded up to 8 (zero padded); `b` rows only to `k`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile(a: [*const f32; RT], b: [*const f32; TT], k: usize) -> [[f32; RT]; TT] {
    let mut acc = [[_mm256_setzero_ps(); RT]; TT];
    let mut c = 0;
    // SAFETY: c + 8 <= k for full steps; the tail copies b's last elements, a is padded.
    unsafe {
        while c + 8 <= k {
            let bv: [__m256; TT] = std::array::from_fn(|t| _mm256_loadu_ps(b[t].add(c)));
            for r in 0..RT {
                let av = _mm256_loadu_ps(a[r].add(c));
                for t in 0..TT {
                    acc[t][r] = _mm256_fmadd_ps(av, bv[t], acc[t][r]);
                }
            }
            c += 8;
        }
        if c < k {
            let n = k - c;
            let bv: [__m256; TT] = std::array::from_fn(|t| {
                let mut buf = [0f32; 8];
                buf[..n].copy_from_slice(std::slice::from_raw_parts(b[t].add(c), n));
                _mm256_loadu_ps(buf.as_ptr())
            });
            for r in 0..RT {
                let av = _mm256_loadu_ps(a[r].add(c));
                for t in 0..TT {
                    acc[t][r] = _mm256_fmadd_ps(av, bv[t], acc[t][r]);
                }
            }
        }
    }
    std::array::from_fn(|t| std::array::from_fn(|r| hsum(acc[t][r])))
}

/// Tiled (`gemm`) block: `y[t * ldy + r] (+)= dot(a row r, x row t)` for `r < n_rows`, `t < n_tok`.
/// `a` rows are `lda` apart (`lda` >= `k` rounded up to 8, zero padded), `x` rows `ldx`.
///
/// # Safety
/// AVX2 tier supported; `y` valid for writes at every `t * ldy + r` above and not accessed by
/// anyone else during the call.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm_block(
    a: &[f32],
    lda: usize,
    n_rows: usize,
    x: &[f32],
    ldx: usize,
    k: usize,
    n_tok: usize,
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
) {
    if n_rows == 0 || n_tok == 0 {
        return;
    }
    assert!(lda >= k.div_ceil(8) * 8 && a.len() >= n_rows * lda);
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
            let res = unsafe { tile(ap, bp, k) };
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

/// `out[c] = sum_p weights[p] * v[p * stride + c]`: attention's P·V for one head, with up to
/// 64 output columns held in registers over all positions.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn weighted_sum(v: &[f32], stride: usize, weights: &[f32], out: &mut [f32]) {
    let cols = out.len();
    let n = weights.len();
    if n == 0 {
        out.fill(0.0);
        return;
    }
    assert!(v.len() >= (n - 1) * stride + cols);
    let mut c = 0;
    while c + 8 <= cols {
        let nv = ((cols - c) / 8).min(8);
        let mut acc = [_mm256_setzero_ps(); 8];
        for (p, &wt) in weights.iter().enumerate() {
            let s = _mm256_set1_ps(wt);
            // SAFETY: row p, columns c..c + 8 * nv <= cols, inside `v` per the assert.
            let base = unsafe { v.as_ptr().add(p * stride + c) };
            for (j, a) in acc.iter_mut().enumerate().take(nv) {
                *a = _mm256_fmadd_ps(s, unsafe { _mm256_loadu_ps(base.add(8 * j)) }, *a);
            }
        }
        for (j, a) in acc.iter().enumerate().take(nv) {
            // SAFETY: c + 8 * j + 8 <= cols.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * j), *a) };
        }
        c += 8 * nv;
    }
    if c < cols {
        out[c..].fill(0.0);
        for (p, &wt) in weights.iter().enumerate() {
            let row = &v[p * stride + c..p * stride + cols];
            for (o, &vv) in out[c..].iter_mut().zip(row) {
                *o += wt * vv;
            }
        }
    }
}

/// e^x for 8 lanes, ~1 ulp on the normal range; same reduction and polynomial as the AVX-512
/// tier. Without `vscalefps`, 2^n is applied as two factors 2^(n/2) so that n up to 128 and
/// down to -150 (the clamp range) stay representable and over/underflow round naturally.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn exp8(x: __m256) -> __m256 {
    // Operand order keeps NaN inputs NaN (min/max return the second operand on NaN).
    let x = _mm256_max_ps(
        _mm256_set1_ps(-104.0),
        _mm256_min_ps(_mm256_set1_ps(89.0), x),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_666_65));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    let e = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let ni = _mm256_cvtps_epi32(n);
    let n1 = _mm256_srai_epi32::<1>(ni);
    let n2 = _mm256_sub_epi32(ni, n1);
    let bias = _mm256_set1_epi32(127);
    let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n1, bias)));
    let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n2, bias)));
    _mm256_mul_ps(_mm256_mul_ps(e, s1), s2)
}

/// Loads `n - i` (< 8) trailing floats zero padded, or 8 floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_part(s: &[f32], i: usize) -> __m256 {
    let rem = s.len() - i;
    if rem >= 8 {
        // SAFETY: 8 elements from i are in bounds.
        unsafe { _mm256_loadu_ps(s.as_ptr().add(i)) }
    } else {
        let mut b = [0f32; 8];
        b[..rem].copy_from_slice(&s[i..]);
        // SAFETY: local 8-float buffer.
        unsafe { _mm256_loadu_ps(b.as_ptr()) }
    }
}

/// Stores `min(8, s.len() - i)` lanes of `v` at `s[i..]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_part(s: &mut [f32], i: usize, v: __m256) {
    let rem = s.len() - i;
    if rem >= 8 {
        // SAFETY: 8 elements from i are in bounds.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr().add(i), v) }
    } else {
        let mut b = [0f32; 8];
        // SAFETY: local 8-float buffer.
        unsafe { _mm256_storeu_ps(b.as_mut_ptr(), v) };
        s[i..].copy_from_slice(&b[..rem]);
    }
}

/// Largest element (-inf for an empty slice).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn max(x: &[f32]) -> f32 {
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        // SAFETY: 8 elements.
        vmax = _mm256_max_ps(vmax, unsafe { _mm256_loadu_ps(c.as_ptr()) });
    }
    let mut lanes = [0f32; 8];
    // SAFETY: local 8-float buffer.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vmax) };
    lanes
        .iter()
        .chain(chunks.remainder())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `x[i] = e^(x[i] - shift)`; returns the sum of the new values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn exp_sum(x: &mut [f32], shift: f32) -> f32 {
    let n = x.len();
    let vs = _mm256_set1_ps(shift);
    let mut vsum = _mm256_setzero_ps();
    let mut i = 0;
    while i < n {
        let e = exp8(_mm256_sub_ps(load_part(x, i), vs));
        store_part(x, i, e);
        if n - i < 8 {
            // Padding lanes hold e^(0 - shift); only the stored ones count.
            let mut b = [0f32; 8];
            // SAFETY: local 8-float buffer.
            unsafe { _mm256_storeu_ps(b.as_mut_ptr(), e) };
            b[n - i..].fill(0.0);
            vsum = _mm256_add_ps(vsum, unsafe { _mm256_loadu_ps(b.as_ptr()) });
        } else {
            vsum = _mm256_add_ps(vsum, e);
        }
        i += 8;
    }
    hsum(vsum)
}

/// `gate[i] = gate[i] / (1 + e^-gate[i]) * up[i]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    let up = &up[..n];
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let g = load_part(gate, i);
        let u = load_part(up, i);
        let den = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
        store_part(gate, i, _mm256_mul_ps(_mm256_div_ps(g, den), u));
        i += 8;
    }
}

/// `out[c] += sum_r coeffs[r] * row_r[c]` for `c < out.len()`, row r starting at the byte
/// offset `offsets[r]` of `w` (natural column order, any dtype): the down projection of
/// neuron bundles. 32 output columns stay in registers while all rows stream past them; the
/// last `cols % 8` columns go through the scalar tier.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn accumulate_rows(
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
    let vec_cols = cols / 8 * 8;
    // SAFETY: rows are inside `w` (asserted) and only the first `vec_cols` columns are loaded.
    unsafe {
        match dtype {
            DType::BF16 => {
                accumulate_rows_as::<2, true>(w.as_ptr(), offsets, coeffs, &mut out[..vec_cols])
            }
            DType::F16 => {
                accumulate_rows_as::<2, false>(w.as_ptr(), offsets, coeffs, &mut out[..vec_cols])
            }
            DType::F32 => {
                accumulate_rows_as::<4, false>(w.as_ptr(), offsets, coeffs, &mut out[..vec_cols])
            }
        }
    }
    if vec_cols < cols {
        let shifted: Vec<usize> = offsets[..coeffs.len()]
            .iter()
            .map(|o| o + vec_cols * esz)
            .collect();
        super::scalar::accumulate_rows(w, &shifted, dtype, coeffs, &mut out[vec_cols..]);
    }
}

/// [`accumulate_rows`] for one dtype over a multiple of 8 columns: `ESZ` bytes per element,
/// `BF16` picks bf16 over f16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_rows_as<const ESZ: usize, const BF16: bool>(
    w: *const u8,
    offsets: &[usize],
    coeffs: &[f32],
    out: &mut [f32],
) {
    // SAFETY: the caller guarantees 8 readable elements at every `p` passed.
    let load = |p: *const u8| unsafe {
        if ESZ == 4 {
            _mm256_loadu_ps(p as *const f32)
        } else if BF16 {
            bf16x8(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    };
    let cols = out.len();
    let op = out.as_mut_ptr();
    let mut c = 0;
    while c < cols {
        let nv = ((cols - c) / 8).min(4);
        // SAFETY: nv * 8 columns from c are inside `out`.
        let mut acc: [__m256; 4] = std::array::from_fn(|v| {
            if v < nv {
                unsafe { _mm256_loadu_ps(op.add(c + 8 * v)) }
            } else {
                _mm256_setzero_ps()
            }
        });
        for (r, &coef) in coeffs.iter().enumerate() {
            let a = _mm256_set1_ps(coef);
            // SAFETY: row r holds the columns below `cols` from its offset (caller).
            let p = unsafe { w.add(offsets[r] + c * ESZ) };
            for v in 0..nv {
                acc[v] = _mm256_fmadd_ps(load(unsafe { p.add(8 * v * ESZ) }), a, acc[v]);
            }
        }
        for v in 0..nv {
            // SAFETY: as for the loads above.
            unsafe { _mm256_storeu_ps(op.add(c + 8 * v), acc[v]) };
        }
        c += 8 * nv;
    }
}
