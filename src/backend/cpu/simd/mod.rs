//! The SIMD kernels, each written once over [`Tier`] and compiled per tier by the dispatch in
//! `kernels` (inside that tier's `#[target_feature]` function, which is why every function
//! here is `#[inline(always)]`: on its own it would be compiled for the baseline ISA).
//!
//! The entry points re-exported below match `Kernels`'s methods one to one (with the tier
//! as first argument); the scalar tier has the same set in `scalar.rs`.

mod attention;
mod down;
mod elementwise;
mod gemm;
mod rows;
mod tokens;

pub(super) use attention::{scores, scores_by_rows, weighted_sum};
pub(super) use down::{accumulate_rows_in, kept_up_down};
pub(super) use elementwise::{exp_sum, max, scale, silu_mul};
pub(super) use gemm::gemm_block;
pub(super) use rows::{convert, convert_rows, matvec_at, matvec_strided};
pub(super) use tokens::{matmul_tokens, split_bf16_x};

use super::kernels::TierLayout;
use super::tier::Tier;

/// The layout constants of tier `T` that the callers of the kernels need.
#[inline(always)]
pub(super) fn layout<T: Tier>(_: T) -> TierLayout {
    TierLayout {
        bf16_block: Some(T::BF16_BLOCK),
        streamed_max_tokens: T::STREAMED_MAX_TOKENS,
        bf16_split_down: T::BF16_SPLIT_DOWN,
    }
}

/// Weight element types as const generic parameters, so that each kernel is compiled once
/// per dtype with the loads below resolved at compile time.
const BF16: u8 = 0;
const F16: u8 = 1;
const F32: u8 = 2;

/// Bytes per element of the const dtype `D`.
const fn elem_size(d: u8) -> usize {
    if d == F32 {
        4
    } else {
        2
    }
}

/// Instantiates `$body` with the const dtype of `$dtype` bound to `$d` (a generic kernel
/// called as `kernel::<.., $d, ..>`). The caller imports `DType`.
macro_rules! with_dtype {
    ($dtype:expr, $d:ident => $body:expr) => {
        match $dtype {
            DType::BF16 => {
                const $d: u8 = super::BF16;
                $body
            }
            DType::F16 => {
                const $d: u8 = super::F16;
                $body
            }
            DType::F32 => {
                const $d: u8 = super::F32;
                $body
            }
            // Quantized matrices are routed to the quantized kernels (or `convert`) before
            // any float kernel sees them: `CpuBackend` checks every entry point.
            q => unreachable!("float kernel called on a {q} matrix"),
        }
    };
}
use with_dtype;

/// `LANES` weights of dtype `D` at `p`, widened to f32 in their natural order.
///
/// # Safety
/// `p` readable for `LANES` elements.
#[inline(always)]
unsafe fn load_w<T: Tier, const D: u8>(t: T, p: *const u8) -> T::V {
    // SAFETY: caller contract.
    unsafe {
        match D {
            BF16 => t.load_bf16(p),
            F16 => t.load_f16(p),
            _ => t.load(p as *const f32),
        }
    }
}

/// [`load_w`] of the first `n` (> 0) elements, the other lanes zero.
///
/// # Safety
/// `p` readable for `min(n, LANES)` elements.
#[inline(always)]
unsafe fn load_w_partial<T: Tier, const D: u8>(t: T, p: *const u8, n: usize) -> T::V {
    // SAFETY: caller contract.
    unsafe {
        match D {
            BF16 => t.load_bf16_partial(p, n),
            F16 => t.load_f16_partial(p, n),
            _ => t.load_partial(p as *const f32, n),
        }
    }
}

/// One block (`2 * LANES`) of weights of dtype `D` at `p` as two f32 vectors in the order of
/// the prepared x: bf16 even then odd columns (`Tier::load_bf16_split`), f16 and f32 first
/// then second half.
///
/// # Safety
/// `p` readable for `2 * LANES` elements.
#[inline(always)]
unsafe fn load_block<T: Tier, const D: u8>(t: T, p: *const u8) -> (T::V, T::V) {
    let half = T::LANES * elem_size(D);
    // SAFETY: caller contract.
    unsafe {
        match D {
            BF16 => t.load_bf16_split(p),
            _ => (load_w::<T, D>(t, p), load_w::<T, D>(t, p.add(half))),
        }
    }
}

/// [`load_block`] of the first `n` (> 0) elements, the others zero.
///
/// # Safety
/// `p` readable for `min(n, 2 * LANES)` elements.
#[inline(always)]
unsafe fn load_block_partial<T: Tier, const D: u8>(t: T, p: *const u8, n: usize) -> (T::V, T::V) {
    let half = T::LANES * elem_size(D);
    // SAFETY: caller contract; the second half is only read where it has elements.
    unsafe {
        match D {
            BF16 => t.load_bf16_split_partial(p, n),
            _ if n > T::LANES => (
                load_w::<T, D>(t, p),
                load_w_partial::<T, D>(t, p.add(half), n - T::LANES),
            ),
            _ => (load_w_partial::<T, D>(t, p, n), t.zero()),
        }
    }
}

/// Asks the CPU to start loading the cache line at `p` into L2. A hint: it never faults, so
/// `p` may point anywhere (form it with wrapping arithmetic past the end of a buffer).
#[inline(always)]
fn prefetch_l2(p: *const u8) {
    // SAFETY: prefetches are hints that never fault; SSE is part of the x86-64 baseline.
    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p as *const i8) }
}
