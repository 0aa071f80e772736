//! Element-wise activation ops. They touch a few KiB per call, so they run on the calling
//! thread; only the exp-heavy ones (silu, silu_mul) go through the SIMD tiers.

use super::kernels::Kernels;

/// Partial sums for the sum of squares; independent lanes let LLVM vectorize the reduction.
const LANES: usize = 16;

/// `out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight` per row of `weight.len()` elements.
pub(super) fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    assert!(d > 0, "rmsnorm: empty weight");
    assert_eq!(
        x.len() % d,
        0,
        "rmsnorm: x.len() not a multiple of weight.len()"
    );
    assert_eq!(out.len(), x.len(), "rmsnorm: out.len() != x.len()");
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mut acc = [0f32; LANES];
        let mut chunks = xr.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                acc[l] += c[l] * c[l];
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        let ss = acc.iter().sum::<f32>() + tail;
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        // Same order as the HF reference: normalize, then scale by the weight.
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * g;
        }
    }
}

/// `x[i] += y[i]`.
pub(super) fn add_inplace(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add_inplace: length mismatch");
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

pub(super) fn silu_mul_with(k: Kernels, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: gate and up lengths differ");
    k.silu_mul(gate, up);
}

/// `x[i] = silu(x[i])`: the SIMD silu_mul against ones (its exp is the cost), in chunks.
pub(super) fn silu_with(k: Kernels, x: &mut [f32]) {
    const ONES: [f32; 256] = [1.0; 256];
    for c in x.chunks_mut(ONES.len()) {
        let n = c.len();
        k.silu_mul(c, &ONES[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::Isa;
    use crate::backend::cpu::util::TestRng;

    /// Numerically stable softmax in place from the kernels attention uses (all `-inf` gives
    /// the uniform distribution).
    fn softmax_with(k: Kernels, x: &mut [f32]) {
        if x.is_empty() {
            return;
        }
        let max = k.max(x);
        if max == f32::NEG_INFINITY {
            x.fill(1.0 / x.len() as f32);
            return;
        }
        let sum = k.exp_sum(x, max);
        k.scale(x, 1.0 / sum);
    }

    fn close(got: f32, want: f64, rel: f64, what: &str) {
        let tol = rel * want.abs() + 1e-37;
        assert!(
            (got as f64 - want).abs() <= tol
                || (got.is_nan() && want.is_nan())
                || got as f64 == want,
            "{what}: got {got}, want {want}"
        );
    }

    #[test]
    fn rmsnorm_matches_reference() {
        let mut rng = TestRng::new(1);
        for d in [1, 5, 16, 17, 576] {
            for n in [1, 3] {
                let x: Vec<f32> = rng.vec(n * d).iter().map(|v| v * 10.0).collect();
                let w = rng.vec(d);
                let mut out = vec![0.0; n * d];
                rmsnorm(&x, &w, 1e-5, &mut out);
                for t in 0..n {
                    let row = &x[t * d..(t + 1) * d];
                    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
                    let inv = 1.0 / (ms + 1e-5).sqrt();
                    for i in 0..d {
                        close(
                            out[t * d + i],
                            row[i] as f64 * inv * w[i] as f64,
                            1e-5,
                            "rmsnorm",
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn add_inplace_adds() {
        let mut a = vec![1.0, 2.0, 3.0];
        add_inplace(&mut a, &[0.5, -2.0, 1.0]);
        assert_eq!(a, [1.5, 0.0, 4.0]);
    }

    #[test]
    fn silu_mul_matches_reference_all_tiers() {
        let mut rng = TestRng::new(2);
        for isa in Isa::available() {
            let k = Kernels::new(isa);
            for n in [0, 1, 7, 8, 16, 31, 1536] {
                let mut g: Vec<f32> = rng.vec(n).iter().map(|v| v * 20.0).collect();
                if n > 4 {
                    g[0] = -100.0;
                    g[1] = 100.0;
                    g[2] = -88.5;
                    g[3] = 0.0;
                }
                let u = rng.vec(n);
                let want: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64)
                    .collect();
                silu_mul_with(k, &mut g, &u);
                for i in 0..n {
                    close(g[i], want[i], 1e-6, &format!("{isa:?} silu n={n} i={i}"));
                }
            }
        }
    }

    #[test]
    fn softmax_matches_reference_all_tiers() {
        let mut rng = TestRng::new(3);
        for isa in Isa::available() {
            let k = Kernels::new(isa);
            for n in [1, 2, 7, 8, 9, 16, 17, 100, 513] {
                for scale in [1.0f32, 30.0] {
                    let mut x: Vec<f32> = rng.vec(n).iter().map(|v| v * scale).collect();
                    if n > 3 {
                        x[1] = f32::NEG_INFINITY;
                    }
                    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
                    let s: f64 = e.iter().sum();
                    softmax_with(k, &mut x);
                    for i in 0..n {
                        let want = e[i] / s;
                        assert!(
                            (x[i] as f64 - want).abs() <= 2e-6 * want + 1e-12,
                            "{isa:?} softmax n={n} i={i}: got {}, want {want}",
                            x[i]
                        );
                    }
                }
            }
            let mut all_masked = vec![f32::NEG_INFINITY; 4];
            softmax_with(k, &mut all_masked);
            assert_eq!(all_masked, [0.25; 4]);
        }
    }

    /// The tiers' exp approximations over the whole normal f32 range, seen through silu
    /// (`g / (1 + e^-g)` with up = 1), which uses e^-g for g from -87 to +87.
    #[test]
    fn exp_is_accurate_over_its_range() {
        for isa in Isa::available() {
            let k = Kernels::new(isa);
            let g: Vec<f32> = (0..4000).map(|i| -87.0 + i as f32 * 0.0437).collect();
            let mut out = g.clone();
            silu_mul_with(k, &mut out, &vec![1.0; g.len()]);
            for (i, &gv) in g.iter().enumerate() {
                let want = gv as f64 / (1.0 + (-gv as f64).exp());
                close(out[i], want, 1e-6, &format!("{isa:?} exp via silu at {gv}"));
            }
        }
    }
}
