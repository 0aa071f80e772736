//! AVX2 + FMA + F16C tier (Haswell / Zen1 and later): 8 f32 lanes, 16 ymm registers.
//!
//! AVX2 has no masked loads of 16-bit elements, so partial vectors go through small zeroed
//! stack buffers and then the same vector code as whole ones.

use std::arch::x86_64::*;

use super::isa::Isa;
use super::tier::{lanewise_ops, Tier};

/// Proof that this CPU runs the AVX2 tier; only [`Avx2::detect`] makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Avx2(());

impl Avx2 {
    pub(super) fn detect() -> Option<Avx2> {
        Isa::Avx2.is_supported().then_some(Avx2(()))
    }
}

/// Widens 8 bf16 to f32: a bf16 is the top half of the f32 with the same value.
#[inline(always)]
fn bf16x8(_: Avx2, h: __m128i) -> __m256 {
    // SAFETY: the `Avx2` proves the features (see the impl below).
    unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h))) }
}

/// The first `n` (< 16) 16-bit elements at `p` in a zeroed vector.
///
/// # Safety
/// `p` readable for `n` 16-bit elements.
#[inline(always)]
unsafe fn load_u16_partial(p: *const u8, n: usize) -> __m128i {
    let mut buf = [0u8; 16];
    // SAFETY: caller contract; the buffer holds 8 elements.
    unsafe {
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), 2 * n.min(8));
        _mm_loadu_si128(buf.as_ptr() as *const __m128i)
    }
}

// SAFETY: an `Avx2` exists only where `Isa::Avx2.is_supported()` said AVX2, FMA and F16C are
// there, which covers every intrinsic below. That is the justification of each `unsafe`
// block in this impl; the memory each load or store touches is its method's contract.
unsafe impl Tier for Avx2 {
    type V = __m256;
    const LANES: usize = 8;
    /// 4 rows x 2 tokens accumulators + 2 x 2 token vectors + 2 weight vectors: 14 of 16.
    const STREAM_TOKENS: usize = 2;
    /// Measured on Zen4 ([1536, 576] bf16): streamed wins up to 64 tokens; at 128 the tiled
    /// kernel is ~10% faster.
    const STREAMED_MAX_TOKENS: usize = 64;
    /// One head, 8 vectors (64 columns) of accumulators: half the registers.
    const WSUM_HEADS: usize = 1;
    const WSUM_VECS: usize = 8;
    const BF16_SPLIT_DOWN: bool = false;

    #[inline(always)]
    fn zero(self) -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    fn splat(self, v: f32) -> __m256 {
        unsafe { _mm256_set1_ps(v) }
    }
    lanewise_ops! { __m256;
        binary: add => _mm256_add_ps, sub => _mm256_sub_ps, mul => _mm256_mul_ps,
            div => _mm256_div_ps, min => _mm256_min_ps, max => _mm256_max_ps;
        ternary: mul_add => _mm256_fmadd_ps, neg_mul_add => _mm256_fnmadd_ps,
    }
    #[inline(always)]
    fn tail_mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_add_ps(c, _mm256_mul_ps(a, b)) }
    }
    #[inline(always)]
    fn round(self, a: __m256) -> __m256 {
        unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
    }
    /// Without `vscalefps`, 2^n is applied as two factors 2^(n/2) so that n up to 128 and
    /// down to -150 stay representable and over/underflow round naturally.
    #[inline(always)]
    fn mul_pow2(self, e: __m256, n: __m256) -> __m256 {
        unsafe {
            let ni = _mm256_cvtps_epi32(n);
            let n1 = _mm256_srai_epi32::<1>(ni);
            let n2 = _mm256_sub_epi32(ni, n1);
            let bias = _mm256_set1_epi32(127);
            let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n1, bias)));
            let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n2, bias)));
            _mm256_mul_ps(_mm256_mul_ps(e, s1), s2)
        }
    }
    #[inline(always)]
    fn keep_first(self, v: __m256, n: usize) -> __m256 {
        if n >= 8 {
            return v;
        }
        unsafe {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
            _mm256_and_ps(v, _mm256_castsi256_ps(keep))
        }
    }
    #[inline(always)]
    fn sum(self, v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn max_with_tail(self, vmax: __m256, tail: &[f32]) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: a local 8-float buffer.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vmax) };
        lanes
            .iter()
            .chain(tail)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m256) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_partial(self, p: *const f32, n: usize) -> __m256 {
        if n >= 8 {
            return unsafe { _mm256_loadu_ps(p) };
        }
        let mut buf = [0f32; 8];
        // Bytes, not floats: `p` may be unaligned (weights straight from the checkpoint).
        unsafe {
            std::ptr::copy_nonoverlapping(p as *const u8, buf.as_mut_ptr() as *mut u8, 4 * n);
            _mm256_loadu_ps(buf.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn store_partial(self, p: *mut f32, n: usize, v: __m256) {
        if n >= 8 {
            return unsafe { _mm256_storeu_ps(p, v) };
        }
        let mut buf = [0f32; 8];
        unsafe {
            _mm256_storeu_ps(buf.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(buf.as_ptr() as *const u8, p as *mut u8, 4 * n);
        }
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u8) -> __m256 {
        bf16x8(self, unsafe { _mm_loadu_si128(p as *const __m128i) })
    }
    #[inline(always)]
    unsafe fn load_bf16_partial(self, p: *const u8, n: usize) -> __m256 {
        bf16x8(self, unsafe { load_u16_partial(p, n) })
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u8) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[inline(always)]
    unsafe fn load_f16_partial(self, p: *const u8, n: usize) -> __m256 {
        unsafe { _mm256_cvtph_ps(load_u16_partial(p, n)) }
    }
    #[inline(always)]
    unsafe fn load_bf16_split(self, p: *const u8) -> (__m256, __m256) {
        unsafe {
            let v = _mm256_loadu_si256(p as *const __m256i);
            let top = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
            (
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                _mm256_castsi256_ps(_mm256_and_si256(v, top)),
            )
        }
    }
    #[inline(always)]
    unsafe fn load_bf16_split_partial(self, p: *const u8, n: usize) -> (__m256, __m256) {
        if n >= 16 {
            return unsafe { self.load_bf16_split(p) };
        }
        let mut buf = [0u8; 32];
        unsafe {
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), 2 * n);
            self.load_bf16_split(buf.as_ptr())
        }
    }
    /// [a0 a2 b0 b2 | a4 a6 b4 b6] -> [a0 a2 a4 a6 | b0 b2 b4 b6] (64-bit lanes 0, 2, 1, 3).
    #[inline(always)]
    fn split_even_odd(self, a: __m256, b: __m256) -> (__m256, __m256) {
        unsafe {
            let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            let fix = |v: __m256| {
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
            };
            (fix(e), fix(o))
        }
    }
}
