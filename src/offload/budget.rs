//! The lines of a memory budget that are not weights, KV cache or activations: the backend's
//! own scratch and, on a GPU, the driver's context and a margin for the allocator. One set of
//! numbers for `plan` and `run` (the planner places weights in what is left; the runtime books
//! the same lines in its arena), so that a plan that fits is a run that fits.
//!
//! `--gpu-mem SIZE` is everything the process may use on the device: the CUDA context (its
//! modules, cuBLAS's kernels) is inside it, as is what the allocator rounds up and keeps
//! pooled. Neither can be measured before a GPU runs, so both are assumptions, stated here
//! once and printed as lines of the plan; the GPU check measures the real device usage
//! against them.

use serde::Serialize;

pub use crate::backend::offload::{
    gather_tables_bytes, gpu_scratch_bytes, max_job_pieces, ALLOCATOR_MARGIN_BASE,
    CUBLAS_WORKSPACE_BYTES, DRIVER_CONTEXT_BYTES,
};

/// The allocator margin's part per layer: a layer's resident matrices are separate device
/// allocations, each rounded up to whole 2 MiB pages (half a page lost on average; about 8
/// allocations per layer: attention, compact FFN, complement, KV cache).
pub const ALLOCATOR_MARGIN_PER_LAYER: u64 = 4 << 20;

/// The allocator margin of a device budget for a model of `layers` layers (576 MiB for
/// Llama-3-70B's 80): fixed, not a share of the budget, so that a plan's minimum budget is
/// one number.
pub fn allocator_margin(layers: usize) -> u64 {
    ALLOCATOR_MARGIN_BASE + layers as u64 * ALLOCATOR_MARGIN_PER_LAYER
}

/// The budget lines besides weights, KV cache, activations and stream buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Reserves {
    /// What the backend allocates for itself (CUDA: the bf16 GEMM's activation copy,
    /// cuBLAS's workspace, the rope table, the per-op temporaries, the copy engine's gather
    /// tables; the CPU's scratch is in the activations).
    pub backend_scratch: u64,
    /// The device driver's context (GPU budgets only).
    pub driver_context: u64,
    /// Allocation granularity, pools and temporaries past their region (GPU budgets only).
    pub allocator_margin: u64,
}

impl Reserves {
    /// The reserves of a model of `layers` layers on a GPU (`on_gpu`) or in host memory.
    pub fn new(on_gpu: bool, layers: usize, backend_scratch: u64) -> Reserves {
        Reserves {
            backend_scratch,
            driver_context: if on_gpu { DRIVER_CONTEXT_BYTES } else { 0 },
            allocator_margin: if on_gpu { allocator_margin(layers) } else { 0 },
        }
    }

    pub fn total(&self) -> u64 {
        self.backend_scratch + self.driver_context + self.allocator_margin
    }

    /// The non-zero lines, labelled as the plan and the runtime's arena name them.
    pub fn lines(&self) -> Vec<(&'static str, u64)> {
        [
            (BACKEND_SCRATCH, self.backend_scratch),
            (DRIVER_CONTEXT, self.driver_context),
            (ALLOCATOR_MARGIN, self.allocator_margin),
        ]
        .into_iter()
        .filter(|&(_, bytes)| bytes > 0)
        .collect()
    }
}

pub const BACKEND_SCRATCH: &str = "backend scratch";
pub const DRIVER_CONTEXT: &str = "driver context";
pub const ALLOCATOR_MARGIN: &str = "allocator margin";

/// The category of one of the runtime arena's labels ("layer 3 wq", "sparse FFN layer 3",
/// "KV cache", ...): the line of the budget it belongs to, as [`budget_line_of_item`] names
/// the plan's items.
pub fn budget_line_of_label(label: &str) -> &'static str {
    let is_attention = label.starts_with("layer ")
        && matches!(label.rsplit(' ').next(), Some("wq" | "wk" | "wv" | "wo"));
    budget_line(label, is_attention)
}

/// The category of one of the plan's resident items ("attention, layers 0-79", "sparse FFN
/// (keep 0.5), layers 0-62", "KV cache (4096 tokens, 2-byte elements)", ...).
pub fn budget_line_of_item(name: &str) -> &'static str {
    budget_line(name, name.starts_with("attention"))
}

fn budget_line(name: &str, is_attention: bool) -> &'static str {
    if is_attention {
        return "attention";
    }
    // Attention is told by the caller (its arena labels name matrices, not the line).
    LINES
        .into_iter()
        .find(|&line| line != "attention" && name.starts_with(line))
        .unwrap_or("other")
}

/// Every budget line, in the order both reports list them.
const LINES: [&str; 12] = [
    "LM head",
    "norms and biases",
    "attention",
    "sparse FFN",
    "FFN complement",
    "KV cache",
    "activations",
    "stream buffers",
    BACKEND_SCRATCH,
    DRIVER_CONTEXT,
    ALLOCATOR_MARGIN,
    "other",
];

/// The budget's lines in one order: each category's bytes summed, categories with no bytes
/// left out. What `plan` and `run` both print (`budget_lines` in their JSON).
pub fn budget_lines<'a>(
    entries: impl IntoIterator<Item = (&'static str, u64)> + 'a,
) -> Vec<BudgetLine> {
    let mut sums = [0u64; LINES.len()];
    for (what, bytes) in entries {
        if let Some(i) = LINES.iter().position(|&o| o == what) {
            sums[i] += bytes;
        }
    }
    LINES
        .iter()
        .zip(sums)
        .filter(|&(_, bytes)| bytes > 0)
        .map(|(&what, bytes)| BudgetLine { what, bytes })
        .collect()
}

/// One line of a budget: a category and its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BudgetLine {
    pub what: &'static str,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::offload::{
        gpu_temporaries_bytes, ScratchShape, DOWN_PARTIALS_MAX_BYTES, GEMM_F32_BLOCK_FLOATS,
    };

    #[test]
    fn gpu_reserves_hold_the_driver_and_a_margin_and_host_ones_do_not() {
        let r = Reserves::new(true, 80, 40 << 20);
        assert_eq!(r.driver_context, DRIVER_CONTEXT_BYTES);
        assert_eq!(r.allocator_margin, 576 << 20);
        assert_eq!(r.total(), (40 << 20) + (512 << 20) + (576 << 20));
        assert_eq!(
            Reserves::new(true, 0, 0).allocator_margin,
            ALLOCATOR_MARGIN_BASE
        );
        let host = Reserves::new(false, 80, 0);
        assert_eq!(host.total(), 0);
        assert!(host.lines().is_empty());
    }

    #[test]
    fn arena_labels_and_plan_items_fall_in_the_same_lines() {
        for (label, item, line) in [
            ("layer 7 wq", "attention, layers 0-79", "attention"),
            ("layer 12 wo", "attention, layer 0", "attention"),
            (
                "sparse FFN layer 3",
                "sparse FFN (keep 0.5), layers 0-62",
                "sparse FFN",
            ),
            (
                "FFN complement layer 0",
                "FFN complement, layer 0",
                "FFN complement",
            ),
            (
                "KV cache",
                "KV cache (4096 tokens, 2-byte elements)",
                "KV cache",
            ),
            (
                "norms and biases",
                "norms and biases (f32)",
                "norms and biases",
            ),
            (
                "stream buffers",
                "stream buffers (2 x 378 MiB)",
                "stream buffers",
            ),
            ("driver context", "driver context", "driver context"),
        ] {
            assert_eq!(budget_line_of_label(label), line, "{label}");
            assert_eq!(budget_line_of_item(item), line, "{item}");
        }
        // "layer 3 norm" is not attention.
        assert_eq!(budget_line_of_label("layer 3 norm"), "other");
        let lines = budget_lines([("KV cache", 5), ("attention", 2), ("attention", 3)]);
        assert_eq!(
            lines,
            vec![
                BudgetLine {
                    what: "attention",
                    bytes: 5
                },
                BudgetLine {
                    what: "KV cache",
                    bytes: 5
                }
            ]
        );
    }

    #[test]
    fn gpu_scratch_follows_the_shape() {
        let shape = ScratchShape {
            widest_cols: 14336,
            gemm_rows: 256,
            sparse_rows: 16,
            head_dim: 128,
            context: 4096,
            num_heads: 32,
            hidden: 4096,
            ffn_neurons: 14336,
        };
        let act = (256u64 * 14336 * 2).next_power_of_two();
        let rope = 2 * 4096 * 128 * 4;
        let temps = |act16| gpu_temporaries_bytes(&shape, act16);
        assert_eq!(
            gpu_scratch_bytes(&shape, true),
            act + CUBLAS_WORKSPACE_BYTES + rope + temps(true)
        );
        assert_eq!(
            gpu_scratch_bytes(&shape, false),
            CUBLAS_WORKSPACE_BYTES + rope + temps(false)
        );
    }

    #[test]
    fn temporaries_hold_the_largest_op() {
        let mut shape = ScratchShape {
            widest_cols: 14336,
            gemm_rows: 16,
            sparse_rows: 16,
            head_dim: 128,
            context: 8192,
            num_heads: 32,
            hidden: 4096,
            ffn_neurons: 14336,
        };
        let window = gpu_temporaries_bytes(&shape, true);
        // A K=16 window's sparse FFN: ids and activations of 16 x 14336 neurons, partials.
        let ffn = 2 * 16 * 14336 * 4 + DOWN_PARTIALS_MAX_BYTES as u64;
        assert!(window >= ffn && window < ffn + (1 << 20), "{window}");
        // The f32 GEMM's block dwarfs a window's lists.
        let f32_path = gpu_temporaries_bytes(&shape, false);
        assert!(f32_path >= GEMM_F32_BLOCK_FLOATS as u64 * 4);
        // A 256-token prefill chunk runs the dense FFN: its rows grow attention's share only.
        shape.gemm_rows = 256;
        let chunk = gpu_temporaries_bytes(&shape, true);
        assert_eq!(chunk, window);
        // Sparse rows scale the lists and activations; the partial sums' cap does not.
        shape.sparse_rows = 64;
        let tree = gpu_temporaries_bytes(&shape, true);
        let more_rows = 2 * (64 - 16) * 14336 * 4;
        assert!(
            tree.abs_diff(window + more_rows) < 4096,
            "{tree} vs {window}"
        );
    }
}
