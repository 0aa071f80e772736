//! Safe dispatch from an [`Isa`] to the matching tier's kernels.
//!
//! [`Kernels`] can only be built for a tier the machine supports, which is what makes calling
//! the `unsafe` `#[target_feature]` functions behind it sound. The match per call is a
//! predictable branch; the kernels behind it run for microseconds at least.

use super::isa::{isa, Isa};
use super::scalar;
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx2_batch, avx512, avx512_batch, avx512_neurons};
use crate::dtype::DType;

/// A supported tier (invariant checked at construction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Kernels(Isa);

impl Kernels {
    /// Kernels of `isa`. Panics if this machine cannot run it.
    pub(super) fn new(isa: Isa) -> Kernels {
        assert!(
            isa.is_supported(),
            "CPU ISA tier {} is not supported on this machine",
            isa.name()
        );
        Kernels(isa)
    }

    /// Kernels of the process-wide selected tier.
    pub(super) fn selected() -> Kernels {
        Kernels(isa())
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
        let (DType::BF16, Some(block)) = (dtype, self.bf16_block()) else {
            return false;
        };
        buf.clear();
        buf.resize(x.len().div_ceil(block) * block, 0.0);
        split_even_odd(buf, x, block);
        true
    }

    /// Up to how many tokens [`Kernels::matmul_tokens`] (weights streamed, converted in
    /// registers) is the faster multi-token path; beyond it `gemm_block` tiling wins. Measured
    /// on Zen4 ([1536, 576] bf16): AVX-512 streamed wins up to 512 tokens and more, AVX2
    /// streamed up to 64 (at 128 the tiled AVX2 kernel is ~10% faster). Scalar has no
    /// streamed kernel.
    pub(super) fn streamed_max_tokens(self) -> usize {
        match self.0 {
            Isa::Scalar => 0,
            Isa::Avx2 => 64,
            Isa::Avx512 => usize::MAX,
        }
    }

    /// Lays out `n` tokens of `x` (`cols` each) as [`Kernels::matmul_tokens`] expects, in
    /// `buf`; returns the stride between tokens. Each token is zero padded to whole blocks of
    /// the tier's bf16 block size, and bf16 wants each block's even columns, then its odd ones
    /// (see `prep_x`).
    pub(super) fn prep_x_tokens(
        self,
        dtype: DType,
        x: &[f32],
        n: usize,
        cols: usize,
        buf: &mut Vec<f32>,
    ) -> usize {
        let block = self.bf16_block().unwrap_or(1);
        let stride = cols.div_ceil(block) * block;
        buf.clear();
        buf.resize(n * stride, 0.0);
        for (dst, src) in buf.chunks_exact_mut(stride).zip(x.chunks_exact(cols)) {
            if dtype == DType::BF16 {
                split_even_odd(dst, src, block);
            } else {
                dst[..cols].copy_from_slice(src);
            }
        }
        stride
    }

    /// `y[t * ldy + r] = dot(row r, x_t)` for the `rows` rows of `w` and `n` tokens prepared by
    /// [`Kernels::prep_x_tokens`] (`xstride` apart). Not on the scalar tier.
    ///
    /// # Safety
    /// `y` must be valid for writes at every `t * ldy + r` (`t < n`, `r < rows`) and those
    /// elements must not be accessed by anyone else during the call.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn matmul_tokens(
        self,
        w: &[u8],
        dtype: DType,
        rows: usize,
        cols: usize,
        xs: &[f32],
        xstride: usize,
        n: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        match self.0 {
            // SAFETY: forwarded contract; Kernels holds only supported tiers.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe {
                avx2_batch::matmul_tokens(w, dtype, rows, cols, xs, xstride, n, y, ldy)
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe {
                avx512_batch::matmul_tokens(w, dtype, rows, cols, xs, xstride, n, y, ldy)
            },
            _ => unreachable!("matmul_tokens on a tier without it"),
        }
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
    pub(super) fn matvec(
        self,
        w: &[u8],
        dtype: DType,
        stride: usize,
        cols: usize,
        x: &[f32],
        y: &mut [f32],
    ) {
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

    /// [`Kernels::matvec`] over rows starting at the byte offsets `offsets[r]` of `w`.
    pub(super) fn matvec_gather(
        self,
        w: &[u8],
        offsets: &[usize],
        dtype: DType,
        cols: usize,
        x: &[f32],
        y: &mut [f32],
    ) {
        match self.0 {
            Isa::Scalar => scalar::matvec_gather(w, offsets, dtype, &x[..cols], y),
            // SAFETY: Kernels holds only supported tiers; bounds are asserted inside.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::matvec_gather(w, offsets, dtype, cols, x, y) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::matvec_gather(w, offsets, dtype, cols, x, y) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }

    /// `out[c] += sum_r coeffs[r] * row_r[c]`, row r at the byte offset `offsets[r]` of `w`
    /// (natural column order; no `prep_x` layout involved).
    pub(super) fn accumulate_rows(
        self,
        w: &[u8],
        offsets: &[usize],
        dtype: DType,
        coeffs: &[f32],
        out: &mut [f32],
    ) {
        match self.0 {
            Isa::Scalar => scalar::accumulate_rows(w, offsets, dtype, coeffs, out),
            // SAFETY: Kernels holds only supported tiers; bounds are asserted inside.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::accumulate_rows(w, offsets, dtype, coeffs, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::accumulate_rows(w, offsets, dtype, coeffs, out) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }

    /// Block size of the de-interleaved output layout [`Kernels::accumulate_rows_in`] uses
    /// for `dtype`, or None if it accumulates in natural column order.
    pub(super) fn acc_split_block(self, dtype: DType) -> Option<usize> {
        match (self.0, dtype) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, DType::BF16) => Some(avx512::BF16_BLOCK),
            _ => None,
        }
    }

    /// [`Kernels::accumulate_rows`] of `cols`-wide rows into `out` laid out as
    /// [`Kernels::acc_split_block`] says (split blocks, or natural order in `out[..cols]`).
    pub(super) fn accumulate_rows_in(
        self,
        w: &[u8],
        offsets: &[usize],
        dtype: DType,
        cols: usize,
        coeffs: &[f32],
        out: &mut [f32],
    ) {
        match self.acc_split_block(dtype) {
            // SAFETY: the split layout exists only on the AVX-512 tier, which Kernels holds
            // only when supported; bounds are asserted inside.
            #[cfg(target_arch = "x86_64")]
            Some(_) => unsafe { avx512::accumulate_rows_bf16_split(w, offsets, cols, coeffs, out) },
            _ => self.accumulate_rows(w, offsets, dtype, coeffs, &mut out[..cols]),
        }
    }

    /// One token's CATS up/down over the kept neurons `ids` of a bundle matrix in a single
    /// fused pass, if this tier has one for `dtype` (AVX-512 bf16); false if the caller must
    /// use the generic path. `xp`, `out` as for [`Kernels::accumulate_rows_in`] with x prepared.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kept_up_down(
        self,
        w: &[u8],
        dtype: DType,
        hidden: usize,
        layout: crate::backend::BundleLayout,
        ids: &[u32],
        coeff: &[f32],
        up_bias: Option<&[f32]>,
        xp: &[f32],
        out: &mut [f32],
    ) -> bool {
        match (self.0, dtype) {
            // SAFETY: Kernels holds only supported tiers; bounds are asserted inside.
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, DType::BF16) => {
                let (parts, up_at) = (layout.parts(), layout.up_offset(hidden));
                unsafe {
                    avx512_neurons::kept_up_down_bf16(
                        w, hidden, parts, up_at, ids, coeff, up_bias, xp, out,
                    )
                };
                true
            }
            _ => false,
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
                Isa::Scalar => {
                    scalar::gemm_block(a, lda, n_rows, x, ldx, k, n_tok, y, ldy, accumulate)
                }
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => avx2::gemm_block(a, lda, n_rows, x, ldx, k, n_tok, y, ldy, accumulate),
                // AVX-512 uses `matmul_tokens` instead; its machines run the AVX2 kernel fine.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => {
                    avx2::gemm_block(a, lda, n_rows, x, ldx, k, n_tok, y, ldy, accumulate)
                }
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!("no SIMD tier off x86_64"),
            }
        }
    }

    /// Attention scores of the `g = s.len() / np` query heads `q[h * cols..][..cols]` that
    /// share one KV head: `s[h * np + p] = dot(keys[p * stride..][..cols], q_h)`, `p < np`.
    pub(super) fn scores(
        self,
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
        match self.0 {
            // Native f32s, so this stays right on big-endian targets too.
            Isa::Scalar => {
                for (h, sh) in s.chunks_exact_mut(np).enumerate() {
                    let qh = &q[h * cols..(h + 1) * cols];
                    for (p, out) in sh.iter_mut().enumerate() {
                        *out = scalar::dot(&keys[p * stride..p * stride + cols], qh);
                    }
                }
            }
            // SAFETY: Kernels holds only supported tiers; bounds are asserted inside. Viewing
            // f32s as bytes is always valid, and x86_64 is little-endian as the byte kernel expects.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe {
                let bytes = std::slice::from_raw_parts(
                    keys.as_ptr() as *const u8,
                    std::mem::size_of_val(keys),
                );
                for (h, sh) in s.chunks_exact_mut(np).enumerate() {
                    avx2::matvec(
                        bytes,
                        DType::F32,
                        stride,
                        cols,
                        &q[h * cols..(h + 1) * cols],
                        sh,
                    );
                }
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::scores(keys, stride, cols, q, np, s) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }

    /// Attention's P·V for the `g = w.len() / np` heads sharing one KV head:
    /// `out[h * cols + c] = sum_p w[h * np + p] * v[p * stride + c]`.
    pub(super) fn weighted_sum(
        self,
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
        match self.0 {
            Isa::Scalar => {
                for (wh, oh) in w.chunks_exact(np).zip(out.chunks_exact_mut(cols)) {
                    scalar::weighted_sum(v, stride, wh, oh);
                }
            }
            // SAFETY: Kernels holds only supported tiers; bounds are asserted inside.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe {
                for (wh, oh) in w.chunks_exact(np).zip(out.chunks_exact_mut(cols)) {
                    avx2::weighted_sum(v, stride, wh, oh);
                }
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::weighted_sum(v, stride, cols, w, np, out) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }

    /// Largest element (-inf for an empty slice).
    pub(super) fn max(self, x: &[f32]) -> f32 {
        match self.0 {
            // SAFETY: Kernels holds only supported tiers.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::max(x) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::max(x) },
            _ => x.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        }
    }

    /// `x[i] = e^(x[i] - shift)`; returns the sum of the new values.
    pub(super) fn exp_sum(self, x: &mut [f32], shift: f32) -> f32 {
        match self.0 {
            Isa::Scalar => scalar::exp_sum(x, shift),
            // SAFETY: Kernels holds only supported tiers.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::exp_sum(x, shift) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::exp_sum(x, shift) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD tier off x86_64"),
        }
    }

    /// `x[i] *= s`.
    pub(super) fn scale(self, x: &mut [f32], s: f32) {
        match self.0 {
            // SAFETY: Kernels holds only supported tiers.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::scale(x, s) },
            // A plain loop autovectorizes well enough on the other tiers.
            _ => x.iter_mut().for_each(|v| *v *= s),
        }
    }

    /// Numerically stable softmax in place; all `-inf` gives the uniform distribution.
    pub(super) fn softmax(self, x: &mut [f32]) {
        if x.is_empty() {
            return;
        }
        let max = self.max(x);
        if max == f32::NEG_INFINITY {
            x.fill(1.0 / x.len() as f32);
            return;
        }
        let sum = self.exp_sum(x, max);
        self.scale(x, 1.0 / sum);
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

/// Inverse of [`split_even_odd`]: `dst[j]` from the block layout of `src`.
pub(super) fn merge_even_odd(dst: &mut [f32], src: &[f32], block: usize) {
    let half = block / 2;
    for (db, sb) in dst.chunks_mut(block).zip(src.chunks_exact(block)) {
        for (j, v) in db.iter_mut().enumerate() {
            *v = sb[(j % 2) * half + j / 2];
        }
    }
}

/// Copies `src` into `dst` block by block (`block` columns each, `dst` holding whole blocks),
/// each block's even columns first, then its odd ones: the bf16 layout of the SIMD tiers.
#[inline]
fn split_even_odd(dst: &mut [f32], src: &[f32], block: usize) {
    let half = block / 2;
    for (db, sb) in dst.chunks_exact_mut(block).zip(src.chunks(block)) {
        for (j, &v) in sb.iter().enumerate() {
            db[(j % 2) * half + j / 2] = v;
        }
    }
}
