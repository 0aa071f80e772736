//! Weight x activation products (Backend::matmul).
//!
//! Up to 16 tokens (decode, verification windows): the matvec.cu kernels, which stream each
//! weight row once per call (per 8 tokens) with 16-byte loads. Longer batches (prefill
//! chunks, wide trees): cuBLAS SGEMM in f32. No kernel converts f32 activations to bf16, and
//! rounding them would move the GPU away from the CPU reference (which multiplies f32
//! activations by the converted weights), so bf16/f16 weights are converted to f32 a block of
//! rows at a time (the embedding kernel with ids 0..rows is exactly that conversion) into a
//! scratch buffer, and SGEMM runs on each block: f32 inputs, f32 accumulation, like the CPU.
//! Without libcublas the small-batch kernel handles any batch (it loops over 8-token blocks).

use std::ffi::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::cublas::result::CublasError;
use cudarc::cublas::{result as blas, sys as blas_sys};

use super::buffers::{CudaBuf, CudaMatrix, DevMem};
use super::context::{panic_message, to_u32, Ctx, KArgs};
use super::ops_basic::need;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Batches above this go to cuBLAS (matvec.cu's contract: the small kernels are for n <= 16).
pub(crate) const SMALL_BATCH: usize = 16;
/// f32 elements of the conversion scratch of one GEMM block (64 MiB).
const GEMM_SCRATCH_FLOATS: usize = 16 << 20;
const THREADS: u32 = 256;
/// Warps per block of the matvec kernels (THREADS / 32): one weight row per warp.
const WARPS: usize = 8;

/// A cuBLAS handle bound to the compute stream. cuBLAS handles must not be used by two
/// threads at once, hence the mutex.
pub(crate) struct Cublas {
    ctx: Arc<Ctx>,
    handle: Mutex<blas_sys::cublasHandle_t>,
}

// SAFETY: the handle is only used under its mutex, with the context bound first.
unsafe impl Send for Cublas {}
unsafe impl Sync for Cublas {}

fn blas_call<T>(
    op: &str,
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, CublasError>,
) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Cuda(format!("{op}: {what} failed: {:?}", e.0))),
        Err(p) => Err(Error::Cuda(format!(
            "{op}: {what}: the cuBLAS library failed: {}",
            panic_message(p.as_ref())
        ))),
    }
}

impl Cublas {
    /// A handle, or `None` (with a warning) when libcublas is missing or will not start:
    /// the backend then runs long batches through the small-batch kernel.
    pub fn new(ctx: &Arc<Ctx>) -> Option<Cublas> {
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
            let handle = blas_call("cuBLAS", "cublasCreate", blas::create_handle)?;
            let stream = ctx.raw_stream() as blas_sys::cudaStream_t;
            // SAFETY: both handles are live.
            if let Err(e) = blas_call("cuBLAS", "cublasSetStream", || unsafe {
                blas::set_stream(handle, stream)
            }) {
                // SAFETY: created above, destroyed once.
                let _ = blas_call("cuBLAS", "cublasDestroy", || unsafe {
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

    /// Row-major `out[t, r0 + i] = sum_k a[i, k] * x[t, k]` for i < m, t < n, with `out`
    /// rows `ldo` floats apart. In cuBLAS's column-major terms: C (m x n, ldc = ldo) =
    /// A^T (A stored k x m, lda = k) * B (k x n, ldb = k).
    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        &self,
        op: &str,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        x: u64,
        out: u64,
        ldo: usize,
    ) -> Result<()> {
        let int = |what: &str, v: usize| {
            c_int::try_from(v).map_err(|_| {
                Error::InvalidArgument(format!("{op}: {what} = {v} is past cuBLAS's int sizes"))
            })
        };
        let (m, n, k, ldo) = (
            int("rows", m)?,
            int("tokens", n)?,
            int("cols", k)?,
            int("ldc", ldo)?,
        );
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        self.ctx.bind()?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: a, x, out are live device allocations of at least k*m, k*n and ldo*n
        // floats (checked by the caller); alpha/beta are host scalars (the default pointer
        // mode); the handle runs on the compute stream, ordered with the kernels.
        blas_call(op, "cublasSgemm", || unsafe {
            blas::sgemm(
                *handle,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha,
                a as *const f32,
                k,
                x as *const f32,
                k,
                &beta,
                out as *mut f32,
                ldo,
            )
        })
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        if self.ctx.bind().is_err() {
            return;
        }
        let handle = *self.handle.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: created in `new`, destroyed once.
        let _ = blas_call("cuBLAS", "cublasDestroy", || unsafe {
            blas::destroy_handle(handle)
        });
    }
}

/// out[t] = w · x[t] for t < n_tokens.
pub(crate) fn matmul(
    ctx: &Arc<Ctx>,
    cublas: Option<&Cublas>,
    iota: &Mutex<Option<DevMem>>,
    w: &CudaMatrix,
    x: &CudaBuf,
    n_tokens: usize,
    out: &mut CudaBuf,
) -> Result<()> {
    const OP: &str = "matmul";
    if n_tokens == 0 || w.rows == 0 {
        return Ok(());
    }
    need(OP, "x", x, n_tokens * w.cols)?;
    need(OP, "out", out, n_tokens * w.rows)?;
    if w.cols == 0 {
        // Empty dot products: zeros, as the CPU computes them.
        return ctx.zero(OP, out.device_ptr(), n_tokens * w.rows * 4);
    }
    if n_tokens > SMALL_BATCH {
        if let Some(blas) = cublas {
            return gemm(ctx, blas, iota, w, x, n_tokens, out);
        }
    }
    let name = match (n_tokens == 1, w.dtype) {
        (true, DType::BF16) => "matvec_bf16",
        (true, DType::F16) => "matvec_f16",
        (true, DType::F32) => "matvec_f32",
        (false, DType::BF16) => "matmul_small_bf16",
        (false, DType::F16) => "matmul_small_f16",
        (false, DType::F32) => "matmul_small_f32",
    };
    let args = KArgs::new()
        .ptr(w.device_ptr())
        .ptr(x.device_ptr())
        .ptr(out.device_ptr())
        .u32(to_u32(OP, "rows", w.rows)?)
        .u32(to_u32(OP, "cols", w.cols)?)
        .u32(to_u32(OP, "tokens", n_tokens)?);
    let grid = to_u32(OP, "blocks", w.rows.div_ceil(WARPS))?;
    ctx.launch(OP, name, (grid, 1, 1), THREADS, args)
}

/// The cuBLAS path (see the module comment).
fn gemm(
    ctx: &Arc<Ctx>,
    blas: &Cublas,
    iota: &Mutex<Option<DevMem>>,
    w: &CudaMatrix,
    x: &CudaBuf,
    n: usize,
    out: &mut CudaBuf,
) -> Result<()> {
    const OP: &str = "matmul";
    let (rows, cols) = (w.rows, w.cols);
    if w.dtype == DType::F32 {
        return blas.sgemm(
            OP,
            rows,
            n,
            cols,
            w.device_ptr(),
            x.device_ptr(),
            out.device_ptr(),
            rows,
        );
    }
    let convert = match w.dtype {
        DType::BF16 => "embed_bf16",
        _ => "embed_f16",
    };
    let block = (GEMM_SCRATCH_FLOATS / cols).clamp(1, rows);
    // Held for the whole call: the ids buffer stays as it is while this call's kernels are
    // queued (a replacement would be freed in stream order anyway).
    let ids = row_ids(ctx, iota, rows)?;
    let ids_ptr = match ids.as_ref() {
        Some(m) => m.ptr(),
        None => return Err(Error::Cuda("matmul: the row-id buffer is missing".into())),
    };
    let scratch = DevMem::new(ctx, OP, block * cols * 4)?;
    for r0 in (0..rows).step_by(block) {
        let m = block.min(rows - r0);
        let args = KArgs::new()
            .ptr(w.device_ptr())
            .ptr(ids_ptr + (r0 * 4) as u64)
            .ptr(scratch.ptr())
            .u32(to_u32(OP, "block rows", m)?)
            .u32(to_u32(OP, "rows", rows)?)
            .u32(to_u32(OP, "cols", cols)?);
        ctx.launch(OP, convert, (m as u32, 1, 1), THREADS, args)?;
        blas.sgemm(
            OP,
            m,
            n,
            cols,
            scratch.ptr(),
            x.device_ptr(),
            out.at(r0),
            rows,
        )?;
    }
    Ok(())
}

/// The device vector 0, 1, 2, ... (u32) with at least `n` entries: the row ids that make the
/// embedding kernel convert whole row blocks of a matrix.
fn row_ids<'a>(
    ctx: &Arc<Ctx>,
    iota: &'a Mutex<Option<DevMem>>,
    n: usize,
) -> Result<std::sync::MutexGuard<'a, Option<DevMem>>> {
    let mut guard = iota.lock().unwrap_or_else(|e| e.into_inner());
    let have = guard.as_ref().map_or(0, |m| m.bytes() / 4);
    if have < n {
        let len = n.next_power_of_two();
        to_u32("matmul", "rows", len)?;
        let host: Vec<u32> = (0..len as u32).collect();
        *guard = Some(DevMem::upload(ctx, "matmul", &host)?);
    }
    Ok(guard)
}
