//! Neuron-level kernels of contextual sparsity: the FFN over neuron bundles (per token over
//! CATS survivors, or over every bundle of a resident subset), Griffin's neuron scores and
//! gather into a compact FFN, and CATS's per-token selection.
//!
//! A bundle is one row of a `[neurons, parts * h]` matrix: (gate row,) up row, down column.
//! Reading a neuron is reading its bundle's contiguous elements, so a selection costs exactly
//! its bytes. Over every bundle (`Activation::All`) the FFN works in blocks of [`BLOCK`]
//! neurons: gate and up dot products for the block, then the block's down columns accumulated
//! into the output while they are still in L1/L2. CATS runs the tier's fused kernel
//! (`Kernels::kept_up_down`) where it has one. Each task owns a slice of the neurons and a private
//! partial output; the partials are summed at the end.

use super::kernels::{Kernels, RowStarts};
use super::pool::ThreadPool;
use super::util::{with_scratch, with_scratch_vec, SharedMut};
use crate::backend::neurons::{BundleLayout, NeuronLists, NeuronRule};
use crate::tensor::DType;

/// Neurons per block: their 3h-element bundles (110 KiB for h = 576 in bf16) stay in L2
/// between the dot products and the down accumulation.
const BLOCK: usize = 32;
/// Tasks per thread. Fewer than the dense matvec uses (4): each CATS task ramps up its own
/// prefetch streams, and 2 measured ~5% faster than 4 on SmolLM2 decode (2 threads).
const TASKS_PER_THREAD: usize = 2;
/// Below this many bundle bytes a task is not split further.
const MIN_TASK_BYTES: usize = 64 << 10;

/// Bundle matrix as the kernels read it.
#[derive(Clone, Copy)]
pub struct Bundles<'a> {
    /// `[neurons, parts * hidden]` elements of `dtype`, any alignment.
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub neurons: usize,
    pub hidden: usize,
    pub layout: BundleLayout,
}

impl Bundles<'_> {
    fn bundle_bytes(&self) -> usize {
        self.layout.parts() * self.dtype.bytes_for(self.hidden)
    }
    /// Byte offset of part `part` (0 gate, 1 up, 2 down) of neuron `i`; the gate exists only
    /// in the gate|up|down layout (callers check).
    fn offset(&self, i: usize, part: usize) -> usize {
        let first = 3 - self.layout.parts();
        i * self.bundle_bytes() + (part - first) * self.dtype.bytes_for(self.hidden)
    }
}

/// How activations are formed (see `crate::backend::BundleSelection`), on host slices.
pub enum Activation<'a> {
    All {
        gate_bias: Option<&'a [f32]>,
        up_bias: Option<&'a [f32]>,
    },
    PerToken {
        coeff: &'a [f32],
        kept: &'a NeuronLists,
        up_bias: Option<&'a [f32]>,
    },
}

/// `out[t] = sum_i act(t, i) * down_i` over rows t < n_tokens of `x` (`[n, hidden]`).
#[allow(clippy::too_many_arguments)]
pub fn bundle_ffn(
    k: Kernels,
    pool: &ThreadPool,
    b: Bundles,
    x: &[f32],
    n_tokens: usize,
    act: Activation,
    out: &mut [f32],
) {
    let h = b.hidden;
    assert_eq!(
        b.bytes.len(),
        b.neurons * b.bundle_bytes(),
        "bundle_ffn: bytes != neurons * parts * h"
    );
    assert!(
        x.len() >= n_tokens * h && out.len() >= n_tokens * h,
        "bundle_ffn: x or out too short"
    );
    let out = &mut out[..n_tokens * h];
    out.fill(0.0);
    if n_tokens == 0 || b.neurons == 0 || h == 0 {
        return;
    }
    with_scratch_vec(&X_PREP, |buf| {
        let xstride = k.prep_x_tokens(b.dtype, &x[..n_tokens * h], n_tokens, h, buf);
        let xs: &[f32] = buf;
        match act {
            Activation::All { gate_bias, up_bias } => {
                assert_eq!(
                    b.layout,
                    BundleLayout::GateUpDown,
                    "bundle_ffn: All needs the gate rows"
                );
                let ids: Vec<u32> = Vec::new();
                let all = NeuronSet {
                    ids: &ids,
                    count: b.neurons,
                };
                run_tasks(k, pool, b, all, n_tokens, out, &|task_ids, t, partial| {
                    let xt = &xs[t * xstride..];
                    block_all(k, b, task_ids, xt, gate_bias, up_bias, partial)
                });
            }
            Activation::PerToken {
                coeff,
                kept,
                up_bias,
            } => {
                assert!(kept.n_tokens() >= n_tokens && coeff.len() >= n_tokens * b.neurons);
                for t in 0..n_tokens {
                    let set = NeuronSet {
                        ids: kept.token(t),
                        count: kept.token(t).len(),
                    };
                    let ct = &coeff[t * b.neurons..(t + 1) * b.neurons];
                    let xt = &xs[t * xstride..];
                    run_tasks(
                        k,
                        pool,
                        b,
                        set,
                        1,
                        &mut out[t * h..(t + 1) * h],
                        &|task_ids, _, partial| {
                            block_kept(k, b, task_ids, xt, ct, up_bias, partial)
                        },
                    );
                }
            }
        }
    });
}

thread_local! {
    static X_PREP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-task partial outputs of `run_tasks`.
    static PARTIALS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Neurons a call covers: `ids` if non-empty, else `0..count`.
#[derive(Clone, Copy)]
struct NeuronSet<'a> {
    ids: &'a [u32],
    count: usize,
}

/// A task's neurons: ids `ids[range]`, or the plain range when the set is `0..count`.
#[derive(Clone, Copy)]
pub struct TaskNeurons<'a> {
    ids: Option<&'a [u32]>,
    start: usize,
    len: usize,
}

impl TaskNeurons<'_> {
    fn get(&self, j: usize) -> usize {
        match self.ids {
            Some(ids) => ids[self.start + j] as usize,
            None => self.start + j,
        }
    }
}

/// Splits `set` into tasks, gives each a zeroed partial output of `n_tokens` rows (in the
/// kernels' accumulation layout, see `Kernels::acc_split_block`) and calls
/// `f(neurons, token, partial_row)` per token, then sums the partials into `out`.
fn run_tasks(
    k: Kernels,
    pool: &ThreadPool,
    b: Bundles,
    set: NeuronSet,
    n_tokens: usize,
    out: &mut [f32],
    f: &(dyn Fn(TaskNeurons, usize, &mut [f32]) + Sync),
) {
    let h = b.hidden;
    let count = set.count;
    if count == 0 {
        return;
    }
    let split = k.acc_split_block(b.dtype);
    let width = split.map_or(h, |blk| h.div_ceil(blk) * blk);
    let by_size = (count * b.bundle_bytes() * n_tokens).div_ceil(MIN_TASK_BYTES);
    let per_thread = if pool.n_threads() == 1 {
        1
    } else {
        TASKS_PER_THREAD
    };
    let n_tasks = (pool.n_threads() * per_thread).min(by_size).max(1);
    let chunk = count.div_ceil(n_tasks);
    let n_tasks = count.div_ceil(chunk);
    let ids = if set.ids.is_empty() {
        None
    } else {
        Some(set.ids)
    };
    let neurons_of = |task: usize| {
        let start = task * chunk;
        TaskNeurons {
            ids,
            start,
            len: chunk.min(count - start),
        }
    };
    let rows = n_tokens * width;
    // The calling thread's reusable buffer: this runs for every layer of every decoded token.
    with_scratch(&PARTIALS, n_tasks * rows, |partials| {
        partials.fill(0.0);
        let shared = SharedMut::new(partials);
        let work = |task: usize| {
            // SAFETY: task `task` alone owns its n_tokens partial rows.
            let mine = unsafe { shared.slice(task * rows, rows) };
            for t in 0..n_tokens {
                f(neurons_of(task), t, &mut mine[t * width..(t + 1) * width]);
            }
        };
        if n_tasks == 1 {
            work(0);
        } else {
            pool.run(n_tasks, &work);
        }
        let (sum, rest) = partials.split_at_mut(rows);
        for part in rest.chunks_exact(rows) {
            super::ops::add_inplace(sum, part);
        }
        for (o, s) in out.chunks_exact_mut(h).zip(sum.chunks_exact(width)) {
            match split {
                Some(blk) => super::kernels::merge_even_odd(o, s, blk),
                None => o.copy_from_slice(&s[..h]),
            }
        }
    });
}

/// Every neuron of `neurons`: act = silu(gate . x + gb) * (up . x + ub).
fn block_all(
    k: Kernels,
    b: Bundles,
    neurons: TaskNeurons,
    xt: &[f32],
    gate_bias: Option<&[f32]>,
    up_bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let mut offs = [[0usize; BLOCK]; 3];
    let mut g = [0f32; BLOCK];
    let mut u = [0f32; BLOCK];
    for j0 in (0..neurons.len).step_by(BLOCK) {
        let nb = BLOCK.min(neurons.len - j0);
        for j in 0..nb {
            let i = neurons.get(j0 + j);
            for (part, o) in offs.iter_mut().enumerate() {
                o[j] = b.offset(i, part);
            }
        }
        let (gate, up) = (RowStarts::At(&offs[0][..nb]), RowStarts::At(&offs[1][..nb]));
        k.matvec(b.bytes, b.dtype, gate, b.hidden, xt, &mut g[..nb]);
        k.matvec(b.bytes, b.dtype, up, b.hidden, xt, &mut u[..nb]);
        for j in 0..nb {
            let i = neurons.get(j0 + j);
            let gv = g[j] + gate_bias.map_or(0.0, |v| v[i]);
            let uv = u[j] + up_bias.map_or(0.0, |v| v[i]);
            g[j] = silu(gv) * uv;
        }
        k.accumulate_rows_in(b.bytes, &offs[2][..nb], b.dtype, b.hidden, &g[..nb], out);
    }
}

/// Groups of 4 kept neurons prefetched ahead of the one being computed. Kept neurons are
/// scattered, and each is a fresh jump the hardware prefetchers cannot predict (they stop at
/// 4 KiB pages); asking for the next groups' bytes explicitly keeps enough reads in flight.
/// Measured on Zen4 (SmolLM2 CATS keep 0.5, 1 thread): the sparse part's time per byte fell
/// ~25% with 4 groups of whole up+down spans into L2 (prefetcht1); T0 (L1) hints or partial
/// spans helped less.
const PREFETCH_GROUPS: usize = 4;

/// The kept neurons `neurons` of one token: act = coeff[i] * (up . x + ub). A kept neuron's
/// up row and down column are adjacent in its bundle, so each neuron is one contiguous
/// 2h-element read; four neurons a quarter of the list apart go together, which makes four
/// ascending streams through memory (as in the dense matvec).
fn block_kept(
    k: Kernels,
    b: Bundles,
    neurons: TaskNeurons,
    xt: &[f32],
    coeff: &[f32],
    up_bias: Option<&[f32]>,
    out: &mut [f32],
) {
    if let Some(ids) = neurons.ids {
        let ids = &ids[neurons.start..neurons.start + neurons.len];
        if k.kept_up_down(b, ids, coeff, up_bias, xt, out) {
            return;
        }
    }
    let q = neurons.len / 4;
    let span = b.dtype.bytes_for(2 * b.hidden);
    // The list positions of group g (g < q: four streams; then the leftovers one by one).
    let group = |g: usize| -> ([usize; 4], usize) {
        if g < q {
            ([g, q + g, 2 * q + g, 3 * q + g], 4)
        } else {
            ([4 * q + (g - q), 0, 0, 0], 1)
        }
    };
    let n_groups = q + (neurons.len - 4 * q);
    let prefetch_group = |g: usize| {
        if g < n_groups {
            let (pos, m) = group(g);
            for &p in &pos[..m] {
                let start = b.offset(neurons.get(p), 1);
                prefetch_range(&b.bytes[start..start + span]);
            }
        }
    };
    for g in 0..PREFETCH_GROUPS {
        prefetch_group(g);
    }
    for g in 0..n_groups {
        prefetch_group(g + PREFETCH_GROUPS);
        let (pos, m) = group(g);
        let mut up = [0usize; 4];
        let mut down = [0usize; 4];
        let mut ids = [0usize; 4];
        for j in 0..m {
            ids[j] = neurons.get(pos[j]);
            up[j] = b.offset(ids[j], 1);
            down[j] = b.offset(ids[j], 2);
        }
        let mut u = [0f32; 4];
        k.matvec(
            b.bytes,
            b.dtype,
            RowStarts::At(&up[..m]),
            b.hidden,
            xt,
            &mut u[..m],
        );
        for j in 0..m {
            let i = ids[j];
            u[j] = coeff[i] * (u[j] + up_bias.map_or(0.0, |v| v[i]));
        }
        k.accumulate_rows_in(b.bytes, &down[..m], b.dtype, b.hidden, &u[..m], out);
    }
}

/// Asks the CPU to start loading every cache line of `bytes` into L2 (a hint: no fault, no
/// effect on results).
#[inline]
fn prefetch_range(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: prefetch is a hint on an address inside `bytes`; it never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                line.as_ptr() as *const i8
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// Copies neurons `ids` of a `[f, 3h]` bundle matrix into a compact FFN in checkpoint
/// layout: gate `[k, h]`, up `[k, h]` (row copies) and down `[h, k]` (each bundle's down
/// column scattered into column j; done in blocks of 64 neurons so every write of a down row
/// is a contiguous run). Ids must be in range (checked by the caller).
pub fn gather_ffn(
    bundles: &[u8],
    dtype: DType,
    h: usize,
    ids: &[u32],
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    const COLS: usize = 64;
    let esz = dtype.size();
    let row = h * esz;
    let k = ids.len();
    let mut gate = Vec::with_capacity(k * row);
    let mut up = Vec::with_capacity(k * row);
    for &i in ids {
        let b = &bundles[i as usize * 3 * row..(i as usize + 1) * 3 * row];
        gate.extend_from_slice(&b[..row]);
        up.extend_from_slice(&b[row..2 * row]);
    }
    let mut down = vec![0u8; h * k * esz];
    for j0 in (0..k).step_by(COLS) {
        let block = &ids[j0..k.min(j0 + COLS)];
        for r in 0..h {
            let dst = &mut down[(r * k + j0) * esz..(r * k + j0 + block.len()) * esz];
            for (d, &i) in dst.chunks_exact_mut(esz).zip(block) {
                let at = i as usize * 3 * row + 2 * row + r * esz;
                d.copy_from_slice(&bundles[at..at + esz]);
            }
        }
    }
    (gate, up, down)
}

/// Griffin: `acc[j] += sum_t (z[t, j] / |z[t]|)^2` over the `width`-long rows of `z`.
pub fn accumulate_neuron_scores(z: &[f32], width: usize, acc: &mut [f32]) {
    for row in z.chunks_exact(width) {
        let norm2: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        if norm2 == 0.0 || !norm2.is_finite() {
            continue;
        }
        // In f64: (v * v) or 1 / norm2 overflow f32 for rows near 1e19 or 1e-19.
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += ((v as f64) * (v as f64) / norm2) as f32;
        }
    }
}

/// CATS: per `width`-long row of `act`, keeps the neurons `rule` picks by |act| (top-k ties:
/// lower index first), zeroes the rest and appends the kept ids (ascending) to `kept`.
pub fn select_neurons(act: &mut [f32], width: usize, rule: NeuronRule, kept: &mut NeuronLists) {
    kept.clear();
    let mut mags: Vec<f32> = Vec::new();
    for row in act.chunks_exact_mut(width) {
        // Neurons strictly above `cut` are kept, plus `ties` of those equal to it, lowest first.
        let (cut, mut ties) = match rule {
            NeuronRule::Threshold(thr) => (thr, usize::MAX),
            NeuronRule::TopK(k) if k >= width => (f32::NEG_INFINITY, 0),
            NeuronRule::TopK(0) => (f32::INFINITY, 0),
            NeuronRule::TopK(k) => {
                mags.clear();
                mags.extend(row.iter().map(|v| nan_to_zero(v.abs())));
                let (_, kth, _) = mags.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
                let kth = *kth;
                let above = mags.iter().filter(|&&m| m > kth).count();
                (kth, k - above)
            }
        };
        for (i, v) in row.iter_mut().enumerate() {
            let m = nan_to_zero(v.abs());
            let keep = if m > cut {
                true
            } else if m == cut && ties > 0 {
                ties -= 1;
                true
            } else {
                false
            };
            if keep {
                kept.ids.push(i as u32);
            } else {
                *v = 0.0;
            }
        }
        kept.offsets.push(kept.ids.len());
    }
}

/// CATS over the beams of a tree: one set for every row of `act`, picked by `rule` from the
/// column sums of |act| (a threshold is compared with the column mean), so the beams of one
/// draft step read the same up/down bundles.
pub fn select_neurons_shared(
    act: &mut [f32],
    width: usize,
    rule: NeuronRule,
    kept: &mut NeuronLists,
) {
    kept.clear();
    if width == 0 {
        return;
    }
    let n = act.len() / width;
    let mut sums = vec![0f32; width];
    for row in act.chunks_exact(width) {
        for (s, v) in sums.iter_mut().zip(row) {
            *s += nan_to_zero(v.abs());
        }
    }
    let rule = match rule {
        NeuronRule::Threshold(t) => NeuronRule::Threshold(t * n as f32),
        top_k => top_k,
    };
    let mut chosen = NeuronLists::default();
    select_neurons(&mut sums, width, rule, &mut chosen);
    let ids = if chosen.n_tokens() == 1 {
        chosen.token(0)
    } else {
        &[]
    };
    let mut keep = vec![false; width];
    for &i in ids {
        keep[i as usize] = true;
    }
    for row in act.chunks_exact_mut(width) {
        for (v, &k) in row.iter_mut().zip(&keep) {
            if !k {
                *v = 0.0;
            }
        }
        kept.push_token(ids.iter().copied());
    }
}

/// NaN magnitudes rank as 0 so a NaN activation is never preferred (and never panics a sort).
#[inline]
fn nan_to_zero(m: f32) -> f32 {
    if m.is_nan() {
        0.0
    } else {
        m
    }
}
