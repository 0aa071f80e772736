//! The one dispatch from a runtime-selected tier to its kernels.
//!
//! [`Kernels`] holds a tier the machine supports: the scalar tier, or the zero-sized proof of
//! a SIMD tier (`Avx2`, `Avx512`), which can only be made after feature detection. Each entry
//! point below is a method that runs the scalar kernel of `scalar.rs`, or the generic kernel
//! of `simd` compiled for the held SIMD tier inside a `#[target_feature]` function of that
//! tier. Holding the proof is what makes calling that function sound. The match per call is a
//! predictable branch; the kernels behind it run for microseconds at least.

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
use super::avx2::Avx2;
#[cfg(target_arch = "x86_64")]
use super::avx512::Avx512;
use super::isa::{isa, Isa};
use super::neurons::Bundles;
use super::scalar;
#[cfg(target_arch = "x86_64")]
use super::simd;
use crate::tensor::DType;

/// A tier this machine supports, with the proof its SIMD kernels need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernels {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512),
}

/// Where the rows of a matvec start in its weight bytes.
#[derive(Clone, Copy, Debug)]
pub(super) enum RowStarts<'a> {
    /// Row r at element `r * stride` (a matrix).
    Strided(usize),
    /// Row r at byte `offsets[r]` (neurons picked out of a bundle matrix).
    At(&'a [usize]),
}

/// `n` rows of f32 `stride` apart: row p is `data[p * stride..][..cols]` (a KV head's slice
/// of the cache, a block of activations or of converted weights).
#[derive(Clone, Copy, Debug)]
pub(super) struct StridedRows<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub cols: usize,
    pub n: usize,
}

/// A KV cache's elements as stored: f32, or f16 (as their bits), which halves what attention
/// reads per step.
#[derive(Clone, Copy, Debug)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl<'a> KvSlice<'a> {
    /// Elements held.
    pub fn len(self) -> usize {
        match self {
            KvSlice::F32(d) => d.len(),
            KvSlice::F16(d) => d.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// Elements `range` (within `len()`).
    pub fn slice(self, range: std::ops::Range<usize>) -> KvSlice<'a> {
        match self {
            KvSlice::F32(d) => KvSlice::F32(&d[range]),
            KvSlice::F16(d) => KvSlice::F16(&d[range]),
        }
    }

    /// Elements from `start` on.
    pub fn from(self, start: usize) -> KvSlice<'a> {
        self.slice(start..self.len())
    }

    /// The element type.
    pub fn dtype(self) -> DType {
        match self {
            KvSlice::F32(_) => DType::F32,
            KvSlice::F16(_) => DType::F16,
        }
    }

    /// The elements' bytes (little-endian, as the byte kernels read them).
    pub fn bytes(self) -> &'a [u8] {
        // SAFETY: f32s and u16s are plain bytes; the same memory, as initialized bytes.
        unsafe {
            match self {
                KvSlice::F32(d) => std::slice::from_raw_parts(d.as_ptr().cast(), size_of_val(d)),
                KvSlice::F16(d) => std::slice::from_raw_parts(d.as_ptr().cast(), size_of_val(d)),
            }
        }
    }

    /// Element `i` as f32.
    pub fn get(self, i: usize) -> f32 {
        match self {
            KvSlice::F32(d) => d[i],
            KvSlice::F16(d) => half::f16::from_bits(d[i]).to_f32(),
        }
    }
}

/// `n` cache rows `stride` elements apart: row p is elements `p * stride..][..cols]` of
/// `data` (a KV head's slice of the cache).
#[derive(Clone, Copy, Debug)]
pub(super) struct CacheRows<'a> {
    pub data: KvSlice<'a>,
    pub stride: usize,
    pub cols: usize,
    pub n: usize,
}

/// What the callers of the kernels need to know of a tier's data layouts and paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TierLayout {
    /// Columns per block of the de-interleaved bf16 layout of x that the bf16 kernels want
    /// (`Kernels::prep_x_tokens`); None if they read x as it is.
    pub bf16_block: Option<usize>,
    /// Up to how many tokens `matmul_tokens` (weights streamed, converted in registers) is
    /// the faster multi-token path; beyond it `gemm_block` tiling wins. 0: no such kernel.
    pub streamed_max_tokens: usize,
    /// Whether bf16 down projections accumulate in the de-interleaved layout
    /// (`Kernels::acc_split_block`).
    pub bf16_split_down: bool,
}

impl Kernels {
    /// The kernels of `isa`, or None if this machine cannot run it.
    pub(super) fn try_new(isa: Isa) -> Option<Kernels> {
        match isa {
            Isa::Scalar => Some(Kernels::Scalar),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Avx2::detect().map(Kernels::Avx2),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Avx512::detect().map(Kernels::Avx512),
            #[cfg(not(target_arch = "x86_64"))]
            _ => None,
        }
    }

    /// The kernels of `isa`. Panics if this machine cannot run it (the `*_with_isa` test and
    /// benchmark entry points document that).
    pub(super) fn new(isa: Isa) -> Kernels {
        match Kernels::try_new(isa) {
            Some(k) => k,
            None => panic!(
                "CPU ISA tier {} is not supported on this machine",
                isa.name()
            ),
        }
    }

    /// Kernels of the process-wide selected tier.
    pub(super) fn selected() -> Kernels {
        static SELECTED: OnceLock<Kernels> = OnceLock::new();
        *SELECTED.get_or_init(|| Kernels::new(isa()))
    }
}

/// The body of an entry point: `scalar::$name(args)` on the scalar tier, else `simd::$name`
/// for the held tier, compiled with that tier's features. `$($unsafe)?` marks entry points
/// with a safety contract of their own, which the caller of the method upholds.
macro_rules! dispatch {
    ($k:expr, [$($unsafe:ident)?] $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        match $k {
            Kernels::Scalar => unsafe_if!([$($unsafe)?] scalar::$name($($arg),*)),
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2(tier) => {
                #[target_feature(enable = "avx2,fma,f16c")]
                $($unsafe)? fn on_tier(tier: Avx2, $($arg: $ty),*) $(-> $ret)? {
                    unsafe_if!([$($unsafe)?] simd::$name(tier, $($arg),*))
                }
                // SAFETY: `tier` proves this CPU has the features (plus the entry point's own
                // contract where it has one, forwarded to our caller).
                unsafe { on_tier(tier, $($arg),*) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512(tier) => {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                $($unsafe)? fn on_tier(tier: Avx512, $($arg: $ty),*) $(-> $ret)? {
                    unsafe_if!([$($unsafe)?] simd::$name(tier, $($arg),*))
                }
                // SAFETY: as above.
                unsafe { on_tier(tier, $($arg),*) }
            }
        }
    };
}

/// `$call`, in an `unsafe` block if the entry point is `unsafe` (forwarding its contract).
macro_rules! unsafe_if {
    ([] $call:expr) => {
        $call
    };
    ([unsafe] $call:expr) => {
        // SAFETY: the contract of the `unsafe` entry point, upheld by its caller.
        unsafe { $call }
    };
}

/// Declares the entry points as methods of [`Kernels`], each dispatched by [`dispatch!`].
macro_rules! entry_points {
    () => {};
    (
        $(#[$doc:meta])*
        fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;
        $($rest:tt)*
    ) => {
        impl Kernels {
            $(#[$doc])*
            #[allow(clippy::too_many_arguments)]
            pub(super) fn $name(self, $($arg: $ty),*) $(-> $ret)? {
                dispatch!(self, [] $name($($arg: $ty),*) $(-> $ret)?)
            }
        }
        entry_points!($($rest)*);
    };
    (
        $(#[$doc:meta])*
        unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;
        $($rest:tt)*
    ) => {
        impl Kernels {
            $(#[$doc])*
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(self, $($arg: $ty),*) $(-> $ret)? {
                dispatch!(self, [unsafe] $name($($arg: $ty),*) $(-> $ret)?)
            }
        }
        entry_points!($($rest)*);
    };
}

entry_points! {
    /// The tier's layout constants.
    fn layout() -> TierLayout;

    /// `out[i] = src[i]` as f32; `src` holds at least `out.len()` elements of `dtype`.
    fn convert(src: &[u8], dtype: DType, out: &mut [f32]);

    /// Rows of `cols` elements of `dtype`, `stride` elements apart in `src`, as f32 rows
    /// packed in `out` (`out.len() / cols` rows): a KV head's f16 cache rows widened once
    /// for every query head that reads them.
    fn convert_rows(src: &[u8], dtype: DType, stride: usize, cols: usize, out: &mut [f32]);

    /// [`Kernels::matvec`] of strided rows.
    fn matvec_strided(w: &[u8], dtype: DType, stride: usize, cols: usize, x: &[f32], y: &mut [f32]);

    /// [`Kernels::matvec`] of rows at byte offsets.
    fn matvec_at(w: &[u8], dtype: DType, offsets: &[usize], cols: usize, x: &[f32], y: &mut [f32]);

    /// `out[c] += sum_r coeffs[r] * row_r[c]` for `c < cols`, row r at the byte offset
    /// `offsets[r]` of `w`, into `out` laid out as [`Kernels::acc_split_block`] says (split
    /// blocks, or natural order in `out[..cols]`).
    fn accumulate_rows_in(
        w: &[u8], offsets: &[usize], dtype: DType, cols: usize, coeffs: &[f32], out: &mut [f32],
    );

    /// One token's CATS up/down over the kept neurons `ids` of `b` in a single fused pass, if
    /// this tier has one for its dtype; false if the caller must use the generic path. `xp`,
    /// `out` as for [`Kernels::accumulate_rows_in`] with x prepared.
    fn kept_up_down(
        b: Bundles, ids: &[u32], coeff: &[f32], up_bias: Option<&[f32]>,
        xp: &[f32], out: &mut [f32],
    ) -> bool;

    /// `y[t * ldy + r] = dot(row r, x row t)` for the `rows` rows of `w` (`x.cols` long) and
    /// the `x.n` tokens prepared by [`Kernels::prep_x_tokens`]; only below the tier's
    /// `streamed_max_tokens`.
    ///
    /// # Safety
    /// `y` must be valid for writes at every `t * ldy + r` (`t < x.n`, `r < rows`) and those
    /// elements must not be accessed by anyone else during the call.
    unsafe fn matmul_tokens(
        w: &[u8], dtype: DType, rows: usize, x: StridedRows, y: *mut f32, ldy: usize,
    );

    /// `y[t * ldy + r] (+)= dot(a row r, x row t)` for `r < a.n`, `t < x.n`, over `a.cols ==
    /// x.cols` columns; `a` rows zero padded to [`Kernels::GEMM_PAD`].
    ///
    /// # Safety
    /// `y` must be valid for writes at every `t * ldy + r` above and those elements must not
    /// be accessed by anyone else during the call.
    unsafe fn gemm_block(a: StridedRows, x: StridedRows, y: *mut f32, ldy: usize, accumulate: bool);

    /// One token's x in the de-interleaved bf16 layout (tiers with a bf16 block only).
    fn split_bf16_x(src: &[f32], dst: &mut [f32]);

    /// Attention scores of the `g = s.len() / keys.n` query heads `q[h * keys.cols..]` that
    /// share one KV head: `s[h * keys.n + p] = dot(key row p, q_h)`.
    fn scores(keys: StridedRows, q: &[f32], s: &mut [f32]);

    /// Attention's P·V for the `g = w.len() / v.n` heads sharing one KV head:
    /// `out[h * v.cols + c] = sum_p w[h * v.n + p] * (value row p)[c]`.
    fn weighted_sum(v: StridedRows, w: &[f32], out: &mut [f32]);

    /// Largest element (-inf for an empty slice).
    fn max(x: &[f32]) -> f32;

    /// `x[i] = e^(x[i] - shift)`; returns the sum of the new values.
    fn exp_sum(x: &mut [f32], shift: f32) -> f32;

    /// `x[i] *= s`.
    fn scale(x: &mut [f32], s: f32);

    /// `gate[i] = silu(gate[i]) * up[i]` for `i < gate.len()` (`up` at least as long).
    fn silu_mul(gate: &mut [f32], up: &[f32]);
}

impl Kernels {
    /// Vector width the `a` rows of [`Kernels::gemm_block`] must be zero padded to (max of
    /// all tiers, so callers need not care).
    pub(super) const GEMM_PAD: usize = 16;

    /// `y[r] = dot(row r, x)` for `r < y.len()`, rows of `w` `cols` long, starting where
    /// `rows` says; `x` prepared by [`Kernels::prep_x_tokens`] for bf16 on tiers with a bf16
    /// block, else as it is. (Two entry points, so that each compiles one kind of rows.)
    pub(super) fn matvec(
        self,
        w: &[u8],
        dtype: DType,
        rows: RowStarts,
        cols: usize,
        x: &[f32],
        y: &mut [f32],
    ) {
        match rows {
            RowStarts::Strided(stride) => self.matvec_strided(w, dtype, stride, cols, x, y),
            RowStarts::At(offsets) => self.matvec_at(w, dtype, offsets, cols, x, y),
        }
    }

    /// Block size of the de-interleaved output layout [`Kernels::accumulate_rows_in`] uses
    /// for `dtype`, or None if it accumulates in natural column order.
    pub(super) fn acc_split_block(self, dtype: DType) -> Option<usize> {
        let l = self.layout();
        if l.bf16_split_down && dtype == DType::BF16 {
            l.bf16_block
        } else {
            None
        }
    }

    /// Lays out `n` tokens of `x` (`cols` each) as the matvec and multi-token kernels expect,
    /// in `buf`; returns the stride between tokens. Each token is zero padded to whole blocks
    /// of the tier's bf16 block, and bf16 wants each block's even columns, then its odd ones.
    /// Every element is written once (no zero-fill first): this runs serially while the
    /// other threads wait.
    pub(super) fn prep_x_tokens(
        self,
        dtype: DType,
        x: &[f32],
        n: usize,
        cols: usize,
        buf: &mut Vec<f32>,
    ) -> usize {
        let block = self.layout().bf16_block;
        let stride = cols.div_ceil(block.unwrap_or(1)) * block.unwrap_or(1);
        if buf.len() < n * stride {
            buf.resize(n * stride, 0.0);
        }
        buf.truncate(n * stride);
        for (dst, src) in buf.chunks_exact_mut(stride).zip(x.chunks_exact(cols)) {
            if dtype == DType::BF16 && block.is_some() {
                self.split_bf16_x(src, dst);
            } else {
                dst[..cols].copy_from_slice(src);
                dst[cols..].fill(0.0);
            }
        }
        stride
    }
}

/// Inverse of the bf16 x layout ([`Kernels::prep_x_tokens`]): `dst[j]` from the blocks of `src`.
pub(super) fn merge_even_odd(dst: &mut [f32], src: &[f32], block: usize) {
    let half = block / 2;
    for (db, sb) in dst.chunks_mut(block).zip(src.chunks_exact(block)) {
        for (j, v) in db.iter_mut().enumerate() {
            *v = sb[(j % 2) * half + j / 2];
        }
    }
}
