//! Attention of a window of several query tokens: prompt chunks, Sirius verification windows
//! and tree batches.
//!
//! One task per token (the decode layout) reads the whole history once per query token: a
//! 16-token verification window at 2k tokens of context re-read ~90 MB of SmolLM2's cache 16
//! times. Here a task owns (kv head, block of cache rows, block of query tokens) and scores
//! every query head of every token in its block against each cache row while the row sits in
//! L1, so the history is read once per token block. Chunks give partial softmax results
//! (max, sum, weighted values) that are merged per token afterwards, as in flash-decoding.

use std::cell::RefCell;

use super::attention::{merge, with_f32_rows, Dims};
use super::kernels::{Kernels, KvSlice};
use super::pool::ThreadPool;
use super::util::{with_scratch, SharedMut};
use crate::tensor::TreeMask;

/// Cache rows scored at a time: a kv head's slice of 256 rows (64 KiB at head_dim 64) stays
/// in L2 while all the block's queries use it.
const ROWS_PER_TASK: usize = 256;
/// Query tokens per task: bounds the per-task score buffer (tokens * group * rows).
const TOKENS_PER_TASK: usize = 32;
/// Tasks per thread wanted when splitting the history for parallelism.
const TASKS_PER_THREAD: usize = 4;

thread_local! {
    /// Gathered queries, scores and outputs of the task a thread is working on.
    static QUERIES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static VALUES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The caller's per-chunk partial results before merging.
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Attention of query tokens `0..n_tokens` (cache rows `start_pos..`), token t seeing rows
/// `0..=start_pos + t` minus what `mask` hides. Shapes are checked by the caller.
#[allow(clippy::too_many_arguments)]
pub(super) fn window_attention(
    k: Kernels,
    pool: &ThreadPool,
    d: &Dims,
    q: &[f32],
    k_cache: KvSlice<'_>,
    v_cache: KvSlice<'_>,
    start_pos: usize,
    n_tokens: usize,
    mask: Option<&TreeMask>,
    out: &mut [f32],
) {
    let seen = start_pos + n_tokens;
    let n_kv_heads = d.n_heads / d.group;
    let q_dim = d.n_heads * d.head_dim;
    let n_blocks = n_tokens.div_ceil(TOKENS_PER_TASK);
    // Split the history into chunks only as far as the threads need tasks: each task walks
    // its chunk ROWS_PER_TASK rows at a time and merges as it goes, so the partials buffer
    // stays small however long the context.
    let want = TASKS_PER_THREAD * pool.n_threads();
    let n_chunks = seen
        .div_ceil(ROWS_PER_TASK)
        .min(want.div_ceil(n_kv_heads * n_blocks))
        .max(1);
    let chunk = seen.div_ceil(n_chunks).next_multiple_of(16);
    let n_chunks = seen.div_ceil(chunk);
    // Partials, per (token, chunk): outputs [q_dim], then maxima and sums [n_heads] each.
    let per = q_dim + 2 * d.n_heads;
    with_scratch(&PARTIALS, n_tokens * n_chunks * per, |parts| {
        let ps = SharedMut::new(parts);
        pool.run(n_kv_heads * n_chunks * n_blocks, &|task| {
            let g = task % n_kv_heads;
            let c = task / n_kv_heads % n_chunks;
            let b = task / (n_kv_heads * n_chunks);
            let rows = c * chunk..((c + 1) * chunk).min(seen);
            let tokens = b * TOKENS_PER_TASK..((b + 1) * TOKENS_PER_TASK).min(n_tokens);
            // SAFETY: task (g, c, b) alone owns the slots of kv head g's query heads in the
            // (t, c) blocks of its tokens.
            let slot = |t: usize| unsafe {
                let block = (t * n_chunks + c) * per;
                (
                    ps.slice(block + g * d.group * d.head_dim, d.group * d.head_dim),
                    ps.slice(block + q_dim + g * d.group, d.group),
                    ps.slice(block + q_dim + d.n_heads + g * d.group, d.group),
                )
            };
            // Tokens whose history ends before these rows get an empty partial.
            let first = rows
                .start
                .saturating_sub(start_pos)
                .clamp(tokens.start, tokens.end);
            for t in tokens.start..first {
                let (o, m, l) = slot(t);
                o.fill(0.0);
                m.fill(f32::NEG_INFINITY);
                l.fill(0.0);
            }
            if first < tokens.end {
                let block = Block {
                    g,
                    rows: rows.clone(),
                    tokens: first..tokens.end,
                    start_pos,
                    mask,
                };
                block_attention(k, d, q, k_cache, v_cache, &block, &slot);
            }
        });
        let outs = SharedMut::new(out);
        pool.run(n_tokens, &|t| {
            // SAFETY: task t alone owns token t's outputs; partials are only read now.
            let o = unsafe { outs.slice(t * q_dim, q_dim) };
            let blocks = unsafe { ps.slice(t * n_chunks * per, n_chunks * per) };
            merge(o, blocks, d.n_heads, d.head_dim, per);
        });
    });
}

/// What one task computes: kv head `g`'s query heads of `tokens` over cache `rows`.
struct Block<'a> {
    g: usize,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
    start_pos: usize,
    mask: Option<&'a TreeMask>,
}

/// Scores, partial softmax and weighted values of one block, written through `slot(t)` as
/// (values [group * head_dim], maxima [group], sums [group]).
#[allow(clippy::type_complexity)]
fn block_attention<'s>(
    k: Kernels,
    d: &Dims,
    q: &[f32],
    k_cache: KvSlice<'_>,
    v_cache: KvSlice<'_>,
    b: &Block<'_>,
    slot: &dyn Fn(usize) -> (&'s mut [f32], &'s mut [f32], &'s mut [f32]),
) {
    let hd = d.head_dim;
    let nq = b.tokens.len() * d.group;
    // Running results over the sub-chunks seen so far (flash-attention style).
    let mut maxima = vec![f32::NEG_INFINITY; nq];
    let mut sums = vec![0f32; nq];
    let mut values = vec![0f32; nq * hd];
    with_scratch(&QUERIES, nq * hd, |qs| {
        for (i, t) in b.tokens.clone().enumerate() {
            let src = &q[(t * d.n_heads + b.g * d.group) * hd..][..d.group * hd];
            qs[i * d.group * hd..][..d.group * hd].copy_from_slice(src);
        }
        // Rows past the last token's own are hidden from every token of the block: a prompt
        // chunk's causal upper triangle is skipped, not scored and masked (which made a
        // one-pass prefill's attention up to twice the work: 1.65x measured at 1619 tokens).
        let visible_end = b.rows.end.min(b.start_pos + b.tokens.end);
        for sub in (b.rows.start..visible_end).step_by(ROWS_PER_TASK) {
            let rows = sub..(sub + ROWS_PER_TASK).min(visible_end);
            let np = rows.len();
            let cache = |c| d.head_rows(c, b.g, rows.start, np);
            with_scratch(&SCORES, nq * np, |s| {
                with_f32_rows(k, cache(k_cache), |keys| k.scores(keys, qs, s));
                let parts: Vec<(f32, f32)> = s
                    .chunks_exact_mut(np)
                    .enumerate()
                    .map(|(r, sh)| {
                        let t = b.tokens.start + r / d.group;
                        softmax_partial(k, d.scale, sh, rows.start, b, t)
                    })
                    .collect();
                with_scratch(&VALUES, nq * hd, |vs| {
                    with_f32_rows(k, cache(v_cache), |values| k.weighted_sum(values, s, vs));
                    for (r, &(m, l)) in parts.iter().enumerate() {
                        let o = &mut values[r * hd..(r + 1) * hd];
                        let part = &vs[r * hd..(r + 1) * hd];
                        combine(&mut maxima[r], &mut sums[r], o, m, l, part);
                    }
                });
            });
        }
    });
    for (i, t) in b.tokens.clone().enumerate() {
        let (o, m, l) = slot(t);
        let rows = i * d.group..(i + 1) * d.group;
        o.copy_from_slice(&values[rows.start * hd..rows.end * hd]);
        m.copy_from_slice(&maxima[rows.clone()]);
        l.copy_from_slice(&sums[rows]);
    }
}

/// Folds one sub-chunk's partial result (max `m`, sum `l`, values `part`) into the running
/// one (`max`, `sum`, `o`), both unnormalised.
fn combine(max: &mut f32, sum: &mut f32, o: &mut [f32], m: f32, l: f32, part: &[f32]) {
    if l == 0.0 {
        return;
    }
    if *sum == 0.0 {
        *max = m;
        *sum = l;
        o.copy_from_slice(part);
        return;
    }
    let top = max.max(m);
    let (a, c) = ((*max - top).exp(), (m - top).exp());
    for (x, &p) in o.iter_mut().zip(part) {
        *x = *x * a + p * c;
    }
    *sum = *sum * a + l * c;
    *max = top;
}

/// Turns one query head's scores over cache rows `rows_start..` into unnormalised weights
/// `e^(score - max)` (0 where token `t` may not look), returning (max, sum of weights);
/// (-inf, 0) with all-zero weights when it sees none of the rows.
fn softmax_partial(
    k: Kernels,
    scale: f32,
    sh: &mut [f32],
    rows_start: usize,
    b: &Block<'_>,
    t: usize,
) -> (f32, f32) {
    let visible_end = (b.start_pos + t + 1)
        .saturating_sub(rows_start)
        .min(sh.len());
    let hidden =
        |i: usize| i >= visible_end || b.mask.is_some_and(|m| !m.visible(t, rows_start + i));
    k.scale(sh, scale);
    // Without a tree mask only a causal tail is hidden.
    let any = if b.mask.is_some() {
        let mut any = false;
        for (i, v) in sh.iter_mut().enumerate() {
            if hidden(i) {
                *v = f32::NEG_INFINITY;
            } else {
                any = true;
            }
        }
        any
    } else {
        sh[visible_end..].fill(f32::NEG_INFINITY);
        visible_end > 0
    };
    if !any {
        sh.fill(0.0);
        return (f32::NEG_INFINITY, 0.0);
    }
    let max = k.max(sh);
    let mut sum = k.exp_sum(sh, max);
    // exp() clamps its input, so a hidden row would keep a weight of ~1e-45.
    if b.mask.is_some() {
        for (i, v) in sh.iter_mut().enumerate() {
            if hidden(i) {
                sum -= *v;
                *v = 0.0;
            }
        }
    } else {
        for v in &mut sh[visible_end..] {
            sum -= *v;
            *v = 0.0;
        }
    }
    (max, sum)
}
