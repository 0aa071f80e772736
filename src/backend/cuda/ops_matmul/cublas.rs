//! The backend's cuBLAS handle ([`Cublas`]) and its one call: GemmEx with f32 accumulation
//! in the row-major layout of the backend's buffers (the mapping is in `gemm`'s module doc).

use std::ffi::{c_int, c_void};
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex};

use cudarc::cublas::result::CublasError;
use cudarc::cublas::{result as blas, sys as blas_sys};

use super::SMALL_BATCH;
use crate::backend::cuda::context::{call, Ctx, LibraryError};
use crate::error::{Error, Result};

impl LibraryError for CublasError {
    const LIBRARY: &'static str = "cuBLAS";
    fn status(&self) -> &dyn std::fmt::Debug {
        &self.0
    }
}

/// A cuBLAS handle bound to the compute stream. cuBLAS handles must not be used by two
/// threads at once, hence the mutex.
pub(crate) struct Cublas {
    ctx: Arc<Ctx>,
    handle: Mutex<blas_sys::cublasHandle_t>,
}

// SAFETY: the handle is only used under its mutex, with the context bound first.
unsafe impl Send for Cublas {}
unsafe impl Sync for Cublas {}

/// The sizes of one [`Cublas::gemm`]: `m` rows of `a`, `n` rows of `x` (tokens), `k`
/// columns of both, and `ldo`, the floats from one row of `out` to the next.
#[derive(Debug, Clone, Copy)]
pub(super) struct GemmDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ldo: usize,
}

impl GemmDims {
    /// The sizes as cuBLAS's ints: (m, n, k, ldo).
    fn to_c(self, op: &str) -> Result<(c_int, c_int, c_int, c_int)> {
        let int = |what: &str, v: usize| {
            c_int::try_from(v).map_err(|_| {
                Error::InvalidArgument(format!("{op}: {what} = {v} is past cuBLAS's int sizes"))
            })
        };
        Ok((
            int("rows", self.m)?,
            int("tokens", self.n)?,
            int("cols", self.k)?,
            int("ldc", self.ldo)?,
        ))
    }
}

impl Cublas {
    /// A handle, or `None` (with a warning) when libcublas is missing or will not start:
    /// the backend then runs long batches through the small-batch kernel.
    pub(super) fn new(ctx: &Arc<Ctx>) -> Option<Cublas> {
        // SAFETY: only tries to dlopen cudarc's candidate names for libcublas.
        let present = catch_unwind(|| unsafe { blas_sys::is_culib_present() }).unwrap_or(false);
        if !present {
            tracing::warn!(
                "libcublas not found: batches over {SMALL_BATCH} tokens use the small-batch \
                 CUDA kernel (slower prefill); install nvidia-cublas (pip) and put its lib dir \
                 on LD_LIBRARY_PATH for cuBLAS"
            );
            return None;
        }
        let made = (|| -> Result<blas_sys::cublasHandle_t> {
            ctx.bind()?;
            let handle = call("cuBLAS", "cublasCreate", blas::create_handle)?;
            let stream = ctx.raw_stream() as blas_sys::cudaStream_t;
            // SAFETY: both handles are live.
            if let Err(e) = call("cuBLAS", "cublasSetStream", || unsafe {
                blas::set_stream(handle, stream)
            }) {
                // SAFETY: created above, destroyed once.
                let _ = call("cuBLAS", "cublasDestroy", || unsafe {
                    blas::destroy_handle(handle)
                });
                return Err(e);
            }
            Ok(handle)
        })();
        match made {
            Ok(handle) => Some(Cublas {
                ctx: ctx.clone(),
                handle: Mutex::new(handle),
            }),
            Err(e) => {
                tracing::warn!(
                    "{e}: batches over {SMALL_BATCH} tokens use the small-batch CUDA kernel"
                );
                None
            }
        }
    }

    /// Row-major `out[t, i] = sum_k a[i, k] * x[t, k]` for i < m, t < n, with `out` rows
    /// `ldo` floats apart (`gemm`'s mapping: C = op_T(A) * B), `a` and `x` both of type `ty`
    /// (f32, bf16 or f16): f32 accumulation (CUBLAS_COMPUTE_32F, so f32 alpha/beta) into the
    /// f32 `out`. With f32 inputs this is SGEMM's arithmetic (the handle keeps the default
    /// math mode, so no TF32), which keeps one cuBLAS call site for every path.
    /// CUBLAS_GEMM_DEFAULT: since CUDA 11 the heuristics use tensor cores for 16-bit inputs
    /// on their own; the *_TENSOR_OP algos are deprecated and would also allow the reduced
    /// precision CUBLAS_COMPUTE_32F_FAST_16F kernels. No alignment is required for
    /// correctness (device allocations are 256-byte aligned anyway; row lengths that are
    /// multiples of 8 elements, as in every Llama shape, are what the fastest kernels want).
    pub(super) fn gemm(
        &self,
        op: &str,
        ty: blas_sys::cudaDataType,
        dims: GemmDims,
        a: u64,
        x: u64,
        out: u64,
    ) -> Result<()> {
        let (m, n, k, ldo) = dims.to_c(op)?;
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        self.ctx.bind()?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: a and x are live device allocations of at least k*m and k*n elements of
        // `ty`, out of ldo*n floats (checked by the caller); alpha/beta are host f32
        // scalars, the scale type CUBLAS_COMPUTE_32F wants (default pointer mode); beta = 0,
        // so `out` is only written; the handle runs on the compute stream, after the kernel
        // that wrote x.
        call(op, "cublasGemmEx", || unsafe {
            blas::gemm_ex(
                *handle,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                ty,
                k,
                x as *const c_void,
                ty,
                k,
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                ldo,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })?;
        // One GEMM, counted as one launch (cuBLAS may queue more than one kernel for it).
        self.ctx.count_launch();
        Ok(())
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        if self.ctx.bind().is_err() {
            return;
        }
        let handle = *self.handle.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: created in `new`, destroyed once.
        let _ = call("cuBLAS", "cublasDestroy", || unsafe {
            blas::destroy_handle(handle)
        });
    }
}
