//! Causal multi-head attention over a KV cache (decode and multi-token prefill/verify).
//!
//! Attention is bound by reading the cache (from L2/L3, or DRAM once the weights have streamed
//! through), not by FMAs. So one task handles all query heads of a KV head together (GQA: the
//! cache rows are read once per group, not once per head), and a long history is split into
//! position chunks whose partial softmax results are merged afterwards (flash-decoding), so
//! that decoding one token still has enough tasks to keep every thread busy.

use std::cell::RefCell;

use super::attention_window::window_attention;
use super::kernels::{CacheRows, Kernels, KvSlice, StridedRows};
use super::pool::ThreadPool;
use super::util::{with_scratch, SharedMut};
use crate::tensor::{DType, TreeMask};

/// Target number of tasks per thread when splitting positions into chunks.
const TASKS_PER_THREAD: usize = 4;
/// Positions per chunk at least: below this the merge and per-task costs dominate.
const MIN_CHUNK: usize = 128;

thread_local! {
    /// Each thread's attention scores for the task it is working on.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The caller's per-chunk partial results (outputs, maxima, sums) before merging.
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One KV head's f16 cache rows widened to f32 for the task's products.
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `rows` as the f32 rows the products read: an f32 cache's rows as they are; an
/// f16 cache's widened once into a thread-local buffer, so that each of the group's query
/// heads reads floats instead of converting every row again (and the kernels stay f32).
pub(super) fn with_f32_rows<R>(k: Kernels, rows: CacheRows, f: impl FnOnce(StridedRows) -> R) -> R {
    let CacheRows {
        data,
        stride,
        cols,
        n,
    } = rows;
    match data {
        KvSlice::F32(data) => f(StridedRows {
            data,
            stride,
            cols,
            n,
        }),
        KvSlice::F16(_) => with_scratch(&WIDE, n * cols, |wide| {
            k.convert_rows(data.bytes(), DType::F16, stride, cols, wide);
            f(StridedRows {
                data: wide,
                stride: cols,
                cols,
                n,
            })
        }),
    }
}

/// Shapes shared by every task of one call.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub n_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub kv_dim: usize,
    pub scale: f32,
}

impl Dims {
    /// The shapes of one call (`n_heads` a multiple of `n_kv_heads`: grouped-query attention).
    pub fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Dims {
        assert!(
            n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
            "attention: n_heads must be a multiple of n_kv_heads"
        );
        Dims {
            n_heads,
            group: n_heads / n_kv_heads,
            head_dim,
            kv_dim: n_kv_heads * head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    /// Cache rows `start..start + n` of KV head `g` in a `[positions, kv_dim]` cache.
    pub fn head_rows<'c>(
        &self,
        cache: KvSlice<'c>,
        g: usize,
        start: usize,
        n: usize,
    ) -> CacheRows<'c> {
        CacheRows {
            data: cache.from(start * self.kv_dim + g * self.head_dim),
            stride: self.kv_dim,
            cols: self.head_dim,
            n,
        }
    }
}

/// See [`super::attention()`].
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_with(
    k: Kernels,
    pool: &ThreadPool,
    q: &[f32],
    k_cache: KvSlice<'_>,
    v_cache: KvSlice<'_>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    start_pos: usize,
    n_tokens: usize,
    mask: Option<&TreeMask>,
    out: &mut [f32],
) {
    assert!(
        mask.is_none_or(|m| m.n_tokens() == n_tokens && m.first_row() == start_pos),
        "attention: the tree mask is for another batch"
    );
    let d = Dims::new(n_heads, n_kv_heads, head_dim);
    let seen = start_pos + n_tokens;
    assert_eq!(
        q.len(),
        n_tokens * n_heads * head_dim,
        "attention: q.len() != n_tokens * n_heads * head_dim"
    );
    assert_eq!(
        out.len(),
        q.len(),
        "attention: out.len() != n_tokens * n_heads * head_dim"
    );
    assert!(
        k_cache.len() >= seen * d.kv_dim,
        "attention: k_cache holds fewer than start_pos + n_tokens rows"
    );
    assert!(
        v_cache.len() >= seen * d.kv_dim,
        "attention: v_cache holds fewer than start_pos + n_tokens rows"
    );
    if n_tokens == 0 || head_dim == 0 {
        return;
    }
    let (k_cache, v_cache) = (
        k_cache.slice(0..seen * d.kv_dim),
        v_cache.slice(0..seen * d.kv_dim),
    );
    // Windows read the history once per block of tokens instead of once per token.
    if n_tokens > 1 {
        window_attention(
            k, pool, &d, q, k_cache, v_cache, start_pos, n_tokens, mask, out,
        );
        return;
    }
    let batch = Batch {
        k,
        d,
        n_kv_heads,
        q,
        k_cache,
        v_cache,
        start_pos,
        n_tokens,
        mask,
    };
    let units = n_tokens * n_kv_heads;
    let want = TASKS_PER_THREAD * pool.n_threads();
    // A one-token tree batch (a draft tree's root) stays in one chunk: the chunked path
    // has no mask, and a chunk of only hidden rows would have no softmax.
    let n_chunks = if pool.n_threads() == 1 || units >= want || mask.is_some() {
        1
    } else {
        want.div_ceil(units).min(seen / MIN_CHUNK).max(1)
    };
    let chunk = seen.div_ceil(n_chunks).next_multiple_of(16);
    if seen.div_ceil(chunk) == 1 {
        batch.whole_history(pool, out);
    } else {
        batch.chunked_history(pool, chunk, out);
    }
}

/// The inputs of one token-at-a-time call (decode), shared by its tasks.
struct Batch<'a> {
    k: Kernels,
    d: Dims,
    n_kv_heads: usize,
    q: &'a [f32],
    k_cache: KvSlice<'a>,
    v_cache: KvSlice<'a>,
    start_pos: usize,
    n_tokens: usize,
    mask: Option<&'a TreeMask>,
}

impl Batch<'_> {
    /// One task per (token, KV head), each over its token's whole visible history.
    fn whole_history(&self, pool: &ThreadPool, out: &mut [f32]) {
        let (d, n_kv_heads) = (&self.d, self.n_kv_heads);
        let q_dim = d.n_heads * d.head_dim;
        let outs = SharedMut::new(out);
        pool.run(self.n_tokens * n_kv_heads, &|task| {
            let (t, g) = (task / n_kv_heads, task % n_kv_heads);
            let len = self.start_pos + t + 1;
            let base = t * q_dim + g * d.group * d.head_dim;
            // SAFETY: task (t, g) alone owns the outputs of its heads of token t.
            let o = unsafe { outs.slice(base, d.group * d.head_dim) };
            let mut sums = [0f32; 1];
            let rows = Rows {
                range: 0..len,
                mask: self.mask.map(|m| (m, t)),
            };
            let (kc, vc) = (self.k_cache, self.v_cache);
            group_chunk(
                self.k,
                d,
                self.q,
                kc,
                vc,
                t,
                g,
                rows,
                o,
                &mut [],
                &mut sums,
                true,
            );
        });
    }

    /// Flash-decoding: the history split into `chunk`-position pieces, one task per (token,
    /// KV head, piece), whose partial softmax results are merged per token afterwards.
    fn chunked_history(&self, pool: &ThreadPool, chunk: usize, out: &mut [f32]) {
        let (d, n_kv_heads) = (&self.d, self.n_kv_heads);
        let (n_heads, head_dim) = (d.n_heads, d.head_dim);
        let q_dim = n_heads * head_dim;
        let n_chunks = (self.start_pos + self.n_tokens).div_ceil(chunk);
        let units = self.n_tokens * n_kv_heads;
        // Partials, per (token, chunk): outputs [n_heads * head_dim], then maxima and sums
        // [n_heads] each.
        let per = q_dim + 2 * n_heads;
        let outs = SharedMut::new(out);
        with_scratch(&PARTIALS, self.n_tokens * n_chunks * per, |parts| {
            let ps = SharedMut::new(parts);
            pool.run(units * n_chunks, &|task| {
                let (u, c) = (task / n_chunks, task % n_chunks);
                let (t, g) = (u / n_kv_heads, u % n_kv_heads);
                let len = self.start_pos + t + 1;
                let block = (t * n_chunks + c) * per;
                // SAFETY: task (t, g, c) alone owns its heads' slots of block (t, c).
                let o = unsafe { ps.slice(block + g * d.group * head_dim, d.group * head_dim) };
                let m = unsafe { ps.slice(block + q_dim + g * d.group, d.group) };
                let l = unsafe { ps.slice(block + q_dim + n_heads + g * d.group, d.group) };
                let rows = Rows {
                    range: (c * chunk).min(len)..((c + 1) * chunk).min(len),
                    mask: None,
                };
                let (kc, vc) = (self.k_cache, self.v_cache);
                group_chunk(self.k, d, self.q, kc, vc, t, g, rows, o, m, l, false);
            });
            pool.run(self.n_tokens, &|t| {
                // SAFETY: task t alone owns token t's outputs; partials are only read now.
                let o = unsafe { outs.slice(t * q_dim, q_dim) };
                let blocks = unsafe { ps.slice(t * n_chunks * per, n_chunks * per) };
                merge(o, blocks, n_heads, head_dim, per);
            });
        });
    }
}

/// The cache rows one task reads, and which of them its token may see (tree batches).
struct Rows<'a> {
    range: std::ops::Range<usize>,
    mask: Option<(&'a TreeMask, usize)>,
}

/// One task: query heads `g * group..` of token `t` over the cache rows `rows`.
///
/// With `normalize`, `o` receives the finished softmax-weighted values. Otherwise `o` gets the
/// values weighted by `e^(score - m)` unnormalized, with the chunk's max `m` and sum of weights
/// `l` per head (m = -inf, l = 0 for an empty range), for [`merge`].
#[allow(clippy::too_many_arguments)]
fn group_chunk(
    k: Kernels,
    d: &Dims,
    q: &[f32],
    k_cache: KvSlice<'_>,
    v_cache: KvSlice<'_>,
    t: usize,
    g: usize,
    rows: Rows<'_>,
    o: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    normalize: bool,
) {
    let range = rows.range;
    let np = range.len();
    if np == 0 {
        o.fill(0.0);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        return;
    }
    let hd = d.head_dim;
    let qg = &q[(t * d.n_heads + g * d.group) * hd..][..d.group * hd];
    let cache = |c| d.head_rows(c, g, range.start, np);
    with_scratch(&SCORES, d.group * np, |s| {
        with_f32_rows(k, cache(k_cache), |keys| k.scores(keys, qg, s));
        for (h, sh) in s.chunks_exact_mut(np).enumerate() {
            k.scale(sh, d.scale);
            let hidden = |i: usize| {
                rows.mask
                    .is_some_and(|(m, t)| !m.visible(t, range.start + i))
            };
            if rows.mask.is_some() {
                for (i, v) in sh.iter_mut().enumerate() {
                    if hidden(i) {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
            let max = k.max(sh);
            let mut sum = k.exp_sum(sh, max);
            if rows.mask.is_some() {
                // exp() clamps its input, so a hidden row would keep a weight of ~1e-45.
                for (i, v) in sh.iter_mut().enumerate() {
                    if hidden(i) {
                        sum -= *v;
                        *v = 0.0;
                    }
                }
            }
            if normalize {
                k.scale(sh, 1.0 / sum);
            } else {
                m[h] = max;
                l[h] = sum;
            }
        }
        with_f32_rows(k, cache(v_cache), |values| k.weighted_sum(values, s, o));
    });
}

/// Combines the chunks' partial results of one token into `out` (all heads).
pub(super) fn merge(out: &mut [f32], blocks: &[f32], n_heads: usize, head_dim: usize, per: usize) {
    let q_dim = n_heads * head_dim;
    for h in 0..n_heads {
        let maxes = blocks.chunks_exact(per).map(|b| b[q_dim + h]);
        let m = maxes.fold(f32::NEG_INFINITY, f32::max);
        let oh = &mut out[h * head_dim..(h + 1) * head_dim];
        oh.fill(0.0);
        let mut total = 0f32;
        for b in blocks.chunks_exact(per) {
            let (mc, lc) = (b[q_dim + h], b[q_dim + n_heads + h]);
            if lc == 0.0 {
                continue;
            }
            let w = (mc - m).exp();
            total += w * lc;
            for (o, &v) in oh.iter_mut().zip(&b[h * head_dim..(h + 1) * head_dim]) {
                *o += w * v;
            }
        }
        let inv = 1.0 / total;
        oh.iter_mut().for_each(|v| *v *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::Isa;
    use crate::backend::cpu::util::TestRng;

    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        kc: &[f32],
        vc: &[f32],
        nh: usize,
        nkv: usize,
        hd: usize,
        start: usize,
        n: usize,
        mask: Option<&TreeMask>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; n * nh * hd];
        let kv_dim = nkv * hd;
        for t in 0..n {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qv = &q[(t * nh + h) * hd..][..hd];
                let len = start + t + 1;
                let s: Vec<f64> = (0..len)
                    .filter(|&p| mask.is_none_or(|m| m.visible(t, p)))
                    .map(|p| {
                        let kr = &kc[p * kv_dim + kvh * hd..][..hd];
                        qv.iter()
                            .zip(kr)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let rows = (0..len).filter(|&p| mask.is_none_or(|m| m.visible(t, p)));
                for (p, ep) in rows.zip(&e) {
                    for d in 0..hd {
                        out[(t * nh + h) * hd + d] += ep / z * vc[p * kv_dim + kvh * hd + d] as f64;
                    }
                }
            }
        }
        out
    }

    fn to_f16(x: &[f32]) -> Vec<u16> {
        x.iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect()
    }

    fn from_f16(x: &[u16]) -> Vec<f32> {
        x.iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect()
    }

    fn kc_f32(x: KvSlice<'_>) -> Vec<f32> {
        (0..x.len()).map(|i| x.get(i)).collect()
    }

    #[test]
    fn attention_matches_reference() {
        let mut rng = TestRng::new(9);
        // (n_heads, n_kv_heads, head_dim, start_pos, n_tokens)
        let cases = [
            (1, 1, 1, 0, 1),
            (2, 2, 8, 0, 3),
            (9, 3, 64, 0, 1),
            (9, 3, 64, 37, 1),
            (9, 3, 64, 20, 5),
            (4, 1, 17, 3, 4),
            (8, 2, 80, 100, 2),
            (6, 2, 128, 0, 7),
            (4, 4, 70, 513, 1),
            (9, 3, 64, 700, 2),
            (8, 2, 128, 300, 1),
            (2, 1, 16, 250, 6),
            (32, 8, 64, 1000, 1),
            // Windows over several row chunks and token blocks.
            (9, 3, 64, 300, 40),
            (4, 2, 32, 0, 70),
            (8, 2, 128, 1000, 17),
            (3, 3, 8, 255, 2),
            // A long prompt chunk: token blocks whose causal end falls inside, before and
            // after each 256-row step (the rows past a block's last token are skipped).
            (4, 2, 16, 0, 600),
            (3, 1, 8, 10, 530),
        ];
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for isa in Isa::available() {
                let k = Kernels::new(isa);
                for &(nh, nkv, hd, start, n) in &cases {
                    let capacity = start + n + 3;
                    let q: Vec<f32> = rng.vec(n * nh * hd).iter().map(|v| v * 3.0).collect();
                    let kc: Vec<f32> = rng
                        .vec(capacity * nkv * hd)
                        .iter()
                        .map(|v| v * 3.0)
                        .collect();
                    let vc = rng.vec(capacity * nkv * hd);
                    // An f16 cache holds the values rounded to f16: the reference gets those.
                    let (kh, vh) = (to_f16(&kc), to_f16(&vc));
                    let (kr, vr) = (from_f16(&kh), from_f16(&vh));
                    for (kv, kc, vc) in [
                        ("f32", KvSlice::F32(&kc), KvSlice::F32(&vc)),
                        ("f16", KvSlice::F16(&kh), KvSlice::F16(&vh)),
                    ] {
                        let mut out = vec![f32::NAN; n * nh * hd];
                        attention_with(k, &pool, &q, kc, vc, nh, nkv, hd, start, n, None, &mut out);
                        let (kc, vc) = match kv {
                            "f32" => (&kc_f32(kc), &kc_f32(vc)),
                            _ => (&kr, &vr),
                        };
                        let want = reference(&q, kc, vc, nh, nkv, hd, start, n, None);
                        for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                            assert!(
                                (g as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()),
                                "{isa:?} {kv} threads={threads} case {:?} i={i}: got {g}, want {w}",
                                (nh, nkv, hd, start, n)
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tree_masked_attention_matches_reference() {
        let mut rng = TestRng::new(21);
        // Trees after a prefix: a root with 3 beams of depth 3, and a deep narrow one.
        let beams: Vec<Option<usize>> = std::iter::once(None)
            .chain((0..9).map(|i| Some(if i < 3 { 0 } else { i - 2 })))
            .collect();
        let chainy: Vec<Option<usize>> = std::iter::once(None)
            .chain((1..70).map(|i| Some(if i % 5 == 0 { i / 2 } else { i - 1 })))
            .collect();
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for isa in Isa::available() {
                let k = Kernels::new(isa);
                for (parents, prefix, batch_start, (nh, nkv, hd)) in [
                    (&beams, 7, 0, (9, 3, 64)),
                    (&beams, 300, 4, (4, 1, 17)),
                    (&chainy, 0, 0, (2, 2, 8)),
                    (&chainy, 40, 60, (8, 2, 80)),
                ] {
                    let mask = TreeMask::from_parents(prefix, parents, batch_start).unwrap();
                    let n = mask.n_tokens();
                    let rows = prefix + parents.len();
                    let q: Vec<f32> = rng.vec(n * nh * hd).iter().map(|v| v * 3.0).collect();
                    let kc: Vec<f32> = rng.vec(rows * nkv * hd).iter().map(|v| v * 3.0).collect();
                    let vc = rng.vec(rows * nkv * hd);
                    let mut out = vec![f32::NAN; n * nh * hd];
                    let start = mask.first_row();
                    attention_with(
                        k,
                        &pool,
                        &q,
                        KvSlice::F32(&kc),
                        KvSlice::F32(&vc),
                        nh,
                        nkv,
                        hd,
                        start,
                        n,
                        Some(&mask),
                        &mut out,
                    );
                    let want = reference(&q, &kc, &vc, nh, nkv, hd, start, n, Some(&mask));
                    for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (g as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()),
                            "{isa:?} threads={threads} prefix {prefix} i={i}: got {g}, want {w}"
                        );
                    }
                }
            }
        }
    }
}
