//! Dot products of weight rows with one activation vector (the decode matvec, the up and gate
//! products of neuron bundles), and dtype conversion.

// Kernels index several per-row accumulator arrays in lockstep; `for i in 0..R` reads best.
#![allow(clippy::needless_range_loop)]

use super::{elem_size, load_block, load_w, load_w_partial, with_dtype, BF16};
use crate::backend::cpu::kernels::RowStarts;
use crate::backend::cpu::tier::Tier;
use crate::tensor::DType;

/// [`convert`] of `out.len() / cols` rows of `cols` elements, `stride` elements apart in `src`,
/// packed into `out`.
#[inline(always)]
pub(in crate::backend::cpu) fn convert_rows<T: Tier>(
    t: T,
    src: &[u8],
    dtype: DType,
    stride: usize,
    cols: usize,
    out: &mut [f32],
) {
    let esz = dtype.size();
    for (p, row) in out.chunks_exact_mut(cols.max(1)).enumerate() {
        convert(t, &src[p * stride * esz..], dtype, row);
    }
}

/// `out[i] = src[i]` as f32; `src` holds at least `out.len()` elements of `dtype`, any alignment.
#[inline(always)]
pub(in crate::backend::cpu) fn convert<T: Tier>(t: T, src: &[u8], dtype: DType, out: &mut [f32]) {
    let n = out.len();
    assert!(src.len() >= dtype.bytes_for(n));
    let (s, o) = (src.as_ptr(), out.as_mut_ptr());
    if dtype.is_quantized() {
        // Block de-quantization (the reference): gemm converts a row block once per 64 tokens.
        crate::tensor::quant::dequantize(dtype, &src[..dtype.bytes_for(n)], out);
        return;
    }
    if dtype == DType::F32 {
        // SAFETY: both buffers hold n floats' bytes (asserted).
        unsafe { std::ptr::copy_nonoverlapping(s, o as *mut u8, n * 4) };
        return;
    }
    with_dtype!(dtype, D => {
        let esz = elem_size(D);
        let mut i = 0;
        // SAFETY (all loads and stores): i + LANES <= n, or partial to n; both hold n elements.
        while i + T::LANES <= n {
            unsafe { t.store(o.add(i), load_w::<T, D>(t, s.add(esz * i))) };
            i += T::LANES;
        }
        if i < n {
            let v = unsafe { load_w_partial::<T, D>(t, s.add(esz * i), n - i) };
            unsafe { t.store_partial(o.add(i), n - i, v) };
        }
    })
}

/// `R` bf16 rows (at `w[i]`, `cols` long) dotted with `xp`, x in the de-interleaved layout of
/// `Kernels::prep_x_tokens` (padded to whole blocks): see `Tier::load_bf16_split`.
///
/// # Safety
/// Every `w[i]` readable for `cols` bf16, `xp` for `cols` rounded up to whole blocks.
#[inline(always)]
pub(super) unsafe fn bf16_rows<T: Tier, const R: usize>(
    t: T,
    w: [*const u8; R],
    cols: usize,
    xp: *const f32,
) -> [f32; R] {
    let block = T::BF16_BLOCK;
    let mut ae = [t.zero(); R];
    let mut ao = [t.zero(); R];
    let nb = cols / block;
    // SAFETY: caller contract; the last block's weights are read only up to `cols`.
    unsafe {
        for b in 0..nb {
            bf16_block(t, &mut ae, &mut ao, w, xp, b, block);
        }
        if !cols.is_multiple_of(block) {
            bf16_block(t, &mut ae, &mut ao, w, xp, nb, cols % block);
        }
    }
    let mut out = [0f32; R];
    for i in 0..R {
        out[i] = t.sum(t.add(ae[i], ao[i]));
    }
    out
}

/// Block `b` of [`bf16_rows`]: its first `n` columns (all of them if `n` is the block size).
///
/// # Safety
/// As [`bf16_rows`], for this block.
#[inline(always)]
unsafe fn bf16_block<T: Tier, const R: usize>(
    t: T,
    ae: &mut [T::V; R],
    ao: &mut [T::V; R],
    w: [*const u8; R],
    xp: *const f32,
    b: usize,
    n: usize,
) {
    let block = T::BF16_BLOCK;
    // SAFETY: caller contract.
    unsafe {
        let xe = t.load(xp.add(block * b));
        let xo = t.load(xp.add(block * b + T::LANES));
        for i in 0..R {
            let p = w[i].add(2 * block * b);
            let (e, o) = if n >= block {
                t.load_bf16_split(p)
            } else {
                t.load_bf16_split_partial(p, n)
            };
            ae[i] = t.mul_add(e, xe, ae[i]);
            ao[i] = t.mul_add(o, xo, ao[i]);
        }
    }
}

/// `R` f16 or f32 rows (dtype `D`, at `w[i]`, `cols` long) dotted with `x` (natural order).
///
/// # Safety
/// Every `w[i]` readable for `cols` elements, `x` for `cols` floats.
#[inline(always)]
unsafe fn wide_rows<T: Tier, const D: u8, const R: usize>(
    t: T,
    w: [*const u8; R],
    cols: usize,
    x: *const f32,
) -> [f32; R] {
    let esz = elem_size(D);
    let l = T::LANES;
    let mut a0 = [t.zero(); R];
    let mut a1 = [t.zero(); R];
    let mut c = 0;
    // SAFETY: c + 2 * LANES <= cols in the first loop; partial to cols in the second.
    unsafe {
        while c + 2 * l <= cols {
            let x0 = t.load(x.add(c));
            let x1 = t.load(x.add(c + l));
            for i in 0..R {
                let (w0, w1) = load_block::<T, D>(t, w[i].add(esz * c));
                a0[i] = t.mul_add(w0, x0, a0[i]);
                a1[i] = t.mul_add(w1, x1, a1[i]);
            }
            c += 2 * l;
        }
        while c < cols {
            let n = cols - c;
            let x0 = t.load_partial(x.add(c), n);
            for i in 0..R {
                a0[i] = t.mul_add(load_w_partial::<T, D>(t, w[i].add(esz * c), n), x0, a0[i]);
            }
            c += l;
        }
    }
    let mut out = [0f32; R];
    for i in 0..R {
        out[i] = t.sum(t.add(a0[i], a1[i]));
    }
    out
}

/// [`matvec`] of a matrix: row r at element `r * stride`.
#[inline(always)]
pub(in crate::backend::cpu) fn matvec_strided<T: Tier>(
    t: T,
    w: &[u8],
    dtype: DType,
    stride: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    matvec(t, w, dtype, RowStarts::Strided(stride), cols, x, y);
}

/// [`matvec`] of rows at the byte offsets `offsets[r]` (neurons of a bundle matrix).
#[inline(always)]
pub(in crate::backend::cpu) fn matvec_at<T: Tier>(
    t: T,
    w: &[u8],
    dtype: DType,
    offsets: &[usize],
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    matvec(t, w, dtype, RowStarts::At(offsets), cols, x, y);
}

/// `y[r] = dot(row r, x)` for `r < y.len()`: rows of `cols` elements of `w`, starting where
/// `rows` says. For bf16, `x` must come from `Kernels::prep_x_tokens`; otherwise it is plain
/// (len >= cols). Each entry point instantiates one kind of rows: with both in one function
/// the register allocator spilled a pointer of the inner loop.
#[inline(always)]
pub(super) fn matvec<T: Tier>(
    t: T,
    w: &[u8],
    dtype: DType,
    rows: RowStarts,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let n = y.len();
    if n == 0 {
        return;
    }
    let (esz, wp) = (dtype.size(), w.as_ptr());
    match rows {
        RowStarts::Strided(stride) => {
            assert!(w.len() >= ((n - 1) * stride + cols) * esz);
            // SAFETY: every row r < n lies inside `w` (asserted above).
            unsafe { rows_dot(t, |r| wp.add(r * stride * esz), dtype, cols, x, y) }
        }
        RowStarts::At(offsets) => {
            let len = cols * esz;
            assert!(offsets.len() >= n && offsets[..n].iter().all(|&o| o + len <= w.len()));
            // SAFETY: every listed row lies inside `w` (asserted above).
            unsafe { rows_dot(t, |r| wp.add(offsets[r]), dtype, cols, x, y) }
        }
    }
}

/// `y[r] = dot(row(r), x)` for `r < y.len()`.
///
/// # Safety
/// `row(r)` must point at `cols` readable elements of `dtype` for every `r < y.len()`.
#[inline(always)]
unsafe fn rows_dot<T: Tier>(
    t: T,
    row: impl Fn(usize) -> *const u8,
    dtype: DType,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let padded = match dtype {
        DType::BF16 => cols.div_ceil(T::BF16_BLOCK) * T::BF16_BLOCK,
        _ => cols,
    };
    assert!(x.len() >= padded);
    // SAFETY: the caller's contract covers every row pointer; x asserted.
    with_dtype!(dtype, D => unsafe { row_groups::<T, D>(t, row, cols, x.as_ptr(), y) })
}

/// Drives [`rows_dot`] 4 rows at a time, then the last `rows % 4` one by one.
///
/// The 4 rows computed together are `j, q + j, 2q + j, 3q + j` (q = rows / 4), not 4
/// adjacent rows: that makes 4 long sequential streams through memory, which the hardware
/// prefetchers follow at full DRAM bandwidth, whereas 4 adjacent short rows (1 KiB each for
/// a 576-wide bf16 matrix) read in lockstep look like interleaved jumps and measured 2x
/// slower when the weights come from DRAM.
///
/// # Safety
/// As [`rows_dot`], with `x` long enough for dtype `D`.
#[inline(always)]
unsafe fn row_groups<T: Tier, const D: u8>(
    t: T,
    row: impl Fn(usize) -> *const u8,
    cols: usize,
    x: *const f32,
    y: &mut [f32],
) {
    let rows = y.len();
    let q = rows / 4;
    // SAFETY: caller contract.
    unsafe {
        for j in 0..q {
            let w = [row(j), row(q + j), row(2 * q + j), row(3 * q + j)];
            let v = rows_of::<T, D, 4>(t, w, cols, x);
            y[j] = v[0];
            y[q + j] = v[1];
            y[2 * q + j] = v[2];
            y[3 * q + j] = v[3];
        }
        for (r, out) in y.iter_mut().enumerate().skip(4 * q) {
            *out = rows_of::<T, D, 1>(t, [row(r)], cols, x)[0];
        }
    }
}

/// `R` rows of dtype `D` dotted with x (prepared for bf16).
///
/// # Safety
/// As [`bf16_rows`] or [`wide_rows`].
#[inline(always)]
unsafe fn rows_of<T: Tier, const D: u8, const R: usize>(
    t: T,
    w: [*const u8; R],
    cols: usize,
    x: *const f32,
) -> [f32; R] {
    // SAFETY: caller contract.
    unsafe {
        if D == BF16 {
            bf16_rows::<T, R>(t, w, cols, x)
        } else {
            wide_rows::<T, D, R>(t, w, cols, x)
        }
    }
}
