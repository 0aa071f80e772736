//! Attention over the KV cache (Backend::attention, tree_attention) with kernels/attention.cu:
//! one warp per (token, query head), GQA heads of a kv head in one block, and a
//! flash-decoding split of the cache rows into chunks, merged afterwards, when the rows
//! alone would not give the GPU enough blocks (decode, short windows over long histories).

use std::sync::Arc;

use super::buffers::CudaBuf;
use super::context::{to_u32, Ctx, KArgs};
use super::ops_basic::need;
use super::ops_kv::CudaKv;
use super::temps::Temp;
use crate::backend::AttentionShape;
use crate::error::{Error, Result};
use crate::tensor::{KvDType, TreeMask};

/// attention.cu's MAX_HEAD_DIM.
const MAX_HEAD_DIM: usize = 256;
/// Warps per block of the chunk kernel at most (the header's suggestion).
const MAX_WARPS: usize = 4;
/// Cache rows per chunk at least: below this the merge costs more than the split gains.
const MIN_CHUNK_ROWS: usize = 128;
/// Chunks at most (gridDim.y, and the partials buffer).
const MAX_CHUNKS: usize = 256;
const MERGE_THREADS: u32 = 128;
/// The op name in errors.
const OP: &str = "attention";

/// Causal attention of rows 0..n_tokens of q (positions start_pos..) over the cache, or the
/// rows `mask` lets each token see (then start_pos = mask.first_row()).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    ctx: &Arc<Ctx>,
    q: &CudaBuf,
    k_cache: &CudaKv,
    v_cache: &CudaKv,
    shape: AttentionShape,
    start_pos: usize,
    n_tokens: usize,
    mask: Option<&TreeMask>,
    out: &mut CudaBuf,
) -> Result<()> {
    check_heads(shape)?;
    let AttentionShape {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
    } = shape;
    let (q_dim, kv_dim) = (nh * hd, nkv * hd);
    let seen = start_pos + n_tokens;
    need(OP, "q", q, n_tokens * q_dim)?;
    need(OP, "out", out, n_tokens * q_dim)?;
    for (what, cache) in [("k_cache", k_cache), ("v_cache", v_cache)] {
        if cache.len() < seen * kv_dim || cache.dtype() != k_cache.dtype() {
            return Err(Error::InvalidArgument(format!(
                "{OP}: {what} holds {} {} elements, {} {} needed",
                cache.len(),
                cache.dtype(),
                seen * kv_dim,
                k_cache.dtype()
            )));
        }
    }
    if n_tokens == 0 || hd == 0 || nh == 0 {
        return Ok(());
    }
    to_u32(OP, "cache floats", seen * kv_dim)?;
    to_u32(OP, "query floats", n_tokens * q_dim)?;
    let split = Split::new(ctx, n_tokens * (nh / nkv), nkv, seen)?;
    let scratch = Scratch::new(ctx, mask, &split, n_tokens * nh, hd)?;
    let (prefix, span, words) = mask.map_or((0, 0, 0), |m| (m.prefix(), m.span(), m.words()));
    let args = KArgs::new()
        .ptr(q.device_ptr())
        .ptr(k_cache.device_ptr())
        .ptr(v_cache.device_ptr())
        .ptr(Scratch::ptr(&scratch.bits))
        .ptr(out.device_ptr())
        .ptr(Scratch::ptr(&scratch.part_o))
        .ptr(Scratch::ptr(&scratch.part_ml))
        .u32(n_tokens as u32)
        .u32(to_u32(OP, "heads", nh)?)
        .u32(nkv as u32)
        .u32(hd as u32)
        .u32(to_u32(OP, "start_pos", start_pos)?)
        .u32(to_u32(OP, "chunk rows", split.chunk_rows)?)
        .u32(to_u32(OP, "tree prefix", prefix)?)
        .u32(to_u32(OP, "tree span", span)?)
        .u32(to_u32(OP, "tree words", words)?)
        // The CPU's scale, computed the same way in f32.
        .f32(1.0 / (hd as f32).sqrt());
    let grid = (split.blocks, split.n_chunks as u32, nkv as u32);
    let block = (32 * split.warps) as u32;
    let kernel = match k_cache.dtype() {
        KvDType::F32 => "attention_chunk_f32",
        KvDType::F16 => "attention_chunk_f16",
    };
    ctx.launch(OP, kernel, grid, block, args)?;
    if split.n_chunks > 1 {
        merge(ctx, &scratch, out, n_tokens, shape, split.n_chunks)?;
    }
    Ok(())
}

/// `Err` unless the query heads split evenly over the kv heads and a head fits the kernel.
fn check_heads(shape: AttentionShape) -> Result<()> {
    let (nh, nkv, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    if nkv == 0 || !nh.is_multiple_of(nkv) {
        return Err(Error::InvalidArgument(format!(
            "attention: n_heads ({nh}) must be a multiple of n_kv_heads ({nkv})"
        )));
    }
    if hd > MAX_HEAD_DIM {
        return Err(Error::Cuda(format!(
            "attention: head_dim {hd} is more than the CUDA kernel's {MAX_HEAD_DIM}"
        )));
    }
    Ok(())
}

/// The chunk kernel's launch shape: `warps` query rows per block, `blocks` blocks of rows
/// per kv head, and the cache rows split into `n_chunks` chunks of `chunk_rows`.
struct Split {
    warps: usize,
    blocks: u32,
    chunk_rows: usize,
    n_chunks: usize,
}

impl Split {
    /// For `query_rows` (tokens x query heads per kv head) over `seen` cache rows: the rows
    /// are split only as far as the GPU needs blocks, two per SM.
    fn new(ctx: &Ctx, query_rows: usize, nkv: usize, seen: usize) -> Result<Split> {
        let warps = query_rows.min(MAX_WARPS);
        let gx = to_u32(OP, "blocks", query_rows.div_ceil(warps))?;
        if nkv > 65535 {
            return Err(Error::InvalidArgument(format!(
                "attention: {nkv} kv heads is more than a CUDA grid holds (65535)"
            )));
        }
        let blocks = gx as usize * nkv;
        let target = 2 * ctx.sms as usize;
        let want = if blocks >= target {
            1
        } else {
            target.div_ceil(blocks)
        };
        let chunk_rows = seen
            .div_ceil(want)
            .max(MIN_CHUNK_ROWS)
            .max(seen.div_ceil(MAX_CHUNKS))
            .min(seen)
            .next_multiple_of(4);
        Ok(Split {
            warps,
            blocks: gx,
            chunk_rows,
            n_chunks: seen.div_ceil(chunk_rows),
        })
    }
}

/// The device buffers of one call: the tree mask's bits, and the chunks' partial results
/// when the cache rows are split (see attention.cu).
struct Scratch {
    bits: Option<Temp>,
    part_o: Option<Temp>,
    part_ml: Option<Temp>,
}

impl Scratch {
    /// For `rows` query rows (tokens x heads) of `hd` floats, split as `split` says.
    fn new(
        ctx: &Arc<Ctx>,
        mask: Option<&TreeMask>,
        split: &Split,
        rows: usize,
        hd: usize,
    ) -> Result<Scratch> {
        let bits = match mask {
            Some(m) => Some(Temp::upload(ctx, OP, m.bits())?),
            None => None,
        };
        let slots = rows * split.n_chunks;
        let (part_o, part_ml) = if split.n_chunks > 1 {
            (
                Some(Temp::new(ctx, OP, slots * hd * 4)?),
                Some(Temp::new(ctx, OP, slots * 2 * 4)?),
            )
        } else {
            (None, None)
        };
        Ok(Scratch {
            bits,
            part_o,
            part_ml,
        })
    }

    /// The device address of `m`, 0 (null) without it.
    fn ptr(m: &Option<Temp>) -> u64 {
        m.as_ref().map_or(0, |m| m.ptr())
    }
}

/// attention_merge_f32: the chunks' partial results of every (token, head) into `out`.
fn merge(
    ctx: &Ctx,
    scratch: &Scratch,
    out: &mut CudaBuf,
    n_tokens: usize,
    shape: AttentionShape,
    n_chunks: usize,
) -> Result<()> {
    let (nh, hd) = (shape.num_heads, shape.head_dim);
    let args = KArgs::new()
        .ptr(Scratch::ptr(&scratch.part_o))
        .ptr(Scratch::ptr(&scratch.part_ml))
        .ptr(out.device_ptr())
        .u32(n_tokens as u32)
        .u32(nh as u32)
        .u32(hd as u32)
        .u32(n_chunks as u32);
    let rows = to_u32(OP, "merge rows", n_tokens * nh)?;
    ctx.launch(OP, "attention_merge_f32", (rows, 1, 1), MERGE_THREADS, args)
}

pub(crate) fn tree_attention(
    ctx: &Arc<Ctx>,
    q: &CudaBuf,
    k_cache: &CudaKv,
    v_cache: &CudaKv,
    shape: AttentionShape,
    mask: &TreeMask,
    out: &mut CudaBuf,
) -> Result<()> {
    let width = shape.num_heads * shape.head_dim;
    let n = mask.n_tokens();
    let rows = (mask.prefix() + mask.span()) * shape.num_kv_heads * shape.head_dim;
    if q.len() < n * width || out.len() < n * width || k_cache.len() < rows || v_cache.len() < rows
    {
        return Err(Error::InvalidArgument(format!(
            "tree attention over {} cache rows for {n} tokens does not fit its buffers",
            mask.prefix() + mask.span()
        )));
    }
    attention(
        ctx,
        q,
        k_cache,
        v_cache,
        shape,
        mask.first_row(),
        n,
        Some(mask),
        out,
    )
}
