//! AVX2 kernels of the 32-element block formats (Q4_0, Q4_1, Q8_0): Q8_0 rows against exact
//! f32 activations and de-quantization to f32. The integer dot products of Q4_0/Q4_1 rows
//! are in `quant_packed_avx2.rs`. Only reached through `quant.rs` with an `Avx2` proof.

use std::arch::x86_64::*;

use super::quant::QK;
use crate::tensor::DType;

/// Every f16 bit pattern as f32: a block's scales are two table loads instead of a
/// conversion each (as ggml does; measured faster on Zen 1).
static F16_TABLE: std::sync::OnceLock<Box<[f32]>> = std::sync::OnceLock::new();

fn f16_table() -> &'static [f32] {
    F16_TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect()
    })
}

/// The f16 at `p` as f32, looked up in `table` ([`f16_table`]).
#[inline(always)]
unsafe fn f16_at_in(table: &[f32], p: *const u8) -> f32 {
    // SAFETY: caller: `p` readable for 2 bytes; the table has an entry for every u16.
    unsafe { *table.get_unchecked(u16::from_le_bytes([*p, *p.add(1)]) as usize) }
}

/// The f16 at `p` as f32 (F16C).
#[inline(always)]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: caller: `p` readable for 2 bytes; F16C enabled by the calling kernel.
    unsafe {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// The 32 nibbles of 16 bytes at `p` as bytes: low nibbles (elements 0..16), then high.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: caller: `p` readable for 16 bytes; AVX2 enabled by the calling kernel.
    unsafe {
        let q = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(q), q);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }
}

#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: AVX enabled by the calling kernel.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// Rows of Q8_0 blocks (`row_bytes` apart) dotted with f32 activations `x` into `y`: the
/// 8-bit weights widened in registers, the activations kept exact.
///
/// # Safety
/// The CPU runs AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows_q8_f32(rows: &[u8], row_bytes: usize, x: &[f32], y: &mut [f32]) {
    let nb = x.len() / QK;
    assert!(rows.len() >= y.len() * row_bytes && row_bytes >= nb * 34);
    let t = f16_table();
    for (r, out) in y.iter_mut().enumerate() {
        // SAFETY: row r holds nb blocks of 34 bytes (asserted); x holds nb * 32 floats.
        unsafe {
            let row = rows.as_ptr().add(r * row_bytes);
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                let p = row.add(b * 34);
                let xs = x.as_ptr().add(b * QK);
                let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
                let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
                let w = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                let mut s = _mm256_mul_ps(w(lo), _mm256_loadu_ps(xs));
                s = _mm256_fmadd_ps(w(_mm_srli_si128::<8>(lo)), _mm256_loadu_ps(xs.add(8)), s);
                s = _mm256_fmadd_ps(w(hi), _mm256_loadu_ps(xs.add(16)), s);
                s = _mm256_fmadd_ps(w(_mm_srli_si128::<8>(hi)), _mm256_loadu_ps(xs.add(24)), s);
                acc = _mm256_fmadd_ps(s, _mm256_set1_ps(f16_at_in(t, p)), acc);
            }
            *out = hsum(acc);
        }
    }
}

/// `out = src` de-quantized (Q4_0, Q4_1 or Q8_0 blocks), bit-equal to the reference.
///
/// # Safety
/// The CPU runs AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn convert(dtype: DType, src: &[u8], out: &mut [f32]) {
    let (_, bb) = dtype.block();
    let nb = (src.len() / bb).min(out.len() / QK);
    let (s, o) = (src.as_ptr(), out.as_mut_ptr());
    for b in 0..nb {
        // SAFETY: block b (< nb) of src and its 32 outputs are in bounds.
        unsafe {
            let p = s.add(b * bb);
            let d = _mm256_set1_ps(f16_at(p));
            let (bytes, min) = match dtype {
                DType::Q8_0 => (_mm256_loadu_si256(p.add(2) as *const __m256i), None),
                DType::Q4_1 => (nibbles(p.add(4)), Some(_mm256_set1_ps(f16_at(p.add(2))))),
                _ => (
                    _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)),
                    None,
                ),
            };
            store_block(bytes, [d, d], min, o.add(b * QK));
        }
    }
}

/// Writes the 32 signed bytes of `bytes` as f32 at `o`: `scale[half] * q (+ min)`, the
/// product rounded before the sum as the reference rounds it (the K-quants use it too).
///
/// # Safety
/// `o` writable for 32 floats; AVX2 enabled by the calling kernel.
#[inline(always)]
pub(super) unsafe fn store_block(
    bytes: __m256i,
    scale: [__m256; 2],
    min: Option<__m256>,
    o: *mut f32,
) {
    // SAFETY: caller's contract.
    unsafe {
        let parts = [
            _mm256_castsi256_si128(bytes),
            _mm256_extracti128_si256::<1>(bytes),
        ];
        for (half, part) in parts.into_iter().enumerate() {
            for quarter in 0..2 {
                let eight = if quarter == 0 {
                    part
                } else {
                    _mm_srli_si128::<8>(part)
                };
                let v = _mm256_mul_ps(scale[half], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)));
                let y = match min {
                    Some(m) => _mm256_add_ps(v, m),
                    None => v,
                };
                _mm256_storeu_ps(o.add(half * 16 + quarter * 8), y);
            }
        }
    }
}
