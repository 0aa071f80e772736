//! Greedy token choice on the device (kernels/sampling.cu): the argmax of rows of logits, so
//! a greedy step reads back one u32 per row instead of a row of `vocab` logits (49152 floats
//! for SmolLM2, 128256 for Llama 3). It decides exactly as `backend::argmax` (the lowest
//! index among equal maxima, NaN never wins, 0 for a row with nothing above -inf):
//! tests/gpu_parity.rs, `argmax_rows_match`. And the acceptance test's verdicts
//! (`row_verdicts`): each row's argmax with the probability of the token that followed it.

use std::sync::Arc;

use super::buffers::CudaBuf;
use super::context::{to_u32, Ctx, KArgs};
use super::ops_basic::need;
use super::temps::Temp;
use crate::backend::argmax::RowVerdict;
use crate::error::{Error, Result};

/// One block per row; 32 warps each stride over the row (the kernel's suggested size).
const THREADS: u32 = 1024;

/// `n_rows` rows of `vocab` logits as the kernels' u32 sizes, checked against `logits`.
fn checked_rows(op: &str, logits: &CudaBuf, n_rows: usize, vocab: usize) -> Result<(u32, u32)> {
    let len = n_rows.checked_mul(vocab).ok_or_else(|| {
        Error::InvalidArgument(format!("{op}: {n_rows} rows of {vocab} logits overflow"))
    })?;
    need(op, "logits", logits, len)?;
    Ok((to_u32(op, "rows", n_rows)?, to_u32(op, "vocab", vocab)?))
}

/// The index of the largest of each of the first `n_rows` rows of `logits` (`[n_rows, vocab]`).
pub(crate) fn argmax_rows(
    ctx: &Arc<Ctx>,
    logits: &CudaBuf,
    n_rows: usize,
    vocab: usize,
) -> Result<Vec<u32>> {
    const OP: &str = "argmax_rows";
    if n_rows == 0 {
        return Ok(Vec::new());
    }
    let (rows32, vocab32) = checked_rows(OP, logits, n_rows, vocab)?;
    let out = Temp::new(ctx, OP, n_rows * 4)?;
    let args = KArgs::new()
        .ptr(logits.device_ptr())
        .ptr(out.ptr())
        .u32(rows32)
        .u32(vocab32);
    ctx.launch(OP, "argmax_f32", (rows32, 1, 1), THREADS, args)?;
    let mut ids = vec![0u32; n_rows];
    // dtoh waits for the kernel (stream order) and for the copy before `out` is freed.
    ctx.dtoh(OP, &mut ids, out.ptr())?;
    Ok(ids)
}

/// Each of the first `n_rows` rows' argmax, and for rows `< next.len()` the probability of
/// `next[r]` at `temperature` (kernels/sampling.cu `row_verdict_f32`, the rules of
/// `backend::argmax::row_verdicts_of`): 12 bytes a row come back instead of `vocab` floats.
pub(crate) fn row_verdicts(
    ctx: &Arc<Ctx>,
    logits: &CudaBuf,
    n_rows: usize,
    vocab: usize,
    next: &[u32],
    temperature: f32,
) -> Result<Vec<RowVerdict>> {
    const OP: &str = "row_verdicts";
    if next.len() > n_rows {
        return Err(Error::InvalidArgument(format!(
            "{OP}: {} following tokens for {n_rows} rows",
            next.len()
        )));
    }
    if n_rows == 0 {
        return Ok(Vec::new());
    }
    let (rows32, vocab32) = checked_rows(OP, logits, n_rows, vocab)?;
    let next_dev = Temp::upload(ctx, OP, next)?;
    let ids = Temp::new(ctx, OP, n_rows * 4)?;
    let probs = Temp::new(ctx, OP, n_rows * 8)?;
    let args = KArgs::new()
        .ptr(logits.device_ptr())
        .ptr(next_dev.ptr())
        .u32(next.len() as u32)
        .ptr(ids.ptr())
        .ptr(probs.ptr())
        .u32(rows32)
        .u32(vocab32)
        .f32(temperature);
    ctx.launch(OP, "row_verdict_f32", (rows32, 1, 1), THREADS, args)?;
    let mut host_ids = vec![0u32; n_rows];
    let mut host_probs = vec![0f64; next.len()];
    // Each read-back waits for the kernel (stream order) before the temporaries go.
    ctx.dtoh(OP, &mut host_ids, ids.ptr())?;
    ctx.dtoh(OP, &mut host_probs, probs.ptr())?;
    Ok(host_ids
        .into_iter()
        .enumerate()
        .map(|(r, argmax)| RowVerdict {
            argmax,
            probability: host_probs.get(r).copied(),
        })
        .collect())
}
