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

/// bf16 matvec wants x de-interleaved per block of this many columns (see `Kernels::prep_x`).
pub(super) const BF16_BLOCK: usize = 32;

#[inline]
pub(super) fn mask16(n: usize) -> __mmask16 {
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
pub(super) unsafe fn bf16_rows<const R: usize>(
    w: [*const u8; R],
    cols: usize,
    xp: *const f32,
) -> [f32; R] {
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
unsafe fn wide_rows<const R: usize, const HALF: bool>(
    w: [*const u8; R],
    cols: usize,
    x: *const f32,
) -> [f32; R] {
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
/// elements. For bf16, `x` must come from `Kernels::prep_x`; otherwise it is plain (len >= cols).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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

/// Sums each of 16 vectors across its lanes: lane `4 * L + j` of the result is the sum of
/// `v[4 * j + L]`. A shuffle tree costs ~45 ops instead of ~130 for 16 separate reductions.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn reduce16(v: [__m512; 16]) -> __m512 {
    // Level 1: pair (2i, 2i+1) -> 128-bit lanes [a.l0+a.l2, a.l1+a.l3, b.l0+b.l2, b.l1+b.l3].
    let s: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // Level 2: pair -> 128-bit lane L holds a 4-float partial of input 4m + L.
    let u: [__m512; 4] = std::array::from_fn(|m| {
        let (a, b) = (s[2 * m], s[2 * m + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    });
    // Level 3: transpose-add inside each 128-bit lane.
    let p = _mm512_add_ps(
        _mm512_unpacklo_ps(u[0], u[1]),
        _mm512_unpackhi_ps(u[0], u[1]),
    );
    let q = _mm512_add_ps(
        _mm512_unpacklo_ps(u[2], u[3]),
        _mm512_unpackhi_ps(u[2], u[3]),
    );
    _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(p, q),
        _mm512_shuffle_ps::<0xEE>(p, q),
    )
}

/// Attention scores of `g = s.len() / np` query heads sharing one KV head:
/// `s[h * np + p] = dot(keys[p * stride..][..cols], q[h * cols..][..cols])` for `p < np`.
///
/// Rows are short (a head is 64-128 floats), so per-row horizontal sums would dominate; 16 rows
/// are reduced together with `reduce16`. All heads of the group go over one 16-row block
/// before the next, so the block's keys come from L2 once and from L1 for the other heads
/// (attention is L2/L3-bandwidth bound, not FMA bound).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn scores(
    keys: &[f32],
    stride: usize,
    cols: usize,
    q: &[f32],
    np: usize,
    s: &mut [f32],
) {
    if np == 0 {
        return;
    }
    let g = s.len() / np;
    assert!(keys.len() >= (np - 1) * stride + cols && q.len() >= g * cols);
    let kp = keys.as_ptr();
    for p0 in (0..np).step_by(16) {
        // A partial block recomputes its last row in the unused slots: a constant trip count
        // keeps `acc` in registers.
        let rows: [*const f32; 16] =
            std::array::from_fn(|i| kp.wrapping_add((p0 + i).min(np - 1) * stride));
        for h in 0..g {
            // SAFETY: head h's query is inside `q` (asserted).
            let qh = unsafe { q.as_ptr().add(h * cols) };
            // SAFETY: rows < np are inside `keys`, q_h inside `q` (asserted).
            let acc = unsafe {
                match cols {
                    64 => block_dots_fixed::<4>(&rows, qh),
                    128 => block_dots_fixed::<8>(&rows, qh),
                    _ => block_dots(&rows, qh, cols),
                }
            };
            // reduce16 puts the sum of acc[4j + L] in lane 4L + j; undo that permutation.
            let mut lanes = [0f32; 16];
            // SAFETY: local 16-float buffer.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), reduce16(acc)) };
            let n = 16.min(np - p0);
            for (i, out) in s[h * np + p0..h * np + p0 + n].iter_mut().enumerate() {
                *out = lanes[4 * (i % 4) + i / 4];
            }
        }
    }
}

/// Per-row partial dot products of 16 rows with `q` over `cols` (lanes still to be summed).
/// Column steps outside, the 16 rows inside: a constant inner trip count is what keeps the
/// accumulators in registers.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn block_dots(rows: &[*const f32; 16], q: *const f32, cols: usize) -> [__m512; 16] {
    let mut acc = [_mm512_setzero_ps(); 16];
    let mut c = 0;
    // SAFETY: caller guarantees `cols` readable floats at every row and at q; tail masked.
    unsafe {
        while c + 16 <= cols {
            let qv = _mm512_loadu_ps(q.add(c));
            for (a, &row) in acc.iter_mut().zip(rows) {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(row.add(c)), qv, *a);
            }
            c += 16;
        }
        if c < cols {
            let m = mask16(cols - c);
            let qv = _mm512_maskz_loadu_ps(m, q.add(c));
            for (a, &row) in acc.iter_mut().zip(rows) {
                *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, row.add(c)), qv, *a);
            }
        }
    }
    acc
}

/// [`block_dots`] for `cols == 16 * NC` (the usual head sizes): q stays in registers and each
/// row is read front to back, so only one row pointer is live at a time instead of 16
/// (which spilled and measured ~2x slower).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn block_dots_fixed<const NC: usize>(
    rows: &[*const f32; 16],
    q: *const f32,
) -> [__m512; 16] {
    // SAFETY: caller guarantees 16 * NC readable floats at every row and at q.
    let qv: [__m512; NC] = std::array::from_fn(|j| unsafe { _mm512_loadu_ps(q.add(16 * j)) });
    let mut acc = [_mm512_setzero_ps(); 16];
    for (a, &row) in acc.iter_mut().zip(rows) {
        for (j, &qj) in qv.iter().enumerate() {
            *a = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(row.add(16 * j)) }, qj, *a);
        }
    }
    acc
}

/// Attention's P·V for `g = w.len() / np` query heads sharing one KV head:
/// `out[h * cols + c] = sum_p w[h * np + p] * v[p * stride + c]`.
/// Each value row is loaded once for up to 4 heads; 64 output columns per head stay in
/// registers over all positions.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn weighted_sum(
    v: &[f32],
    stride: usize,
    cols: usize,
    w: &[f32],
    np: usize,
    out: &mut [f32],
) {
    if np == 0 {
        out.fill(0.0);
        return;
    }
    let g = w.len() / np;
    assert!(v.len() >= (np - 1) * stride + cols && out.len() >= g * cols);
    for h0 in (0..g).step_by(4) {
        let wp = w[h0 * np..].as_ptr();
        let op = out[h0 * cols..].as_mut_ptr();
        // SAFETY: heads h0..h0 + hb have their weights and outputs inside `w` / `out`.
        unsafe {
            match g - h0 {
                1 => weighted_sum_heads::<1>(v, stride, cols, wp, np, op),
                2 => weighted_sum_heads::<2>(v, stride, cols, wp, np, op),
                3 => weighted_sum_heads::<3>(v, stride, cols, wp, np, op),
                _ => weighted_sum_heads::<4>(v, stride, cols, wp, np, op),
            }
        }
    }
}

/// `H` heads of [`weighted_sum`]; weights at `w + h * np`, outputs at `out + h * cols`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn weighted_sum_heads<const H: usize>(
    v: &[f32],
    stride: usize,
    cols: usize,
    w: *const f32,
    np: usize,
    out: *mut f32,
) {
    for c0 in (0..cols).step_by(64) {
        let rem = cols - c0;
        let m: [__mmask16; 4] = std::array::from_fn(|j| mask16(rem.saturating_sub(16 * j)));
        let mut acc = [[_mm512_setzero_ps(); 4]; H];
        for p in 0..np {
            // SAFETY: row p, columns c0.. masked to cols, inside `v` (caller asserted).
            let base = unsafe { v.as_ptr().add(p * stride + c0) };
            let vv: [__m512; 4] = std::array::from_fn(|j| {
                if m[j] != 0 {
                    unsafe { _mm512_maskz_loadu_ps(m[j], base.add(16 * j)) }
                } else {
                    _mm512_setzero_ps()
                }
            });
            for (h, a) in acc.iter_mut().enumerate() {
                // SAFETY: weight (h, p) is inside `w` (caller contract).
                let s = _mm512_set1_ps(unsafe { *w.add(h * np + p) });
                for j in 0..4 {
                    a[j] = _mm512_fmadd_ps(s, vv[j], a[j]);
                }
            }
        }
        for (h, a) in acc.iter().enumerate() {
            for j in 0..4 {
                if m[j] != 0 {
                    // SAFETY: masked to this head's `cols` outputs.
                    unsafe { _mm512_mask_storeu_ps(out.add(h * cols + c0 + 16 * j), m[j], a[j]) };
                }
            }
        }
    }
}

/// e^x for 16 lanes, ~1 ulp on the normal range. Cody-Waite reduction x = n ln2 + r, a
/// degree-6 polynomial for e^r on |r| <= ln2/2, and `vscalefps` for 2^n, which also yields
/// exact 0 / inf / denormals at the ends of the range without extra blends.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn exp16(x: __m512) -> __m512 {
    // Operand order keeps NaN inputs NaN (min/max return the second operand on NaN).
    let x = _mm512_max_ps(
        _mm512_set1_ps(-104.0),
        _mm512_min_ps(_mm512_set1_ps(89.0), x),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_666_65));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    let e = _mm512_fmadd_ps(
        p,
        _mm512_mul_ps(r, r),
        _mm512_add_ps(r, _mm512_set1_ps(1.0)),
    );
    _mm512_scalef_ps(e, n)
}

/// Largest element (-inf for an empty slice).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn max(x: &[f32]) -> f32 {
    let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..x.len()).step_by(16) {
        let m = mask16(x.len() - i);
        // SAFETY: masked to the slice.
        let v = unsafe {
            _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, x.as_ptr().add(i))
        };
        vmax = _mm512_max_ps(vmax, v);
    }
    _mm512_reduce_max_ps(vmax)
}

/// `x[i] = e^(x[i] - shift)`; returns the sum of the new values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn exp_sum(x: &mut [f32], shift: f32) -> f32 {
    let n = x.len();
    let p = x.as_mut_ptr();
    let vs = _mm512_set1_ps(shift);
    let mut vsum = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        let m = mask16(n - i);
        // SAFETY: masked to n.
        unsafe {
            let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), vs));
            let e = _mm512_maskz_mov_ps(m, e);
            vsum = _mm512_add_ps(vsum, e);
            _mm512_mask_storeu_ps(p.add(i), m, e);
        }
    }
    _mm512_reduce_add_ps(vsum)
}

/// `x[i] *= s`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn scale(x: &mut [f32], s: f32) {
    let vs = _mm512_set1_ps(s);
    let p = x.as_mut_ptr();
    for i in (0..x.len()).step_by(16) {
        let m = mask16(x.len() - i);
        // SAFETY: masked to the slice.
        unsafe {
            _mm512_mask_storeu_ps(
                p.add(i),
                m,
                _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), vs),
            )
        };
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

/// `out[c] += sum_r coeffs[r] * row_r[c]` for `c < out.len()`, row r starting at the byte
/// offset `offsets[r]` of `w` (natural column order, any dtype): the down projection of
/// neuron bundles, whose down columns are stored as rows. 64 output columns stay in
/// registers while all rows stream past them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
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
    // SAFETY: rows are inside `w` (asserted); loads are masked to `cols`.
    unsafe {
        match dtype {
            DType::BF16 => accumulate_rows_as::<2, true>(w.as_ptr(), offsets, coeffs, out),
            DType::F16 => accumulate_rows_as::<2, false>(w.as_ptr(), offsets, coeffs, out),
            DType::F32 => accumulate_rows_as::<4, false>(w.as_ptr(), offsets, coeffs, out),
        }
    }
}

/// [`accumulate_rows`] for one dtype: `ESZ` bytes per element, `BF16` picks bf16 over f16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn accumulate_rows_as<const ESZ: usize, const BF16: bool>(
    w: *const u8,
    offsets: &[usize],
    coeffs: &[f32],
    out: &mut [f32],
) {
    // SAFETY: the caller guarantees `cols` elements at every row start; lanes past `m` are masked.
    let load = |p: *const u8, m: __mmask16| unsafe {
        if ESZ == 4 {
            _mm512_maskz_loadu_ps(m, p as *const f32)
        } else if BF16 {
            bf16x16(_mm256_maskz_loadu_epi16(m, p as *const i16))
        } else {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
        }
    };
    let cols = out.len();
    let op = out.as_mut_ptr();
    let mut c = 0;
    while c < cols {
        let left = cols - c;
        let masks: [__mmask16; 4] = std::array::from_fn(|v| mask16(left.saturating_sub(16 * v)));
        // SAFETY: masked to the columns left in `out`.
        let mut acc: [__m512; 4] =
            std::array::from_fn(|v| unsafe { _mm512_maskz_loadu_ps(masks[v], op.add(c + 16 * v)) });
        for (r, &coef) in coeffs.iter().enumerate() {
            let a = _mm512_set1_ps(coef);
            // SAFETY: row r holds `cols` elements from its offset (caller).
            let p = unsafe { w.add(offsets[r] + c * ESZ) };
            for v in 0..4 {
                if masks[v] != 0 {
                    acc[v] =
                        _mm512_fmadd_ps(load(unsafe { p.add(16 * v * ESZ) }, masks[v]), a, acc[v]);
                }
            }
        }
        for v in 0..4 {
            // SAFETY: masked to the columns left in `out`.
            unsafe { _mm512_mask_storeu_ps(op.add(c + 16 * v), masks[v], acc[v]) };
        }
        c += 64;
    }
}

/// [`accumulate_rows`] for bf16 with `out` in the de-interleaved layout of `Kernels::prep_x`
/// (per block of 32 columns: the 16 even ones, then the 16 odd ones; `out` holds whole
/// blocks). The layout lets one 512-bit load feed two FMAs through the shift/mask trick of
/// `bf16_rows`, instead of a widening shuffle per 16 weights: the down projection of
/// scattered CATS neurons measured compute bound with the shuffle.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn accumulate_rows_bf16_split(
    w: &[u8],
    offsets: &[usize],
    cols: usize,
    coeffs: &[f32],
    out: &mut [f32],
) {
    let nb = cols.div_ceil(BF16_BLOCK);
    assert!(out.len() >= nb * BF16_BLOCK);
    assert!(
        offsets.len() >= coeffs.len()
            && offsets[..coeffs.len()]
                .iter()
                .all(|&o| o + cols * 2 <= w.len())
    );
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let op = out.as_mut_ptr();
    let wp = w.as_ptr();
    let mut b0 = 0;
    while b0 < nb {
        let nblk = (nb - b0).min(4);
        let masks: [__mmask32; 4] = std::array::from_fn(|v| {
            let c0 = (b0 + v) * BF16_BLOCK;
            match cols.saturating_sub(c0) {
                n if n >= 32 => !0,
                n => (1u32 << n) - 1,
            }
        });
        let mut ae = [_mm512_setzero_ps(); 4];
        let mut ao = [_mm512_setzero_ps(); 4];
        for v in 0..nblk {
            // SAFETY: out holds whole blocks up to nb (asserted).
            unsafe {
                ae[v] = _mm512_loadu_ps(op.add((b0 + v) * BF16_BLOCK));
                ao[v] = _mm512_loadu_ps(op.add((b0 + v) * BF16_BLOCK + 16));
            }
        }
        for (r, &coef) in coeffs.iter().enumerate() {
            let a = _mm512_set1_ps(coef);
            for v in 0..nblk {
                // SAFETY: masked to the row's `cols` elements (asserted inside `w`).
                let x = unsafe {
                    _mm512_maskz_loadu_epi16(
                        masks[v],
                        wp.add(offsets[r] + (b0 + v) * 2 * BF16_BLOCK) as *const i16,
                    )
                };
                ae[v] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(x)), a, ae[v]);
                ao[v] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(x, hi)), a, ao[v]);
            }
        }
        for v in 0..nblk {
            // SAFETY: as for the loads.
            unsafe {
                _mm512_storeu_ps(op.add((b0 + v) * BF16_BLOCK), ae[v]);
                _mm512_storeu_ps(op.add((b0 + v) * BF16_BLOCK + 16), ao[v]);
            }
        }
        b0 += 4;
    }
}
