//! AVX-512 (F/BW/VL) tier (Skylake-X / Zen4 and later): 16 f32 lanes, 32 zmm registers.
//!
//! Partial vectors use masked loads and stores: masked-off lanes are neither read nor
//! faulted on, so odd column counts need neither padding copies nor scalar epilogues.
//! Attention scores have their own blocked algorithm here (see [`scores_blocked`]).

// Kernels index several per-row accumulator arrays in lockstep; `for i in 0..R` reads best.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::isa::Isa;
use super::kernels::StridedRows;
use super::tier::{lanewise_ops, Tier};

/// Proof that this CPU runs the AVX-512 tier; only [`Avx512::detect`] makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Avx512(());

impl Avx512 {
    pub(super) fn detect() -> Option<Avx512> {
        Isa::Avx512.is_supported().then_some(Avx512(()))
    }
}

#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

#[inline(always)]
fn mask32(n: usize) -> __mmask32 {
    if n >= 32 {
        !0
    } else {
        (1u32 << n) - 1
    }
}

/// Widens 16 bf16 to f32: a bf16 is the top half of the f32 with the same value.
#[inline(always)]
fn bf16x16(_: Avx512, h: __m256i) -> __m512 {
    // SAFETY: the `Avx512` proves the features (see the impl below).
    unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))) }
}

/// (even, odd) columns of a raw bf16 vector; see `Tier::load_bf16_split`.
#[inline(always)]
fn split_raw(_: Avx512, v: __m512i) -> (__m512, __m512) {
    // SAFETY: the `Avx512` proves the features (see the impl below).
    unsafe {
        let top = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
            _mm512_castsi512_ps(_mm512_and_si512(v, top)),
        )
    }
}

// SAFETY: an `Avx512` exists only where `Isa::Avx512.is_supported()` said AVX-512 F/BW/VL,
// AVX2, FMA and F16C are there, which covers every intrinsic below. That is the
// justification of each `unsafe` block in this impl; the memory each load or store touches
// is its method's contract (masked-off lanes are never accessed).
unsafe impl Tier for Avx512 {
    type V = __m512;
    const LANES: usize = 16;
    /// 4 rows x 4 tokens accumulators + 4 x 2 token vectors + 2 weight vectors: 26 of 32.
    /// Larger tiles (2 rows x 8 tokens, 4 x 6) measured 40-50% slower (the accumulators no
    /// longer stay in registers).
    const STREAM_TOKENS: usize = 4;
    /// Measured on Zen4 ([1536, 576] bf16): streamed wins up to 512 tokens and more.
    const STREAMED_MAX_TOKENS: usize = usize::MAX;
    /// Each value row is loaded once for up to 4 heads; 4 x 4 accumulators (64 columns each).
    const WSUM_HEADS: usize = 4;
    const WSUM_VECS: usize = 4;
    /// The down projection of scattered CATS neurons measured compute bound with the
    /// widening shuffle.
    const BF16_SPLIT_DOWN: bool = true;

    #[inline(always)]
    fn zero(self) -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    fn splat(self, v: f32) -> __m512 {
        unsafe { _mm512_set1_ps(v) }
    }
    lanewise_ops! { __m512;
        binary: add => _mm512_add_ps, sub => _mm512_sub_ps, mul => _mm512_mul_ps,
            div => _mm512_div_ps, min => _mm512_min_ps, max => _mm512_max_ps;
        ternary: mul_add => _mm512_fmadd_ps, neg_mul_add => _mm512_fnmadd_ps,
            tail_mul_add => _mm512_fmadd_ps,
    }
    #[inline(always)]
    fn round(self, a: __m512) -> __m512 {
        unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
    }
    /// `vscalefps` also yields exact 0 / inf / denormals at the ends of the range.
    #[inline(always)]
    fn mul_pow2(self, e: __m512, n: __m512) -> __m512 {
        unsafe { _mm512_scalef_ps(e, n) }
    }
    #[inline(always)]
    fn keep_first(self, v: __m512, n: usize) -> __m512 {
        unsafe { _mm512_maskz_mov_ps(mask16(n), v) }
    }
    #[inline(always)]
    fn sum(self, v: __m512) -> f32 {
        unsafe { _mm512_reduce_add_ps(v) }
    }
    /// One shuffle tree ([`reduce16`]) instead of 16 reductions.
    #[inline(always)]
    fn sum_4x4(self, acc: [[__m512; 4]; 4]) -> [[f32; 4]; 4] {
        let mut flat = [self.zero(); 16];
        for k in 0..16 {
            flat[k] = acc[k / 4][k % 4];
        }
        let mut lanes = [0f32; 16];
        // SAFETY: a local 16-float buffer.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), reduce16(self, flat)) };
        // reduce16 puts the sum of flat[k] in lane 4 * (k % 4) + k / 4.
        let mut out = [[0f32; 4]; 4];
        for k in 0..16 {
            out[k / 4][k % 4] = lanes[4 * (k % 4) + k / 4];
        }
        out
    }
    #[inline(always)]
    fn max_with_tail(self, vmax: __m512, tail: &[f32]) -> f32 {
        let mut vmax = vmax;
        if !tail.is_empty() {
            let m = mask16(tail.len());
            // SAFETY: masked to the slice.
            let v = unsafe {
                _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, tail.as_ptr())
            };
            vmax = self.max(vmax, v);
        }
        unsafe { _mm512_reduce_max_ps(vmax) }
    }

    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_partial(self, p: *const f32, n: usize) -> __m512 {
        unsafe { _mm512_maskz_loadu_ps(mask16(n), p) }
    }
    #[inline(always)]
    unsafe fn store_partial(self, p: *mut f32, n: usize, v: __m512) {
        unsafe { _mm512_mask_storeu_ps(p, mask16(n), v) }
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u8) -> __m512 {
        bf16x16(self, unsafe { _mm256_loadu_si256(p as *const __m256i) })
    }
    #[inline(always)]
    unsafe fn load_bf16_partial(self, p: *const u8, n: usize) -> __m512 {
        bf16x16(self, unsafe {
            _mm256_maskz_loadu_epi16(mask16(n), p as *const i16)
        })
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u8) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
    #[inline(always)]
    unsafe fn load_f16_partial(self, p: *const u8, n: usize) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(n), p as *const i16)) }
    }
    #[inline(always)]
    unsafe fn load_bf16_split(self, p: *const u8) -> (__m512, __m512) {
        split_raw(self, unsafe { _mm512_loadu_si512(p as *const __m512i) })
    }
    #[inline(always)]
    unsafe fn load_bf16_split_partial(self, p: *const u8, n: usize) -> (__m512, __m512) {
        split_raw(self, unsafe {
            _mm512_maskz_loadu_epi16(mask32(n), p as *const i16)
        })
    }
    #[inline(always)]
    fn split_even_odd(self, a: __m512, b: __m512) -> (__m512, __m512) {
        unsafe {
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            (
                _mm512_permutex2var_ps(a, even, b),
                _mm512_permutex2var_ps(a, odd, b),
            )
        }
    }

    #[inline(always)]
    fn scores(self, keys: StridedRows, q: &[f32], s: &mut [f32]) {
        scores_blocked(self, keys, q, s);
    }
}

/// Sums each of 16 vectors across its lanes: lane `4 * L + j` of the result is the sum of
/// `v[4 * j + L]`. A shuffle tree costs ~45 ops instead of ~130 for 16 separate reductions.
#[inline(always)]
fn reduce16(_: Avx512, v: [__m512; 16]) -> __m512 {
    // SAFETY: the `Avx512` proves the features.
    unsafe {
        // Level 1: pair (2i, 2i+1) -> 128-bit lanes [a.l0+a.l2, a.l1+a.l3, b.l0+b.l2, b.l1+b.l3].
        let mut s = [_mm512_setzero_ps(); 8];
        for i in 0..8 {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            s[i] = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            );
        }
        // Level 2: pair -> 128-bit lane L holds a 4-float partial of input 4m + L.
        let mut u = [_mm512_setzero_ps(); 4];
        for m in 0..4 {
            let (a, b) = (s[2 * m], s[2 * m + 1]);
            u[m] = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            );
        }
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
}

/// `Tier::scores` for AVX-512. Rows are short (a head is 64-128 floats), so per-row horizontal
/// sums would dominate; 16 rows are reduced together with [`reduce16`]. All heads of the group
/// go over one 16-row block before the next, so the block's keys come from L2 once and from
/// L1 for the other heads (attention is L2/L3-bandwidth bound, not FMA bound).
#[inline(always)]
fn scores_blocked(t: Avx512, keys: StridedRows, q: &[f32], s: &mut [f32]) {
    let StridedRows {
        data,
        stride,
        cols,
        n: np,
    } = keys;
    if np == 0 {
        return;
    }
    let g = s.len() / np;
    assert!(data.len() >= (np - 1) * stride + cols && q.len() >= g * cols);
    let kp = data.as_ptr();
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
                    64 => block_dots_fixed::<4>(t, &rows, qh),
                    128 => block_dots_fixed::<8>(t, &rows, qh),
                    _ => block_dots(t, &rows, qh, cols),
                }
            };
            // reduce16 puts the sum of acc[4j + L] in lane 4L + j; undo that permutation.
            let mut lanes = [0f32; 16];
            // SAFETY: a local 16-float buffer.
            unsafe { t.store(lanes.as_mut_ptr(), reduce16(t, acc)) };
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
///
/// # Safety
/// `cols` readable floats at every row and at `q`.
#[inline(always)]
unsafe fn block_dots(
    t: Avx512,
    rows: &[*const f32; 16],
    q: *const f32,
    cols: usize,
) -> [__m512; 16] {
    let mut acc = [t.zero(); 16];
    let mut c = 0;
    // SAFETY: caller contract; the tail is masked.
    unsafe {
        while c + 16 <= cols {
            let qv = t.load(q.add(c));
            for (a, &row) in acc.iter_mut().zip(rows) {
                *a = t.mul_add(t.load(row.add(c)), qv, *a);
            }
            c += 16;
        }
        if c < cols {
            let n = cols - c;
            let qv = t.load_partial(q.add(c), n);
            for (a, &row) in acc.iter_mut().zip(rows) {
                *a = t.mul_add(t.load_partial(row.add(c), n), qv, *a);
            }
        }
    }
    acc
}

/// [`block_dots`] for `cols == 16 * NC` (the usual head sizes): q stays in registers and each
/// row is read front to back, so only one row pointer is live at a time instead of 16
/// (which spilled and measured ~2x slower).
///
/// # Safety
/// `16 * NC` readable floats at every row and at `q`.
#[inline(always)]
unsafe fn block_dots_fixed<const NC: usize>(
    t: Avx512,
    rows: &[*const f32; 16],
    q: *const f32,
) -> [__m512; 16] {
    let mut qv = [t.zero(); NC];
    for (j, v) in qv.iter_mut().enumerate() {
        // SAFETY: caller contract.
        *v = unsafe { t.load(q.add(16 * j)) };
    }
    let mut acc = [t.zero(); 16];
    for (a, &row) in acc.iter_mut().zip(rows) {
        for (j, &qj) in qv.iter().enumerate() {
            // SAFETY: caller contract.
            *a = t.mul_add(unsafe { t.load(row.add(16 * j)) }, qj, *a);
        }
    }
    acc
}
