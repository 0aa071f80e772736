//! Token windows of the weight kernels (kernels/matvec.cu, quant.cu, bundle_window.cu):
//! which entry point a batch takes and the launch shapes that follow, as pure functions of
//! the sizes (tested without a GPU).
//!
//! A window kernel reads each weight once per window of 16 or 64 tokens (the `_t16` and
//! `_t64` entries), so a K-token verification window (K <= 16) or a tree of up to 64 rows
//! reads its weights once; longer batches read them once per 64 tokens.

use crate::backend::NeuronLists;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Tokens per pass over the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenWindow {
    /// 16 tokens: verification windows (K <= 16).
    T16,
    /// 64 tokens: trees and longer batches (64 register sums per lane or thread).
    T64,
}

impl TokenWindow {
    /// The window of a batch of `n_tokens`: 16 up to 16 tokens (a window of 2..16 costs no
    /// more registers than the tokens it has), 64 above.
    pub fn for_tokens(n_tokens: usize) -> TokenWindow {
        if n_tokens <= 16 {
            TokenWindow::T16
        } else {
            TokenWindow::T64
        }
    }

    /// The window of bundle_ffn over a list `n_tokens` share: None for one token (decode
    /// keeps neurons.cu's warp per (token, neuron), which reads each bundle once already).
    pub fn for_shared_list(n_tokens: usize) -> Option<TokenWindow> {
        (n_tokens > 1).then(|| TokenWindow::for_tokens(n_tokens))
    }

    pub fn tokens(self) -> usize {
        match self {
            TokenWindow::T16 => 16,
            TokenWindow::T64 => 64,
        }
    }

    /// Passes over the weights for `n_tokens`: the grid's z of bundle_down, and how many
    /// times a call reads each weight.
    pub fn passes(self, n_tokens: usize) -> usize {
        n_tokens.div_ceil(self.tokens())
    }

    /// Output columns per thread of bundle_down_t*: tokens x columns = 64 sums in registers.
    pub fn down_cols(self) -> usize {
        64 / self.tokens()
    }

    /// bundle_down_t*'s grid before splits: (column blocks, token windows) for `threads`
    /// threads per block.
    pub fn down_grid(self, hidden: usize, n_tokens: usize, threads: usize) -> (usize, usize) {
        let cols = hidden.div_ceil(self.down_cols() * threads);
        (cols, self.passes(n_tokens))
    }
}

/// The matmul kernel for `n_tokens` of weights stored as `dtype`: matvec (one token), else
/// the window kernel of [`TokenWindow::for_tokens`].
pub(crate) fn matmul_kernel(dtype: DType, n_tokens: usize) -> Result<&'static str> {
    use TokenWindow::{T16, T64};
    let name = match (n_tokens == 1, TokenWindow::for_tokens(n_tokens), dtype) {
        (true, _, DType::BF16) => "matvec_bf16",
        (true, _, DType::F16) => "matvec_f16",
        (true, _, DType::F32) => "matvec_f32",
        (true, _, DType::Q4_0) => "matvec_q4_0",
        (true, _, DType::Q4_1) => "matvec_q4_1",
        (true, _, DType::Q8_0) => "matvec_q8_0",
        (true, _, DType::Q4K) => "matvec_q4_k",
        (true, _, DType::Q6K) => "matvec_q6_k",
        (false, T16, DType::BF16) => "matmul_t16_bf16",
        (false, T16, DType::F16) => "matmul_t16_f16",
        (false, T16, DType::F32) => "matmul_t16_f32",
        (false, T16, DType::Q4_0) => "matmul_t16_q4_0",
        (false, T16, DType::Q4_1) => "matmul_t16_q4_1",
        (false, T16, DType::Q8_0) => "matmul_t16_q8_0",
        (false, T16, DType::Q4K) => "matmul_t16_q4_k",
        (false, T16, DType::Q6K) => "matmul_t16_q6_k",
        (false, T64, DType::BF16) => "matmul_t64_bf16",
        (false, T64, DType::F16) => "matmul_t64_f16",
        (false, T64, DType::F32) => "matmul_t64_f32",
        (false, T64, DType::Q4_0) => "matmul_t64_q4_0",
        (false, T64, DType::Q4_1) => "matmul_t64_q4_1",
        (false, T64, DType::Q8_0) => "matmul_t64_q8_0",
        (false, T64, DType::Q4K) => "matmul_t64_q4_k",
        (false, T64, DType::Q6K) => "matmul_t64_q6_k",
        (_, _, q) => return Err(no_kernel("matmul", q)),
    };
    Ok(name)
}

/// The bundle kernels (activations, down sums) for `dtype`: bundle_window.cu's for a list
/// every token shares (`window`), else neurons.cu's per-token ones.
pub(crate) fn bundle_kernels(
    dtype: DType,
    window: Option<TokenWindow>,
) -> Result<(&'static str, &'static str)> {
    use TokenWindow::{T16, T64};
    Ok(match (window, dtype) {
        (None, DType::BF16) => ("bundle_act_bf16", "bundle_down_bf16"),
        (None, DType::F16) => ("bundle_act_f16", "bundle_down_f16"),
        (None, DType::F32) => ("bundle_act_f32", "bundle_down_f32"),
        (Some(T16), DType::BF16) => ("bundle_act_t16_bf16", "bundle_down_t16_bf16"),
        (Some(T16), DType::F16) => ("bundle_act_t16_f16", "bundle_down_t16_f16"),
        (Some(T16), DType::F32) => ("bundle_act_t16_f32", "bundle_down_t16_f32"),
        (Some(T64), DType::BF16) => ("bundle_act_t64_bf16", "bundle_down_t64_bf16"),
        (Some(T64), DType::F16) => ("bundle_act_t64_f16", "bundle_down_t64_f16"),
        (Some(T64), DType::F32) => ("bundle_act_t64_f32", "bundle_down_t64_f32"),
        (_, q) => return Err(no_kernel("bundle_ffn", q)),
    })
}

/// The list all of the first `n_tokens` (> 0) tokens of `kept` use, when they use the same
/// one (CATS's tree beam): the window kernels then read each bundle once for all of them.
/// None when the lists differ or do not cover the tokens.
pub(crate) fn shared_list(kept: &NeuronLists, n_tokens: usize) -> Option<&[u32]> {
    let list = |t: usize| {
        let (&a, &b) = (kept.offsets.get(t)?, kept.offsets.get(t + 1)?);
        kept.ids.get(a..b)
    };
    let first = list(0)?;
    (1..n_tokens)
        .all(|t| list(t) == Some(first))
        .then_some(first)
}

fn no_kernel(op: &str, dtype: DType) -> Error {
    Error::Cuda(format!("{op}: no CUDA kernel for {dtype} weights"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::kernels::KERNELS;

    fn defined(name: &str) -> bool {
        KERNELS.iter().any(|k| k.functions.contains(&name))
    }

    #[test]
    fn windows_cover_a_verification_window_and_a_tree_in_one_pass() {
        for n in 2..=16 {
            assert_eq!(TokenWindow::for_tokens(n), TokenWindow::T16);
            assert_eq!(TokenWindow::for_tokens(n).passes(n), 1);
        }
        for n in 17..=64 {
            assert_eq!(TokenWindow::for_tokens(n), TokenWindow::T64);
            assert_eq!(TokenWindow::for_tokens(n).passes(n), 1);
        }
        assert_eq!(TokenWindow::for_tokens(65).passes(65), 2);
        assert_eq!(TokenWindow::for_tokens(512).passes(512), 8);
        assert_eq!(TokenWindow::T16.passes(0), 0);
        assert_eq!(TokenWindow::for_shared_list(1), None);
        assert_eq!(TokenWindow::for_shared_list(2), Some(TokenWindow::T16));
        assert_eq!(TokenWindow::for_shared_list(64), Some(TokenWindow::T64));
    }

    #[test]
    fn down_sums_per_thread_stay_at_64() {
        for w in [TokenWindow::T16, TokenWindow::T64] {
            assert_eq!(w.tokens() * w.down_cols(), 64);
        }
        // 4096 columns: 4 per thread x 128 threads = 512 per block -> 8 blocks; one window.
        assert_eq!(TokenWindow::T16.down_grid(4096, 16, 128), (8, 1));
        // 1 column per thread: 32 blocks; 65 tree rows are two windows.
        assert_eq!(TokenWindow::T64.down_grid(4096, 65, 128), (32, 2));
        // A ragged width still covers every column.
        assert_eq!(TokenWindow::T16.down_grid(576, 3, 128), (2, 1));
        assert_eq!(TokenWindow::T64.down_grid(1, 64, 128), (1, 1));
    }

    #[test]
    fn shared_lists_are_found_and_different_ones_refused() {
        let mut kept = NeuronLists::default();
        kept.clear();
        for _ in 0..3 {
            kept.push_token([1, 5, 9]);
        }
        assert_eq!(shared_list(&kept, 3), Some(&[1, 5, 9][..]));
        kept.push_token([1, 5]);
        assert_eq!(shared_list(&kept, 3), Some(&[1, 5, 9][..]));
        assert_eq!(shared_list(&kept, 4), None);
        // More tokens than lists.
        assert_eq!(shared_list(&kept, 5), None);
        let mut empty = NeuronLists::default();
        empty.clear();
        empty.push_token([]);
        empty.push_token([]);
        assert_eq!(shared_list(&empty, 2), Some(&[][..]));
    }

    #[test]
    fn every_chosen_kernel_is_defined() {
        let dtypes = [
            DType::BF16,
            DType::F16,
            DType::F32,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q8_0,
            DType::Q4K,
            DType::Q6K,
        ];
        for dtype in dtypes {
            for n in [1, 2, 16, 17, 64, 65] {
                let name = matmul_kernel(dtype, n).unwrap();
                assert!(defined(name), "{name}");
            }
        }
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for w in [None, Some(TokenWindow::T16), Some(TokenWindow::T64)] {
                let (act, down) = bundle_kernels(dtype, w).unwrap();
                assert!(defined(act) && defined(down), "{act} {down}");
            }
        }
        assert!(bundle_kernels(DType::Q4_0, None).is_err());
    }
}
