//! Element-wise and row ops of the CUDA backend: embedding, rmsnorm, rope, bias, residual
//! add, SiLU, row copies and moves (kernels/embedding.cu, rmsnorm.cu, rope.cu,
//! elementwise.cu). Shape checks mirror the CPU backend's, with its messages where it has
//! them; where the CPU would panic on a short slice this returns `InvalidArgument`.

use std::sync::Arc;

use super::buffers::{CudaBuf, CudaMatrix, DevMem};
use super::context::{to_u32, Ctx, KArgs};
use super::temps::Temp;
use crate::backend::checks;
use crate::backend::cpu as host;
use crate::backend::RopeTable;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Threads per block of the grid-stride and per-row kernels (the headers' suggestion).
const THREADS: u32 = 256;
/// Threads per block of the rope kernels (the header's suggestion).
const ROPE_THREADS: u32 = 128;
/// gridDim.y limit: rope launches cover at most this many rows each.
const MAX_GRID_Y: usize = 65535;

/// The grid of a grid-stride kernel over `len` elements: enough blocks to cover it, at most
/// 4 per SM (elementwise.cu).
fn stride_grid(ctx: &Ctx, len: usize) -> u32 {
    let blocks = len.div_ceil(THREADS as usize);
    blocks.min(4 * ctx.sms as usize).max(1) as u32
}

/// Queues grid-stride kernel `kernel` over `len` elements ([`stride_grid`] blocks of
/// THREADS threads).
pub(crate) fn launch_grid_stride(
    ctx: &Ctx,
    op: &str,
    kernel: &'static str,
    len: usize,
    args: KArgs,
) -> Result<()> {
    ctx.launch(op, kernel, (stride_grid(ctx, len), 1, 1), THREADS, args)
}

/// `Err` unless `buf` holds at least `need` floats.
pub(crate) fn need(op: &str, what: &str, buf: &CudaBuf, need: usize) -> Result<()> {
    if buf.len() < need {
        return Err(Error::InvalidArgument(format!(
            "{op}: {what} holds {} floats, {need} needed",
            buf.len()
        )));
    }
    Ok(())
}

pub(crate) fn embed(
    ctx: &Arc<Ctx>,
    table: &CudaMatrix,
    tokens: &[u32],
    out: &mut CudaBuf,
) -> Result<()> {
    const OP: &str = "embed";
    if let Some(&id) = tokens.iter().find(|&&id| id as usize >= table.rows) {
        return Err(Error::TokenOutOfRange {
            id,
            vocab: table.rows,
        });
    }
    if tokens.is_empty() {
        return Ok(());
    }
    need(OP, "out", out, tokens.len() * table.cols)?;
    if let Some(bytes) = table.host_bytes() {
        // Offloading keeps the table in host memory (the planner does not count it as
        // resident): the rows are converted there, by the CPU's code, and uploaded.
        let mut rows = vec![0f32; tokens.len() * table.cols];
        for (row, &id) in rows.chunks_exact_mut(table.cols).zip(tokens) {
            host::row_to_f32(bytes, table.dtype, table.cols, id as usize, row);
        }
        return ctx.htod(OP, out.device_ptr(), &rows);
    }
    let ids = Temp::upload(ctx, OP, tokens)?;
    let name = match table.dtype {
        DType::BF16 => "embed_bf16",
        DType::F16 => "embed_f16",
        DType::F32 => "embed_f32",
        DType::Q4_0 => "embed_q4_0",
        DType::Q4_1 => "embed_q4_1",
        DType::Q8_0 => "embed_q8_0",
        DType::Q4K => "embed_q4_k",
        DType::Q6K => "embed_q6_k",
        q => unreachable!("{q}: no CUDA matrix holds it (buffers::cuda_dtype)"),
    };
    let args = KArgs::new()
        .ptr(table.device_ptr())
        .ptr(ids.ptr())
        .ptr(out.device_ptr())
        .u32(to_u32(OP, "tokens", tokens.len())?)
        .u32(to_u32(OP, "vocab", table.rows)?)
        .u32(to_u32(OP, "cols", table.cols)?);
    ctx.launch(OP, name, (tokens.len() as u32, 1, 1), THREADS, args)
}

pub(crate) fn rmsnorm(
    ctx: &Ctx,
    x: &CudaBuf,
    weight: &CudaBuf,
    eps: f32,
    n_tokens: usize,
    out: &mut CudaBuf,
) -> Result<()> {
    const OP: &str = "rmsnorm";
    let dim = weight.len();
    if dim == 0 {
        return Err(Error::InvalidArgument("rmsnorm: empty weight".into()));
    }
    need(OP, "x", x, n_tokens * dim)?;
    need(OP, "out", out, n_tokens * dim)?;
    let args = KArgs::new()
        .ptr(x.device_ptr())
        .ptr(weight.device_ptr())
        .ptr(out.device_ptr())
        .u32(to_u32(OP, "rows", n_tokens)?)
        .u32(to_u32(OP, "dim", dim)?)
        .f32(eps);
    ctx.launch(OP, "rmsnorm_f32", (n_tokens as u32, 1, 1), THREADS, args)
}

pub(crate) fn add_bias(ctx: &Ctx, x: &mut CudaBuf, bias: &CudaBuf, n_tokens: usize) -> Result<()> {
    const OP: &str = "add_bias";
    let width = bias.len();
    let len = n_tokens * width;
    if len == 0 {
        return Ok(());
    }
    need(OP, "x", x, len)?;
    to_u32(OP, "rows x width", len)?;
    let args = KArgs::new()
        .ptr(x.device_ptr())
        .ptr(bias.device_ptr())
        .u32(n_tokens as u32)
        .u32(width as u32);
    launch_grid_stride(ctx, OP, "add_bias_f32", len, args)
}

/// A device copy of a RopeTable's cos/sin rows, grown on demand. Kept for the table whose
/// frequencies it was built from (compared by value, so another model's table rebuilds it).
pub(crate) struct RopeCache {
    head_dim: usize,
    inv_freq: Vec<f32>,
    positions: usize,
    mem: DevMem,
}

/// Positions uploaded at least: one upload covers a typical context.
const ROPE_MIN_POSITIONS: usize = 1024;

/// Calls `f(table pointer, table positions)` with a device table covering `needed`
/// positions of `table`.
fn with_rope_table<R>(
    ctx: &Arc<Ctx>,
    cache: &std::sync::Mutex<Option<RopeCache>>,
    table: &RopeTable,
    needed: usize,
    f: impl FnOnce(u64, u32) -> Result<R>,
) -> Result<R> {
    const OP: &str = "rope";
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    let same = |c: &RopeCache| c.head_dim == table.head_dim && c.inv_freq == table.inv_freq;
    let have = match cache.as_ref() {
        Some(c) if same(c) => c.positions,
        _ => 0,
    };
    if have < needed {
        // Doubling keeps re-uploads logarithmic in the context length. The old table is
        // freed in stream order, after the kernels that read it.
        let positions = needed.max(2 * have).max(ROPE_MIN_POSITIONS);
        to_u32(OP, "positions", positions)?;
        let host = table.cos_sin_rows(positions);
        let mem = DevMem::upload(ctx, OP, &host)?;
        *cache = Some(RopeCache {
            head_dim: table.head_dim,
            inv_freq: table.inv_freq.clone(),
            positions,
            mem,
        });
    }
    match cache.as_ref() {
        Some(c) => f(c.mem.ptr(), c.positions as u32),
        None => Err(Error::Cuda("rope: the cos/sin table is missing".into())),
    }
}

/// The rope grid's x dimension: one thread per (head, pair).
fn rope_grid_x(op: &str, num_heads: usize, head_dim: usize) -> Result<u32> {
    let pairs = num_heads * (head_dim / 2);
    to_u32(op, "heads x pairs", pairs)?;
    Ok(pairs.div_ceil(ROPE_THREADS as usize) as u32)
}

pub(crate) fn rope(
    ctx: &Arc<Ctx>,
    cache: &std::sync::Mutex<Option<RopeCache>>,
    x: &mut CudaBuf,
    num_heads: usize,
    start_pos: usize,
    n_tokens: usize,
    table: &RopeTable,
) -> Result<()> {
    const OP: &str = "rope";
    if n_tokens == 0 {
        return Ok(());
    }
    let width = num_heads * table.head_dim;
    need(OP, "x", x, n_tokens * width)?;
    let gx = rope_grid_x(OP, num_heads, table.head_dim)?;
    with_rope_table(
        ctx,
        cache,
        table,
        start_pos + n_tokens,
        |cos_sin, positions| {
            // gridDim.y caps the rows of one launch; later slices start further on.
            for t0 in (0..n_tokens).step_by(MAX_GRID_Y) {
                let rows = (n_tokens - t0).min(MAX_GRID_Y);
                let args = KArgs::new()
                    .ptr(x.at(t0 * width))
                    .ptr(cos_sin)
                    .u32(rows as u32)
                    .u32(to_u32(OP, "heads", num_heads)?)
                    .u32(to_u32(OP, "head_dim", table.head_dim)?)
                    .u32(to_u32(OP, "start_pos", start_pos + t0)?)
                    .u32(positions);
                ctx.launch(OP, "rope_f32", (gx, rows as u32, 1), ROPE_THREADS, args)?;
            }
            Ok(())
        },
    )
}

pub(crate) fn rope_at(
    ctx: &Arc<Ctx>,
    cache: &std::sync::Mutex<Option<RopeCache>>,
    x: &mut CudaBuf,
    num_heads: usize,
    positions: &[usize],
    table: &RopeTable,
) -> Result<()> {
    const OP: &str = "rope_at";
    let Some(&last) = positions.iter().max() else {
        return Ok(());
    };
    let n = positions.len();
    let width = num_heads * table.head_dim;
    need(OP, "x", x, n * width)?;
    let gx = rope_grid_x(OP, num_heads, table.head_dim)?;
    let pos: Vec<u32> = positions
        .iter()
        .map(|&p| to_u32(OP, "position", p))
        .collect::<Result<_>>()?;
    let pos = Temp::upload(ctx, OP, &pos)?;
    with_rope_table(ctx, cache, table, last + 1, |cos_sin, table_positions| {
        for t0 in (0..n).step_by(MAX_GRID_Y) {
            let rows = (n - t0).min(MAX_GRID_Y);
            let args = KArgs::new()
                .ptr(x.at(t0 * width))
                .ptr(cos_sin)
                .ptr(pos.ptr() + (t0 * 4) as u64)
                .u32(rows as u32)
                .u32(to_u32(OP, "heads", num_heads)?)
                .u32(to_u32(OP, "head_dim", table.head_dim)?)
                .u32(table_positions);
            ctx.launch(OP, "rope_at_f32", (gx, rows as u32, 1), ROPE_THREADS, args)?;
        }
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_rows(
    ctx: &Ctx,
    src: &CudaBuf,
    src_row: usize,
    dst: &mut CudaBuf,
    dst_row: usize,
    n_rows: usize,
    row_len: usize,
) -> Result<()> {
    const OP: &str = "copy_rows";
    let (s, d, n) =
        checks::row_copy_range(src.len(), src_row, dst.len(), dst_row, n_rows, row_len)?;
    if n == 0 {
        return Ok(());
    }
    to_u32(OP, "source end", s + n)?;
    to_u32(OP, "destination end", d + n)?;
    let args = KArgs::new()
        .ptr(src.device_ptr())
        .u32(src_row as u32)
        .ptr(dst.device_ptr())
        .u32(dst_row as u32)
        .u32(n_rows as u32)
        .u32(row_len as u32);
    launch_grid_stride(ctx, OP, "copy_rows_f32", n, args)
}

/// silu_mul_f32 / add_f32: `a[i] = f(a[i], b[i])` for i < len.
pub(crate) fn binary(
    ctx: &Ctx,
    op: &'static str,
    kernel: &'static str,
    a: &mut CudaBuf,
    b: &CudaBuf,
    len: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    need(op, "the first operand", a, len)?;
    need(op, "the second operand", b, len)?;
    let args = KArgs::new()
        .ptr(a.device_ptr())
        .ptr(b.device_ptr())
        .u32(to_u32(op, "len", len)?);
    launch_grid_stride(ctx, op, kernel, len, args)
}

pub(crate) fn silu(ctx: &Ctx, x: &mut CudaBuf, len: usize) -> Result<()> {
    const OP: &str = "silu";
    if len == 0 {
        return Ok(());
    }
    need(OP, "x", x, len)?;
    let args = KArgs::new()
        .ptr(x.device_ptr())
        .u32(to_u32(OP, "len", len)?);
    launch_grid_stride(ctx, OP, "silu_f32", len, args)
}

pub(crate) fn read(ctx: &Ctx, buf: &CudaBuf, offset: usize, out: &mut [f32]) -> Result<()> {
    if offset
        .checked_add(out.len())
        .is_none_or(|end| end > buf.len())
    {
        return Err(Error::InvalidArgument(format!(
            "read of {} floats at {offset} past a buffer of {}",
            out.len(),
            buf.len()
        )));
    }
    ctx.dtoh("read", out, buf.at(offset))
}
