// Weight x activation products for decode and small batches (Backend::matmul with n <= 16;
// longer float batches go to cuBLAS when it is there):
//   out[t, r] = sum_c w[r, c] * x[t, c]    for r < rows, t < n_tokens
// w: [rows, cols] of the stored dtype (bf16, f16, f32); x: [n_tokens, cols] f32;
// out: [n_tokens, rows] f32, distinct from x.
//
// One warp per weight row: its lanes read consecutive 16-byte chunks (8 bf16/f16 or 4 f32),
// so every warp load is one contiguous 512-byte request and the row streams from memory
// once per window of tokens (16 or 64, held in registers); f32 accumulation in the same
// per-lane order for every kernel here, warp shuffle reduction. Rows whose 16-byte
// alignment cannot be guaranteed (cols not a multiple of 8 / 4, or unaligned buffers) are
// read element by element (same sums up to rounding).
//
// matvec_bf16 / matvec_f16 / matvec_f32(w, x, out, rows, cols, n_tokens)
//   one token at a time (decode: n_tokens = 1; larger n re-reads w per token).
// matmul_t16_bf16 / _f16 / _f32(w, x, out, rows, cols, n_tokens)
//   windows of 16 tokens per pass over w (2..16 tokens, a verification window: w is read
//   once), x staged in shared memory (window_dot in common.cuh; 16 KiB static).
// matmul_t64_bf16 / _f16 / _f32(w, x, out, rows, cols, n_tokens)
//   windows of 64 tokens per pass over w (longer batches when cuBLAS is absent).
//   All: grid = (ceil(rows / warps)), blockDim.x = 32 * warps (256 suggested).
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

// A window product: one warp per row, every warp of the block in the staging barriers
// (warps past `rows` hold no row rather than leaving).
template <typename T, int TOK>
__device__ __forceinline__ void matmul_tiled(const T* __restrict__ w, const float* __restrict__ x,
                                             float* __restrict__ out, unsigned rows,
                                             unsigned cols, unsigned n_tokens, XTile& xs) {
    const size_t r = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const FloatRow<T> row{r < rows ? w + r * cols : nullptr, cols, wide_ok(w, x, cols)};
    matmul_window<FloatRow<T>, TOK>(row, r, x, out, rows, cols, n_tokens, xs);
}

#define MATVEC_ENTRY(NAME, T)                                                                 \
    extern "C" __global__ void NAME(const T* __restrict__ w, const float* __restrict__ x,     \
                                    float* __restrict__ out, unsigned rows, unsigned cols,    \
                                    unsigned n_tokens) {                                      \
        matmul_rows<T, 1>(w, x, out, rows, cols, n_tokens);                                   \
    }

#define MATMUL_ENTRY(NAME, T, TOK)                                                            \
    extern "C" __global__ void NAME(const T* __restrict__ w, const float* __restrict__ x,     \
                                    float* __restrict__ out, unsigned rows, unsigned cols,    \
                                    unsigned n_tokens) {                                      \
        __shared__ XTile xs;                                                                  \
        matmul_tiled<T, TOK>(w, x, out, rows, cols, n_tokens, xs);                            \
    }

MATVEC_ENTRY(matvec_bf16, __nv_bfloat16)
MATVEC_ENTRY(matvec_f16, __half)
MATVEC_ENTRY(matvec_f32, float)
MATMUL_ENTRY(matmul_t16_bf16, __nv_bfloat16, 16)
MATMUL_ENTRY(matmul_t16_f16, __half, 16)
MATMUL_ENTRY(matmul_t16_f32, float, 16)
MATMUL_ENTRY(matmul_t64_bf16, __nv_bfloat16, 64)
MATMUL_ENTRY(matmul_t64_f16, __half, 64)
MATMUL_ENTRY(matmul_t64_f32, float, 64)
