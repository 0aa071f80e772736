//! The vector operations every SIMD kernel is written in, implemented once per x86 tier
//! (`avx2`, `avx512`). The kernels themselves (`simd`) are generic over [`Tier`] and exist once;
//! `kernels` compiles each of them per tier inside a `#[target_feature]` function.
//!
//! A tier value is a zero-sized proof that this CPU runs the tier's instructions: only the
//! tier's `detect()` makes one. That is what makes the primitives below safe to call, and the
//! dispatch in `kernels` sound. Every method is `#[inline(always)]` in the implementations so
//! that it is compiled inside the caller's `#[target_feature]` function, never on its own.
//!
//! Where the tiers need different algorithms (the masked tails of AVX-512 against the stack
//! buffers of AVX2, register budgets, AVX-512's blocked attention scores), they say so through
//! the constants and the overridable methods here, not through a second copy of a kernel.

use super::kernels::StridedRows;
use super::simd;

/// A SIMD tier: `LANES` f32 lanes per vector `V` and the operations the kernels use.
///
/// Partial loads and stores take a count `n` of valid elements: lanes from `n` on read as
/// zero and are not written; `n >= LANES` means the whole vector. Raw-pointer methods are
/// `unsafe` only for the memory they touch: the pointer must be valid for the elements named.
/// `min` and `max` follow x86 semantics (the second operand if either is NaN or both are
/// zeros), which the softmax clamps rely on to keep NaN inputs NaN.
///
/// # Safety
/// A value of the implementing type may exist only on a CPU that supports every instruction
/// its methods use.
pub(super) unsafe trait Tier: Copy {
    /// `LANES` f32 values.
    type V: Copy;
    const LANES: usize;
    /// Columns per block of the de-interleaved bf16 layout of x (`Kernels::prep_x_tokens`):
    /// two vectors' worth, one of even columns and one of odd ones.
    const BF16_BLOCK: usize = 2 * Self::LANES;
    /// Tokens per pass over a row group of the streamed multi-token matmul (`simd::tokens`):
    /// as many as keep the accumulators, token vectors and weight vectors in registers.
    const STREAM_TOKENS: usize;
    /// Up to how many tokens the streamed matmul beats converting and tiling the weights
    /// (`gemm`); see `matmul.rs`.
    const STREAMED_MAX_TOKENS: usize;
    /// Query heads that share each load of a value row in attention's P·V, ...
    const WSUM_HEADS: usize;
    /// ... and vectors of output columns per head kept in registers over all positions.
    const WSUM_VECS: usize;
    /// Whether bf16 down projections accumulate into the de-interleaved layout (one load
    /// feeds two FMAs through the even/odd trick), including the fused CATS kernel. Worth it
    /// where the widening shuffle is the bottleneck (AVX-512).
    const BF16_SPLIT_DOWN: bool;

    fn zero(self) -> Self::V;
    fn splat(self, v: f32) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, rounded once.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `c - a * b`, rounded once.
    fn neg_mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `c + a * b` as this tier computes the last, partial vector of a column range in the
    /// accumulating kernels: fused on AVX-512; rounded twice on AVX2, whose tails ran on the
    /// scalar path and keep its results.
    fn tail_mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Rounds to the nearest integer (ties to even).
    fn round(self, a: Self::V) -> Self::V;
    /// `e * 2^n` for integral `n` in [-150, 128], rounding only once the result leaves the
    /// normal range (the last step of `simd::exp`).
    fn mul_pow2(self, e: Self::V, n: Self::V) -> Self::V;
    /// `v` with the lanes from `n` on zeroed.
    fn keep_first(self, v: Self::V, n: usize) -> Self::V;
    /// Sum of the lanes, in the tier's fixed order.
    fn sum(self, v: Self::V) -> f32;
    /// The lane sums `out[t][r] = sum(acc[t][r])` of a 4 x 4 tile of accumulators.
    #[inline(always)]
    fn sum_4x4(self, acc: [[Self::V; 4]; 4]) -> [[f32; 4]; 4] {
        let mut out = [[0f32; 4]; 4];
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, &a) in o.iter_mut().zip(a) {
                *o = self.sum(a);
            }
        }
        out
    }
    /// The largest of the lanes of `vmax` and the elements of `tail` (shorter than a vector);
    /// -inf if there are none.
    fn max_with_tail(self, vmax: Self::V, tail: &[f32]) -> f32;

    /// # Safety
    /// `p` readable for `LANES` floats, any alignment.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// # Safety
    /// `p` writable for `LANES` floats, any alignment.
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// # Safety
    /// `p` readable for `min(n, LANES)` floats, any alignment; `n > 0`.
    unsafe fn load_partial(self, p: *const f32, n: usize) -> Self::V;
    /// # Safety
    /// `p` writable for `min(n, LANES)` floats, any alignment; `n > 0`.
    unsafe fn store_partial(self, p: *mut f32, n: usize, v: Self::V);
    /// `LANES` bf16 widened to f32.
    ///
    /// # Safety
    /// `p` readable for `LANES` bf16.
    unsafe fn load_bf16(self, p: *const u8) -> Self::V;
    /// # Safety
    /// `p` readable for `min(n, LANES)` bf16; `n > 0`.
    unsafe fn load_bf16_partial(self, p: *const u8, n: usize) -> Self::V;
    /// `LANES` f16 widened to f32.
    ///
    /// # Safety
    /// `p` readable for `LANES` f16.
    unsafe fn load_f16(self, p: *const u8) -> Self::V;
    /// # Safety
    /// `p` readable for `min(n, LANES)` f16; `n > 0`.
    unsafe fn load_f16_partial(self, p: *const u8, n: usize) -> Self::V;
    /// `2 * LANES` bf16 (one bf16 block) as (even columns, odd columns) in f32. A 32-bit lane
    /// of raw bf16 holds an even column in its low half and the next odd one in its high
    /// half, so `lane << 16` is the even value and `lane & 0xffff0000` the odd one: two ALU
    /// ops per two vectors of weights instead of a widening shuffle per vector.
    ///
    /// # Safety
    /// `p` readable for `2 * LANES` bf16.
    unsafe fn load_bf16_split(self, p: *const u8) -> (Self::V, Self::V);
    /// # Safety
    /// `p` readable for `min(n, 2 * LANES)` bf16; `n > 0`.
    unsafe fn load_bf16_split_partial(self, p: *const u8, n: usize) -> (Self::V, Self::V);
    /// The even elements of `a ++ b`, then the odd ones (the bf16 layout of x).
    fn split_even_odd(self, a: Self::V, b: Self::V) -> (Self::V, Self::V);

    /// Attention scores of the `g = s.len() / keys.n` query heads `q[h * keys.cols..]` that
    /// share one KV head: `s[h * keys.n + p] = dot(key row p, q_h)`, as a matvec per head
    /// unless the tier has a better algorithm.
    #[inline(always)]
    fn scores(self, keys: StridedRows, q: &[f32], s: &mut [f32]) {
        simd::scores_by_rows(self, keys, q, s);
    }
}

/// Implements the [`Tier`] methods that are one intrinsic on `$v` each: `binary` ones
/// `fn name(self, a, b)`, `ternary` ones `fn name(self, a, b, c)`. Used inside an
/// `unsafe impl Tier`, whose safety invariant (the tier value proves the CPU features) is
/// what justifies calling the intrinsics.
macro_rules! lanewise_ops {
    ($v:ty; binary: $($b:ident => $bi:path),*; ternary: $($t:ident => $ti:path),* $(,)?) => {
        $(
            #[inline(always)]
            fn $b(self, a: $v, b: $v) -> $v {
                // SAFETY: see the macro's doc.
                unsafe { $bi(a, b) }
            }
        )*
        $(
            #[inline(always)]
            fn $t(self, a: $v, b: $v, c: $v) -> $v {
                // SAFETY: see the macro's doc.
                unsafe { $ti(a, b, c) }
            }
        )*
    };
}
pub(super) use lanewise_ops;
