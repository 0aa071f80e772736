//! Weight x activation products (Backend::matmul).
//!
//! Up to 16 tokens (decode, verification windows): the matvec.cu kernels, which stream each
//! weight row once per call (per 8 tokens) with 16-byte loads: f32 activations times the
//! stored weights, summed in f32, like the CPU.
//!
//! Longer batches (prefill chunks, wide trees) go to cuBLAS. f32 weights use SGEMM. For
//! bf16/f16 weights the backend's [`GemmPrecision`] picks one of two paths; it comes from
//! `SIRIUS_CUDA_GEMM` (`bf16`, the default when unset, or `f32`; anything else is an error),
//! read once when `CudaBackend::new` runs, or is given to `CudaBackend::with_gemm`:
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
//!
//! Without libcublas the small-batch kernel handles any batch (it loops over 8-token blocks).

use std::ffi::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::result::CublasError;
use cudarc::cublas::{result as blas, sys as blas_sys};

use super::buffers::{CudaBuf, CudaMatrix, DevMem};
use super::context::{panic_message, to_u32, Ctx, KArgs};
use super::ops_basic::{need, stride_grid};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Batches above this go to cuBLAS (matvec.cu's contract: the small kernels are for n <= 16).
pub(crate) const SMALL_BATCH: usize = 16;
/// f32 elements of the weight conversion scratch of one GEMM block (64 MiB; `f32` path).
const GEMM_SCRATCH_FLOATS: usize = 16 << 20;
const THREADS: u32 = 256;
/// Warps per block of the matvec kernels (THREADS / 32): one weight row per warp.
const WARPS: usize = 8;

/// The environment variable that picks [`GemmPrecision`] for `CudaBackend::new`.
pub const GEMM_ENV: &str = "SIRIUS_CUDA_GEMM";

/// How batches over 16 tokens are multiplied by bf16/f16 weights (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPrecision {
    /// Activations rounded to the weights' 16-bit dtype, one cublasGemmEx with f32
    /// accumulation (`SIRIUS_CUDA_GEMM=bf16`, the default).
    #[default]
    Bf16,
    /// Weights converted to f32 block by block, SGEMM: the CPU's arithmetic
    /// (`SIRIUS_CUDA_GEMM=f32`).
    F32,
}

impl GemmPrecision {
    /// `bf16` or `f32`; anything else is an error that names the accepted values.
    pub fn parse(value: &str) -> Result<GemmPrecision> {
        match value {
            "bf16" => Ok(GemmPrecision::Bf16),
            "f32" => Ok(GemmPrecision::F32),
            other => Err(Error::InvalidArgument(format!(
                "{GEMM_ENV}={other:?}: expected `bf16` (16-bit activations, f32 accumulation: \
                 the default) or `f32` (the CPU's arithmetic, slower), or unset"
            ))),
        }
    }

    /// From `SIRIUS_CUDA_GEMM`; unset is the default ([`GemmPrecision::Bf16`]).
    pub fn from_env() -> Result<GemmPrecision> {
        match std::env::var(GEMM_ENV) {
            Ok(v) => GemmPrecision::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(GemmPrecision::default()),
            Err(std::env::VarError::NotUnicode(v)) => Err(Error::InvalidArgument(format!(
                "{GEMM_ENV}={v:?} is not UTF-8: expected `bf16` or `f32`, or unset"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GemmPrecision::Bf16 => "bf16",
            GemmPrecision::F32 => "f32",
        }
    }
}

/// The matmul state of one backend: the cuBLAS handle (None without libcublas), the
/// precision, and the device scratch buffers the GEMM paths reuse.
pub(crate) struct Matmul {
    cublas: Option<Cublas>,
    precision: GemmPrecision,
    /// Whether the device can run bf16 GemmEx (compute capability 8.0 or newer).
    bf16_gemm: bool,
    /// Row ids 0..n (u32) for converting weight blocks before SGEMM (`f32` path).
    row_ids: Mutex<Option<DevMem>>,
    /// The 16-bit copy of the activations (`bf16` path). Grown to the next power of two of
    /// the largest request and kept for the backend's life, so steady-state calls allocate
    /// nothing (at most n * cols * 2 bytes, e.g. 32 MiB for a 512-token chunk through a
    /// 28672-wide down projection). The lock is held while the conversion and the GEMM are
    /// queued, so another thread cannot overwrite it before this call's GEMM; stream order
    /// does the rest.
    act16: Mutex<Option<DevMem>>,
}

impl Matmul {
    pub fn new(ctx: &Arc<Ctx>, precision: GemmPrecision) -> Matmul {
        Matmul {
            cublas: Cublas::new(ctx),
            precision,
            bf16_gemm: ctx.device.compute_capability.0 >= 8,
            row_ids: Mutex::new(None),
            act16: Mutex::new(None),
        }
    }

    /// Bytes of the bf16 path's activation copy for `rows` rows of at most `cols` columns, as
    /// `grown` rounds them (0 where that path never runs).
    pub fn act16_bytes(&self, rows: usize, cols: usize) -> usize {
        if self.cublas.is_none() || self.precision != GemmPrecision::Bf16 {
            return 0;
        }
        let bytes = rows.saturating_mul(cols).saturating_mul(2);
        bytes.checked_next_power_of_two().unwrap_or(bytes)
    }

    /// Allocates the activation copy at `bytes` now (the offloading runtime reserved them),
    /// so no request up to that size grows it.
    pub fn presize_act16(&self, ctx: &Arc<Ctx>, bytes: usize) -> Result<()> {
        if bytes > 0 {
            drop(grown(ctx, &self.act16, bytes)?);
        }
        Ok(())
    }

    pub fn has_cublas(&self) -> bool {
        self.cublas.is_some()
    }

    pub fn precision(&self) -> GemmPrecision {
        self.precision
    }

    /// `out[t] = w · x[t]` for t < n_tokens.
    pub fn matmul(
        &self,
        ctx: &Arc<Ctx>,
        w: &CudaMatrix,
        x: &CudaBuf,
        n_tokens: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        const OP: &str = "matmul";
        // Host-weight matrices have no device pointer: refuse before launching anything.
        w.check_on_device(OP)?;
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
            if let Some(blas) = &self.cublas {
                return self.gemm(ctx, blas, w, x, n_tokens, out);
            }
        }
        small_batch(ctx, w, x, n_tokens, out)
    }

    /// The cuBLAS paths (see the module doc).
    fn gemm(
        &self,
        ctx: &Arc<Ctx>,
        blas: &Cublas,
        w: &CudaMatrix,
        x: &CudaBuf,
        n: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        const OP: &str = "matmul";
        let (rows, cols) = (w.rows, w.cols);
        let half = match w.dtype {
            DType::F32 => {
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
            DType::BF16 => Half::Bf16,
            DType::F16 => Half::F16,
        };
        let rounded =
            self.precision == GemmPrecision::Bf16 && (half == Half::F16 || self.bf16_gemm);
        if rounded {
            self.gemm_16(ctx, blas, half, w, x, n, out)
        } else {
            self.gemm_f32(ctx, blas, half, w, x, n, out)
        }
    }

    /// `bf16` path: activations rounded to the weights' type, one GemmEx.
    #[allow(clippy::too_many_arguments)]
    fn gemm_16(
        &self,
        ctx: &Arc<Ctx>,
        blas: &Cublas,
        half: Half,
        w: &CudaMatrix,
        x: &CudaBuf,
        n: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        const OP: &str = "matmul";
        let len = n * w.cols;
        let len32 = to_u32(OP, "activations", len)?;
        let scratch = grown(ctx, &self.act16, len * 2)?;
        let act = match scratch.as_ref() {
            Some(m) => m.ptr(),
            None => {
                return Err(Error::Cuda(
                    "matmul: the activation scratch is missing".into(),
                ))
            }
        };
        let args = KArgs::new().ptr(x.device_ptr()).ptr(act).u32(len32);
        ctx.launch(
            OP,
            half.convert_kernel(),
            (stride_grid(ctx, len), 1, 1),
            THREADS,
            args,
        )?;
        blas.gemm_ex(
            OP,
            half.cuda_type(),
            w.rows,
            n,
            w.cols,
            w.device_ptr(),
            act,
            out.device_ptr(),
            w.rows,
        )
    }

    /// `f32` path: weight blocks converted to f32, SGEMM on each.
    #[allow(clippy::too_many_arguments)]
    fn gemm_f32(
        &self,
        ctx: &Arc<Ctx>,
        blas: &Cublas,
        half: Half,
        w: &CudaMatrix,
        x: &CudaBuf,
        n: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        const OP: &str = "matmul";
        let (rows, cols) = (w.rows, w.cols);
        let block = (GEMM_SCRATCH_FLOATS / cols).clamp(1, rows);
        // Held for the whole call: the ids buffer stays as it is while this call's kernels
        // are queued (a replacement would be freed in stream order anyway).
        let ids = row_ids(ctx, &self.row_ids, rows)?;
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
            ctx.launch(OP, half.embed_kernel(), (m as u32, 1, 1), THREADS, args)?;
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
}

/// The matvec.cu kernels: any batch, built for n <= 16.
fn small_batch(
    ctx: &Arc<Ctx>,
    w: &CudaMatrix,
    x: &CudaBuf,
    n_tokens: usize,
    out: &mut CudaBuf,
) -> Result<()> {
    const OP: &str = "matmul";
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

    fn cuda_type(self) -> blas_sys::cudaDataType {
        match self {
            Half::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            Half::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        }
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

/// GEMM sizes as cuBLAS's ints: (m, n, k, ldc).
fn blas_dims(
    op: &str,
    m: usize,
    n: usize,
    k: usize,
    ldc: usize,
) -> Result<(c_int, c_int, c_int, c_int)> {
    let int = |what: &str, v: usize| {
        c_int::try_from(v).map_err(|_| {
            Error::InvalidArgument(format!("{op}: {what} = {v} is past cuBLAS's int sizes"))
        })
    };
    Ok((
        int("rows", m)?,
        int("tokens", n)?,
        int("cols", k)?,
        int("ldc", ldc)?,
    ))
}

impl Cublas {
    /// A handle, or `None` (with a warning) when libcublas is missing or will not start:
    /// the backend then runs long batches through the small-batch kernel.
    fn new(ctx: &Arc<Ctx>) -> Option<Cublas> {
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

    /// Row-major `out[t, r0 + i] = sum_k a[i, k] * x[t, k]` for i < m, t < n, all f32, with
    /// `out` rows `ldo` floats apart (the module doc's mapping: C = op_T(A) * B). GemmEx with
    /// f32 inputs and CUBLAS_COMPUTE_32F is SGEMM's arithmetic (the handle keeps the default
    /// math mode, so no TF32), which keeps one cuBLAS call site for both paths.
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
        self.gemm_ex(
            op,
            blas_sys::cudaDataType::CUDA_R_32F,
            m,
            n,
            k,
            a,
            x,
            out,
            ldo,
        )
    }

    /// As [`Cublas::sgemm`] with `a` and `x` both of type `ty` (f32, bf16 or f16): f32
    /// accumulation (CUBLAS_COMPUTE_32F, so f32 alpha/beta) into the f32 `out`.
    /// CUBLAS_GEMM_DEFAULT: since CUDA 11 the heuristics use tensor cores for 16-bit inputs
    /// on their own; the *_TENSOR_OP algos are deprecated and would also allow the reduced
    /// precision CUBLAS_COMPUTE_32F_FAST_16F kernels. No alignment is required for
    /// correctness (device allocations are 256-byte aligned anyway; row lengths that are
    /// multiples of 8 elements, as in every Llama shape, are what the fastest kernels want).
    #[allow(clippy::too_many_arguments)]
    fn gemm_ex(
        &self,
        op: &str,
        ty: blas_sys::cudaDataType,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        x: u64,
        out: u64,
        ldo: usize,
    ) -> Result<()> {
        let (m, n, k, ldo) = blas_dims(op, m, n, k, ldo)?;
        let handle = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        self.ctx.bind()?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: a and x are live device allocations of at least k*m and k*n elements of
        // `ty`, out of ldo*n floats (checked by the caller); alpha/beta are host f32
        // scalars, the scale type CUBLAS_COMPUTE_32F wants (default pointer mode); beta = 0,
        // so `out` is only written; the handle runs on the compute stream, after the kernel
        // that wrote x.
        blas_call(op, "cublasGemmEx", || unsafe {
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

/// The scratch in `slot`, replaced by one of the next power of two of `bytes` when smaller
/// (the old one is freed in stream order, after the work queued on it).
fn grown<'a>(
    ctx: &Arc<Ctx>,
    slot: &'a Mutex<Option<DevMem>>,
    bytes: usize,
) -> Result<MutexGuard<'a, Option<DevMem>>> {
    let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().is_none_or(|m| m.bytes() < bytes) {
        // The old one goes first, so that the device never holds both.
        *guard = None;
        let size = bytes.checked_next_power_of_two().unwrap_or(bytes);
        *guard = Some(DevMem::new(ctx, "matmul", size)?);
    }
    Ok(guard)
}

/// The device vector 0, 1, 2, ... (u32) with at least `n` entries: the row ids that make the
/// embedding kernel convert whole row blocks of a matrix.
fn row_ids<'a>(
    ctx: &Arc<Ctx>,
    iota: &'a Mutex<Option<DevMem>>,
    n: usize,
) -> Result<MutexGuard<'a, Option<DevMem>>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_precision_accepts_bf16_and_f32_only() {
        assert_eq!(GemmPrecision::parse("bf16").unwrap(), GemmPrecision::Bf16);
        assert_eq!(GemmPrecision::parse("f32").unwrap(), GemmPrecision::F32);
        assert_eq!(GemmPrecision::default(), GemmPrecision::Bf16);
        for bad in ["", "BF16", "fp32", "f16", " bf16"] {
            match GemmPrecision::parse(bad) {
                Err(Error::InvalidArgument(msg)) => {
                    assert!(msg.contains(GEMM_ENV) && msg.contains("`f32`"), "{msg}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
