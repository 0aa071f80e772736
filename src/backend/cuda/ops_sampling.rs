//! Token choice on the device (kernels/sampling.cu): the greedy argmax of rows of logits and
//! Sirius acceptance probabilities, so a verification window can read back one number per row
//! instead of a row of `vocab` logits (49152 floats for SmolLM2, 128256 for Llama 3).
//!
//! Both match their host versions exactly in what they decide: `model::sampler::argmax` (the
//! lowest index among equal maxima, NaN never wins, 0 for a row with nothing above -inf) and
//! `sirius::corrector::token_probability` (NaN left out, 0 without a finite maximum or for a
//! token outside the vocabulary); the probability differs only by f32 rounding of the
//! exponentials (tests/gpu_parity.rs, `token_choice_matches`).

use std::sync::Arc;

use super::buffers::{CudaBuf, DevMem};
use super::context::{to_u32, Ctx, KArgs};
use super::ops_basic::need;
use crate::error::{Error, Result};

/// One block per row; 32 warps each stride over the row (the kernels' suggested size).
const THREADS: u32 = 1024;

/// Rows 0..n_rows of `logits` (`[n_rows, vocab]`) exist on the device, and their count.
fn rows(op: &str, logits: &CudaBuf, n_rows: usize, vocab: usize) -> Result<(u32, u32)> {
    let len = n_rows.checked_mul(vocab).ok_or_else(|| {
        Error::InvalidArgument(format!("{op}: {n_rows} rows of {vocab} logits overflow"))
    })?;
    need(op, "logits", logits, len)?;
    Ok((to_u32(op, "rows", n_rows)?, to_u32(op, "vocab", vocab)?))
}

/// The index of each row's largest logit.
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
    let (rows32, vocab32) = rows(OP, logits, n_rows, vocab)?;
    let out = DevMem::new(ctx, OP, n_rows * 4)?;
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

/// `softmax(logits[r] / temperature)[tokens[r]]` for each row r < tokens.len().
pub(crate) fn accept_probs(
    ctx: &Arc<Ctx>,
    logits: &CudaBuf,
    vocab: usize,
    tokens: &[u32],
    temperature: f32,
) -> Result<Vec<f32>> {
    const OP: &str = "accept_probs";
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "{OP}: the temperature must be positive, got {temperature}"
        )));
    }
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let (rows32, vocab32) = rows(OP, logits, tokens.len(), vocab)?;
    let ids = DevMem::upload(ctx, OP, tokens)?;
    let out = DevMem::new(ctx, OP, tokens.len() * 4)?;
    let args = KArgs::new()
        .ptr(logits.device_ptr())
        .ptr(ids.ptr())
        .ptr(out.ptr())
        .u32(rows32)
        .u32(vocab32)
        .f32(temperature);
    ctx.launch(OP, "accept_probs_f32", (rows32, 1, 1), THREADS, args)?;
    let mut probs = vec![0f32; tokens.len()];
    ctx.dtoh(OP, &mut probs, out.ptr())?;
    Ok(probs)
}
