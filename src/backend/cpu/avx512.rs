//! AVX-512 (F/BW/VL) tier. Every function here must only be called after
//! `Isa::Avx512.is_supported()` returned true; that is the safety contract of each `unsafe fn`
//! below on top of the bounds each one asserts.
//!
//! Tails use AVX-512 masked loads: masked-off lanes are neither read nor faulted on, so odd
//! column counts need neither padding copies nor scalar epilogues.

// Kernels index several per-row accumulator arrays in lockstep; `for i in 0..R` reads best.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::dtype::DType;

/// bf16 matvec wants x de-interleaved per block of this many columns (see `prep_x_bf16`).
pub(super) const BF16_BLOCK: usize = 32;
/// Prefill micro-tile: weight rows x tokens.
const RT: usize = 4;
const TT: usize = 4;

#[inline]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

/// Widens 16 bf16 to f32: a bf16 is the top half of the f32 with the same value.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn bf16x16(h: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// `out[i] = src[i]` as f32; `src` holds at least `out.len()` elements of `dtype`, any alignment.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn convert(src: &[u8], dtype: DType, out: &mut [f32]) {
    let n = out.len();
    assert!(src.len() >= n * dtype.size());
    let s = src.as_ptr();
    let o = out.as_mut_ptr();
    let mut i = 0;
    // SAFETY (all loads/stores below): i + 16 <= n or masked to n, and both buffers hold n.
    match dtype {
        DType::F32 => unsafe { std::ptr::copy_nonoverlapping(s, o as *mut u8, n * 4) },
        DType::BF16 => unsafe {
            while i + 16 <= n {
                let h = _mm256_loadu_si256(s.add(2 * i) as *const __m256i);
                _mm512_storeu_ps(o.add(i), bf16x16(h));
                i += 16;
            }
            if i < n {
                let m = mask16(n - i);
                let h = _mm256_maskz_loadu_epi16(m, s.add(2 * i) as *const i16);
                _mm512_mask_storeu_ps(o.add(i), m, bf16x16(h));
            }
        },
        DType::F16 => unsafe {
            while i + 16 <= n {
                let h = _mm256_loadu_si256(s.add(2 * i) as *const __m256i);
                _mm512_storeu_ps(o.add(i), _mm512_cvtph_ps(h));
                i += 16;
            }
            if i < n {
                let m = mask16(n - i);
                let h = _mm256_maskz_loadu_epi16(m, s.add(2 * i) as *const i16);
                _mm512_mask_storeu_ps(o.add(i), m, _mm512_cvtph_ps(h));
            }
        },
    }
}

/// `R` bf16 rows (at `w[i]`) dotted with the de-interleaved `xp`.
///
/// Trick: a 32-bit lane of raw bf16 data holds an even column in its low half and the next odd
/// column in its high half, so `lane << 16` is the even value and `lane & 0xffff0000` the odd
/// one, as f32. Two ALU ops per 32 weights instead of a widening shuffle per 16; x was
/// permuted once per call to match (even columns of the block, then odd ones).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn bf16_rows<const R: usize>(w: [*const u8; R], cols: usize, xp: *const f32) -> [f32; R] {
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let mut ae = [_mm512_setzero_ps(); R];
    let mut ao = [_mm512_setzero_ps(); R];
    let nb = cols / BF16_BLOCK;
    // SAFETY: the caller guarantees R rows of `cols` bf16 and `xp` padded to whole blocks.
    unsafe {
        for b in 0..nb {
            let xe = _mm512_loadu_ps(xp.add(BF16_BLOCK * b));
            let xo = _mm512_loadu_ps(xp.add(BF16_BLOCK * b + 16));
            for i in 0..R {
                let v = _mm512_loadu_si512(w[i].add(2 * BF16_BLOCK * b) as *const __m512i);
                ae[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)), xe, ae[i]);
                ao[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), xo, ao[i]);
            }
        }
        let tail = cols % BF16_BLOCK;
        if tail != 0 {
            let m: __mmask32 = (1u32 << tail) - 1;
            let xe = _mm512_loadu_ps(xp.add(BF16_BLOCK * nb));
            let xo = _mm512_loadu_ps(xp.add(BF16_BLOCK * nb + 16));
            for i in 0..R {
                let v = _mm512_maskz_loadu_epi16(m, w[i].add(2 * BF16_BLOCK * nb) as *const i16);
                ae[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)), xe, ae[i]);
                ao[i] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), xo, ao[i]);
            }
        }
    }
    let mut out = [0f32; R];
    for i in 0..R {
        out[i] = _mm512_reduce_add_ps(_mm512_add_ps(ae[i], ao[i]));
    }
    out
}

/// `R` f16 or f32 rows (at `w[i]`; `HALF` selects f16) dotted with `x` (natural order).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn wide_rows<const R: usize, const HALF: bool>(w: [*const u8; R], cols: usize, x: *const f32) -> [f32; R] {
    let esz = if HALF { 2 } else { 4 };
    // SAFETY: the caller guarantees R rows of `cols` elements; tails are masked.
    let load = |p: *const u8, m: __mmask16| unsafe {
        if HALF {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
        } else {
            _mm512_maskz_loadu_ps(m, p as *const f32)
        }
    };
    let mut a0 = [_mm512_setzero_ps(); R];
    let mut a1 = [_mm512_setzero_ps(); R];
    let mut c = 0;
    // SAFETY: c + 32 <= cols in the loop; masked below.
    unsafe {
        while c + 32 <= cols {
            let x0 = _mm512_loadu_ps(x.add(c));
            let x1 = _mm512_loadu_ps(x.add(c + 16));
            for i in 0..R {
                let p = w[i].add(esz * c);
                a0[i] = _mm512_fmadd_ps(load(p, 0xFFFF), x0, a0[i]);
                a1[i] = _mm512_fmadd_ps(load(p.add(16 * esz), 0xFFFF), x1, a1[i]);
            }
            c += 32;
        }
        while c < cols {
            let m = mask16(cols - c);
            let x0 = _mm512_maskz_loadu_ps(m, x.add(c));
            for i in 0..R {
                a0[i] = _mm512_fmadd_ps(load(w[i].add(esz * c), m), x0, a0[i]);
            }
            c += 16;
        }
    }
    let mut out = [0f32; R];
    for i in 0..R {
        out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
    }
    out
}

/// `y[r] = dot(row r, x)`; row `r` starts `r * stride` elements into `w` and has `cols`
/// elements. For bf16, `x` must come from `prep_x_bf16`; otherwise it is plain (len >= cols).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn matvec(w: &[u8], dtype: DType, stride: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    let rows = y.len();
    if rows == 0 {
        return;
    }
    let esz = dtype.size();
    assert!(w.len() >= ((rows - 1) * stride + cols) * esz);
    let row_bytes = stride * esz;
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    macro_rules! rows_with {
        ($kernel:ident $(, $extra:tt)?) => {
            // SAFETY: every row pointer is a row < rows, inside `w` (asserted above).
            super::util::for_row_groups(rows, |r| unsafe { wp.add(r * row_bytes) }, y, |p| unsafe {
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

/// Sums each of 16 vectors across its lanes: lane `4 * L + j` of the result is the sum of
/// `v[4 * j + L]`. A shuffle tree costs ~45 ops instead of ~130 for 16 separate reductions.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn reduce16(v: [__m512; 16]) -> __m512 {
    // Level 1: pair (2i, 2i+1) -> 128-bit lanes [a.l0+a.l2, a.l1+a.l3, b.l0+b.l2, b.l1+b.l3].
    let s: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
    });
    // Level 2: pair -> 128-bit lane L holds a 4-float partial of input 4m + L.
    let u: [__m512; 4] = std::array::from_fn(|m| {
        let (a, b) = (s[2 * m], s[2 * m + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
    });
    // Level 3: transpose-add inside each 128-bit lane.
    let p = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
    let q = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
    _mm512_add_ps(_mm512_shuffle_ps::<0x44>(p, q), _mm512_shuffle_ps::<0xEE>(p, q))
}

/// 4 rows of `a` x 4 rows of `b` dot products over `k`; lane `4 * r + t` = dot(a[r], b[t]).
/// `a` rows must be readable to `k` rounded up to 16 (zero padded); `b` rows only to `k`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn tile(a: [*const f32; RT], b: [*const f32; TT], k: usize) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); RT * TT];
    let mut c = 0;
    // SAFETY: c + 16 <= k for full steps; the tail step masks b and a is padded.
    unsafe {
        while c + 16 <= k {
            let av: [__m512; RT] = std::array::from_fn(|r| _mm512_loadu_ps(a[r].add(c)));
            for t in 0..TT {
                let bv = _mm512_loadu_ps(b[t].add(c));
                for r in 0..RT {
                    acc[t * RT + r] = _mm512_fmadd_ps(av[r], bv, acc[t * RT + r]);
                }
            }
            c += 16;
        }
        if c < k {
            let m = mask16(k - c);
            let av: [__m512; RT] = std::array::from_fn(|r| _mm512_loadu_ps(a[r].add(c)));
            for t in 0..TT {
                let bv = _mm512_maskz_loadu_ps(m, b[t].add(c));
                for r in 0..RT {
                    acc[t * RT + r] = _mm512_fmadd_ps(av[r], bv, acc[t * RT + r]);
                }
            }
        }
    }
    reduce16(acc)
}

/// Prefill block: `y[t * ldy + r] (+)= dot(a row r, x row t)` for `r < n_rows`, `t < n_tok`.
/// `a` rows are `lda` apart (`lda` >= `k` rounded up to 16, zero padded), `x` rows `ldx`.
///
/// # Safety
/// AVX-512 tier supported; `y` valid for writes at every `t * ldy + r` above and not accessed
/// by anyone else during the call.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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
    assert!(lda >= k.div_ceil(16) * 16 && a.len() >= n_rows * lda);
    assert!(x.len() >= (n_tok - 1) * ldx + k);
    for t0 in (0..n_tok).step_by(TT) {
        // Missing tokens/rows of a partial tile repeat the last valid one; their results are
        // dropped. Cheaper than a zoo of smaller tiles and never reads out of bounds.
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
            let mut res = [0f32; RT * TT];
            // SAFETY: pointers derived from in-bounds rows per the asserts above.
            unsafe { _mm512_storeu_ps(res.as_mut_ptr(), tile(ap, bp, k)) };
            for j in 0..nt {
                for i in 0..RT.min(n_rows - r0) {
                    // SAFETY: exclusive, in-bounds element per the contract.
                    let o = unsafe { &mut *y.add((t0 + j) * ldy + r0 + i) };
                    let v = res[i * TT + j];
                    *o = if accumulate { *o + v } else { v };
                }
            }
        }
    }
}

/// `out[c] = sum_p weights[p] * v[p * stride + c]`: attention's P·V with up to 64 output
/// columns held in registers over all positions.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn weighted_sum(v: &[f32], stride: usize, weights: &[f32], out: &mut [f32]) {
    let cols = out.len();
    let n = weights.len();
    if n == 0 {
        out.fill(0.0);
        return;
    }
    assert!(v.len() >= (n - 1) * stride + cols);
    let mut c = 0;
    while c < cols {
        let rem = cols - c;
        let m: [__mmask16; 4] = std::array::from_fn(|j| mask16(rem.saturating_sub(16 * j)));
        let mut acc = [_mm512_setzero_ps(); 4];
        for (p, &wt) in weights.iter().enumerate() {
            let s = _mm512_set1_ps(wt);
            // SAFETY: row p, columns c.. masked to cols, inside `v` per the assert.
            let base = unsafe { v.as_ptr().add(p * stride + c) };
            for j in 0..4 {
                if m[j] != 0 {
                    let vv = unsafe { _mm512_maskz_loadu_ps(m[j], base.add(16 * j)) };
                    acc[j] = _mm512_fmadd_ps(s, vv, acc[j]);
                }
            }
        }
        for j in 0..4 {
            if m[j] != 0 {
                // SAFETY: masked to the columns of `out`.
                unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(c + 16 * j), m[j], acc[j]) };
            }
        }
        c += 64;
    }
}

/// e^x for 16 lanes, ~1 ulp on the normal range. Cody-Waite reduction x = n ln2 + r, a
/// degree-6 polynomial for e^r on |r| <= ln2/2, and `vscalefps` for 2^n, which also yields
/// exact 0 / inf / denormals at the ends of the range without extra blends.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn exp16(x: __m512) -> __m512 {
    // Operand order keeps NaN inputs NaN (min/max return the second operand on NaN).
    let x = _mm512_max_ps(_mm512_set1_ps(-104.0), _mm512_min_ps(_mm512_set1_ps(89.0), x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_666_65));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    let e = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(e, n)
}

/// Numerically stable softmax in place.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn softmax(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    // SAFETY (all loads/stores): masked to n.
    while i < n {
        let m = mask16(n - i);
        let v = unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, p.add(i)) };
        vmax = _mm512_max_ps(vmax, v);
        i += 16;
    }
    let max = _mm512_reduce_max_ps(vmax);
    if max == f32::NEG_INFINITY {
        x.fill(1.0 / n as f32);
        return;
    }
    let vm = _mm512_set1_ps(max);
    let mut vsum = _mm512_setzero_ps();
    i = 0;
    while i < n {
        let m = mask16(n - i);
        let e = exp16(_mm512_sub_ps(unsafe { _mm512_maskz_loadu_ps(m, p.add(i)) }, vm));
        let e = _mm512_maskz_mov_ps(m, e);
        vsum = _mm512_add_ps(vsum, e);
        unsafe { _mm512_mask_storeu_ps(p.add(i), m, e) };
        i += 16;
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vsum));
    i = 0;
    while i < n {
        let m = mask16(n - i);
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, p.add(i));
            _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(v, inv));
        }
        i += 16;
    }
}

/// `gate[i] = gate[i] / (1 + e^-gate[i]) * up[i]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    assert!(up.len() >= n);
    let g = gate.as_mut_ptr();
    let u = up.as_ptr();
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m = mask16(n - i);
        // SAFETY: masked to n, both slices hold n.
        unsafe {
            let gv = _mm512_maskz_loadu_ps(m, g.add(i));
            let uv = _mm512_maskz_loadu_ps(m, u.add(i));
            let den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
            _mm512_mask_storeu_ps(g.add(i), m, _mm512_mul_ps(_mm512_div_ps(gv, den), uv));
        }
        i += 16;
    }
}
