// Element-wise ops on f32 activations and row copies (Backend::silu_mul, silu, add, add_bias,
// copy_rows, move_rows).
//
// Grid-stride kernels: any grid works; grid = (min(ceil(len / blockDim.x), 4 * SMs)),
// blockDim.x = 256 suggested.
// silu_mul_f32(gate, up, len)        gate[i] = silu(gate[i]) * up[i],  i < len
// silu_f32(x, len)                   x[i] = silu(x[i])
// add_f32(x, y, len)                 x[i] += y[i]
// add_bias_f32(x, bias, n_rows, width)
//                                    x[t, i] += bias[i],  t < n_rows, i < width
// copy_rows_f32(src, src_row, dst, dst_row, n_rows, row_len)
//                                    dst[dst_row + r, :] = src[src_row + r, :], r < n_rows
//                                    (src and dst distinct; a device-to-device memcpy does
//                                    the same, this keeps it on the compute stream as a kernel)
// copy_rows_u16(...)                 the same for 16-bit elements (an f16 KV cache)
//
// move_rows_f32(buf, src_row, dst_row, n_rows, row_len), move_rows_u16 (16-bit elements)
//   Moves n_rows rows of row_len floats from src_row down to dst_row <= src_row inside one
//   buffer; the ranges may overlap (compacting an accepted tree path in the KV cache).
//   grid = (1) exactly (other blocks return at once), blockDim.x = 32 * warps (1024
//   suggested). dst_row >= src_row moves nothing (equal: nothing to do; greater: the host
//   reports it as an error, as the CPU does).
#include "common.cuh"

extern "C" __global__ void silu_mul_f32(float* __restrict__ gate, const float* __restrict__ up,
                                        unsigned len) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x) {
        gate[i] = silu(gate[i]) * up[i];
    }
}

extern "C" __global__ void silu_f32(float* __restrict__ x, unsigned len) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x) {
        x[i] = silu(x[i]);
    }
}

extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ y,
                                   unsigned len) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}

extern "C" __global__ void add_bias_f32(float* __restrict__ x, const float* __restrict__ bias,
                                        unsigned n_rows, unsigned width) {
    const size_t len = (size_t)n_rows * width;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x) {
        x[i] += bias[i % width];
    }
}

template <typename T>
__device__ __forceinline__ void copy_rows(const T* __restrict__ src, unsigned src_row,
                                          T* __restrict__ dst, unsigned dst_row, unsigned n_rows,
                                          unsigned row_len) {
    const size_t len = (size_t)n_rows * row_len;
    const T* s = src + (size_t)src_row * row_len;
    T* d = dst + (size_t)dst_row * row_len;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (size_t)gridDim.x * blockDim.x) {
        d[i] = s[i];
    }
}

extern "C" __global__ void copy_rows_f32(const float* __restrict__ src, unsigned src_row,
                                         float* __restrict__ dst, unsigned dst_row,
                                         unsigned n_rows, unsigned row_len) {
    copy_rows(src, src_row, dst, dst_row, n_rows, row_len);
}

extern "C" __global__ void copy_rows_u16(const unsigned short* __restrict__ src,
                                         unsigned src_row, unsigned short* __restrict__ dst,
                                         unsigned dst_row, unsigned n_rows, unsigned row_len) {
    copy_rows(src, src_row, dst, dst_row, n_rows, row_len);
}

// Elements each thread carries per step of move_rows_f32.
#define MOVE_UNROLL 4

// One block walks the range front to back, a step of MOVE_UNROLL * blockDim.x elements at a
// time: all of a step's reads finish (barrier) before any of its writes. A write to element
// i of the destination lands on source element i - (src - dst), which is below the current
// step's end, so it was read already: nothing is overwritten before it is read, whatever the
// overlap. (Several blocks could not give that guarantee; the moves are a few rows.)
template <typename T>
__device__ __forceinline__ void move_rows(T* buf, unsigned src_row, unsigned dst_row,
                                          unsigned n_rows, unsigned row_len) {
    if (blockIdx.x != 0 || dst_row >= src_row) {
        return;
    }
    const size_t len = (size_t)n_rows * row_len;
    const T* s = buf + (size_t)src_row * row_len;
    T* d = buf + (size_t)dst_row * row_len;
    const size_t step = (size_t)MOVE_UNROLL * blockDim.x;
    for (size_t base = 0; base < len; base += step) {
        T v[MOVE_UNROLL];
#pragma unroll
        for (unsigned u = 0; u < MOVE_UNROLL; ++u) {
            const size_t i = base + (size_t)u * blockDim.x + threadIdx.x;
            v[u] = i < len ? s[i] : T(0);
        }
        __syncthreads();
#pragma unroll
        for (unsigned u = 0; u < MOVE_UNROLL; ++u) {
            const size_t i = base + (size_t)u * blockDim.x + threadIdx.x;
            if (i < len) {
                d[i] = v[u];
            }
        }
        __syncthreads();
    }
}

extern "C" __global__ void move_rows_f32(float* buf, unsigned src_row, unsigned dst_row,
                                         unsigned n_rows, unsigned row_len) {
    move_rows(buf, src_row, dst_row, n_rows, row_len);
}

extern "C" __global__ void move_rows_u16(unsigned short* buf, unsigned src_row,
                                         unsigned dst_row, unsigned n_rows, unsigned row_len) {
    move_rows(buf, src_row, dst_row, n_rows, row_len);
}
