//! Shared pieces of the CUDA parity tests (`tests/gpu_parity.rs`, `tests/gpu_end_to_end.rs`):
//! the backend under test, the skip rule without a GPU, and the comparison with its
//! per-kind tolerances.

use std::io::Write;

use sirius_offload::backend::cuda::device;
use sirius_offload::backend::{Backend, CpuBackend, SparseOps};
use sirius_offload::tensor::DType;

use super::Rng;

// ---------------------------------------------------------------- the backend under test

pub type Gpu = sirius_offload::backend::cuda::CudaBackend;
pub use sirius_offload::backend::cuda::GemmPrecision;

/// Device 0 with the GEMM precision of `SIRIUS_CUDA_GEMM` (bf16 when unset), as the CLI.
pub fn open_backend() -> sirius_offload::Result<Gpu> {
    Gpu::new(0)
}

/// Device 0 with an explicit GEMM precision (tests that need one path, whatever the
/// environment says).
pub fn open_backend_with(precision: GemmPrecision) -> sirius_offload::Result<Gpu> {
    Gpu::with_gemm(0, precision)
}

/// Writes one line straight to stderr (the test harness swallows `eprintln!`).
pub fn say(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// The CUDA backend on device 0, or None after saying why the test is skipped. A machine
/// whose GPU opens but whose backend does not start (NVRTC, cuBLAS) fails: that is a bug or a
/// broken install, not a machine without a GPU.
pub fn gpu() -> Option<Gpu> {
    gpu_opened(open_backend)
}

/// As [`gpu`], with an explicit GEMM precision.
pub fn gpu_with(precision: GemmPrecision) -> Option<Gpu> {
    gpu_opened(|| open_backend_with(precision))
}

fn gpu_opened(open: impl FnOnce() -> sirius_offload::Result<Gpu>) -> Option<Gpu> {
    let why = if !device::driver_present() {
        device::NO_DRIVER.to_string()
    } else {
        match device::open(0) {
            Ok(_) => return Some(open().expect("device 0 opens, the CUDA backend must")),
            Err(e) => e.to_string(),
        }
    };
    if std::env::var("SIRIUS_REQUIRE_GPU").as_deref() == Ok("1") {
        panic!("SIRIUS_REQUIRE_GPU=1 but no GPU: {why}");
    }
    say(&format!("SKIPPED (gpu parity): {why}"));
    None
}

pub fn cpu() -> CpuBackend {
    CpuBackend::new(2)
}

// ---------------------------------------------------------------- comparison helpers

pub fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| scale * rng.next_f32()).collect()
}

pub fn read_all<B: Backend>(b: &B, buf: &B::Buf, len: usize) -> Vec<f32> {
    let mut out = vec![0.0; len];
    b.read(buf, 0, &mut out).unwrap();
    out
}

/// `len` NaNs on the device: an element the op should write and does not stays NaN.
pub fn poisoned<B: Backend>(b: &B, len: usize) -> B::Buf {
    b.upload(&vec![f32::NAN; len]).unwrap()
}

pub fn matrix<B: SparseOps>(
    b: &B,
    values: &[f32],
    dtype: DType,
    rows: usize,
    cols: usize,
) -> B::Matrix {
    let name = match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    };
    b.upload_matrix(super::encode(values, name), dtype, rows, cols)
        .unwrap()
}

/// Compares whole buffers (NaN matches only NaN) and fails above `tol`.
pub fn check(op: &str, case: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{op} {case}: lengths");
    let scale = cpu
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f64, |m, v| m.max(v.abs() as f64));
    let mut err = 0.0f64;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        if g.is_nan() != c.is_nan() {
            say(&format!("PARITY {op} {case} err=inf tol={tol:e} FAIL"));
            panic!(
                "{op} {case}: element {i} is {g} on the GPU, {c} on the CPU (NaN = never written)"
            );
        }
        if !c.is_nan() {
            err = err.max((g as f64 - c as f64).abs() / scale);
        }
    }
    let verdict = if err <= tol { "ok" } else { "FAIL" };
    say(&format!(
        "PARITY {op} {case} err={err:.3e} tol={tol:e} {verdict}"
    ));
    assert!(err <= tol, "{op} {case}: error {err:e} above {tol:e}");
}

pub const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

// Thresholds (normalised error as above), one per kind of arithmetic:
/// Pure data movement and conversions (embed, copies, bias and residual adds: one rounding
/// per element in both backends, the same one).
pub const EXACT: f64 = 0.0;
/// Element-wise transcendental (SiLU) and rope: a few ulp apart at most (expf
/// implementations differ; rope uses the host's cos/sin and unfused products on both).
pub const ELEMENTWISE: f64 = 1e-6;
/// f32 reductions of one level (rmsnorm, Griffin scores): summation order differs, random
/// walk ~sqrt(n) * 6e-8 for n <= 4096, worst case n * 6e-8 = 2.5e-4 is never approached.
pub const REDUCE: f64 = 1e-5;
/// Attention: the output is a convex combination of values in [-1, 1]; the f32 softmax and
/// chunk merge differ in order (~1e-6). 5e-5 is still tight enough that one cache row too
/// many or too few (a shift of ~0.5 / rows >= 1.2e-4 at 4100 rows) fails.
pub const ATTENTION: f64 = 5e-5;
/// Weight x activation dot products accumulated in f32 (matvec kernels, neuron bundles, and
/// the f32 GEMM path: SGEMM on weights converted to f32, or f32 weights; cuBLAS's default
/// math mode uses no TF32): products of a rounded weight and an f32 activation are exact in
/// both, only the order of up to a few thousand f32 additions differs.
pub const DOT: f64 = 1e-4;
/// Whole-model logits after a prompt through the f32 GEMM path: the per-op f32 order
/// differences (each <= DOT) carried through the layers. 1e-2 leaves margin while a wrong
/// op is O(1).
pub const LOGITS: f64 = 1e-2;
/// Whole-model logits after a prompt through the bf16 GEMM path (the tiny 2-layer models of
/// gpu_end_to_end). Each GEMM is off by up to ~2 * 2^-8 of its largest output (see
/// [`gemm_tolerance`]: 8 sigma over a maximum near 4 sigma); a layer has 4 GEMM stages in
/// series (qkv, o, gate/up, down), so 2 layers and the head stack <= 9 such errors, which
/// add as a random walk: ~3 * 2 * 2^-8 = 2.3e-2, doubled for margin. Still far below the
/// O(1) of a wrong layout. A calibration, not a bound: written without a GPU to measure it.
pub const LOGITS_BF16: f64 = 5e-2;

/// The unit roundoff of the 16-bit type the bf16 GEMM path rounds activations to (the
/// weights' dtype): bf16 keeps 8 significant bits (2^-8), f16 11 (2^-11).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        DType::F32 => 0.0,
    }
}

/// The normalised tolerance (as [`check`] measures: error / max(1, max |cpu|)) of a GEMM
/// whose activations were rounded with unit roundoff `u`, weights `w` and activations `x`
/// (random, independent, zero-mean), contraction length `k`, against the CPU's `cpu`.
///
/// Each product w_j * x_j becomes w_j * x_j * (1 + d_j) with |d_j| <= u, so an output is off
/// by sum_j w_j x_j d_j: a sum of k independent zero-mean terms (the rounding errors of
/// different activations), of standard deviation <= u * sqrt(k) * rms(w) * rms(x). The
/// tolerance is 8 of those (the largest of ~10^5 outputs stays under ~4.5 sigma), plus DOT
/// for the f32 summation order. The outputs themselves are ~sqrt(k) * rms(w) * rms(x), so
/// this is ~2u of the largest output whatever k is: 7.8e-3 for bf16, 9.8e-4 for f16, while
/// a wrong row, column or transpose is O(1).
pub fn gemm_tolerance(u: f64, k: usize, w: &[f32], x: &[f32], cpu: &[f32]) -> f64 {
    let rms =
        |v: &[f32]| (v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    let scale = cpu
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f64, |m, v| m.max(v.abs() as f64));
    8.0 * u * (k as f64).sqrt() * rms(w) * rms(x) / scale + DOT
}

// ---------------------------------------------------------------- element-wise, rows, read
