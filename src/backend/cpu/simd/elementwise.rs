//! Element-wise kernels: the softmax steps of attention (max, exp and sum, scale) and the
//! SwiGLU activation, around one vectorized e^x.

use crate::backend::cpu::tier::Tier;

/// e^x per lane, ~1 ulp on the normal range: Cody-Waite reduction x = n ln2 + r, a degree-6
/// polynomial for e^r on |r| <= ln2/2, then `Tier::mul_pow2` for 2^n.
#[inline(always)]
fn exp<T: Tier>(t: T, x: T::V) -> T::V {
    // Operand order keeps NaN inputs NaN (min/max return the second operand on NaN).
    let x = t.max(t.splat(-104.0), t.min(t.splat(89.0), x));
    let n = t.round(t.mul(x, t.splat(std::f32::consts::LOG2_E)));
    let r = t.neg_mul_add(n, t.splat(0.693_359_4), x);
    let r = t.neg_mul_add(n, t.splat(-2.121_944_4e-4), r);
    let mut p = t.splat(1.987_569_1e-4);
    p = t.mul_add(p, r, t.splat(1.398_199_9e-3));
    p = t.mul_add(p, r, t.splat(8.333_452e-3));
    p = t.mul_add(p, r, t.splat(4.166_579_6e-2));
    p = t.mul_add(p, r, t.splat(0.166_666_65));
    p = t.mul_add(p, r, t.splat(0.5));
    let e = t.mul_add(p, t.mul(r, r), t.add(r, t.splat(1.0)));
    t.mul_pow2(e, n)
}

/// Largest element (-inf for an empty slice).
#[inline(always)]
pub(in crate::backend::cpu) fn max<T: Tier>(t: T, x: &[f32]) -> f32 {
    let full = x.len() / T::LANES * T::LANES;
    let mut vmax = t.splat(f32::NEG_INFINITY);
    for i in (0..full).step_by(T::LANES) {
        // SAFETY: a whole vector inside `x`.
        vmax = t.max(vmax, unsafe { t.load(x.as_ptr().add(i)) });
    }
    t.max_with_tail(vmax, &x[full..])
}

/// `x[i] = e^(x[i] - shift)`; returns the sum of the new values.
#[inline(always)]
pub(in crate::backend::cpu) fn exp_sum<T: Tier>(t: T, x: &mut [f32], shift: f32) -> f32 {
    let n = x.len();
    let p = x.as_mut_ptr();
    let vs = t.splat(shift);
    let mut vsum = t.zero();
    for i in (0..n).step_by(T::LANES) {
        // SAFETY: partial to n.
        unsafe {
            let e = exp(t, t.sub(t.load_partial(p.add(i), n - i), vs));
            // The padding lanes hold e^(0 - shift); only the stored ones count.
            let e = t.keep_first(e, n - i);
            vsum = t.add(vsum, e);
            t.store_partial(p.add(i), n - i, e);
        }
    }
    t.sum(vsum)
}

/// `x[i] *= s`.
#[inline(always)]
pub(in crate::backend::cpu) fn scale<T: Tier>(t: T, x: &mut [f32], s: f32) {
    let vs = t.splat(s);
    let (n, p) = (x.len(), x.as_mut_ptr());
    for i in (0..n).step_by(T::LANES) {
        // SAFETY: partial to n.
        unsafe { t.store_partial(p.add(i), n - i, t.mul(t.load_partial(p.add(i), n - i), vs)) };
    }
}

/// `gate[i] = gate[i] / (1 + e^-gate[i]) * up[i]`.
#[inline(always)]
pub(in crate::backend::cpu) fn silu_mul<T: Tier>(t: T, gate: &mut [f32], up: &[f32]) {
    let n = gate.len();
    assert!(up.len() >= n);
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let one = t.splat(1.0);
    for i in (0..n).step_by(T::LANES) {
        // SAFETY: partial to n; both slices hold n.
        unsafe {
            let gv = t.load_partial(g.add(i), n - i);
            let uv = t.load_partial(u.add(i), n - i);
            let den = t.add(one, exp(t, t.sub(t.zero(), gv)));
            t.store_partial(g.add(i), n - i, t.mul(t.div(gv, den), uv));
        }
    }
}
