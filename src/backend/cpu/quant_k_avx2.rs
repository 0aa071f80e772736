//! AVX2 kernels of the K-quants that llama.cpp's `Q4_K_M` files hold (Q4_K, Q6_K): decode
//! dot products with 8-bit activations and de-quantization to f32 for the batched GEMM.
//!
//! Decode takes activations quantized per super-block of 256 (one scale) and keeps each
//! super-block's products in 32-bit integers, its sub-block scales applied by `madd`.
//! De-quantization unpacks each block of 32 into bytes, a scale for each half (Q6_K scales
//! every 16 values, Q4_K every 32) and, for Q4_K, a minimum. Only reached through
//! `quant.rs` with an `Avx2` proof.

use std::arch::x86_64::*;

use super::quant::Q8Row;
use super::quant_avx2::{f16_at as f16c, hsum, store_block};
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

/// The 128 six-bit values (0..63) of half `half` of a Q6_K super-block at `p`, as 4 blocks of
/// 32 bytes: low 4 bits from `ql`, high 2 from `qh`.
#[inline(always)]
unsafe fn q6k_groups(p: *const u8, half: usize) -> [__m256i; 4] {
    // SAFETY: caller: `p` starts a 210-byte block; features enabled by the calling kernel.
    unsafe {
        let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let ql0 = _mm256_loadu_si256(p.add(64 * half) as *const __m256i);
        let ql1 = _mm256_loadu_si256(p.add(64 * half + 32) as *const __m256i);
        let qh = _mm256_loadu_si256(p.add(128 + 32 * half) as *const __m256i);
        [
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
        ]
    }
}

/// The 8 blocks of 32 of a Q6_K super-block (210 bytes), values as signed bytes (-32..31).
#[inline(always)]
unsafe fn unpack_q6k(b: &[u8], out: &mut [Unpacked; 8]) {
    let d = f16(b, 208);
    // SAFETY: the block is 210 bytes (caller); features enabled by the calling kernel.
    unsafe {
        let bias = _mm256_set1_epi8(32);
        for half in 0..2 {
            let p = b.as_ptr();
            let groups = q6k_groups(p, half);
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

/// How far ahead of the super-block in use decode prefetches.
const PREFETCH_BYTES: usize = 1024;

/// Rows of Q4_K or Q6_K super-blocks (`row_bytes` apart) dotted with `x` (quantized per 256:
/// one activation scale per super-block) into `y`. As in ggml's Q8_K products, the
/// sub-block scales multiply integer sums (`madd` with the scale as the 16-bit factor) that
/// stay in 32-bit integers across the super-block, so each super-block costs one
/// conversion and one FMA; minima and offsets go through the activations' sums per 16.
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
    let n_super = x.d.len();
    assert!(
        x.per == 256
            && x.qs.len() >= n_super * 256
            && x.bsums.len() >= n_super * 16
            && rows.len() >= y.len() * row_bytes
            && row_bytes >= n_super * bb
    );
    for (r, out) in y.iter_mut().enumerate() {
        let row = &rows[r * row_bytes..];
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0f32;
        for s in 0..n_super {
            let blk = &row[s * bb..(s + 1) * bb];
            // The lines a few super-blocks ahead (a row is one stream, but the hardware
            // prefetcher alone leaves the loads waiting here).
            for line in 0..bb.div_ceil(64) {
                let ahead = blk.as_ptr().wrapping_add(PREFETCH_BYTES + 64 * line);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            }
            let qx = &x.qs[256 * s..256 * (s + 1)];
            let bsums = &x.bsums[16 * s..16 * (s + 1)];
            // SAFETY: the super-block and its activations are in bounds (asserted above).
            let (sumi, d, off) = unsafe {
                match dtype {
                    DType::Q4K => super_q4k(blk, qx, bsums),
                    _ => super_q6k(blk, qx, bsums),
                }
            };
            let dx = x.d[s];
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(d * dx), acc);
            offset += off * dx;
        }
        // SAFETY: AVX enabled here.
        *out = unsafe { hsum(acc) } + offset;
    }
}

/// The eight 6-bit scales and minima of a Q4_K super-block (`tensor::quant::scale_min_k4`
/// for every j at once): bytes 0..4 hold scales 0..3 and bytes 4..8 minima 0..3 in their low
/// 6 bits; scales and minima 4..7 take the low and high nibbles of bytes 8..12 for their low
/// 4 bits and the top 2 bits of bytes 0..4 and 4..8 for their high 2.
#[inline(always)]
fn scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let low6 = 0x3f3f_3f3f;
    let (nib, top2) = (0x0f0f_0f0f, 0x0303_0303);
    let sc_hi = (u2 & nib) | (((u0 >> 6) & top2) << 4);
    let m_hi = ((u2 >> 4) & nib) | (((u1 >> 6) & top2) << 4);
    let join = |lo: u32, hi: u32| {
        let (a, b) = (lo.to_le_bytes(), hi.to_le_bytes());
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    };
    (join(u0 & low6, sc_hi), join(u1 & low6, m_hi))
}

/// One Q4_K super-block against its 256 activations: the integer sums `sc_j * q . qx` (8
/// lanes), `d`, and the minima's share `-dmin * sum_j m_j * sum(qx of j)` (both still to be
/// multiplied by the activation scale).
#[inline(always)]
unsafe fn super_q4k(b: &[u8], qx: &[i8], bsums: &[i32]) -> (__m256i, f32, f32) {
    let (sc, m) = scales_mins_k4(&b[4..16]);
    let mins: i32 = (0..8)
        .map(|j| m[j] as i32 * (bsums[2 * j] + bsums[2 * j + 1]))
        .sum();
    // SAFETY: b is 144 bytes, qx 256 (caller); features enabled by the calling kernel.
    unsafe {
        let (d, dmin) = (f16c(b.as_ptr()), f16c(b.as_ptr().add(2)));
        let mask = _mm256_set1_epi8(0x0F);
        let mut sumi = _mm256_setzero_si256();
        for chunk in 0..4 {
            let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * chunk) as *const __m256i);
            let halves = [
                _mm256_and_si256(q, mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask),
            ];
            for (half, w) in halves.into_iter().enumerate() {
                let j = 2 * chunk + half;
                let xv = _mm256_loadu_si256(qx.as_ptr().add(32 * j) as *const __m256i);
                let prod = _mm256_maddubs_epi16(w, xv);
                let scale = _mm256_set1_epi16(sc[j] as i16);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(prod, scale));
            }
        }
        (sumi, d, -dmin * mins as f32)
    }
}

/// One Q6_K super-block against its 256 activations: the integer sums `sc_g * q . qx` with
/// the 6-bit values unsigned (0..63), `d`, and the -32 offset's share
/// `-32 d sum_g sc_g * sum(qx of g)` over the 16 groups of 16.
#[inline(always)]
unsafe fn super_q6k(b: &[u8], qx: &[i8], bsums: &[i32]) -> (__m256i, f32, f32) {
    // SAFETY: b is 210 bytes (caller); F16C enabled by the calling kernel.
    let d = unsafe { f16c(b.as_ptr().add(208)) };
    let sc = &b[192..208];
    let shift: i32 = (0..16).map(|g| (sc[g] as i8) as i32 * bsums[g]).sum();
    // SAFETY: b is 210 bytes, qx 256 (caller); features enabled by the calling kernel.
    unsafe {
        let scales = _mm_loadu_si128(sc.as_ptr() as *const __m128i);
        // Byte offsets 0 x 8 then 1 x 8.
        let second = _mm_set_epi64x(0x0101_0101_0101_0101, 0);
        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let p = b.as_ptr();
            let groups = q6k_groups(p, half);
            for (g, w) in groups.into_iter().enumerate() {
                let at = 128 * half + 32 * g;
                let xv = _mm256_loadu_si256(qx.as_ptr().add(at) as *const __m256i);
                // maddubs pairs bytes 0..16 into the low 8 lanes, 16..32 into the high 8:
                // each half of the register meets its own group's scale.
                let prod = _mm256_maddubs_epi16(w, xv);
                // Scales g16 and g16 + 1 picked out 8 times each, widened to 16 bits.
                let g16 = (8 * half + 2 * g) as i8;
                let pick = _mm_add_epi8(_mm_set1_epi8(g16), second);
                let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(prod, scale));
            }
        }
        (sumi, d, -32.0 * d * shift as f32)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_scales_and_minima_at_once_equal_one_at_a_time() {
        let mut state = 7u64;
        for _ in 0..200 {
            let s: Vec<u8> = (0..12)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (state >> 56) as u8
                })
                .collect();
            let (sc, m) = scales_mins_k4(&s);
            for j in 0..8 {
                assert_eq!(
                    (sc[j] as f32, m[j] as f32),
                    scale_min_k4(j, &s),
                    "{s:?} j={j}"
                );
            }
        }
    }
}
