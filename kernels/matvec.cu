// Weight x activation products for decode and small batches (Backend::matmul with n <= 16;
// longer batches go to cuBLAS):
//   out[t, r] = sum_c w[r, c] * x[t, c]    for r < rows, t < n_tokens
// w: [rows, cols] of the stored dtype (bf16, f16, f32); x: [n_tokens, cols] f32;
// out: [n_tokens, rows] f32, distinct from x.
//
// One warp per weight row: its lanes read consecutive 16-byte chunks (8 bf16/f16 or 4 f32),
// so every warp load is one contiguous 512-byte request and the row streams from memory
// once per call (per block of tokens); f32 accumulation, warp shuffle reduction. Rows whose
// 16-byte alignment cannot be guaranteed (cols not a multiple of 8 / 4, or unaligned
// buffers) are read element by element, with the same result.
//
// matvec_bf16 / matvec_f16 / matvec_f32(w, x, out, rows, cols, n_tokens)
//   one token at a time (decode: n_tokens = 1; larger n re-reads w per token).
// matmul_small_bf16 / matmul_small_f16 / matmul_small_f32(w, x, out, rows, cols, n_tokens)
//   blocks of 8 tokens per pass over w (2..16 tokens: verification windows).
//   Both: grid = (ceil(rows / warps)), blockDim.x = 32 * warps (256 suggested).
#include "common.cuh"

template <typename T, int TOK>
__device__ __forceinline__ void matmul_rows(const T* __restrict__ w, const float* __restrict__ x,
                                            float* __restrict__ out, unsigned rows,
                                            unsigned cols, unsigned n_tokens) {
    const unsigned lane = threadIdx.x & 31u;
    const size_t r = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    // r is the same for the whole warp, so the warp leaves together (the shuffles below
    // need every lane).
    if (r >= rows) {
        return;
    }
    const T* row = w + r * cols;
    const bool wide = wide_ok(w, x, cols);
    for (unsigned t0 = 0; t0 < n_tokens; t0 += TOK) {
        const unsigned nt = min((unsigned)TOK, n_tokens - t0);
        float acc[TOK];
#pragma unroll
        for (int j = 0; j < TOK; ++j) {
            acc[j] = 0.0f;
        }
        row_dot<T, TOK>(row, x + (size_t)t0 * cols, cols, nt, wide, lane, acc);
#pragma unroll
        for (int j = 0; j < TOK; ++j) {
            const float s = warp_sum(acc[j]);
            if (lane == 0 && (unsigned)j < nt) {
                out[(size_t)(t0 + j) * rows + r] = s;
            }
        }
    }
}

#define MATMUL_ENTRY(NAME, T, TOK)                                                            \
    extern "C" __global__ void NAME(const T* __restrict__ w, const float* __restrict__ x,     \
                                    float* __restrict__ out, unsigned rows, unsigned cols,    \
                                    unsigned n_tokens) {                                      \
        matmul_rows<T, TOK>(w, x, out, rows, cols, n_tokens);                                 \
    }

MATMUL_ENTRY(matvec_bf16, __nv_bfloat16, 1)
MATMUL_ENTRY(matvec_f16, __half, 1)
MATMUL_ENTRY(matvec_f32, float, 1)
MATMUL_ENTRY(matmul_small_bf16, __nv_bfloat16, 8)
MATMUL_ENTRY(matmul_small_f16, __half, 8)
MATMUL_ENTRY(matmul_small_f32, float, 8)
