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
use super::ops_basic::need;
use super::temps::Temp;
use super::windows::{bundle_kernels, shared_list, TokenWindow};
use crate::backend::checks;
use crate::backend::cpu as host;
use crate::backend::offload::DOWN_PARTIALS_MAX_BYTES;
use crate::backend::{BundleLayout, BundleSelection, NeuronLists, NeuronRule};
use crate::error::{Error, Result};
use crate::tensor::DType;

const THREADS: u32 = 256;
/// Warps per block of bundle_act (THREADS / 32): one warp per (token, neuron), or per
/// listed neuron in the window kernels.
const ACT_WARPS: usize = 8;
/// bundle_down: threads per block, each owning 8 output columns (4 or 1 in the window
/// kernels, [`TokenWindow::down_cols`]).
const DOWN_THREADS: usize = 128;
/// bundle_down splits a token's list into at most this many parts ...
const MAX_SPLITS: usize = 64;
/// ... of at least this many neurons each.
const MIN_SPLIT_NEURONS: usize = 32;
/// The op name in bundle_ffn's errors.
const BUNDLE_FFN: &str = "bundle_ffn";

pub(crate) fn upload_matrix(
    ctx: &Arc<Ctx>,
    bytes: &[u8],
    dtype: DType,
    rows: usize,
    cols: usize,
) -> Result<CudaMatrix> {
    super::buffers::cuda_dtype(dtype)?;
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

/// Backend::bundle_ffn: the arguments checked, then bundle_act and bundle_down
/// (kernels/neurons.cu; see [`BundleCall`]).
pub(crate) fn bundle_ffn(
    ctx: &Arc<Ctx>,
    bundles: &CudaMatrix,
    layout: BundleLayout,
    x: &CudaBuf,
    n_tokens: usize,
    sel: BundleSelection<'_, CudaBuf>,
    out: &mut CudaBuf,
) -> Result<()> {
    bundles.check_on_device(BUNDLE_FFN)?;
    let hidden = checks::bundle_call(bundles.cols, bundles.rows, layout, &sel, n_tokens)?;
    let parts = layout.parts();
    need(BUNDLE_FFN, "x", x, n_tokens * hidden)?;
    need(BUNDLE_FFN, "out", out, n_tokens * hidden)?;
    if n_tokens == 0 || hidden == 0 {
        return Ok(());
    }
    let sel = Selected::new(ctx, sel, n_tokens, bundles.rows)?;
    let call = BundleCall::new(bundles, sel, n_tokens, hidden, parts)?;
    let act = call.launch_act(ctx, x)?;
    call.launch_down(ctx, &act, out)
}

/// What a [`BundleSelection`] gives the bundle kernels: device pointers (0 for none) and
/// neuron counts.
struct Selected {
    /// Some when every token shares one list (`count` neurons, no offsets) and there are
    /// several tokens: bundle_window.cu's kernels read each bundle once per window.
    window: Option<TokenWindow>,
    /// The uploaded id and offset lists (per-token selection; the shared list alone), kept
    /// alive until the kernels that read them are queued.
    _lists: Vec<Temp>,
    ids: u64,
    offsets: u64,
    coeff: u64,
    gate_bias: u64,
    up_bias: u64,
    /// Neurons per token of a dense pass (0 with per-token lists).
    count: usize,
    /// (token, neuron) pairs computed: the bundle_act kernel's work items.
    total: usize,
}

impl Selected {
    fn new(
        ctx: &Arc<Ctx>,
        sel: BundleSelection<'_, CudaBuf>,
        n_tokens: usize,
        neurons: usize,
    ) -> Result<Selected> {
        // checks::bundle_call has refused a dense pass without gate rows.
        match sel {
            BundleSelection::All { gate_bias, up_bias } => Ok(Selected {
                window: TokenWindow::for_shared_list(n_tokens),
                gate_bias: check_bias("gate bias", gate_bias, neurons)?,
                up_bias: check_bias("up bias", up_bias, neurons)?,
                _lists: Vec::new(),
                ids: 0,
                offsets: 0,
                coeff: 0,
                count: neurons,
                total: n_tokens * neurons,
            }),
            BundleSelection::PerToken {
                coeff,
                kept,
                up_bias,
            } => Selected::per_token(ctx, coeff, kept, up_bias, n_tokens, neurons),
        }
    }

    /// CATS's lists: checked against the tokens and the bundles, then uploaded.
    fn per_token(
        ctx: &Arc<Ctx>,
        coeff: &CudaBuf,
        kept: &NeuronLists,
        up_bias: Option<&CudaBuf>,
        n_tokens: usize,
        neurons: usize,
    ) -> Result<Selected> {
        // checks::bundle_call has checked the lists against the tokens and the bundles.
        need(BUNDLE_FFN, "coeff", coeff, n_tokens * neurons)?;
        let up_bias = check_bias("up bias", up_bias, neurons)?;
        if let (Some(w), Some(list)) = (
            TokenWindow::for_shared_list(n_tokens),
            shared_list(kept, n_tokens),
        ) {
            let ids = Temp::upload(ctx, BUNDLE_FFN, list)?;
            return Ok(Selected {
                window: Some(w),
                ids: ids.ptr(),
                offsets: 0,
                coeff: coeff.device_ptr(),
                gate_bias: 0,
                up_bias,
                count: list.len(),
                total: n_tokens * list.len(),
                _lists: vec![ids],
            });
        }
        let total = kept.offsets[n_tokens];
        let offs: Vec<u32> = kept.offsets[..=n_tokens]
            .iter()
            .map(|&o| to_u32(BUNDLE_FFN, "list offset", o))
            .collect::<Result<_>>()?;
        let ids = Temp::upload(ctx, BUNDLE_FFN, &kept.ids[..total])?;
        let offsets = Temp::upload(ctx, BUNDLE_FFN, &offs)?;
        Ok(Selected {
            window: None,
            ids: ids.ptr(),
            offsets: offsets.ptr(),
            coeff: coeff.device_ptr(),
            gate_bias: 0,
            up_bias,
            count: 0,
            total,
            _lists: vec![ids, offsets],
        })
    }
}

/// One checked bundle_ffn call: what both of its kernels read.
struct BundleCall<'a> {
    bundles: &'a CudaMatrix,
    sel: Selected,
    n_tokens: usize,
    hidden: usize,
    /// The sizes both kernels take, in their order: tokens, count, total, neurons, hidden,
    /// parts.
    sizes: [u32; 6],
}

impl<'a> BundleCall<'a> {
    fn new(
        bundles: &'a CudaMatrix,
        sel: Selected,
        n_tokens: usize,
        hidden: usize,
        parts: usize,
    ) -> Result<BundleCall<'a>> {
        let total = to_u32(BUNDLE_FFN, "listed neurons", sel.total)?;
        let sizes = [
            to_u32(BUNDLE_FFN, "tokens", n_tokens)?,
            to_u32(BUNDLE_FFN, "count", sel.count)?,
            total,
            to_u32(BUNDLE_FFN, "neurons", bundles.rows)?,
            hidden as u32,
            parts as u32,
        ];
        if n_tokens > 65535 {
            return Err(Error::InvalidArgument(format!(
                "bundle_ffn: {n_tokens} tokens is more than a CUDA grid holds (65535)"
            )));
        }
        Ok(BundleCall {
            bundles,
            sel,
            n_tokens,
            hidden,
            sizes,
        })
    }

    /// `args` followed by the sizes.
    fn with_sizes(&self, args: KArgs) -> KArgs {
        self.sizes.iter().fold(args, |args, &v| args.u32(v))
    }

    /// The sizes the window kernels take: tokens, count, neurons, hidden, parts (no total).
    fn window_sizes(&self, args: KArgs) -> KArgs {
        let s = &self.sizes;
        [s[0], s[1], s[3], s[4], s[5]]
            .iter()
            .fold(args, |args, &v| args.u32(v))
    }

    /// bundle_act: every selected (token, neuron)'s activation into a new buffer; one warp
    /// per (token, neuron), or with a shared list one warp per listed neuron and window of
    /// tokens (grid = ceil(count / 8)).
    fn launch_act(&self, ctx: &Arc<Ctx>, x: &CudaBuf) -> Result<Temp> {
        let sel = &self.sel;
        let act = Temp::new(ctx, BUNDLE_FFN, sel.total.max(1) * 4)?;
        let (kernel, _) = bundle_kernels(self.bundles.dtype, sel.window)?;
        let args = KArgs::new()
            .ptr(self.bundles.device_ptr())
            .ptr(x.device_ptr())
            .ptr(sel.ids);
        let (args, items) = match sel.window {
            Some(_) => (args, sel.count),
            None => (args.ptr(sel.offsets), sel.total),
        };
        let args = args
            .ptr(sel.coeff)
            .ptr(sel.gate_bias)
            .ptr(sel.up_bias)
            .ptr(act.ptr());
        let args = match sel.window {
            Some(_) => self.window_sizes(args),
            None => self.with_sizes(args),
        };
        let grid = to_u32(BUNDLE_FFN, "blocks", items.div_ceil(ACT_WARPS))?;
        ctx.launch(BUNDLE_FFN, kernel, (grid, 1, 1), THREADS, args)?;
        Ok(act)
    }

    /// bundle_down: `out[t] = sum of act * down row` over token t's neurons, each token's
    /// list split over several blocks (partial sums, then reduce_splits) when tokens x
    /// columns alone leave SMs idle. grid = (column blocks, splits, tokens), or with a
    /// shared list (column blocks, splits, windows): [`TokenWindow::down_grid`].
    fn launch_down(&self, ctx: &Arc<Ctx>, act: &Temp, out: &mut CudaBuf) -> Result<()> {
        let (n_tokens, hidden) = (self.n_tokens, self.hidden);
        // (column blocks, token blocks): a token per block, or a window of them.
        let (col_blocks, token_blocks) = match self.sel.window {
            Some(w) => w.down_grid(hidden, n_tokens, DOWN_THREADS),
            None => (hidden.div_ceil(8 * DOWN_THREADS), n_tokens),
        };
        let per_token = self.sel.total / n_tokens;
        let len = n_tokens * hidden;
        // Partial sums stay within what the budget's temporaries bound allows for them.
        let room = (DOWN_PARTIALS_MAX_BYTES / (len * 4).max(1)).max(1);
        let splits = down_splits(ctx, col_blocks * token_blocks, per_token).min(room);
        let partials = if splits > 1 {
            Some(Temp::new(ctx, BUNDLE_FFN, splits * len * 4)?)
        } else {
            None
        };
        let dst = partials.as_ref().map_or(out.device_ptr(), |p| p.ptr());
        let (_, kernel) = bundle_kernels(self.bundles.dtype, self.sel.window)?;
        let args = KArgs::new()
            .ptr(self.bundles.device_ptr())
            .ptr(act.ptr())
            .ptr(self.sel.ids);
        let args = match self.sel.window {
            Some(_) => self.window_sizes(args.ptr(dst)),
            None => self.with_sizes(args.ptr(self.sel.offsets).ptr(dst)),
        };
        let grid = (
            to_u32(BUNDLE_FFN, "column blocks", col_blocks)?,
            splits as u32,
            token_blocks as u32,
        );
        ctx.launch(BUNDLE_FFN, kernel, grid, DOWN_THREADS as u32, args)?;
        match &partials {
            Some(p) => reduce_splits(ctx, p, out, splits, len),
            None => Ok(()),
        }
    }
}

/// Blocks each token's list is split over: 1 when `blocks` (tokens x column blocks) give
/// every SM two, else as many as fill them, at most MAX_SPLITS and at least
/// MIN_SPLIT_NEURONS of the token's `per_token` neurons each.
fn down_splits(ctx: &Ctx, blocks: usize, per_token: usize) -> usize {
    let target = 2 * ctx.sms as usize;
    if blocks >= target {
        1
    } else {
        target
            .div_ceil(blocks)
            .min(per_token / MIN_SPLIT_NEURONS)
            .clamp(1, MAX_SPLITS)
    }
}

/// reduce_splits: `out` = the sum of the `splits` partial outputs of `len` floats.
fn reduce_splits(
    ctx: &Ctx,
    partials: &Temp,
    out: &mut CudaBuf,
    splits: usize,
    len: usize,
) -> Result<()> {
    let args = KArgs::new()
        .ptr(partials.ptr())
        .ptr(out.device_ptr())
        .u32(splits as u32)
        .u32(to_u32(BUNDLE_FFN, "output floats", len)?);
    let grid = to_u32(BUNDLE_FFN, "blocks", len.div_ceil(THREADS as usize))?;
    ctx.launch(BUNDLE_FFN, "reduce_splits_f32", (grid, 1, 1), THREADS, args)
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
    let inv = Temp::new(ctx, OP, n_tokens * 8)?;
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

/// Checks that `act` holds rows 0..n, reads them, lets `select` (the CPU selection) zero
/// and list them, and writes the rows back.
fn on_host(
    ctx: &Arc<Ctx>,
    op: &str,
    act: &mut CudaBuf,
    n: usize,
    select: impl FnOnce(&mut [f32]),
) -> Result<()> {
    need(op, "act", act, n)?;
    let mut host = vec![0f32; n];
    ctx.dtoh(op, &mut host, act.device_ptr())?;
    select(&mut host);
    ctx.htod(op, act.device_ptr(), &host)
}

/// CATS's selection (`shared`: one list for every token, the tree beam's). Threshold rules
/// without `shared` run on the device; the rest on the host (see the module doc).
pub(crate) fn select_neurons(
    ctx: &Arc<Ctx>,
    act: &mut CudaBuf,
    n_tokens: usize,
    width: usize,
    rule: NeuronRule,
    shared: bool,
    kept: &mut NeuronLists,
) -> Result<()> {
    if shared {
        return on_host(ctx, "select_neurons_shared", act, n_tokens * width, |a| {
            host::select_neurons_shared(a, width, rule, kept)
        });
    }
    const OP: &str = "select_neurons";
    if width == 0 {
        return Err(Error::InvalidArgument("select_neurons: width is 0".into()));
    }
    let NeuronRule::Threshold(threshold) = rule else {
        return on_host(ctx, OP, act, n_tokens * width, |a| {
            host::select_neurons(a, width, rule, kept)
        });
    };
    need(OP, "act", act, n_tokens * width)?;
    kept.clear();
    if n_tokens == 0 {
        return Ok(());
    }
    select_threshold(ctx, act, n_tokens, width, threshold, kept)
}

/// select_threshold_f32: each row's ids with |act| >= `threshold` (the others zeroed in
/// place), read back into `kept`.
fn select_threshold(
    ctx: &Arc<Ctx>,
    act: &mut CudaBuf,
    n_tokens: usize,
    width: usize,
    threshold: f32,
    kept: &mut NeuronLists,
) -> Result<()> {
    const OP: &str = "select_neurons";
    let (n32, w32) = (to_u32(OP, "rows", n_tokens)?, to_u32(OP, "width", width)?);
    to_u32(OP, "act floats", n_tokens * width)?;
    let ids = Temp::new(ctx, OP, n_tokens * width * 4)?;
    let counts = Temp::new(ctx, OP, n_tokens * 4)?;
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
