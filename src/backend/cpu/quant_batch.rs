//! A few tokens through a quantized matrix (Sirius's verification windows, token trees,
//! batched drafts): the decode kernels' integer products, each weight row block read from
//! memory once and applied to every token while it sits in L1.
//!
//! The alternative for n > 1, converting row blocks to f32 and tiling them (`matmul::gemm`),
//! pays the conversion plus an f32 product per token: on Qwen2.5-1.5B Q4_K_M (2 Zen 1 cores)
//! a 5-token window cost ~6 single-token steps that way. Here each token costs one integer
//! dot product over weights already in cache, and its result for token t is bit for bit the
//! decode matvec's for that token alone (same activation quantization, same kernel), so a
//! verification picks what plain decoding picks.
//!
//! Tried and dropped: a K-quant kernel that unpacks each super-block once for all the tokens
//! (the nibble split and scale widening are about half of a super-block's instructions). On a
//! Zen 1 core (256-bit AVX2 issued as two 128-bit halves) the products dominate: a Qwen2.5
//! forward over 2 / 5 / 17 tokens cost 2.34 / 4.43 / 12.08 single-token forwards with it and
//! 2.00 / 4.58 / 11.76 without.

use std::cell::RefCell;

use super::kernels::Kernels;
use super::pool::ThreadPool;
use super::quant::{activation_block, dot_q8_f32_row, dot_q8_rows, has_int_dot, tier, Q8Row};
use super::util::SharedMut;
use crate::tensor::DType;

/// Up to this many tokens take this path (beyond, the f32 tiles' reuse wins).
pub(super) const MAX_TOKENS: usize = 16;
/// Weight bytes of one row block: within L1 beside the activations being read.
const BLOCK_BYTES: usize = 16 << 10;
/// Row chunks per thread (as the decode matvec splits them).
const TASKS_PER_THREAD: usize = 4;

thread_local! {
    /// The calling thread's quantized activations, one row per token.
    static X_Q8: RefCell<Vec<Q8Row>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`matmul_small`] takes `n_tokens` of `dtype`.
pub(super) fn takes(dtype: DType, n_tokens: usize) -> bool {
    has_int_dot(dtype) && (2..=MAX_TOKENS).contains(&n_tokens)
}

/// `y[t*rows + r] = w[r] . x[t]` for `n_tokens` tokens (see [`takes`]), with 8-bit
/// activations as the decode matvec.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_small(
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
    let (t, row_bytes) = (tier(k), dtype.bytes_for(cols));
    X_Q8.with_borrow_mut(|xq| {
        xq.resize_with(n_tokens, Q8Row::default);
        for (q, xt) in xq.iter_mut().zip(x.chunks_exact(cols)) {
            q.quantize(xt, activation_block(dtype));
        }
        let xq = &xq[..n_tokens];
        by_row_blocks(pool, w, row_bytes, rows, n_tokens, y, &|ti, block, yt| {
            dot_q8_rows(t, dtype, block, row_bytes, &xq[ti], yt)
        });
    });
}

/// [`matmul_small`] for a Q8_0 matrix with f32 activations: each row as the exact decode
/// product computes it (`dot_q8_f32_row`, what a Q8_0 head's pick is rescored with), so a
/// verification's logits pick what plain decoding picks.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_small_exact_q8(
    k: Kernels,
    pool: &ThreadPool,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) {
    let row_bytes = DType::Q8_0.bytes_for(cols);
    by_row_blocks(pool, w, row_bytes, rows, n_tokens, y, &|ti, block, yt| {
        let xt = &x[ti * cols..(ti + 1) * cols];
        for (out, row) in yt.iter_mut().zip(block.chunks_exact(row_bytes)) {
            *out = dot_q8_f32_row(k, row, xt);
        }
    });
}

/// `(token, row block bytes, that token's outputs of the block)`.
type RowProduct<'a> = dyn Fn(usize, &[u8], &mut [f32]) + Sync + 'a;

/// Splits the rows into tasks on `pool` and each task's rows into blocks of about
/// `BLOCK_BYTES`; `product(token, block, out)` fills that token's outputs of the block while
/// its bytes sit in L1.
fn by_row_blocks(
    pool: &ThreadPool,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    n_tokens: usize,
    y: &mut [f32],
    product: &RowProduct<'_>,
) {
    let block_rows = (BLOCK_BYTES / row_bytes.max(1)).clamp(1, rows.max(1));
    let n_tasks = (pool.n_threads() * TASKS_PER_THREAD).min(rows.div_ceil(block_rows));
    let chunk = rows.div_ceil(n_tasks.max(1)).max(1);
    let n_tasks = rows.div_ceil(chunk);
    let ys = SharedMut::new(y);
    pool.run(n_tasks, &|task| {
        let (r0, r1) = (task * chunk, ((task + 1) * chunk).min(rows));
        let mut r = r0;
        while r < r1 {
            let nr = block_rows.min(r1 - r);
            let block = &w[r * row_bytes..(r + nr) * row_bytes];
            for ti in 0..n_tokens {
                // SAFETY: task `task` alone owns rows r0..r1 of every token's output.
                let yt = unsafe { ys.slice(ti * rows + r, nr) };
                product(ti, block, yt);
            }
            r += nr;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::Isa;
    use crate::backend::cpu::quant::matvec;
    use crate::backend::cpu::util::TestRng;
    use crate::tensor::quant::tests::reference_blocks;

    /// Each token's row of a Q8_0 batch with f32 activations is bit for bit the exact
    /// one-token product's.
    #[test]
    fn exact_q8_rows_equal_the_exact_decode_product() {
        let mut rng = TestRng::new(9);
        let pool = ThreadPool::new(2);
        let (rows, cols) = (37, 512);
        let bytes = reference_blocks(DType::Q8_0, rows * cols / 32);
        for n in [2, 7, MAX_TOKENS] {
            let x = rng.vec(n * cols);
            for isa in Isa::available() {
                let k = Kernels::new(isa);
                let mut y = vec![f32::NAN; n * rows];
                matmul_small_exact_q8(k, &pool, &bytes, rows, cols, &x, n, &mut y);
                for t in 0..n {
                    let mut want = vec![f32::NAN; rows];
                    let xt = &x[t * cols..(t + 1) * cols];
                    matvec(
                        k,
                        &pool,
                        &bytes,
                        DType::Q8_0,
                        rows,
                        cols,
                        xt,
                        &mut want,
                        3,
                        true,
                    );
                    let got = &y[t * rows..(t + 1) * rows];
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} n={n} t={t}"
                    );
                }
            }
        }
    }

    /// Each token's row of the batch is bit for bit the decode matvec's for that token.
    #[test]
    fn every_token_equals_its_own_decode_product() {
        let mut rng = TestRng::new(5);
        let pool = ThreadPool::new(2);
        for dtype in [
            DType::Q4_0,
            DType::Q4_1,
            DType::Q8_0,
            DType::Q4K,
            DType::Q6K,
        ] {
            // Rows not a multiple of a block or of the tasks; cols two K-quant super-blocks.
            let (rows, cols) = (37, 512);
            let bytes = reference_blocks(dtype, rows * cols / dtype.block().0);
            for n in [2, 5, MAX_TOKENS] {
                let x = rng.vec(n * cols);
                for isa in Isa::available() {
                    let k = Kernels::new(isa);
                    let mut y = vec![f32::NAN; n * rows];
                    matmul_small(k, &pool, &bytes, dtype, rows, cols, &x, n, &mut y);
                    for t in 0..n {
                        let mut want = vec![f32::NAN; rows];
                        let xt = &x[t * cols..(t + 1) * cols];
                        matvec(k, &pool, &bytes, dtype, rows, cols, xt, &mut want, 3, false);
                        let got = &y[t * rows..(t + 1) * rows];
                        assert!(
                            got.iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} {dtype} n={n} t={t}: {got:?} vs {want:?}"
                        );
                    }
                }
            }
        }
    }
}
