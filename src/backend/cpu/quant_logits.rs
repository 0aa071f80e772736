//! One token's logits from a Q8_0 LM head (what GGUF files give SmolLM2, Llama and others):
//! fast integer products for every row, exact ones where the maximum can be.
//!
//! With exact f32 activations the head was a fifth of a Q4_1 SmolLM2 decode step (each 8-bit
//! weight widened to f32). With quantized activations it runs on integer dot products like
//! the other matrices (interleaved, `quant_packed`), but near-ties then flip: SmolLM2's
//! answer to "What is the capital of France?" changes at a logit lead of 0.098. So each row
//! gets an error bound, and every row whose interval reaches the best lower bound is
//! recomputed exactly: the largest logit and its row (greedy decoding, the drafts of
//! Sirius's chains) are what exact activations give, at the cost of a few exact rows; the
//! other logits keep
//! the quantized activations' small error (what sampling at a temperature sees, as in
//! llama.cpp).
//!
//! The bound: activations `x = dx_b * q + e` with `|e| <= dx_b / 2` in block `b`, so a row
//! errs by at most `sum_b dx_b / 2 * sum_(i in b) |w_i|`; the packed head carries each
//! (row, block) L1 norm, and the kernel sums the bound beside the product.

use std::cmp::Ordering;

use super::kernels::Kernels;
use super::pool::ThreadPool;
use super::quant;
use super::quant_packed::PackedRows;
use crate::tensor::DType;

/// Relative slack on each bound for f32 rounding in both sums (each is within ~1e-6 of its
/// magnitude over a few thousand terms) and the norms' f16 rounding (up, so already safe).
const ROUNDING_SLACK: f32 = 1e-4;
/// Head rows per task.
const TASK_ROWS: usize = 2048;

thread_local! {
    static BOUNDS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y = w x` for one token (`w`: the head's stored `rows x cols` Q8_0 bytes) with the
/// maximum exact; the number of rows recomputed exactly, or `None` (nothing done) on a
/// tier without the interleaved kernel.
pub(super) fn logits_q8(
    k: Kernels,
    pool: &ThreadPool,
    w: &[u8],
    head: &PackedRows,
    x: &[f32],
    y: &mut [f32],
) -> Option<usize> {
    let rows = head.rows();
    let row_bytes = DType::Q8_0.bytes_for(x.len());
    assert!(y.len() == rows && w.len() == rows * row_bytes && x.len() == 32 * head.blocks());
    BOUNDS.with_borrow_mut(|bounds| {
        bounds.resize(rows, 0.0);
        let n_tasks = rows.div_ceil(TASK_ROWS);
        if !quant::matvec_packed(k, pool, head, x, y, Some(bounds), n_tasks) {
            return None;
        }
        let x_max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let slack = |v: f32| v * (1.0 + ROUNDING_SLACK) + ROUNDING_SLACK * x_max;
        let best_low = y
            .iter()
            .zip(bounds.iter())
            .map(|(v, b)| v - slack(*b))
            .fold(f32::NEG_INFINITY, f32::max);
        let mut exact = 0;
        for (r, (v, b)) in y.iter_mut().zip(bounds.iter()).enumerate() {
            // Not-finite values (a broken input) compare false: recomputed too.
            let below = (*v + slack(*b)).partial_cmp(&best_low) == Some(Ordering::Less);
            if !below {
                *v = quant::dot_q8_f32_row(k, &w[r * row_bytes..(r + 1) * row_bytes], x);
                exact += 1;
            }
        }
        Some(exact)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::Isa;
    use crate::backend::cpu::util::TestRng;
    use crate::tensor::quant::tests::reference_blocks;

    /// The maximum equals the exact product, bit for bit, on every tier with the kernel,
    /// also when the runner-up trails it by less than the quantized activations' error.
    #[test]
    fn the_row_maximum_is_the_exact_products() {
        const QK: usize = 32;
        let mut rng = TestRng::new(23);
        let pool = ThreadPool::new(2);
        let (rows, cols) = (4096, 128);
        let row_bytes = DType::Q8_0.bytes_for(cols);
        let mut w = reference_blocks(DType::Q8_0, rows * cols / QK);
        let x = rng.vec(cols);
        let exact_of = |k: Kernels, w: &[u8]| -> Vec<f32> {
            w.chunks_exact(row_bytes)
                .map(|r| quant::dot_q8_f32_row(k, r, &x))
                .collect()
        };
        let argmax = |v: &[f32]| (0..v.len()).fold(0, |m, i| if v[i] > v[m] { i } else { m });
        // A near-tie: the best row copied with one weight a step closer to its activation.
        let best = argmax(&exact_of(Kernels::new(Isa::Scalar), &w));
        let twin = (best + 1) % rows;
        let row = w[best * row_bytes..(best + 1) * row_bytes].to_vec();
        w[twin * row_bytes..(twin + 1) * row_bytes].copy_from_slice(&row);
        let i = (0..QK)
            .find(|&i| (w[twin * row_bytes + 2 + i] as i8).abs() < 100)
            .unwrap_or(0);
        let q = &mut w[twin * row_bytes + 2 + i];
        *q = (*q as i8 + if x[i] > 0.0 { 1 } else { -1 }) as u8;
        let head = PackedRows::pack(DType::Q8_0, &w, rows, cols).expect("packs");
        let mut ran = 0;
        for isa in Isa::available() {
            let k = Kernels::new(isa);
            let exact = exact_of(k, &w);
            let top = argmax(&exact);
            let lead = exact[top] - exact[best].min(exact[twin]);
            assert!(lead.abs() < 0.1, "{isa:?}: the twins are {lead} apart");
            let mut y = vec![f32::NAN; rows];
            let Some(n) = logits_q8(k, &pool, &w, &head, &x, &mut y) else {
                eprintln!(
                    "{isa:?}: no interleaved kernel on this tier (the backend multiplies exactly)"
                );
                continue;
            };
            ran += 1;
            assert_eq!(argmax(&y), top, "{isa:?}");
            assert_eq!(y[top].to_bits(), exact[top].to_bits(), "{isa:?}");
            assert!((2..rows / 4).contains(&n), "{isa:?}: {n} rows recomputed");
            // Every row within the documented bound of its exact product.
            let mut wf = vec![0f32; cols];
            for (r, (g, e)) in y.iter().zip(&exact).enumerate() {
                crate::tensor::quant::dequantize(
                    DType::Q8_0,
                    &w[r * row_bytes..(r + 1) * row_bytes],
                    &mut wf,
                );
                let bound: f32 = wf
                    .chunks_exact(QK)
                    .zip(x.chunks_exact(QK))
                    .map(|(wb, xb)| {
                        let dx = xb.iter().fold(0f32, |m, v| m.max(v.abs()))
                            / quant::HEAD_ACTIVATION_LIMIT;
                        dx / 2.0 * wb.iter().map(|v| v.abs()).sum::<f32>()
                    })
                    .sum();
                assert!(
                    (g - e).abs() <= 1.001 * bound + 1e-5,
                    "{isa:?} row {r}: {g} vs {e}, bound {bound}"
                );
            }
        }
        if ran == 0 {
            eprintln!("skipped: this CPU has no AVX2, the head's interleaved kernel does not run");
        }
    }
}
