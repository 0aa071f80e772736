//! CPU backend: SIMD kernels (runtime-selected ISA tier) and the thread pool they run on.
//!
//! Weights arrive as raw little-endian bytes of their checkpoint dtype (straight from the
//! memory-mapped safetensors file, any alignment) and are converted on the fly inside the
//! kernels; activations are f32. Every kernel runs on three tiers (see [`Isa`]): AVX-512,
//! AVX2+FMA+F16C and portable scalar, picked once per process by feature detection and
//! lowered with `SIRIUS_CPU_ISA=scalar|avx2|avx512`. The `*_with_isa` variants run a given
//! tier (tests, benchmarks, a `CpuBackend` pinned to a tier) and panic if the machine cannot
//! run it.
//!
//! Layout: the SIMD kernels are written once, generic over the [`tier::Tier`] trait (`simd/`),
//! which `avx2.rs` and `avx512.rs` implement; `scalar.rs` is the portable tier; `kernels.rs`
//! is the one dispatch from a tier to its code. The rest (`matmul`, `attention`, `neurons`,
//! `ops`) splits work into tasks for the [`ThreadPool`] and calls the kernels.

mod attention;
mod attention_window;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod copy_engine;
mod isa;
mod kernels;
mod matmul;
mod neurons;
mod offload;
mod ops;
mod pool;
mod quant;
#[cfg(target_arch = "x86_64")]
mod quant_avx2;
mod quant_batch;
mod quant_gather;
#[cfg(target_arch = "x86_64")]
mod quant_k_avx2;
mod quant_logits;
mod quant_packed;
#[cfg(target_arch = "x86_64")]
mod quant_packed_avx2;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod tier;
mod util;

pub use isa::{isa, isa_name, Isa, ISA_ENV};
pub use pool::ThreadPool;

use crate::tensor::DType;
use crate::tensor::TreeMask;
use kernels::Kernels;
pub use kernels::KvSlice;

/// Defines a public kernel `$name` on the process-wide selected ISA tier and its
/// `$name_isa(isa, ...)` twin on a given tier (panics if this machine cannot run it), both
/// forwarding to `$inner(kernels, ...)`.
macro_rules! tiered {
    (
        $(#[$doc:meta])*
        $name:ident, $name_isa:ident => $inner:path;
        $($arg:ident: $ty:ty),* $(,)? $(=> $ret:ty)?
    ) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            $inner(Kernels::selected(), $($arg),*)
        }

        #[doc = concat!("[`", stringify!($name), "()`] on a given ISA tier. Panics if this machine cannot run `isa`.")]
        #[allow(clippy::too_many_arguments)]
        pub fn $name_isa(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            $inner(Kernels::new(isa), $($arg),*)
        }
    };
}

tiered! {
    /// `y[t*rows + r] = sum_c w[r, c] * x[t*cols + c]` for `t in 0..n_tokens`.
    ///
    /// `w` is a row-major `[rows, cols]` matrix (HF `[out_features, in_features]`) as raw bytes of
    /// `dtype`, any alignment. The weights are read from memory once per call (per block of
    /// tokens for long prompts): `n_tokens == 1` (decode) and small batches run at memory
    /// bandwidth, long prompts near FMA peak.
    matmul, matmul_with_isa => matmul::matmul_with;
    pool: &ThreadPool, w: &[u8], dtype: DType, rows: usize, cols: usize,
    x: &[f32], n_tokens: usize, y: &mut [f32],
}

tiered! {
    /// [`matmul()`] with f32 activations whatever `dtype`: a quantized matrix's rows
    /// de-quantized, where [`matmul()`] quantizes a few tokens' activations to 8 bits (the
    /// LM head of a verification, whose probabilities Sirius reads).
    matmul_exact, matmul_exact_with_isa => matmul::matmul_exact_with;
    pool: &ThreadPool, w: &[u8], dtype: DType, rows: usize, cols: usize,
    x: &[f32], n_tokens: usize, y: &mut [f32],
}

tiered! {
    /// `y = w x` for one token with a Q4_0/Q4_1 matrix in the interleaved decode layout
    /// ([`PackedRows`]); false (nothing done) on a tier without that kernel.
    matvec_packed, matvec_packed_with_isa => matmul::matvec_packed_with;
    pool: &ThreadPool, w: &PackedRows, x: &[f32], y: &mut [f32], => bool
}

tiered! {
    /// `y = w x` for one token with f32 activations whatever `dtype` (a quantized matrix's
    /// rows de-quantized), where [`matmul()`] would quantize them to 8 bits.
    matvec_exact, matvec_exact_with_isa => matmul::matvec_exact_with;
    pool: &ThreadPool, w: &[u8], dtype: DType, rows: usize, cols: usize,
    x: &[f32], y: &mut [f32],
}

pub use quant_packed::PackedRows;

tiered! {
    /// One token's logits from a Q8_0 head (its stored bytes `w`), the maximum exact;
    /// the rows recomputed exactly, or `None` on a tier without the kernel. See `quant_logits`.
    logits_q8, logits_q8_with_isa => quant_logits::logits_q8;
    pool: &ThreadPool, w: &[u8], head: &PackedRows, x: &[f32], y: &mut [f32], => Option<usize>
}

tiered! {
    /// The FFN over neuron bundles; see [`neurons::bundle_ffn`].
    bundle_ffn, bundle_ffn_with_isa => neurons::bundle_ffn;
    pool: &ThreadPool, b: Bundles, x: &[f32], n_tokens: usize, act: Activation, out: &mut [f32],
}

tiered! {
    /// Griffin's compact FFN gathered out of quantized matrices; see [`QuantizedFfn`].
    gather_quantized_ffn, gather_quantized_ffn_with_isa => quant_gather::gather_quantized_ffn;
    pool: &ThreadPool, w: QuantizedFfn<'_>, ids: &[u32], down_dtype: DType, => (Vec<u8>, Vec<u8>, Vec<u8>)
}

pub use quant_gather::QuantizedFfn;

pub use neurons::{
    accumulate_neuron_scores, gather_ffn, select_neurons, select_neurons_shared, Activation,
    Bundles,
};

tiered! {
    /// `x[i] = silu(x[i])`.
    silu, silu_with_isa => ops::silu_with;
    x: &mut [f32],
}

tiered! {
    /// Converts row `row` of a `[rows, cols]` matrix to f32 into `out[..cols]` (embedding lookup).
    row_to_f32, row_to_f32_with_isa => matmul::row_to_f32_with;
    w: &[u8], dtype: DType, cols: usize, row: usize, out: &mut [f32],
}

tiered! {
    /// Converts a whole tensor to f32 (norm weights and biases at load time).
    to_f32_vec, to_f32_vec_with_isa => matmul::to_f32_vec_with;
    w: &[u8], dtype: DType,
    => Vec<f32>
}

/// `out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight` for each row of `weight.len()`.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    ops::rmsnorm(x, weight, eps, out);
}

tiered! {
    /// `gate[i] = silu(gate[i]) * up[i]`.
    silu_mul, silu_mul_with_isa => ops::silu_mul_with;
    gate: &mut [f32], up: &[f32],
}

/// `x[i] += y[i]`.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    ops::add_inplace(x, y);
}

tiered! {
    /// Causal attention for `n_tokens` new queries at positions `start_pos..start_pos + n_tokens`
    /// over a per-layer KV cache that already holds positions `0..start_pos + n_tokens`.
    ///
    /// `q`, `out`: `[n_tokens, n_heads * head_dim]`; `k_cache`, `v_cache`:
    /// `[capacity, n_kv_heads * head_dim]` (row = position), f32 or f16. Query head `h` uses kv head
    /// `h / (n_heads / n_kv_heads)`; scale `1/sqrt(head_dim)`; query `t` sees positions
    /// `0..=start_pos + t`, of which a tree `mask` (for this batch) hides the rows of other
    /// branches. Parallel over (token, head).
    attention, attention_with_isa => attention::attention_with;
    pool: &ThreadPool, q: &[f32], k_cache: KvSlice<'_>, v_cache: KvSlice<'_>,
    n_heads: usize, n_kv_heads: usize, head_dim: usize,
    start_pos: usize, n_tokens: usize, mask: Option<&TreeMask>, out: &mut [f32],
}
