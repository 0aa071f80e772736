//! Attention over the KV cache (Backend::attention, tree_attention) with kernels/attention.cu:
//! one warp per (token, query head), GQA heads of a kv head in one block, and a
//! flash-decoding split of the cache rows into chunks, merged afterwards, when the rows
//! alone would not give the GPU enough blocks (decode, short windows over long histories).

use std::sync::Arc;

use super::buffers::{CudaBuf, DevMem};
use super::context::{to_u32, Ctx, KArgs};
use super::ops_basic::need;
use crate::backend::AttentionShape;
use crate::error::{Error, Result};
use crate::tensor::TreeMask;

/// attention.cu's MAX_HEAD_DIM.
const MAX_HEAD_DIM: usize = 256;
/// Warps per block of the chunk kernel at most (the header's suggestion).
const MAX_WARPS: usize = 4;
/// Cache rows per chunk at least: below this the merge costs more than the split gains.
const MIN_CHUNK_ROWS: usize = 128;
/// Chunks at most (gridDim.y, and the partials buffer).
const MAX_CHUNKS: usize = 256;
const MERGE_THREADS: u32 = 128;

/// Causal attention of rows 0..n_tokens of q (positions start_pos..) over the cache, or the
/// rows `mask` lets each token see (then start_pos = mask.first_row()).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    ctx: &Arc<Ctx>,
    q: &CudaBuf,
    k_cache: &CudaBuf,
    v_cache: &CudaBuf,
    shape: AttentionShape,
    start_pos: usize,
    n_tokens: usize,
    mask: Option<&TreeMask>,
    out: &mut CudaBuf,
) -> Result<()> {
    const OP: &str = "attention";
    let AttentionShape {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
    } = shape;
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
    let (q_dim, kv_dim) = (nh * hd, nkv * hd);
    let seen = start_pos + n_tokens;
    need(OP, "q", q, n_tokens * q_dim)?;
    need(OP, "out", out, n_tokens * q_dim)?;
    need(OP, "k_cache", k_cache, seen * kv_dim)?;
    need(OP, "v_cache", v_cache, seen * kv_dim)?;
    if n_tokens == 0 || hd == 0 || nh == 0 {
        return Ok(());
    }
    to_u32(OP, "cache floats", seen * kv_dim)?;
    to_u32(OP, "query floats", n_tokens * q_dim)?;
    let group = nh / nkv;
    let query_rows = n_tokens * group;
    let warps = query_rows.min(MAX_WARPS);
    let gx = to_u32(OP, "blocks", query_rows.div_ceil(warps))?;
    if nkv > 65535 {
        return Err(Error::InvalidArgument(format!(
            "attention: {nkv} kv heads is more than a CUDA grid holds (65535)"
        )));
    }
    // Split the cache rows only as far as the GPU needs blocks: two per SM.
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
    let n_chunks = seen.div_ceil(chunk_rows);

    let bits = match mask {
        Some(m) => Some(DevMem::upload(ctx, OP, m.bits())?),
        None => None,
    };
    let (prefix, span, words) = mask.map_or((0, 0, 0), |m| (m.prefix(), m.span(), m.words()));
    let slots = n_tokens * nh * n_chunks;
    let (part_o, part_ml) = if n_chunks > 1 {
        (
            Some(DevMem::new(ctx, OP, slots * hd * 4)?),
            Some(DevMem::new(ctx, OP, slots * 2 * 4)?),
        )
    } else {
        (None, None)
    };
    let ptr = |m: &Option<DevMem>| m.as_ref().map_or(0, |m| m.ptr());
    let args = KArgs::new()
        .ptr(q.device_ptr())
        .ptr(k_cache.device_ptr())
        .ptr(v_cache.device_ptr())
        .ptr(ptr(&bits))
        .ptr(out.device_ptr())
        .ptr(ptr(&part_o))
        .ptr(ptr(&part_ml))
        .u32(n_tokens as u32)
        .u32(to_u32(OP, "heads", nh)?)
        .u32(nkv as u32)
        .u32(hd as u32)
        .u32(to_u32(OP, "start_pos", start_pos)?)
        .u32(to_u32(OP, "chunk rows", chunk_rows)?)
        .u32(to_u32(OP, "tree prefix", prefix)?)
        .u32(to_u32(OP, "tree span", span)?)
        .u32(to_u32(OP, "tree words", words)?)
        // The CPU's scale, computed the same way in f32.
        .f32(1.0 / (hd as f32).sqrt());
    let grid = (gx, n_chunks as u32, nkv as u32);
    ctx.launch(OP, "attention_chunk_f32", grid, (32 * warps) as u32, args)?;
    if n_chunks > 1 {
        let args = KArgs::new()
            .ptr(ptr(&part_o))
            .ptr(ptr(&part_ml))
            .ptr(out.device_ptr())
            .u32(n_tokens as u32)
            .u32(nh as u32)
            .u32(hd as u32)
            .u32(n_chunks as u32);
        let rows = to_u32(OP, "merge rows", n_tokens * nh)?;
        ctx.launch(OP, "attention_merge_f32", (rows, 1, 1), MERGE_THREADS, args)?;
    }
    Ok(())
}

pub(crate) fn tree_attention(
    ctx: &Arc<Ctx>,
    q: &CudaBuf,
    k_cache: &CudaBuf,
    v_cache: &CudaBuf,
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
