// f32 activations rounded to a 16-bit float, the B operand of the bf16/f16 cuBLAS GEMM
// (src/backend/cuda/ops_matmul/gemm.rs): cublasGemmEx wants both inputs in one 16-bit type and
// the weights stay as stored, so the activations are the ones converted.
//
// Grid-stride kernels: any grid works; grid = (min(ceil(len / blockDim.x), 4 * SMs)),
// blockDim.x = 256 suggested.
// f32_to_bf16(x, out, len)   out[i] = bf16(x[i]),  i < len
// f32_to_f16(x, out, len)    out[i] = f16(x[i]),   i < len
//   x: [len] f32; out: [len] of the 16-bit type, not overlapping x.
//   Round to nearest even (the _rn intrinsics), as a checkpoint's conversion to bf16/f16 does;
//   NaN stays NaN and infinities stay infinite. f16 has a narrower range than f32: values
//   past 65504 (plus half an ulp) become infinite, as they would in an f16 forward pass.
#include "common.cuh"

extern "C" __global__ void f32_to_bf16(const float* __restrict__ x,
                                       __nv_bfloat16* __restrict__ out, unsigned len) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = __float2bfloat16_rn(x[i]);
    }
}

extern "C" __global__ void f32_to_f16(const float* __restrict__ x, __half* __restrict__ out,
                                      unsigned len) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = __float2half_rn(x[i]);
    }
}
