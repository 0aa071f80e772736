//! Shared pieces of the CUDA tests (`tests/gpu_parity.rs`, `tests/gpu_end_to_end.rs`,
//! `tests/gpu_offload.rs`): the backend under test and the skip rule without a GPU; the
//! comparison and its tolerances are the parity harness's (`common::parity`).

use sirius_offload::backend::cuda::device;
use sirius_offload::backend::CpuBackend;

pub use super::parity::*;

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
