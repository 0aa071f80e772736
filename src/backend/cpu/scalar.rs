//! Portable tier: the fallback on machines without AVX2 and the reference the SIMD tiers are
//! tested against. Written so LLVM can still vectorize it with the baseline ISA (independent
//! partial sums, no loop-carried float dependency on a single accumulator).
//!
//! The public functions here are the same entry points as those of `simd` (`Kernels` calls
//! one or the other), without the tier argument.

use super::kernels::{RowStarts, StridedRows, TierLayout};
use super::neurons::Bundles;
use crate::tensor::DType;

/// Partial sums per dot product; 8 lanes let SSE2 keep two vectors of work in flight.
const LANES: usize = 8;

#[inline]
fn bf16_to_f32(lo: u8, hi: u8) -> f32 {
    f32::from_bits((u16::from_le_bytes([lo, hi]) as u32) << 16)
}

#[inline]
fn f16_to_f32(lo: u8, hi: u8) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

/// No de-interleaved bf16 layout, no streamed multi-token kernel.
pub(super) fn layout() -> TierLayout {
    TierLayout {
        bf16_block: None,
        streamed_max_tokens: 0,
        bf16_split_down: false,
    }
}

/// `out[i] = src[i]` as f32; `src` holds at least `out.len()` elements of `dtype`.
pub(super) fn convert(src: &[u8], dtype: DType, out: &mut [f32]) {
    convert_exact(&src[..dtype.bytes_for(out.len())], dtype, out);
}

/// Rows of `cols` elements, `stride` elements apart in `src`, converted into `out` packed.
pub(super) fn convert_rows(src: &[u8], dtype: DType, stride: usize, cols: usize, out: &mut [f32]) {
    let esz = dtype.size();
    for (p, row) in out.chunks_exact_mut(cols.max(1)).enumerate() {
        convert(&src[p * stride * esz..], dtype, row);
    }
}

/// [`convert`] of `src.len() == dtype.bytes_for(out.len())` bytes.
fn convert_exact(src: &[u8], dtype: DType, out: &mut [f32]) {
    debug_assert_eq!(src.len(), dtype.bytes_for(out.len()));
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16_to_f32(b[0], b[1]);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16_to_f32(b[0], b[1]);
            }
        }
        quantized => {
            crate::tensor::quant::dequantize(quantized, src, out);
        }
    }
}

/// Dot product of one stored row (`x.len()` elements) with `x`. The row is converted in
/// short chunks into a stack buffer first: separate, branch-free conversion and dot loops
/// autovectorize, a per-element `load` in the dot loop does not (measured ~5x slower).
fn dot_row(row: &[u8], dtype: DType, x: &[f32]) -> f32 {
    const CHUNK: usize = 64;
    let size = dtype.size();
    let mut buf = [0f32; CHUNK];
    let mut acc = [0f32; LANES];
    let mut tail = 0f32;
    for (i, xs) in x.chunks(CHUNK).enumerate() {
        let n = xs.len();
        let start = i * CHUNK * size;
        convert_exact(&row[start..start + n * size], dtype, &mut buf[..n]);
        let mut wc = buf[..n].chunks_exact(LANES);
        let mut xc = xs.chunks_exact(LANES);
        for (wl, xl) in (&mut wc).zip(&mut xc) {
            for l in 0..LANES {
                acc[l] += wl[l] * xl[l];
            }
        }
        tail += wc
            .remainder()
            .iter()
            .zip(xc.remainder())
            .map(|(a, b)| a * b)
            .sum::<f32>();
    }
    acc.iter().sum::<f32>() + tail
}

/// `y[r] = dot(row r, x)` for `r < y.len()`, rows of `cols` elements `stride` apart.
pub(super) fn matvec_strided(
    w: &[u8],
    dtype: DType,
    stride: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    matvec(w, dtype, RowStarts::Strided(stride), cols, x, y);
}

/// `y[r] = dot(row r, x)` for `r < y.len()`, rows of `cols` elements at byte `offsets[r]`.
pub(super) fn matvec_at(
    w: &[u8],
    dtype: DType,
    offsets: &[usize],
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    matvec(w, dtype, RowStarts::At(offsets), cols, x, y);
}

/// `y[r] = dot(row r, x)` for `r < y.len()`, rows of `cols` elements starting where `rows`
/// says.
fn matvec(w: &[u8], dtype: DType, rows: RowStarts, cols: usize, x: &[f32], y: &mut [f32]) {
    let size = dtype.size();
    let (x, len) = (&x[..cols], cols * size);
    for (r, out) in y.iter_mut().enumerate() {
        let start = match rows {
            RowStarts::Strided(stride) => r * stride * size,
            RowStarts::At(offsets) => offsets[r],
        };
        *out = dot_row(&w[start..start + len], dtype, x);
    }
}

/// f32 dot product.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0f32; LANES];
    let full = n / LANES * LANES;
    for (ac, bc) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += ac[l] * bc[l];
        }
    }
    let tail: f32 = a[full..n].iter().zip(&b[full..n]).map(|(p, q)| p * q).sum();
    acc.iter().sum::<f32>() + tail
}

/// Tiled (`gemm`) block: `y[t * ldy + r] (+)= dot(a row r, x row t)` for `r < a.n`,
/// `t < x.n`, over `k = a.cols` columns.
///
/// # Safety
/// `y` must be valid for writes at every `t * ldy + r` above, and no other thread may access
/// those elements during the call.
pub(super) unsafe fn gemm_block(
    a: StridedRows,
    x: StridedRows,
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
) {
    let k = a.cols;
    for t in 0..x.n {
        let xr = &x.data[t * x.stride..t * x.stride + k];
        for r in 0..a.n {
            let v = dot(&a.data[r * a.stride..r * a.stride + k], xr);
            // SAFETY: in bounds and exclusively ours per the contract above.
            let o = unsafe { &mut *y.add(t * ldy + r) };
            *o = if accumulate { *o + v } else { v };
        }
    }
}

/// Attention scores of the `g = s.len() / keys.n` query heads `q[h * keys.cols..]` that share
/// one KV head: `s[h * keys.n + p] = dot(key row p, q_h)`.
pub(super) fn scores(keys: StridedRows, q: &[f32], s: &mut [f32]) {
    let StridedRows {
        data,
        stride,
        cols,
        n,
    } = keys;
    if n == 0 {
        return;
    }
    for (h, sh) in s.chunks_exact_mut(n).enumerate() {
        let qh = &q[h * cols..(h + 1) * cols];
        for (p, out) in sh.iter_mut().enumerate() {
            *out = dot(&data[p * stride..p * stride + cols], qh);
        }
    }
}

/// Attention's P·V for the `g = w.len() / v.n` heads sharing one KV head:
/// `out[h * v.cols + c] = sum_p w[h * v.n + p] * (value row p)[c]`.
pub(super) fn weighted_sum(v: StridedRows, w: &[f32], out: &mut [f32]) {
    if v.n == 0 {
        out.fill(0.0);
        return;
    }
    for (wh, oh) in w.chunks_exact(v.n).zip(out.chunks_exact_mut(v.cols)) {
        head_weighted_sum(v.data, v.stride, wh, oh);
    }
}

/// One head of [`weighted_sum`]: `out[c] = sum_p weights[p] * v[p * stride + c]`.
fn head_weighted_sum(v: &[f32], stride: usize, weights: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    let cols = out.len();
    for (p, &wt) in weights.iter().enumerate() {
        let row = &v[p * stride..p * stride + cols];
        for (o, &vv) in out.iter_mut().zip(row) {
            *o += wt * vv;
        }
    }
}

/// Largest element (-inf for an empty slice).
pub(super) fn max(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `x[i] *= s`.
pub(super) fn scale(x: &mut [f32], s: f32) {
    x.iter_mut().for_each(|v| *v *= s);
}

/// `x[i] = e^(x[i] - shift)`; returns the sum of the new values.
pub(super) fn exp_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}

/// `gate[i] = silu(gate[i]) * up[i]`.
pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `out[c] += sum_r coeffs[r] * row_r[c]`, row r starting at the byte offset `offsets[r]` of `w`.
fn accumulate_rows(w: &[u8], offsets: &[usize], dtype: DType, coeffs: &[f32], out: &mut [f32]) {
    const CHUNK: usize = 64;
    let size = dtype.size();
    let mut buf = [0f32; CHUNK];
    for (r, &coef) in coeffs.iter().enumerate() {
        for (i, oc) in out.chunks_mut(CHUNK).enumerate() {
            let start = offsets[r] + i * CHUNK * size;
            let n = oc.len();
            convert_exact(&w[start..start + n * size], dtype, &mut buf[..n]);
            for (o, &v) in oc.iter_mut().zip(&buf[..n]) {
                *o += coef * v;
            }
        }
    }
}

/// [`accumulate_rows`] of `cols`-wide rows into `out[..cols]` (no split layout here).
pub(super) fn accumulate_rows_in(
    w: &[u8],
    offsets: &[usize],
    dtype: DType,
    cols: usize,
    coeffs: &[f32],
    out: &mut [f32],
) {
    accumulate_rows(w, offsets, dtype, coeffs, &mut out[..cols]);
}

/// No fused CATS kernel here: the caller takes the generic path.
pub(super) fn kept_up_down(
    _: Bundles,
    _: &[u32],
    _: &[f32],
    _: Option<&[f32]>,
    _: &[f32],
    _: &mut [f32],
) -> bool {
    false
}

/// Not on this tier: `layout()` has no streamed kernel, so `matmul` never asks.
///
/// # Safety
/// None needed; it does nothing but stop.
pub(super) unsafe fn matmul_tokens(
    _: &[u8],
    _: DType,
    _: usize,
    _: StridedRows,
    _: *mut f32,
    _: usize,
) {
    unreachable!("the scalar tier has no streamed multi-token kernel");
}

/// Not on this tier: `layout()` has no de-interleaved bf16 layout, so nobody asks.
pub(super) fn split_bf16_x(_: &[f32], _: &mut [f32]) {
    unreachable!("the scalar tier has no de-interleaved bf16 layout");
}
