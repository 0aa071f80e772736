//! The cuBLAS paths of batches over 16 tokens (prefill chunks, wide trees).
//!
//! f32 weights use SGEMM. For bf16/f16 weights the backend's [`GemmPrecision`] picks one of
//! two paths; it comes from `SIRIUS_CUDA_GEMM` (`bf16`, the default when unset, or `f32`;
//! anything else is an error), read once when `CudaBackend::new` runs, or is given to
//! `CudaBackend::with_gemm`:
//! - `bf16`: the activations are rounded to the weights' dtype (kernels/convert.cu) into a
//!   scratch buffer, then ONE cublasGemmEx multiplies the weights, used in place, by them:
//!   16-bit inputs, f32 accumulation and output (CUBLAS_COMPUTE_32F), tensor cores. No weight
//!   is copied. Each product carries its activation's rounding (relative <= 2^-8 for bf16,
//!   2^-11 for f16), so outputs differ from the CPU's by about that fraction of their scale
//!   (the errors random-walk: `gemm_tolerance` in tests/common/gpu.rs). GemmEx wants one
//!   type for both inputs, and rounding the small activation matrix is far cheaper than
//!   widening the weights. f16 activations saturate to infinity past 65504, as in any f16
//!   forward pass of an f16 checkpoint. The scratch is kept and grown (see
//!   [`Matmul::act16`]). bf16 GemmEx needs compute capability 8.0 (all the targets); an
//!   older GPU takes the `f32` path for bf16 weights.
//! - `f32`: the CPU reference's arithmetic, for parity checks and users who want results
//!   closer to the CPU. Weights are converted to f32 a block of rows at a time (the
//!   embedding kernel with ids 0..rows is exactly that conversion) into a scratch of up to
//!   64 MiB per call, and SGEMM runs on each block: f32 inputs, f32 accumulation, only the
//!   summation order differs from the CPU. Slower: every weight is read, written and read
//!   again.
//!
//! cuBLAS is column-major, and a row-major [r, c] buffer is the column-major c x r matrix
//! of its transpose. So the weights W (rows x cols, row-major) are W^T (cols x rows, ld =
//! cols), the activations X (n x cols) are X^T (cols x n, ld = cols) and the output
//! (n x rows) is out^T (rows x n, ld = rows). out = X W^T is out^T = W X^T: gemm(transa = T,
//! transb = N, m = rows, n = n, k = cols, A = weights with lda = cols, B = activations with
//! ldb = cols, C = out with ldc = rows), for SGEMM and GemmEx alike.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::sys::cudaDataType;

use super::cublas::Cublas;
use super::{GemmPrecision, Matmul, Product, OP, THREADS};
use crate::backend::cuda::buffers::DevMem;
use crate::backend::cuda::context::{to_u32, Ctx, KArgs};
use crate::backend::cuda::ops_basic::launch_grid_stride;
use crate::backend::cuda::temps::Temp;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// f32 elements of the weight conversion scratch of one GEMM block (64 MiB; `f32` path):
/// a per-op temporary, which the budget's bound knows.
const GEMM_SCRATCH_FLOATS: usize = crate::backend::offload::GEMM_F32_BLOCK_FLOATS;

impl Matmul {
    /// The cuBLAS paths (see the module doc).
    pub(super) fn gemm(&self, ctx: &Arc<Ctx>, blas: &Cublas, p: &Product) -> Result<()> {
        let half = match p.w.dtype {
            DType::F32 => {
                let (w, x, out) = (p.w.device_ptr(), p.x.device_ptr(), p.out.device_ptr());
                return blas.gemm(OP, cudaDataType::CUDA_R_32F, p.dims(p.w.rows), w, x, out);
            }
            DType::BF16 => Half::Bf16,
            DType::F16 => Half::F16,
            q => unreachable!(
                "{q}: quantized matrices take the small-batch kernels (Matmul::matmul)"
            ),
        };
        let rounded =
            self.precision == GemmPrecision::Bf16 && (half == Half::F16 || self.bf16_gemm);
        if rounded {
            self.gemm_16(ctx, blas, half, p)
        } else {
            self.gemm_f32(ctx, blas, half, p)
        }
    }

    /// `bf16` path: activations rounded to the weights' type, one GemmEx.
    fn gemm_16(&self, ctx: &Arc<Ctx>, blas: &Cublas, half: Half, p: &Product) -> Result<()> {
        let len = p.n * p.w.cols;
        let len32 = to_u32(OP, "activations", len)?;
        let scratch = grown(ctx, &self.act16, len * 2)?;
        let act = held_ptr(&scratch, "activation scratch")?;
        let args = KArgs::new().ptr(p.x.device_ptr()).ptr(act).u32(len32);
        launch_grid_stride(ctx, OP, half.convert_kernel(), len, args)?;
        let (w, out) = (p.w.device_ptr(), p.out.device_ptr());
        blas.gemm(OP, half.cuda_type(), p.dims(p.w.rows), w, act, out)
    }

    /// `f32` path: weight blocks converted to f32, SGEMM on each.
    fn gemm_f32(&self, ctx: &Arc<Ctx>, blas: &Cublas, half: Half, p: &Product) -> Result<()> {
        let (rows, cols) = (p.w.rows, p.w.cols);
        let block = (GEMM_SCRATCH_FLOATS / cols).clamp(1, rows);
        // Held for the whole call: the ids buffer stays as it is while this call's kernels
        // are queued (a replacement would be freed in stream order anyway).
        let ids = row_ids(ctx, &self.row_ids, rows)?;
        let ids_ptr = held_ptr(&ids, "row-id buffer")?;
        let scratch = Temp::new(ctx, OP, block * cols * 4)?;
        for r0 in (0..rows).step_by(block) {
            let m = block.min(rows - r0);
            let args = KArgs::new()
                .ptr(p.w.device_ptr())
                .ptr(ids_ptr + (r0 * 4) as u64)
                .ptr(scratch.ptr())
                .u32(to_u32(OP, "block rows", m)?)
                .u32(to_u32(OP, "rows", rows)?)
                .u32(to_u32(OP, "cols", cols)?);
            ctx.launch(OP, half.embed_kernel(), (m as u32, 1, 1), THREADS, args)?;
            let (a, x, out) = (scratch.ptr(), p.x.device_ptr(), p.out.at(r0));
            blas.gemm(OP, cudaDataType::CUDA_R_32F, p.dims(m), a, x, out)?;
        }
        Ok(())
    }
}

/// The 16-bit weight types (the GemmEx operand type of the `bf16` path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    Bf16,
    F16,
}

impl Half {
    /// kernels/convert.cu: f32 activations to this type.
    fn convert_kernel(self) -> &'static str {
        match self {
            Half::Bf16 => "f32_to_bf16",
            Half::F16 => "f32_to_f16",
        }
    }

    /// kernels/embedding.cu: rows of this type to f32 (the `f32` path's weight conversion).
    fn embed_kernel(self) -> &'static str {
        match self {
            Half::Bf16 => "embed_bf16",
            Half::F16 => "embed_f16",
        }
    }

    fn cuda_type(self) -> cudaDataType {
        match self {
            Half::Bf16 => cudaDataType::CUDA_R_16BF,
            Half::F16 => cudaDataType::CUDA_R_16F,
        }
    }
}

/// The address of the scratch buffer a [`grown`] or [`row_ids`] guard holds.
fn held_ptr(held: &Option<DevMem>, what: &str) -> Result<u64> {
    held.as_ref()
        .map(DevMem::ptr)
        .ok_or_else(|| Error::Cuda(format!("{OP}: the {what} is missing")))
}

/// The buffer in `slot`, first replaced by `make()` unless it is `big_enough`. The old one
/// goes first, so that the device never holds both (it is freed in stream order, after the
/// work queued on it).
fn refilled<'a>(
    slot: &'a Mutex<Option<DevMem>>,
    big_enough: impl Fn(&DevMem) -> bool,
    make: impl FnOnce() -> Result<DevMem>,
) -> Result<MutexGuard<'a, Option<DevMem>>> {
    let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    if !guard.as_ref().is_some_and(big_enough) {
        *guard = None;
        *guard = Some(make()?);
    }
    Ok(guard)
}

/// The scratch in `slot`, replaced by one of the next power of two of `bytes` when smaller.
pub(super) fn grown<'a>(
    ctx: &Arc<Ctx>,
    slot: &'a Mutex<Option<DevMem>>,
    bytes: usize,
) -> Result<MutexGuard<'a, Option<DevMem>>> {
    let size = bytes.checked_next_power_of_two().unwrap_or(bytes);
    refilled(slot, |m| m.bytes() >= bytes, || DevMem::new(ctx, OP, size))
}

/// The device vector 0, 1, 2, ... (u32) with at least `n` entries: the row ids that make the
/// embedding kernel convert whole row blocks of a matrix.
fn row_ids<'a>(
    ctx: &Arc<Ctx>,
    iota: &'a Mutex<Option<DevMem>>,
    n: usize,
) -> Result<MutexGuard<'a, Option<DevMem>>> {
    let upload = || {
        let len = n.next_power_of_two();
        to_u32(OP, "rows", len)?;
        let host: Vec<u32> = (0..len as u32).collect();
        DevMem::upload(ctx, OP, &host)
    };
    refilled(iota, |m| m.bytes() / 4 >= n, upload)
}
