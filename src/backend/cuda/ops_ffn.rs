//! Contextual-sparsity ops of the CUDA backend (kernels/neurons.cu): the FFN over neuron
//! bundles, Griffin's scores and gather, CATS's selection.
//!
//! Done on the host, by design for now: Griffin's gather (the bundle matrix is read back,
//! gathered by the CPU code and the three compact matrices uploaded; it runs once per prompt
//! and layer), and CATS's top-k and shared (tree-beam) selection (activations read back,
//! selected by the CPU code, written back; the trait returns host lists anyway, and a
//! per-row k-th largest value needs a radix select kernel that does not exist yet).
//! Threshold selection runs on the device (select_threshold_f32).

use std::sync::Arc;

use super::buffers::{CudaBuf, CudaMatrix, DevMem};
use super::context::{to_u32, Ctx, KArgs};
use super::ops_basic::{dtype_suffix, need};
use crate::backend::checks;
use crate::backend::cpu as host;
use crate::backend::{BundleLayout, BundleSelection, NeuronLists, NeuronRule};
use crate::error::{Error, Result};
use crate::tensor::DType;

const THREADS: u32 = 256;
/// Warps per block of bundle_act (THREADS / 32): one warp per (token, neuron).
const ACT_WARPS: usize = 8;
/// bundle_down: threads per block, each owning 8 output columns.
const DOWN_THREADS: usize = 128;
/// bundle_down splits a token's list into at most this many parts ...
const MAX_SPLITS: usize = 64;
/// ... of at least this many neurons each.
const MIN_SPLIT_NEURONS: usize = 32;

pub(crate) fn upload_matrix(
    ctx: &Arc<Ctx>,
    bytes: &[u8],
    dtype: DType,
    rows: usize,
    cols: usize,
) -> Result<CudaMatrix> {
    checks::check_matrix_bytes(bytes.len(), dtype, rows, cols)?;
    let mem = DevMem::new(ctx, "upload_matrix", bytes.len())?;
    ctx.htod("upload_matrix", mem.ptr(), bytes)?;
    Ok(CudaMatrix::on_device(mem, dtype, rows, cols))
}

pub(crate) fn gather_ffn(
    ctx: &Arc<Ctx>,
    bundles: &CudaMatrix,
    rows: &[u32],
) -> Result<[CudaMatrix; 3]> {
    let h = crate::backend::neurons::gather_hidden(bundles.rows, bundles.cols, rows)?;
    // Bundles left in host memory (offloading) are gathered in place, without a round trip.
    let read;
    let bytes = match bundles.host_bytes() {
        Some(b) => b,
        None => {
            read = bundles.to_host()?;
            &read[..]
        }
    };
    let (gate, up, down) = host::gather_ffn(bytes, bundles.dtype, h, rows);
    let k = rows.len();
    Ok([
        upload_matrix(ctx, &gate, bundles.dtype, k, h)?,
        upload_matrix(ctx, &up, bundles.dtype, k, h)?,
        upload_matrix(ctx, &down, bundles.dtype, h, k)?,
    ])
}

/// `Err` unless an optional per-neuron vector covers `neurons`.
fn check_bias(what: &str, bias: Option<&CudaBuf>, neurons: usize) -> Result<u64> {
    match bias {
        None => Ok(0),
        Some(b) if b.len() >= neurons => Ok(b.device_ptr()),
        Some(b) => Err(Error::InvalidArgument(format!(
            "bundle_ffn: {what} holds {} floats for {neurons} neurons",
            b.len()
        ))),
    }
}

pub(crate) fn bundle_ffn(
    ctx: &Arc<Ctx>,
    bundles: &CudaMatrix,
    layout: BundleLayout,
    x: &CudaBuf,
    n_tokens: usize,
    sel: BundleSelection<'_, CudaBuf>,
    out: &mut CudaBuf,
) -> Result<()> {
    const OP: &str = "bundle_ffn";
    bundles.check_on_device(OP)?;
    let parts = layout.parts();
    if !bundles.cols.is_multiple_of(parts) {
        return Err(Error::InvalidArgument(format!(
            "bundle matrix has {} columns, not {parts} x hidden",
            bundles.cols
        )));
    }
    let hidden = bundles.cols / parts;
    let neurons = bundles.rows;
    need(OP, "x", x, n_tokens * hidden)?;
    need(OP, "out", out, n_tokens * hidden)?;
    if n_tokens == 0 || hidden == 0 {
        return Ok(());
    }
    // What each selection gives the kernels: (ids, offsets, coeff, gate bias, up bias,
    // count, total); the id and offset lists stay alive (in `_lists`) until queued.
    let (_lists, ids, offsets, coeff, gate_bias, up_bias, count, total) = match sel {
        BundleSelection::All { .. } if layout != BundleLayout::GateUpDown => {
            return Err(Error::InvalidArgument(
                "a dense pass over bundles needs their gate rows".into(),
            ));
        }
        BundleSelection::All { gate_bias, up_bias } => {
            let g = check_bias("gate bias", gate_bias, neurons)?;
            let u = check_bias("up bias", up_bias, neurons)?;
            (None, 0, 0, 0, g, u, neurons, n_tokens * neurons)
        }
        BundleSelection::PerToken {
            coeff,
            kept,
            up_bias,
        } => {
            if kept.n_tokens() < n_tokens || kept.ids.iter().any(|&i| i as usize >= neurons) {
                return Err(Error::InvalidArgument(
                    "neuron lists do not match the tokens or the bundles".into(),
                ));
            }
            need(OP, "coeff", coeff, n_tokens * neurons)?;
            let u = check_bias("up bias", up_bias, neurons)?;
            let total = kept.offsets[n_tokens];
            if total > kept.ids.len() {
                return Err(Error::InvalidArgument(
                    "neuron lists do not match the tokens or the bundles".into(),
                ));
            }
            let offs: Vec<u32> = kept.offsets[..=n_tokens]
                .iter()
                .map(|&o| to_u32(OP, "list offset", o))
                .collect::<Result<_>>()?;
            if offs.windows(2).any(|w| w[0] > w[1]) || offs[0] != 0 {
                return Err(Error::InvalidArgument(
                    "neuron lists do not match the tokens or the bundles".into(),
                ));
            }
            let ids = DevMem::upload(ctx, OP, &kept.ids[..total])?;
            let offsets = DevMem::upload(ctx, OP, &offs)?;
            let (ip, op) = (ids.ptr(), offsets.ptr());
            (
                Some((ids, offsets)),
                ip,
                op,
                coeff.device_ptr(),
                0,
                u,
                0,
                total,
            )
        }
    };
    let total_u32 = to_u32(OP, "listed neurons", total)?;
    let (n32, count32, neurons32) = (
        to_u32(OP, "tokens", n_tokens)?,
        to_u32(OP, "count", count)?,
        to_u32(OP, "neurons", neurons)?,
    );
    let (hidden32, parts32) = (hidden as u32, parts as u32);
    let suffix = dtype_suffix(bundles.dtype);
    let act = DevMem::new(ctx, OP, total.max(1) * 4)?;
    let args = KArgs::new()
        .ptr(bundles.device_ptr())
        .ptr(x.device_ptr())
        .ptr(ids)
        .ptr(offsets)
        .ptr(coeff)
        .ptr(gate_bias)
        .ptr(up_bias)
        .ptr(act.ptr())
        .u32(n32)
        .u32(count32)
        .u32(total_u32)
        .u32(neurons32)
        .u32(hidden32)
        .u32(parts32);
    let act_grid = to_u32(OP, "blocks", total.div_ceil(ACT_WARPS))?;
    ctx.launch(OP, act_kernel(suffix), (act_grid, 1, 1), THREADS, args)?;

    if n_tokens > 65535 {
        return Err(Error::InvalidArgument(format!(
            "bundle_ffn: {n_tokens} tokens is more than a CUDA grid holds (65535)"
        )));
    }
    // Split each token's list over several blocks when tokens x columns alone leave SMs idle.
    let col_blocks = hidden.div_ceil(8 * DOWN_THREADS);
    let blocks = col_blocks * n_tokens;
    let target = 2 * ctx.sms as usize;
    let per_token = total / n_tokens;
    let splits = if blocks >= target {
        1
    } else {
        target
            .div_ceil(blocks)
            .min(per_token / MIN_SPLIT_NEURONS)
            .clamp(1, MAX_SPLITS)
    };
    let len = n_tokens * hidden;
    let partials = if splits > 1 {
        Some(DevMem::new(ctx, OP, splits * len * 4)?)
    } else {
        None
    };
    let dst = partials.as_ref().map_or(out.device_ptr(), |p| p.ptr());
    let args = KArgs::new()
        .ptr(bundles.device_ptr())
        .ptr(act.ptr())
        .ptr(ids)
        .ptr(offsets)
        .ptr(dst)
        .u32(n32)
        .u32(count32)
        .u32(total_u32)
        .u32(neurons32)
        .u32(hidden32)
        .u32(parts32);
    let grid = (col_blocks as u32, splits as u32, n32);
    ctx.launch(OP, down_kernel(suffix), grid, DOWN_THREADS as u32, args)?;
    if let Some(p) = &partials {
        let args = KArgs::new()
            .ptr(p.ptr())
            .ptr(out.device_ptr())
            .u32(splits as u32)
            .u32(to_u32(OP, "output floats", len)?);
        let grid = to_u32(OP, "blocks", len.div_ceil(THREADS as usize))?;
        ctx.launch(OP, "reduce_splits_f32", (grid, 1, 1), THREADS, args)?;
    }
    Ok(())
}

fn act_kernel(suffix: &str) -> &'static str {
    match suffix {
        "bf16" => "bundle_act_bf16",
        "f16" => "bundle_act_f16",
        _ => "bundle_act_f32",
    }
}

fn down_kernel(suffix: &str) -> &'static str {
    match suffix {
        "bf16" => "bundle_down_bf16",
        "f16" => "bundle_down_f16",
        _ => "bundle_down_f32",
    }
}

pub(crate) fn accumulate_neuron_scores(
    ctx: &Arc<Ctx>,
    z: &CudaBuf,
    n_tokens: usize,
    width: usize,
    acc: &mut CudaBuf,
) -> Result<()> {
    const OP: &str = "accumulate_neuron_scores";
    need(OP, "z", z, n_tokens * width)?;
    need(OP, "acc", acc, width)?;
    if n_tokens == 0 || width == 0 {
        return Ok(());
    }
    let (n32, w32) = (to_u32(OP, "rows", n_tokens)?, to_u32(OP, "width", width)?);
    to_u32(OP, "z floats", n_tokens * width)?;
    let inv = DevMem::new(ctx, OP, n_tokens * 8)?;
    let args = KArgs::new()
        .ptr(z.device_ptr())
        .ptr(inv.ptr())
        .u32(n32)
        .u32(w32);
    ctx.launch(OP, "row_inv_norm2_f32", (n32, 1, 1), THREADS, args)?;
    let args = KArgs::new()
        .ptr(z.device_ptr())
        .ptr(inv.ptr())
        .ptr(acc.device_ptr())
        .u32(n32)
        .u32(w32);
    let grid = width.div_ceil(THREADS as usize) as u32;
    ctx.launch(
        OP,
        "accumulate_neuron_scores_f32",
        (grid, 1, 1),
        THREADS,
        args,
    )
}

/// Reads rows 0..n of `act`, lets `select` (the CPU selection) zero and list them, and
/// writes the rows back.
fn on_host(
    ctx: &Arc<Ctx>,
    op: &str,
    act: &mut CudaBuf,
    n: usize,
    select: impl FnOnce(&mut [f32]),
) -> Result<()> {
    let mut host = vec![0f32; n];
    ctx.dtoh(op, &mut host, act.device_ptr())?;
    select(&mut host);
    ctx.htod(op, act.device_ptr(), &host)
}

pub(crate) fn select_neurons(
    ctx: &Arc<Ctx>,
    act: &mut CudaBuf,
    n_tokens: usize,
    width: usize,
    rule: NeuronRule,
    kept: &mut NeuronLists,
) -> Result<()> {
    const OP: &str = "select_neurons";
    if width == 0 {
        return Err(Error::InvalidArgument("select_neurons: width is 0".into()));
    }
    need(OP, "act", act, n_tokens * width)?;
    let NeuronRule::Threshold(threshold) = rule else {
        return on_host(ctx, OP, act, n_tokens * width, |a| {
            host::select_neurons(a, width, rule, kept)
        });
    };
    kept.clear();
    if n_tokens == 0 {
        return Ok(());
    }
    let (n32, w32) = (to_u32(OP, "rows", n_tokens)?, to_u32(OP, "width", width)?);
    to_u32(OP, "act floats", n_tokens * width)?;
    let ids = DevMem::new(ctx, OP, n_tokens * width * 4)?;
    let counts = DevMem::new(ctx, OP, n_tokens * 4)?;
    let args = KArgs::new()
        .ptr(act.device_ptr())
        .ptr(ids.ptr())
        .ptr(counts.ptr())
        .u32(n32)
        .u32(w32)
        .f32(threshold);
    ctx.launch(OP, "select_threshold_f32", (n32, 1, 1), THREADS, args)?;
    let mut n_kept = vec![0u32; n_tokens];
    ctx.dtoh(OP, &mut n_kept, counts.ptr())?;
    let mut all = vec![0u32; n_tokens * width];
    ctx.dtoh(OP, &mut all, ids.ptr())?;
    for (t, &c) in n_kept.iter().enumerate() {
        let c = (c as usize).min(width);
        kept.push_token(all[t * width..t * width + c].iter().copied());
    }
    Ok(())
}

pub(crate) fn select_neurons_shared(
    ctx: &Arc<Ctx>,
    act: &mut CudaBuf,
    n_tokens: usize,
    width: usize,
    rule: NeuronRule,
    kept: &mut NeuronLists,
) -> Result<()> {
    const OP: &str = "select_neurons_shared";
    need(OP, "act", act, n_tokens * width)?;
    on_host(ctx, OP, act, n_tokens * width, |a| {
        host::select_neurons_shared(a, width, rule, kept)
    })
}
