//! Causal multi-head attention over a KV cache (decode and multi-token prefill/verify).

use std::cell::RefCell;

use super::isa::Isa;
use super::kernels::Kernels;
use super::pool::ThreadPool;
use super::util::{with_scratch, SharedMut};
use crate::dtype::DType;

thread_local! {
    /// Each thread's attention scores for the (token, head) it is working on.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// See [`super::attention`]. One task per (token, head): scores = K·q (the f32 matvec kernel
/// with the cache's row stride), softmax, then out = Pᵀ·V with the output in registers.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_with(
    k: Kernels,
    pool: &ThreadPool,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    start_pos: usize,
    n_tokens: usize,
    out: &mut [f32],
) {
    assert!(n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads), "attention: n_heads must be a multiple of n_kv_heads");
    let q_dim = n_heads * head_dim;
    let kv_dim = n_kv_heads * head_dim;
    let seen = start_pos + n_tokens;
    assert_eq!(q.len(), n_tokens * q_dim, "attention: q.len() != n_tokens * n_heads * head_dim");
    assert_eq!(out.len(), n_tokens * q_dim, "attention: out.len() != n_tokens * n_heads * head_dim");
    assert!(k_cache.len() >= seen * kv_dim, "attention: k_cache holds fewer than start_pos + n_tokens rows");
    assert!(v_cache.len() >= seen * kv_dim, "attention: v_cache holds fewer than start_pos + n_tokens rows");
    if n_tokens == 0 || head_dim == 0 {
        return;
    }
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let outs = SharedMut::new(out);
    pool.run(n_tokens * n_heads, &|task| {
        let (t, h) = (task / n_heads, task % n_heads);
        let kvh = h / group;
        let len = start_pos + t + 1;
        let qv = &q[t * q_dim + h * head_dim..][..head_dim];
        with_scratch(&SCORES, len, |s| {
            scores(k, &k_cache[kvh * head_dim..seen * kv_dim], kv_dim, head_dim, qv, s);
            s.iter_mut().for_each(|v| *v *= scale);
            k.softmax(s);
            // SAFETY: task (t, h) alone owns this head's slot of token t.
            let o = unsafe { outs.slice(t * q_dim + h * head_dim, head_dim) };
            k.weighted_sum(&v_cache[kvh * head_dim..seen * kv_dim], kv_dim, s, o);
        });
    });
}

/// `s[p] = dot(keys[p * stride..][..cols], q)` for `p < s.len()`.
fn scores(k: Kernels, keys: &[f32], stride: usize, cols: usize, q: &[f32], s: &mut [f32]) {
    if k.isa() == Isa::Scalar {
        // Native f32s, so this stays right on big-endian targets too (the byte kernels read
        // little-endian, which is what checkpoints store).
        for (p, out) in s.iter_mut().enumerate() {
            *out = super::scalar::dot(&keys[p * stride..p * stride + cols], q);
        }
        return;
    }
    // SAFETY: any initialized memory may be viewed as bytes; SIMD tiers exist only on x86_64,
    // which is little-endian, so the bytes are the f32 encoding the kernel expects.
    let bytes = unsafe { std::slice::from_raw_parts(keys.as_ptr() as *const u8, std::mem::size_of_val(keys)) };
    k.matvec(bytes, DType::F32, stride, cols, q, s);
}

#[cfg(test)]
mod tests {
    use super::*;
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
    ) -> Vec<f64> {
        let mut out = vec![0f64; n * nh * hd];
        let kv_dim = nkv * hd;
        for t in 0..n {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qv = &q[(t * nh + h) * hd..][..hd];
                let len = start + t + 1;
                let s: Vec<f64> = (0..len)
                    .map(|p| {
                        let kr = &kc[p * kv_dim + kvh * hd..][..hd];
                        qv.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (p, ep) in e.iter().enumerate() {
                    for d in 0..hd {
                        out[(t * nh + h) * hd + d] += ep / z * vc[p * kv_dim + kvh * hd + d] as f64;
                    }
                }
            }
        }
        out
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
        ];
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for isa in Isa::available() {
                let k = Kernels::new(isa);
                for &(nh, nkv, hd, start, n) in &cases {
                    let capacity = start + n + 3;
                    let q: Vec<f32> = rng.vec(n * nh * hd).iter().map(|v| v * 3.0).collect();
                    let kc: Vec<f32> = rng.vec(capacity * nkv * hd).iter().map(|v| v * 3.0).collect();
                    let vc = rng.vec(capacity * nkv * hd);
                    let mut out = vec![f32::NAN; n * nh * hd];
                    attention_with(k, &pool, &q, &kc, &vc, nh, nkv, hd, start, n, &mut out);
                    let want = reference(&q, &kc, &vc, nh, nkv, hd, start, n);
                    for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (g as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()),
                            "{isa:?} threads={threads} case {:?} i={i}: got {g}, want {w}",
                            (nh, nkv, hd, start, n)
                        );
                    }
                }
            }
        }
    }
}
