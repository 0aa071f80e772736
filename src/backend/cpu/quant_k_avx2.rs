//! AVX2 kernels of the K-quants that llama.cpp's `Q4_K_M` files hold (Q4_K, Q6_K): decode
//! dot products with 8-bit activations and de-quantization to f32 for the batched GEMM.
//!
//! Both formats are unpacked per activation block of 32 values into 32 weight bytes, a scale
//! for each half (Q6_K scales every 16 values, Q4_K every 32) and, for Q4_K, a minimum: then
//! one `maddubs` per block, as for the 32-element formats. Only reached through `quant.rs`
//! with an `Avx2` proof.

use std::arch::x86_64::*;

use super::quant::{Q8Row, QK};
use super::quant_avx2::{hsum, store_block};
use crate::tensor::quant::{f16_at as f16, scale_min_k4};
use crate::tensor::DType;

/// One activation block's worth of a super-block: weight bytes (unsigned for Q4_K, signed
/// for Q6_K), the scale of each half (f32 x 4 per half) and the minimum.
struct Unpacked {
    w: __m256i,
    scale: __m256,
    min: f32,
}

#[inline(always)]
unsafe fn halves(lo: f32, hi: f32) -> __m256 {
    // SAFETY: AVX enabled by the calling kernel.
    unsafe { _mm256_set_m128(_mm_set1_ps(hi), _mm_set1_ps(lo)) }
}

/// The 8 blocks of 32 of a Q4_K super-block (144 bytes).
#[inline(always)]
unsafe fn unpack_q4k(b: &[u8], out: &mut [Unpacked; 8]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let scales = &b[4..16];
    // SAFETY: the block is 144 bytes (caller); features enabled by the calling kernel.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        for chunk in 0..4 {
            let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * chunk) as *const __m256i);
            for (half, w) in [
                _mm256_and_si256(q, mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask),
            ]
            .into_iter()
            .enumerate()
            {
                let (sc, m) = scale_min_k4(2 * chunk + half, scales);
                let s = d * sc;
                out[2 * chunk + half] = Unpacked {
                    w,
                    scale: halves(s, s),
                    min: -(dmin * m),
                };
            }
        }
    }
}

/// The 8 blocks of 32 of a Q6_K super-block (210 bytes), values as signed bytes (-32..31).
#[inline(always)]
unsafe fn unpack_q6k(b: &[u8], out: &mut [Unpacked; 8]) {
    let d = f16(b, 208);
    // SAFETY: the block is 210 bytes (caller); features enabled by the calling kernel.
    unsafe {
        let (m4, m2, bias) = (
            _mm256_set1_epi8(0x0F),
            _mm256_set1_epi8(0x30),
            _mm256_set1_epi8(32),
        );
        for half in 0..2 {
            let p = b.as_ptr();
            let ql0 = _mm256_loadu_si256(p.add(64 * half) as *const __m256i);
            let ql1 = _mm256_loadu_si256(p.add(64 * half + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(p.add(128 + 32 * half) as *const __m256i);
            let groups = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                    _mm256_and_si256(qh, m2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
                ),
            ];
            let sc = &b[192 + 8 * half..200 + 8 * half];
            for (g, w) in groups.into_iter().enumerate() {
                out[4 * half + g] = Unpacked {
                    w: _mm256_sub_epi8(w, bias),
                    scale: halves(
                        d * (sc[2 * g] as i8) as f32,
                        d * (sc[2 * g + 1] as i8) as f32,
                    ),
                    min: 0.0,
                };
            }
        }
    }
}

#[inline(always)]
unsafe fn unpack(dtype: DType, b: &[u8], out: &mut [Unpacked; 8]) {
    // SAFETY: caller's contract, passed on.
    unsafe {
        match dtype {
            DType::Q4K => unpack_q4k(b, out),
            _ => unpack_q6k(b, out),
        }
    }
}

fn empty() -> [Unpacked; 8] {
    // SAFETY: AVX is enabled wherever this module's kernels run; zero vectors need nothing.
    std::array::from_fn(|_| unsafe {
        Unpacked {
            w: _mm256_setzero_si256(),
            scale: _mm256_setzero_ps(),
            min: 0.0,
        }
    })
}

/// Rows of Q4_K or Q6_K super-blocks (`row_bytes` apart) dotted with `x` into `y`.
///
/// # Safety
/// The CPU runs AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_rows(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    x: &Q8Row,
    y: &mut [f32],
) {
    let bb = dtype.block().1;
    let n_super = x.d.len() / 8;
    assert!(rows.len() >= y.len() * row_bytes && row_bytes >= n_super * bb);
    let mut blocks = empty();
    let ones = _mm256_set1_epi16(1);
    for (r, out) in y.iter_mut().enumerate() {
        let row = &rows[r * row_bytes..];
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0f32;
        for s in 0..n_super {
            // SAFETY: super-block s of the row is in bounds (asserted); x holds 8 blocks each.
            unsafe {
                unpack(dtype, &row[s * bb..(s + 1) * bb], &mut blocks);
                for (j, blk) in blocks.iter().enumerate() {
                    let b = 8 * s + j;
                    let xv = _mm256_loadu_si256(x.qs.as_ptr().add(b * QK) as *const __m256i);
                    let prod = match dtype {
                        DType::Q4K => _mm256_maddubs_epi16(blk.w, xv),
                        _ => _mm256_maddubs_epi16(
                            _mm256_sign_epi8(blk.w, blk.w),
                            _mm256_sign_epi8(xv, blk.w),
                        ),
                    };
                    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
                    let scale = _mm256_mul_ps(blk.scale, _mm256_set1_ps(x.d[b]));
                    acc = _mm256_fmadd_ps(sums, scale, acc);
                    offset += blk.min * x.s[b];
                }
            }
        }
        // SAFETY: AVX enabled here.
        *out = unsafe { hsum(acc) } + offset;
    }
}

/// `out = src` de-quantized (Q4_K or Q6_K super-blocks), bit-equal to the reference (same
/// products in the same order).
///
/// # Safety
/// The CPU runs AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn convert(dtype: DType, src: &[u8], out: &mut [f32]) {
    let bb = dtype.block().1;
    let n_super = (src.len() / bb).min(out.len() / 256);
    let mut blocks = empty();
    for s in 0..n_super {
        // SAFETY: super-block s and its 256 outputs are in bounds.
        unsafe {
            unpack(dtype, &src[s * bb..(s + 1) * bb], &mut blocks);
            for (j, blk) in blocks.iter().enumerate() {
                let o = out.as_mut_ptr().add(256 * s + 32 * j);
                let halves = [
                    _mm256_permute2f128_ps::<0x00>(blk.scale, blk.scale),
                    _mm256_permute2f128_ps::<0x11>(blk.scale, blk.scale),
                ];
                // Q6_K has no minimum (and -0.0 + 0.0 would lose a sign bit).
                let min = (dtype == DType::Q4K).then(|| _mm256_set1_ps(blk.min));
                store_block(blk.w, halves, min, o);
            }
        }
    }
}
