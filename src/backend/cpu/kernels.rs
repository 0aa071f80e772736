//! Safe dispatch from an [`Isa`] to the matching tier's kernels.
//!
//! [`Kernels`] can only be built for a tier the machine supports, which is what makes calling
//! the `unsafe` `#[target_feature]` functions behind it sound. The match per call is a
//! predictable branch; the kernels behind it run for microseconds at least.

use super::isa::{isa, Isa};
use super::scalar;
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use crate::dtype::DType;

/// A supported tier (invariant checked at construction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Kernels(Isa);

impl Kernels {
    /// Kernels of `isa`. Panics if this machine cannot run it.
    pub(super) fn new(isa: Isa) -> Kernels {
        assert!(isa.is_supported(), "CPU ISA tier {} is not supported on this machine", isa.name());
        Kernels(isa)
    }

    /// Kernels of the process-wide selected tier.
    pub(super) fn selected() -> Kernels {
        Kernels(isa())
    }

    pub(super) fn isa(self) -> Isa {
        self.0
    }

    /// Columns per de-interleave block of the bf16 matvec, or None if x is used as is.
    fn bf16_block(self) -> Option<usize> {
        match self.0 {
            Isa::Scalar => None,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(avx2::BF16_BLOCK),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Some(avx512::BF16_BLOCK),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }

    /// Writes into `buf` the form of `x` that [`Kernels::matvec`] expects for `dtype` and
    /// returns whether `buf` (true) or `x` itself (false) is to be passed.
    ///
    /// For bf16 the SIMD tiers want each block of columns split into its even then its odd
    /// columns, zero padded to whole blocks (see `bf16_rows` in the tiers).
    pub(super) fn prep_x(self, dtype: DType, x: &[f32], buf: &mut Vec<f32>) -> bool {
        let (DType::BF16, Some(block)) = (dtype, self.bf16_block()) else { return false };
        let half = block / 2;
        buf.clear();
        buf.resize(x.len().div_ceil(block) * block, 0.0);
        for (dst, src) in buf.chunks_exact_mut(block).zip(x.chunks(block)) {
            for (j, &v) in src.iter().enumerate() {
                dst[(j % 2) * half + j / 2] = v;
            }
        }
        true
    }

    /// `out[i] = src[i]` as f32.
    pub(super) fn convert(self, src: &[u8], dtype: DType, out: &mut [f32]) {
        match self.0 {
            Isa::Scalar => scalar::convert(&src[..out.len() * dtype.size()], dtype, out),
            // SAFETY: Kernels holds only supported tiers.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::convert(src, dtype, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::convert(src, dtype, out) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }

    /// `y[r] = dot(row r, x)`, rows `stride` elements apart, `cols` long; `x` prepared by
    /// [`Kernels::prep_x`] for this tier and dtype.
    pub(super) fn matvec(self, w: &[u8], dtype: DType, stride: usize, cols: usize, x: &[f32], y: &mut [f32]) {
        match self.0 {
            Isa::Scalar => scalar::matvec(w, dtype, stride, &x[..cols], y),
            // SAFETY: Kernels holds only supported tiers; bounds are asserted inside.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::matvec(w, dtype, stride, cols, x, y) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::matvec(w, dtype, stride, cols, x, y) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }

    /// Vector width the `a` rows of [`Kernels::gemm_block`] must be zero padded to (max of
    /// all tiers, so callers need not care).
    pub(super) const GEMM_PAD: usize = 16;

    /// `y[t * ldy + r] (+)= dot(a row r, x row t)`; see the tiers' `gemm_block`.
    ///
    /// # Safety
    /// `y` must be valid for writes at every `t * ldy + r` (`t < n_tok`, `r < n_rows`) and
    /// those elements must not be accessed by anyone else during the call.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_block(
        self,
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
        debug_assert!(lda.is_multiple_of(Self::GEMM_PAD));
        // SAFETY: forwarded contract; Kernels holds only supported tiers.
        unsafe {
            match self.0 {
                Isa::Scalar => scalar::gemm_block(a, lda, n_rows, x, ldx, k, n_tok, y, ldy, accumulate),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => avx2::gemm_block(a, lda, n_rows, x, ldx, k, n_tok, y, ldy, accumulate),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => avx512::gemm_block(a, lda, n_rows, x, ldx, k, n_tok, y, ldy, accumulate),
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!("no SIMD tier off x86_64"),
            }
        }
    }

    /// `out[c] = sum_p weights[p] * v[p * stride + c]`.
    pub(super) fn weighted_sum(self, v: &[f32], stride: usize, weights: &[f32], out: &mut [f32]) {
        match self.0 {
            Isa::Scalar => scalar::weighted_sum(v, stride, weights, out),
            // SAFETY: Kernels holds only supported tiers; bounds are asserted inside.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::weighted_sum(v, stride, weights, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::weighted_sum(v, stride, weights, out) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }

    pub(super) fn softmax(self, x: &mut [f32]) {
        if x.is_empty() {
            return;
        }
        match self.0 {
            Isa::Scalar => scalar::softmax(x),
            // SAFETY: Kernels holds only supported tiers.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::softmax(x) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::softmax(x) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }

    pub(super) fn silu_mul(self, gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len(), "silu_mul: gate and up lengths differ");
        match self.0 {
            Isa::Scalar => scalar::silu_mul(gate, up),
            // SAFETY: Kernels holds only supported tiers.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::silu_mul(gate, up) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::silu_mul(gate, up) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }
}
