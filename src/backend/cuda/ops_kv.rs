//! The KV cache on the GPU ([`CudaKv`]: one layer's keys or values, f32 or f16) and its row
//! ops: a batch's rows stored (rounded to f16 by `f32_to_f16`), a prefix copied, an accepted
//! tree path compacted (elementwise.cu's row kernels for 4- and 2-byte elements).

use std::sync::Arc;

use super::buffers::{CudaBuf, DevMem};
use super::context::{to_u32, Ctx, KArgs};
use super::ops_basic::launch_grid_stride;
use crate::backend::checks;
use crate::error::{Error, Result};
use crate::tensor::KvDType;

/// One layer's keys or values in device memory.
pub struct CudaKv {
    pub(crate) mem: DevMem,
    len: usize,
    dtype: KvDType,
}

impl CudaKv {
    /// `len` zeroed elements of `dtype`.
    pub(crate) fn zeroed(ctx: &Arc<Ctx>, len: usize, dtype: KvDType) -> Result<CudaKv> {
        let mem = DevMem::zeroed(ctx, "alloc_kv", len * dtype.size())?;
        Ok(CudaKv { mem, len, dtype })
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> KvDType {
        self.dtype
    }

    /// The device address (0 for an empty buffer).
    pub fn device_ptr(&self) -> u64 {
        self.mem.ptr()
    }

    /// Address of element `i` (callers check `i <= len`).
    fn at(&self, i: usize) -> u64 {
        self.mem.ptr() + (i * self.dtype.size()) as u64
    }

    /// Elements `offset..offset + out.len()` as f32 on the host (waits for queued work).
    pub fn read(&self, offset: usize, out: &mut [f32]) -> Result<()> {
        if offset
            .checked_add(out.len())
            .is_none_or(|end| end > self.len)
        {
            return Err(Error::InvalidArgument(format!(
                "read of {} elements from {offset} past a KV buffer of {}",
                out.len(),
                self.len
            )));
        }
        let ctx = self.mem.ctx();
        match self.dtype {
            KvDType::F32 => ctx.dtoh("read_kv", out, self.at(offset)),
            KvDType::F16 => {
                let mut bits = vec![0u16; out.len()];
                ctx.dtoh("read_kv", &mut bits, self.at(offset))?;
                for (o, b) in out.iter_mut().zip(bits) {
                    *o = half::f16::from_bits(b).to_f32();
                }
                Ok(())
            }
        }
    }
}

impl std::fmt::Debug for CudaKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaKv({} {} at {:#x})",
            self.len,
            self.dtype,
            self.mem.ptr()
        )
    }
}

/// The row kernels' name for this dtype's element size.
fn rows_kernel(dtype: KvDType, f32_name: &'static str, u16_name: &'static str) -> &'static str {
    match dtype {
        KvDType::F32 => f32_name,
        KvDType::F16 => u16_name,
    }
}

/// Rows `0..n_rows` of `src` into `dst` from row `dst_row`, rounded to `dst`'s dtype.
pub(crate) fn store(
    ctx: &Ctx,
    src: &CudaBuf,
    dst: &mut CudaKv,
    dst_row: usize,
    n_rows: usize,
    row_len: usize,
) -> Result<()> {
    const OP: &str = "store_kv";
    let (_, d, n) = checks::row_copy_range(src.len(), 0, dst.len, dst_row, n_rows, row_len)?;
    if n == 0 {
        return Ok(());
    }
    to_u32(OP, "destination end", d + n)?;
    match dst.dtype {
        KvDType::F32 => {
            let args = KArgs::new()
                .ptr(src.device_ptr())
                .u32(0)
                .ptr(dst.device_ptr())
                .u32(dst_row as u32)
                .u32(n_rows as u32)
                .u32(row_len as u32);
            launch_grid_stride(ctx, OP, "copy_rows_f32", n, args)
        }
        KvDType::F16 => {
            let args = KArgs::new()
                .ptr(src.device_ptr())
                .ptr(dst.at(d))
                .u32(n as u32);
            launch_grid_stride(ctx, OP, "f32_to_f16", n, args)
        }
    }
}

/// `dst`'s first `n_rows` rows from `src`'s (same dtype).
pub(crate) fn copy(
    ctx: &Ctx,
    src: &CudaKv,
    dst: &mut CudaKv,
    n_rows: usize,
    row_len: usize,
) -> Result<()> {
    const OP: &str = "copy_kv_rows";
    if src.dtype != dst.dtype {
        return Err(Error::InvalidArgument(format!(
            "cannot copy {} KV rows into a {} KV buffer",
            src.dtype, dst.dtype
        )));
    }
    let (_, _, n) = checks::row_copy_range(src.len, 0, dst.len, 0, n_rows, row_len)?;
    if n == 0 {
        return Ok(());
    }
    to_u32(OP, "rows x row_len", n)?;
    let args = KArgs::new()
        .ptr(src.device_ptr())
        .u32(0)
        .ptr(dst.device_ptr())
        .u32(0)
        .u32(n_rows as u32)
        .u32(row_len as u32);
    let kernel = rows_kernel(dst.dtype, "copy_rows_f32", "copy_rows_u16");
    launch_grid_stride(ctx, OP, kernel, n, args)
}

/// Rows `src_row..src_row + n_rows` moved down to `dst_row..` within `buf`.
pub(crate) fn move_rows(
    ctx: &Ctx,
    buf: &mut CudaKv,
    src_row: usize,
    dst_row: usize,
    n_rows: usize,
    row_len: usize,
) -> Result<()> {
    const OP: &str = "move_kv_rows";
    let (s, n) = (src_row * row_len, n_rows * row_len);
    if dst_row > src_row || s + n > buf.len {
        return Err(Error::InvalidArgument(format!(
            "move of {n_rows} rows of {row_len} from row {src_row} to row {dst_row} in a KV \
             buffer of {} elements",
            buf.len
        )));
    }
    if dst_row == src_row || n == 0 {
        return Ok(());
    }
    to_u32(OP, "rows x row_len", s + n)?;
    let args = KArgs::new()
        .ptr(buf.device_ptr())
        .u32(src_row as u32)
        .u32(dst_row as u32)
        .u32(n_rows as u32)
        .u32(row_len as u32);
    let kernel = rows_kernel(buf.dtype, "move_rows_f32", "move_rows_u16");
    // One block exactly: the kernel's overlap guarantee needs a single block (elementwise.cu).
    ctx.launch(OP, kernel, (1, 1, 1), 1024, args)
}
