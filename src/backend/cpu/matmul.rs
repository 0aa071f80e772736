//! Weight x activation products, plus dtype conversion helpers. Four paths:
//! - `matvec` (n_tokens == 1, decode): memory bound, streams the weights once.
//! - `quant_batch` (2-16 tokens of a quantized matrix with integer kernels): decode's integer
//!   products, each row block read once for all the tokens.
//! - `streamed` (n_tokens > 1; AVX-512, AVX2 up to 64 tokens): streams weight rows like the
//!   matvec and applies each group of 4 rows to several tokens while it is in L1; memory bound
//!   up to ~4 tokens, then ~88% of FMA peak on AVX-512.
//! - `gemm` (otherwise): converts blocks of weight rows to f32 once into a per-thread scratch
//!   and tiles them against the tokens.

use std::cell::RefCell;

use super::kernels::{Kernels, RowStarts, StridedRows};
use super::pool::ThreadPool;
use super::quant;
use super::quant_batch;
use super::util::{with_scratch, with_scratch_vec, SharedMut};
use crate::tensor::DType;

/// Decode tasks per thread: a few, so a thread that got delayed (OS noise, a cold cache) does
/// not hold up the others, yet few enough that per-task costs stay invisible.
const DECODE_TASKS_PER_THREAD: usize = 4;
/// Below this many weight bytes per task a matvec is split no further: waking a thread costs
/// more than streaming this from L2.
const DECODE_MIN_TASK_BYTES: usize = 32 << 10;
/// Row chunks per thread of the streamed multi-token path: fewer than decode's, because each
/// chunk start costs a ramp-up of its 4 row streams (prefetchers, `PREFETCH_BYTES` in the
/// tiers) that a 2-16 token pass, busier computing, hides less well. Measured on SmolLM2
/// shapes, 2 threads, 2-8 tokens: 2 per thread ~5-10% faster than 4, 1 no better than 2.
const STREAMED_TASKS_PER_THREAD: usize = 2;

/// Tokens per pass of the streamed multi-token path are limited so that their activations
/// (re-read for every group of 4 weight rows) stay within this many bytes, i.e. in L2.
const STREAMED_X_BYTES: usize = 256 << 10;

/// `gemm`: weight rows converted to f32 together (one task's row block) ...
const GEMM_ROWS: usize = 16;
/// ... against this many tokens (one task's token block); the conversion is amortized over them.
const GEMM_TOKENS: usize = 64;
/// Columns per pass, so a row block's f32 copy (16 x 2048 x 4 B = 128 KiB) stays in L2 for
/// very wide matrices.
const GEMM_K: usize = 2048;

thread_local! {
    /// The calling thread's activations in the layout the kernels want (matvec, streamed).
    static X_PREP: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's f32 copy of a weight row block (gemm).
    static W_BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// See [`super::matmul()`]. `k` selects the ISA tier.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_with(
    k: Kernels,
    pool: &ThreadPool,
    w: &[u8],
    dtype: DType,
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    assert_eq!(
        w.len(),
        dtype.bytes_for(rows * cols),
        "matmul: weight bytes != rows * cols * {}",
        dtype.size()
    );
    assert_eq!(
        x.len(),
        n_tokens * cols,
        "matmul: x.len() != n_tokens * cols"
    );
    assert_eq!(
        y.len(),
        n_tokens * rows,
        "matmul: y.len() != n_tokens * rows"
    );
    if rows == 0 || n_tokens == 0 {
        return;
    }
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    if dtype.is_quantized() && n_tokens == 1 {
        let n_tasks = decode_tasks(pool, w.len());
        quant::matvec(k, pool, w, dtype, rows, cols, x, y, n_tasks, false);
        return;
    }
    if quant_batch::takes(dtype, n_tokens) {
        quant_batch::matmul_small(k, pool, w, dtype, rows, cols, x, n_tokens, y);
        return;
    }
    float_paths(k, pool, w, dtype, rows, cols, x, n_tokens, y);
}

/// [`super::matmul_exact()`]: f32 activations on every path; a few tokens of a Q8_0 matrix
/// row by row as its exact one-token product (`quant_batch`).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_exact_with(
    k: Kernels,
    pool: &ThreadPool,
    w: &[u8],
    dtype: DType,
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    match n_tokens {
        1 => matvec_exact_with(k, pool, w, dtype, rows, cols, x, y),
        2..=quant_batch::MAX_TOKENS if dtype == DType::Q8_0 => {
            assert_eq!(
                w.len(),
                dtype.bytes_for(rows * cols),
                "matmul_exact: weight bytes"
            );
            assert_eq!(x.len(), n_tokens * cols, "matmul_exact: x.len()");
            assert_eq!(y.len(), n_tokens * rows, "matmul_exact: y.len()");
            quant_batch::matmul_small_exact_q8(k, pool, w, rows, cols, x, n_tokens, y)
        }
        _ => {
            assert_eq!(x.len(), n_tokens * cols, "matmul_exact: x.len()");
            assert_eq!(y.len(), n_tokens * rows, "matmul_exact: y.len()");
            float_paths(k, pool, w, dtype, rows, cols, x, n_tokens, y)
        }
    }
}

/// The f32-activation paths of [`matmul_with`] (sizes checked by the caller).
#[allow(clippy::too_many_arguments)]
fn float_paths(
    k: Kernels,
    pool: &ThreadPool,
    w: &[u8],
    dtype: DType,
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    if rows == 0 || n_tokens == 0 {
        return;
    }
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    let m = Operands {
        k,
        pool,
        w,
        dtype,
        rows,
        cols,
        x,
        n_tokens,
    };
    if n_tokens == 1 {
        matvec(m, y);
    } else if n_tokens <= k.layout().streamed_max_tokens && !dtype.is_quantized() {
        streamed(m, y);
    } else {
        gemm(m, y);
    }
}

/// [`super::matvec_packed()`]: decode's task split over the packed matrix's bytes.
pub(super) fn matvec_packed_with(
    k: Kernels,
    pool: &ThreadPool,
    w: &super::quant_packed::PackedRows,
    x: &[f32],
    y: &mut [f32],
) -> bool {
    assert_eq!(y.len(), w.rows(), "matvec_packed: y.len() != rows");
    assert_eq!(x.len(), 32 * w.blocks(), "matvec_packed: x.len() != cols");
    let n_tasks = decode_tasks(pool, w.byte_len());
    quant::matvec_packed(k, pool, w, x, y, None, n_tasks)
}

/// [`super::matvec_exact()`]: one token through a quantized matrix's de-quantized rows.
#[allow(clippy::too_many_arguments)]
pub(super) fn matvec_exact_with(
    k: Kernels,
    pool: &ThreadPool,
    w: &[u8],
    dtype: DType,
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) {
    if !dtype.is_quantized() {
        return matmul_with(k, pool, w, dtype, rows, cols, x, 1, y);
    }
    assert_eq!(
        w.len(),
        dtype.bytes_for(rows * cols),
        "matvec_exact: weight bytes"
    );
    assert_eq!(
        (x.len(), y.len()),
        (cols, rows),
        "matvec_exact: x or y length"
    );
    let n_tasks = decode_tasks(pool, w.len());
    quant::matvec(k, pool, w, dtype, rows, cols, x, y, n_tasks, true);
}

/// How many tasks a one-token product over `bytes` of weights is split into.
fn decode_tasks(pool: &ThreadPool, bytes: usize) -> usize {
    (pool.n_threads() * DECODE_TASKS_PER_THREAD)
        .min(bytes.div_ceil(DECODE_MIN_TASK_BYTES))
        .max(1)
}

/// The inputs of one [`matmul_with`] call, as its three paths take them.
#[derive(Clone, Copy)]
struct Operands<'a> {
    k: Kernels,
    pool: &'a ThreadPool,
    w: &'a [u8],
    dtype: DType,
    rows: usize,
    cols: usize,
    x: &'a [f32],
    n_tokens: usize,
}

/// Rows split into contiguous chunks (multiples of 4, the kernels' row group), handed out
/// dynamically; each task streams its chunk once.
fn matvec(m: Operands, y: &mut [f32]) {
    let (k, pool, w, dtype) = (m.k, m.pool, m.w, m.dtype);
    let (rows, cols, x) = (m.rows, m.cols, m.x);
    let row_bytes = dtype.bytes_for(cols);
    let by_size = (rows * row_bytes).div_ceil(DECODE_MIN_TASK_BYTES);
    // One thread: one task, so each of the kernel's 4 row streams is as long as possible.
    let per_thread = if pool.n_threads() == 1 {
        1
    } else {
        DECODE_TASKS_PER_THREAD
    };
    let want = (pool.n_threads() * per_thread).min(by_size).max(1);
    let chunk = rows.div_ceil(want).next_multiple_of(4).min(rows);
    let n_tasks = rows.div_ceil(chunk);
    with_scratch_vec(&X_PREP, |buf| {
        // bf16 on a SIMD tier wants x de-interleaved; other dtypes read x as it is.
        let xs: &[f32] = if dtype == DType::BF16 && k.layout().bf16_block.is_some() {
            k.prep_x_tokens(dtype, x, 1, cols, buf);
            buf
        } else {
            x
        };
        if n_tasks == 1 {
            k.matvec(w, dtype, RowStarts::Strided(cols), cols, xs, y);
            return;
        }
        let ys = SharedMut::new(y);
        pool.run(n_tasks, &|t| {
            let r0 = t * chunk;
            let nr = chunk.min(rows - r0);
            // SAFETY: task t alone owns rows r0..r0 + nr.
            let yt = unsafe { ys.slice(r0, nr) };
            k.matvec(
                &w[r0 * row_bytes..(r0 + nr) * row_bytes],
                dtype,
                RowStarts::Strided(cols),
                cols,
                xs,
                yt,
            );
        });
    });
}

/// n_tokens > 1 up to the tier's `streamed_max_tokens`: weights are streamed like the decode
/// matvec and each group of 4 rows is applied to the tokens while it sits in L1. Measured
/// faster than converting and tiling (`gemm`) on AVX-512 from 2 tokens (memory bound, same
/// time as 1 token up to 4) to 512 (~88% of FMA peak). Tasks are (row chunk, token block)
/// pairs; token blocks keep the activations each row group re-reads in L2.
fn streamed(m: Operands, y: &mut [f32]) {
    let (k, pool, w, dtype) = (m.k, m.pool, m.w, m.dtype);
    let (rows, cols, x, n_tokens) = (m.rows, m.cols, m.x, m.n_tokens);
    let row_bytes = dtype.bytes_for(cols);
    with_scratch_vec(&X_PREP, |buf| {
        let xstride = k.prep_x_tokens(dtype, x, n_tokens, cols, buf);
        let xs: &[f32] = buf;
        let tb = (STREAMED_X_BYTES / (4 * xstride) / 4 * 4)
            .max(4)
            .min(n_tokens);
        let n_tb = n_tokens.div_ceil(tb);
        let by_size = (rows * row_bytes).div_ceil(DECODE_MIN_TASK_BYTES);
        let per_thread = if pool.n_threads() == 1 {
            1
        } else {
            STREAMED_TASKS_PER_THREAD
        };
        let want = (pool.n_threads() * per_thread)
            .div_ceil(n_tb)
            .min(by_size)
            .max(1);
        let chunk = rows.div_ceil(want).next_multiple_of(4).min(rows);
        let n_rc = rows.div_ceil(chunk);
        let ys = SharedMut::new(y);
        pool.run(n_rc * n_tb, &|task| {
            let (rc, b) = (task % n_rc, task / n_rc);
            let (r0, t0) = (rc * chunk, b * tb);
            let (nr, nt) = (chunk.min(rows - r0), tb.min(n_tokens - t0));
            assert!((t0 + nt - 1) * rows + r0 + nr <= ys.len());
            let yp = ys.ptr_at(t0 * rows + r0);
            let wt = &w[r0 * row_bytes..(r0 + nr) * row_bytes];
            let xt = StridedRows {
                data: &xs[t0 * xstride..],
                stride: xstride,
                cols,
                n: nt,
            };
            // SAFETY: this task alone owns outputs (t0.., r0..) of its block; bounds above.
            unsafe { k.matmul_tokens(wt, dtype, nr, xt, yp, rows) };
        });
    });
}

/// Tasks are (row block, token block) pairs. Each converts its weight rows to f32 once into a
/// per-thread scratch and reuses them for every token of its block in register tiles.
fn gemm(m: Operands, y: &mut [f32]) {
    let (k, pool, w, dtype) = (m.k, m.pool, m.w, m.dtype);
    let (rows, cols, x, n_tokens) = (m.rows, m.cols, m.x, m.n_tokens);
    let n_rb = rows.div_ceil(GEMM_ROWS);
    let n_tb = n_tokens.div_ceil(GEMM_TOKENS);
    let lda = cols.min(GEMM_K).next_multiple_of(Kernels::GEMM_PAD);
    let ys = SharedMut::new(y);
    pool.run(n_rb * n_tb, &|task| {
        let (rb, tb) = (task % n_rb, task / n_rb);
        let r0 = rb * GEMM_ROWS;
        let nr = GEMM_ROWS.min(rows - r0);
        let t0 = tb * GEMM_TOKENS;
        let nt = GEMM_TOKENS.min(n_tokens - t0);
        with_scratch(&W_BLOCK, GEMM_ROWS * lda, |a| {
            for k0 in (0..cols).step_by(GEMM_K) {
                let kc = GEMM_K.min(cols - k0);
                for i in 0..nr {
                    // GEMM_K is a multiple of every block length: chunks are whole blocks.
                    let src = dtype.bytes_for((r0 + i) * cols + k0);
                    let row = &mut a[i * lda..(i + 1) * lda];
                    convert(k, &w[src..src + dtype.bytes_for(kc)], dtype, &mut row[..kc]);
                    row[kc..].fill(0.0);
                }
                // Output (t, r) lives at y[(t0 + t) * rows + r0 + r]; the pointer is checked
                // against the slice's end here, the kernel stays within nt x nr of it.
                assert!((t0 + nt - 1) * rows + r0 + nr <= ys.len());
                let yp = ys.ptr_at(t0 * rows + r0);
                // SAFETY: this task alone owns outputs (t0.., r0..) of its block; bounds above.
                unsafe {
                    let a = StridedRows {
                        data: a,
                        stride: lda,
                        cols: kc,
                        n: nr,
                    };
                    let x = StridedRows {
                        data: &x[t0 * cols + k0..],
                        stride: cols,
                        cols: kc,
                        n: nt,
                    };
                    k.gemm_block(a, x, yp, rows, k0 > 0)
                };
            }
        });
    });
}

/// Converts row `row` of a `[rows, cols]` matrix of `dtype` to f32 into `out[..cols]`.
pub(super) fn row_to_f32_with(
    k: Kernels,
    w: &[u8],
    dtype: DType,
    cols: usize,
    row: usize,
    out: &mut [f32],
) {
    let row_bytes = dtype.bytes_for(cols);
    let start = row * row_bytes;
    assert!(
        start + row_bytes <= w.len(),
        "row_to_f32: row {row} out of bounds"
    );
    assert!(out.len() >= cols, "row_to_f32: out shorter than cols");
    convert(k, &w[start..start + row_bytes], dtype, &mut out[..cols]);
}

/// Converts a whole tensor to f32.
pub(super) fn to_f32_vec_with(k: Kernels, w: &[u8], dtype: DType) -> Vec<f32> {
    let (block_elems, block_bytes) = dtype.block();
    assert!(
        w.len().is_multiple_of(block_bytes),
        "to_f32_vec: byte length not a multiple of the block size"
    );
    let mut out = vec![0.0; w.len() / block_bytes * block_elems];
    convert(k, w, dtype, &mut out);
    out
}

/// Weights of any type to f32: the float kernels' conversion, or block de-quantization.
fn convert(k: Kernels, src: &[u8], dtype: DType, out: &mut [f32]) {
    if dtype.is_quantized() {
        quant::convert(k, src, dtype, out);
    } else {
        k.convert(src, dtype, out);
    }
}

#[cfg(test)]
#[path = "matmul_tests.rs"]
pub(super) mod tests;
