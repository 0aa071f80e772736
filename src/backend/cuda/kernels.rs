//! The CUDA kernels' sources (`kernels/*.cu`, one op family per file), embedded in the
//! binary and compiled by NVRTC at run time ([`super::nvrtc`]) for the device's compute
//! capability. Each file documents its entry points' arguments and launch shapes at its top.

/// One kernel file and the `extern "C" __global__` entry points it defines (the names the
/// backend looks up in the compiled module).
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

/// Name under which every kernel file includes [`COMMON_HEADER`].
pub const COMMON_HEADER_NAME: &str = "common.cuh";
/// Shared helpers (dtype conversion, 16-byte loads, reductions), given to NVRTC as an
/// in-memory header: the kernels directory is not there at run time.
pub const COMMON_HEADER: &str = include_str!("../../../kernels/common.cuh");

macro_rules! kernel {
    ($file:literal, [$($f:literal),* $(,)?]) => {
        KernelSource {
            file: $file,
            source: include_str!(concat!("../../../kernels/", $file)),
            functions: &[$($f),*],
        }
    };
}

/// Every kernel file with its entry points.
pub const KERNELS: &[KernelSource] = &[
    kernel!("rmsnorm.cu", ["rmsnorm_f32"]),
    kernel!("rope.cu", ["rope_f32", "rope_at_f32"]),
    kernel!(
        "elementwise.cu",
        [
            "silu_mul_f32",
            "silu_f32",
            "add_f32",
            "add_bias_f32",
            "copy_rows_f32",
            "copy_rows_u16",
            "move_rows_f32",
            "move_rows_u16",
        ]
    ),
    kernel!("embedding.cu", ["embed_bf16", "embed_f16", "embed_f32"]),
    kernel!("convert.cu", ["f32_to_bf16", "f32_to_f16"]),
    kernel!(
        "quant.cu",
        [
            "matvec_q4_0",
            "matmul_t16_q4_0",
            "matmul_t64_q4_0",
            "embed_q4_0",
            "matvec_q4_1",
            "matmul_t16_q4_1",
            "matmul_t64_q4_1",
            "embed_q4_1",
            "matvec_q8_0",
            "matmul_t16_q8_0",
            "matmul_t64_q8_0",
            "embed_q8_0",
            "matvec_q4_k",
            "matmul_t16_q4_k",
            "matmul_t64_q4_k",
            "embed_q4_k",
            "matvec_q6_k",
            "matmul_t16_q6_k",
            "matmul_t64_q6_k",
            "embed_q6_k",
        ]
    ),
    kernel!(
        "attention.cu",
        [
            "attention_chunk_f32",
            "attention_chunk_f16",
            "attention_merge_f32"
        ]
    ),
    kernel!(
        "matvec.cu",
        [
            "matvec_bf16",
            "matvec_f16",
            "matvec_f32",
            "matmul_t16_bf16",
            "matmul_t16_f16",
            "matmul_t16_f32",
            "matmul_t64_bf16",
            "matmul_t64_f16",
            "matmul_t64_f32",
        ]
    ),
    kernel!(
        "bundle_window.cu",
        [
            "bundle_act_t16_bf16",
            "bundle_act_t16_f16",
            "bundle_act_t16_f32",
            "bundle_act_t64_bf16",
            "bundle_act_t64_f16",
            "bundle_act_t64_f32",
            "bundle_down_t16_bf16",
            "bundle_down_t16_f16",
            "bundle_down_t16_f32",
            "bundle_down_t64_bf16",
            "bundle_down_t64_f16",
            "bundle_down_t64_f32",
        ]
    ),
    kernel!(
        "neurons.cu",
        [
            "bundle_act_bf16",
            "bundle_act_f16",
            "bundle_act_f32",
            "bundle_down_bf16",
            "bundle_down_f16",
            "bundle_down_f32",
            "reduce_splits_f32",
            "row_inv_norm2_f32",
            "accumulate_neuron_scores_f32",
            "select_threshold_f32",
        ]
    ),
    kernel!("sampling.cu", ["argmax_f32", "row_verdict_f32"]),
    kernel!("gather.cu", ["gather_pieces"]),
    kernel!(
        "assemble.cu",
        ["assemble_compact_u16", "assemble_compact_u32"]
    ),
];
