// Helpers shared by every kernel file: weight dtype conversion (bf16 / f16 / f32 to f32),
// 16-byte weight loads, warp and block reductions.
//
// Not a kernel file: NVRTC gets it as an in-memory header (src/backend/cuda/nvrtc.rs), each
// *.cu file includes it as "common.cuh". Conventions of all kernels:
// - sizes are u32 (`unsigned`); every product that indexes memory is formed in 64 bits (size_t);
// - activations are f32; weights are row-major [rows, cols] of bf16, f16 or f32 (the _bf16,
//   _f16 and _f32 entry points), read through the read-only cache;
// - "blockDim.x = 32 * warps" means a multiple of 32 between 32 and 1024.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define FULL_MASK 0xffffffffu

// No <cmath> under NVRTC: the special values by their bits.
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// bf16 / f16 / f32 element to f32 (exact for all three).
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

// The two 16-bit elements packed in a little-endian 32-bit word: low half first.
__device__ __forceinline__ void bf16x2_to_f32(unsigned w, float* out) {
    out[0] = __bfloat162float(__ushort_as_bfloat16((unsigned short)(w & 0xffffu)));
    out[1] = __bfloat162float(__ushort_as_bfloat16((unsigned short)(w >> 16)));
}
__device__ __forceinline__ void f16x2_to_f32(unsigned w, float* out) {
    out[0] = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
    out[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
}

// One 16-byte load of weights converted to f32: N elements (8 of bf16/f16, 4 of f32).
// `p` must be 16-byte aligned; callers check with wide_ok() first.
template <typename T> struct Wide;

template <> struct Wide<__nv_bfloat16> {
    static constexpr unsigned N = 8;
    static __device__ __forceinline__ void load(const __nv_bfloat16* p, float* out) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
        bf16x2_to_f32(u.x, out);
        bf16x2_to_f32(u.y, out + 2);
        bf16x2_to_f32(u.z, out + 4);
        bf16x2_to_f32(u.w, out + 6);
    }
};

template <> struct Wide<__half> {
    static constexpr unsigned N = 8;
    static __device__ __forceinline__ void load(const __half* p, float* out) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
        f16x2_to_f32(u.x, out);
        f16x2_to_f32(u.y, out + 2);
        f16x2_to_f32(u.z, out + 4);
        f16x2_to_f32(u.w, out + 6);
    }
};

template <> struct Wide<float> {
    static constexpr unsigned N = 4;
    static __device__ __forceinline__ void load(const float* p, float* out) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(p));
        out[0] = v.x;
        out[1] = v.y;
        out[2] = v.z;
        out[3] = v.w;
    }
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<size_t>(p) & 15u) == 0;
}

// Whether rows of `cols` weights starting at `w` (and f32 rows of `cols` at `x`) can be read
// with 16-byte loads: every row start is then 16-byte aligned. Otherwise kernels fall back
// to element loads (slower, same result).
template <typename T>
__device__ __forceinline__ bool wide_ok(const T* w, const float* x, unsigned cols) {
    return cols % Wide<T>::N == 0 && aligned16(w) && aligned16(x);
}

// Eight consecutive weights starting at `p` as f32. `wide`: `p` is 16-byte aligned (two
// loads for f32, one for 16-bit types); otherwise element loads of the first `valid` (the
// rest read as 0).
template <typename T>
__device__ __forceinline__ void load8(const T* p, bool wide, unsigned valid, float* out) {
    if (wide) {
        Wide<T>::load(p, out);
        if constexpr (Wide<T>::N == 4) {
            Wide<T>::load(p + 4, out + 4);
        }
    } else {
#pragma unroll
        for (unsigned k = 0; k < 8; ++k) {
            out[k] = k < valid ? to_f32(p[k]) : 0.0f;
        }
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, o);
    }
    return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, o);
    }
    return v;
}

// Max over the warp; NaN lanes are ignored (fmaxf), as f32::max does on the CPU.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    }
    return v;
}

// Sum over the block, returned to every thread. Every thread of the block must call it
// (blockDim.x = 32 * warps). The trailing barrier lets the caller use it again at once.
template <typename F>
__device__ __forceinline__ F block_sum(F v) {
    __shared__ F partial[32];
    __shared__ F total;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        F s = lane < (blockDim.x >> 5) ? partial[lane] : F(0);
        s = warp_sum(s);
        if (lane == 0) {
            total = s;
        }
    }
    __syncthreads();
    const F r = total;
    __syncthreads();
    return r;
}

// Max over the block (NaN ignored), returned to every thread; same calling rules as block_sum.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float s = lane < (blockDim.x >> 5) ? partial[lane] : neg_inf();
        s = warp_max(s);
        if (lane == 0) {
            total = s;
        }
    }
    __syncthreads();
    const float r = total;
    __syncthreads();
    return r;
}

// This lane's partial dot products of one weight row (`cols` elements at `row`) with `nt`
// (<= TOK) activation rows of x (`cols` floats apart): acc[j] += sum over this lane's columns
// of row[c] * x[j, c]. The caller sums acc over the warp. `wide`: see wide_ok(); lanes then
// read consecutive 16-byte chunks, so each warp load is one contiguous 512-byte request.
template <typename T, int TOK>
__device__ __forceinline__ void row_dot(const T* __restrict__ row, const float* __restrict__ x,
                                        unsigned cols, unsigned nt, bool wide, unsigned lane,
                                        float (&acc)[TOK]) {
    if (wide) {
        constexpr unsigned N = Wide<T>::N;
        const unsigned chunks = cols / N;
#pragma unroll 4
        for (unsigned k = lane; k < chunks; k += 32) {
            float wv[N];
            Wide<T>::load(row + (size_t)k * N, wv);
#pragma unroll
            for (int j = 0; j < TOK; ++j) {
                if ((unsigned)j < nt) {
                    const float4* xp =
                        reinterpret_cast<const float4*>(x + (size_t)j * cols + (size_t)k * N);
#pragma unroll
                    for (unsigned q = 0; q < N / 4; ++q) {
                        const float4 xv = __ldg(xp + q);
                        acc[j] = fmaf(wv[4 * q], xv.x, acc[j]);
                        acc[j] = fmaf(wv[4 * q + 1], xv.y, acc[j]);
                        acc[j] = fmaf(wv[4 * q + 2], xv.z, acc[j]);
                        acc[j] = fmaf(wv[4 * q + 3], xv.w, acc[j]);
                    }
                }
            }
        }
    } else {
        for (unsigned c = lane; c < cols; c += 32) {
            const float wv = to_f32(row[c]);
#pragma unroll
            for (int j = 0; j < TOK; ++j) {
                if ((unsigned)j < nt) {
                    acc[j] = fmaf(wv, __ldg(x + (size_t)j * cols + c), acc[j]);
                }
            }
        }
    }
}

// ---- Token windows: each weight read once for up to 64 tokens ----
//
// A verification window (K tokens) or a tree (up to 64 rows) multiplies the same weights by
// every token. window_dot() reads each weight of a row once per window: a lane loads its 8
// weights of a 256-column tile into registers and applies them to all TOK tokens before the
// next tile. The block stages the activations of 16 tokens x 256 columns (16 KiB) in shared
// memory (one XTile; a 64-token window stages four per column tile), so the block's warps,
// one weight row each, share one read of x.
//
// Lanes and columns of a tile (c0 = the tile's first column):
//   16-bit weights (SWIZZLE): lane L owns columns c0 + 8L .. + 8 (one 16-byte load);
//   f32 weights and quantized rows: lane L owns c0 + 4L .. + 4 and c0 + 128 + 4L .. + 4
//   (f32: two 16-byte loads), or c0 + L + 32e, e < 8 (quantized, element by element).
// Either way a lane sums its columns in the order matvec.cu's row_dot and quant.cu's
// matvec visit them, so each output is rounded as those kernels round it.
#define XTILE_TOKENS 16u
#define XTILE_COLS 256u

// Float4 slot s of an XTile: token s / 64, slot s % 64 of that token's 64 float4s.
typedef float4 XTile[XTILE_TOKENS * XTILE_COLS / 4];

// The slot of a token's float4 holding tile columns 4n .. 4n + 4. SWIZZLE puts column 8L +
// 4q at slot 32q + L, so lane L's two float4s (q = 0, 1) are 32 slots apart and a warp's
// shared loads hit consecutive 16-byte words (no bank conflicts).
template <bool SWIZZLE>
__device__ __forceinline__ unsigned xtile_slot(unsigned n) {
    return SWIZZLE ? (n & 1u) * 32u + (n >> 1) : n;
}

// Whether x rows of `cols` floats can be staged with 16-byte loads.
__device__ __forceinline__ bool x_vec_ok(const float* x, unsigned cols) {
    return cols % 4 == 0 && aligned16(x);
}

// The whole block stages x[t0 + j, c0 .. c0 + 256] for j < nt (<= 16) into xs (zeros past
// cols; tokens past nt are left as they are: nobody reads them). Global reads are
// coalesced: consecutive threads, consecutive float4s.
template <bool SWIZZLE>
__device__ __forceinline__ void stage_x(XTile& xs, const float* __restrict__ x, unsigned cols,
                                        unsigned t0, unsigned nt, unsigned c0, bool vec) {
    for (unsigned s = threadIdx.x; s < nt * 64u; s += blockDim.x) {
        const unsigned j = s >> 6, c = c0 + 4u * (s & 63u);
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (c < cols) {
            const float* p = x + (size_t)(t0 + j) * cols + c;
            if (vec) {
                v = __ldg(reinterpret_cast<const float4*>(p));
            } else {
                v.x = __ldg(p);
                v.y = c + 1 < cols ? __ldg(p + 1) : 0.0f;
                v.z = c + 2 < cols ? __ldg(p + 2) : 0.0f;
                v.w = c + 3 < cols ? __ldg(p + 3) : 0.0f;
            }
        }
        xs[(s & ~63u) + xtile_slot<SWIZZLE>(s & 63u)] = v;
    }
}

// A row of bf16 / f16 / f32 weights for window_dot (row == nullptr: a warp without a row,
// which only helps stage x and reads zeros). `wide`: wide_ok() of the weights and x.
template <typename T>
struct FloatRow {
    static constexpr bool SWIZZLE = Wide<T>::N == 8;
    const T* row;
    unsigned cols;
    bool wide;

    __device__ __forceinline__ void load(unsigned c0, unsigned lane, float (&w)[8]) const {
#pragma unroll
        for (unsigned q = 0; q < 2; ++q) {
            // This lane's q-th group of 4 columns (see the lane layout above).
            const unsigned c = c0 + (SWIZZLE ? 8u * lane + 4u * q : 128u * q + 4u * lane);
            if (row != nullptr && wide && c < cols) {
                if constexpr (SWIZZLE) {
                    // One 16-byte load holds both groups.
                    if (q == 0) {
                        Wide<T>::load(row + c, w);
                    }
                } else {
                    Wide<T>::load(row + c, w + 4 * q);
                }
            } else {
#pragma unroll
                for (unsigned e = 0; e < 4; ++e) {
                    w[4 * q + e] =
                        row != nullptr && c + e < cols ? to_f32(row[c + e]) : 0.0f;
                }
            }
        }
    }

    __device__ __forceinline__ float dot(const float (&w)[8], const float4* xj, unsigned lane,
                                         float acc) const {
#pragma unroll
        for (unsigned q = 0; q < 2; ++q) {
            const float4 v = xj[32 * q + lane];
            acc = fmaf(w[4 * q], v.x, acc);
            acc = fmaf(w[4 * q + 1], v.y, acc);
            acc = fmaf(w[4 * q + 2], v.z, acc);
            acc = fmaf(w[4 * q + 3], v.w, acc);
        }
        return acc;
    }
};

// acc[j] = this lane's partial dot product of `row` with x[t0 + j] for j < nt (<= TOK, a
// multiple of 16); the caller sums acc over the warp. Every thread of the block must call it
// with the same x, cols, t0, nt and vec (x_vec_ok): it stages x between barriers.
template <typename Row, int TOK>
__device__ __forceinline__ void window_dot(const Row& row, const float* __restrict__ x,
                                           unsigned cols, unsigned t0, unsigned nt, bool vec,
                                           XTile& xs, float (&acc)[TOK]) {
    const unsigned lane = threadIdx.x & 31u;
#pragma unroll
    for (int j = 0; j < TOK; ++j) {
        acc[j] = 0.0f;
    }
    for (unsigned c0 = 0; c0 < cols; c0 += XTILE_COLS) {
        float w[8];
        row.load(c0, lane, w);
#pragma unroll
        for (int s0 = 0; s0 < TOK; s0 += (int)XTILE_TOKENS) {
            if ((unsigned)s0 < nt) {
                // The previous tile's readers are done before it is overwritten.
                __syncthreads();
                stage_x<Row::SWIZZLE>(xs, x, cols, t0 + s0, min(XTILE_TOKENS, nt - s0), c0,
                                      vec);
                __syncthreads();
#pragma unroll
                for (int j = 0; j < (int)XTILE_TOKENS; ++j) {
                    if ((unsigned)(s0 + j) < nt) {
                        acc[s0 + j] = row.dot(w, xs + j * 64, lane, acc[s0 + j]);
                    }
                }
            }
        }
    }
}

// The rows of a window product (matvec.cu, quant.cu): out[t, r] = row r . x[t] for
// t < n_tokens, one warp per row r (row.row == nullptr past `rows`: that warp only stages),
// TOK tokens per pass over the row.
template <typename Row, int TOK>
__device__ __forceinline__ void matmul_window(const Row& row, size_t r,
                                              const float* __restrict__ x,
                                              float* __restrict__ out, unsigned rows,
                                              unsigned cols, unsigned n_tokens, XTile& xs) {
    const unsigned lane = threadIdx.x & 31u;
    const bool vec = x_vec_ok(x, cols);
    for (unsigned t0 = 0; t0 < n_tokens; t0 += TOK) {
        const unsigned nt = min((unsigned)TOK, n_tokens - t0);
        float acc[TOK];
        window_dot<Row, TOK>(row, x, cols, t0, nt, vec, xs, acc);
#pragma unroll
        for (int j = 0; j < TOK; ++j) {
            if ((unsigned)j < nt) {
                const float s = warp_sum(acc[j]);
                if (lane == 0 && r < rows) {
                    out[(size_t)(t0 + j) * rows + r] = s;
                }
            }
        }
    }
}

// SiLU as the CPU computes it: v / (1 + e^-v).
__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

// One token's embedding row per block (embedding.cu, quant.cu): out[t, c] = element(id, c)
// for c < cols, id = tokens[t]; an id past vocab (the host checks ids first) gives a row of
// NaN rather than a read past the table.
template <typename Element>
__device__ __forceinline__ void embed_rows(Element element, const unsigned* __restrict__ tokens,
                                           float* __restrict__ out, unsigned n_tokens,
                                           unsigned vocab, unsigned cols) {
    const unsigned t = blockIdx.x;
    if (t >= n_tokens) {
        return;
    }
    const unsigned id = tokens[t];
    float* o = out + (size_t)t * cols;
    for (unsigned c = threadIdx.x; c < cols; c += blockDim.x) {
        o[c] = id < vocab ? element(id, c) : quiet_nan();
    }
}
