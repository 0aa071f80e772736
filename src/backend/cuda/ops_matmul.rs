//! Weight x activation products (Backend::matmul).
//!
//! Up to 16 tokens (decode, verification windows): the matvec.cu kernels ([`small_batch`]),
//! which stream each weight row once per call (once per window of 16 tokens) with 16-byte
//! loads: f32 activations times the stored weights, summed in f32, like the CPU.
//!
//! Quantized weights (GGUF block formats) take quant.cu's kernels of the same shape for any
//! batch, de-quantizing each weight in registers once per window of 16 or 64 tokens (f32
//! activations, as the CPU's batches).
//!
//! Longer float batches (prefill chunks, wide trees) go to cuBLAS ([`gemm`]: SGEMM for f32
//! weights, one of the two paths [`GemmPrecision`] picks for bf16/f16 weights), through the
//! backend's handle ([`cublas`]). Without libcublas the window kernels handle any batch
//! (once per 64 tokens).

mod cublas;
mod gemm;
mod precision;

use std::sync::{Arc, Mutex};

use self::cublas::{Cublas, GemmDims};
use super::buffers::{CudaBuf, CudaMatrix, DevMem};
use super::context::{to_u32, Ctx, KArgs};
use super::ops_basic::need;
use super::windows::matmul_kernel;
use crate::error::Result;

pub use precision::{GemmPrecision, GEMM_ENV};

/// Batches above this go to cuBLAS (matvec.cu's contract: the small kernels are for n <= 16).
pub(crate) const SMALL_BATCH: usize = 16;
const THREADS: u32 = 256;
/// Warps per block of the matvec kernels (THREADS / 32): one weight row per warp.
const WARPS: usize = 8;
/// The op name in errors.
const OP: &str = "matmul";

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
            drop(gemm::grown(ctx, &self.act16, bytes)?);
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
        let p = Product {
            w,
            x,
            n: n_tokens,
            out,
        };
        // Quantized weights stay in their blocks: the small-batch kernels de-quantize them in
        // registers for any batch (cuBLAS would want them expanded first).
        if n_tokens > SMALL_BATCH && !w.dtype.is_quantized() {
            if let Some(blas) = &self.cublas {
                return self.gemm(ctx, blas, &p);
            }
        }
        small_batch(ctx, &p)
    }
}

/// One product, its sizes checked by [`Matmul::matmul`]: `out[t] = w · x[t]` for t < n,
/// `w` of `[rows, cols]`, `x` of `[n, cols]`, `out` of `[n, rows]` floats.
struct Product<'a> {
    w: &'a CudaMatrix,
    x: &'a CudaBuf,
    n: usize,
    out: &'a CudaBuf,
}

impl Product<'_> {
    /// The GEMM sizes of weight rows `m` rows at a time: all `n` tokens, `cols` deep, into
    /// output rows of `rows` floats.
    fn dims(&self, m: usize) -> GemmDims {
        GemmDims {
            m,
            n: self.n,
            k: self.w.cols,
            ldo: self.w.rows,
        }
    }
}

/// The matvec.cu / quant.cu kernels: any batch, built for n <= 16 (floats) or any n
/// (quantized); each weight is read once per window of 16 or 64 tokens
/// ([`matmul_kernel`]). One warp per weight row: grid = ceil(rows / 8) blocks of 256
/// threads, 16 KiB of static shared memory for the window kernels' staged activations.
fn small_batch(ctx: &Arc<Ctx>, p: &Product) -> Result<()> {
    let (w, n_tokens) = (p.w, p.n);
    let name = matmul_kernel(w.dtype, n_tokens)?;
    let args = KArgs::new()
        .ptr(w.device_ptr())
        .ptr(p.x.device_ptr())
        .ptr(p.out.device_ptr())
        .u32(to_u32(OP, "rows", w.rows)?)
        .u32(to_u32(OP, "cols", w.cols)?)
        .u32(to_u32(OP, "tokens", n_tokens)?);
    let grid = to_u32(OP, "blocks", w.rows.div_ceil(WARPS))?;
    ctx.launch(OP, name, (grid, 1, 1), THREADS, args)
}
