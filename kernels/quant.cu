// Quantized weights as stored in GGUF files (ggml block formats; the CPU reference is
// src/tensor/quant.rs): products and embedding rows, de-quantized element by element in
// registers (the weights are never expanded in device memory).
//
// Formats (block elements, block bytes):
//   q4_0 (32, 18): d f16, 16 bytes of nibbles (low: elements 0..16, high: 16..32), d * (q - 8)
//   q4_1 (32, 20): d f16, m f16, nibbles as q4_0, d * q + m
//   q8_0 (32, 34): d f16, 32 i8, d * q
//   q4_k (256, 144): d, dmin f16, 12 bytes of 6-bit scales/minima, 128 bytes of nibbles
//   q6_k (256, 210): 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 i8 scales, d f16
// Every product and sum of the de-quantization is rounded as the CPU reference rounds it
// (__fmul_rn / __fadd_rn: no FMA contraction), so converted weights are bit-equal to it.
//
// matvec_<fmt>(w, x, out, rows, cols, n_tokens)      one token per pass over w
// matmul_t16_<fmt>(w, x, out, rows, cols, n_tokens)  16 tokens per pass over w
// matmul_t64_<fmt>(w, x, out, rows, cols, n_tokens)  64 tokens per pass over w
//   out[t, r] = sum_c w[r, c] * x[t, c]; w: [rows, cols] blocks (cols a multiple of the
//   block length, rows back to back); x: [n_tokens, cols] f32; out: [n_tokens, rows] f32.
//   One warp per row, lane L over the row's elements L, L + 32, ...; f32 sums in that order,
//   warp shuffle reduction (as matvec.cu). The t16 / t64 kernels de-quantize each weight
//   once per window and stage x in shared memory (window_dot in common.cuh; 16 KiB static).
//   grid = (ceil(rows / warps)), blockDim.x = 32 * warps (256 suggested).
// embed_<fmt>(table, tokens, out, n_tokens, vocab, cols)
//   out[t, :] = table[tokens[t], :] as f32; grid = (n_tokens), one block per token; an id
//   past vocab gives a row of NaN (the host checks ids first, as embedding.cu).
#include "common.cuh"

__device__ __forceinline__ float f16_at(const unsigned char* p) {
    return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

enum Fmt { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, Q4_K = 3, Q6_K = 4 };

template <int F> struct Block;
template <> struct Block<Q4_0> { static constexpr unsigned elems = 32, bytes = 18; };
template <> struct Block<Q4_1> { static constexpr unsigned elems = 32, bytes = 20; };
template <> struct Block<Q8_0> { static constexpr unsigned elems = 32, bytes = 34; };
template <> struct Block<Q4_K> { static constexpr unsigned elems = 256, bytes = 144; };
template <> struct Block<Q6_K> { static constexpr unsigned elems = 256, bytes = 210; };

// Sub-block j's 6-bit scale and minimum of a Q4_K block's 12 scale bytes s.
__device__ __forceinline__ void scale_min_k4(unsigned j, const unsigned char* s, float* sc,
                                             float* m) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *m = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// Element i of the block at b.
template <int F>
__device__ __forceinline__ float dequant(const unsigned char* b, unsigned i) {
    if (F == Q4_0 || F == Q4_1) {
        const unsigned char* qs = b + (F == Q4_0 ? 2 : 4);
        const int q = i < 16 ? (qs[i] & 0xF) : (qs[i - 16] >> 4);
        if (F == Q4_0) {
            return __fmul_rn(f16_at(b), (float)(q - 8));
        }
        return __fadd_rn(__fmul_rn(f16_at(b), (float)q), f16_at(b + 2));
    } else if (F == Q8_0) {
        return __fmul_rn(f16_at(b), (float)(signed char)b[2 + i]);
    } else if (F == Q4_K) {
        const unsigned chunk = i / 64, l = i % 32, high = (i % 64) / 32;
        float sc, m;
        scale_min_k4(2 * chunk + high, b + 4, &sc, &m);
        const unsigned char q = b[16 + 32 * chunk + l];
        const float d = __fmul_rn(f16_at(b), sc), dm = __fmul_rn(f16_at(b + 2), m);
        return __fsub_rn(__fmul_rn(d, (float)(high ? q >> 4 : q & 0xF)), dm);
    } else {
        const unsigned half = i / 128, g = (i % 128) / 32, l = i % 32;
        const unsigned char* ql = b + 64 * half;
        const unsigned char* qh = b + 128 + 32 * half;
        const signed char* sc = (const signed char*)(b + 192 + 8 * half);
        const unsigned char low = (g & 1) ? ql[l + 32] : ql[l];
        const int nib = g >= 2 ? (low >> 4) : (low & 0xF);
        const int q = nib | (((qh[l] >> (2 * g)) & 3) << 4);
        const float scale = __fmul_rn(f16_at(b + 208), (float)sc[l / 16 + 2 * g]);
        return __fmul_rn(scale, (float)(q - 32));
    }
}

// Element c of a row of blocks.
template <int F>
__device__ __forceinline__ float row_element(const unsigned char* row, unsigned c) {
    return dequant<F>(row + (size_t)(c / Block<F>::elems) * Block<F>::bytes,
                      c % Block<F>::elems);
}

template <int F, int TOK>
__device__ __forceinline__ void matmul_q(const unsigned char* __restrict__ w,
                                         const float* __restrict__ x, float* __restrict__ out,
                                         unsigned rows, unsigned cols, unsigned n_tokens) {
    const unsigned lane = threadIdx.x & 31u;
    const size_t r = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    // r is the same for the whole warp, so the warp leaves together (the shuffles below
    // need every lane).
    if (r >= rows) {
        return;
    }
    const unsigned char* row = w + r * (size_t)(cols / Block<F>::elems) * Block<F>::bytes;
    for (unsigned t0 = 0; t0 < n_tokens; t0 += TOK) {
        const unsigned nt = min((unsigned)TOK, n_tokens - t0);
        float acc[TOK];
#pragma unroll
        for (int j = 0; j < TOK; ++j) {
            acc[j] = 0.0f;
        }
        for (unsigned c = lane; c < cols; c += 32) {
            const float wv = row_element<F>(row, c);
#pragma unroll
            for (int j = 0; j < TOK; ++j) {
                if ((unsigned)j < nt) {
                    acc[j] = fmaf(wv, x[(size_t)(t0 + j) * cols + c], acc[j]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < TOK; ++j) {
            const float s = warp_sum(acc[j]);
            if (lane == 0 && (unsigned)j < nt) {
                out[(size_t)(t0 + j) * rows + r] = s;
            }
        }
    }
}

// A row of quantized weights for window_dot (row == nullptr: a warp without a row). Lane L
// takes the tile's columns c0 + L + 32e, the order matmul_q visits them.
template <int F>
struct QuantRow {
    static constexpr bool SWIZZLE = false;
    const unsigned char* row;
    unsigned cols;

    __device__ __forceinline__ void load(unsigned c0, unsigned lane, float (&w)[8]) const {
#pragma unroll
        for (unsigned e = 0; e < 8; ++e) {
            const unsigned c = c0 + lane + 32u * e;
            w[e] = row != nullptr && c < cols ? row_element<F>(row, c) : 0.0f;
        }
    }

    __device__ __forceinline__ float dot(const float (&w)[8], const float4* xj, unsigned lane,
                                         float acc) const {
        const float* xf = reinterpret_cast<const float*>(xj);
#pragma unroll
        for (unsigned e = 0; e < 8; ++e) {
            acc = fmaf(w[e], xf[lane + 32u * e], acc);
        }
        return acc;
    }
};

template <int F, int TOK>
__device__ __forceinline__ void matmul_q_tiled(const unsigned char* __restrict__ w,
                                               const float* __restrict__ x,
                                               float* __restrict__ out, unsigned rows,
                                               unsigned cols, unsigned n_tokens, XTile& xs) {
    const size_t r = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const size_t row_bytes = (size_t)(cols / Block<F>::elems) * Block<F>::bytes;
    // Warps past `rows` hold no row but still help stage x (barriers).
    const QuantRow<F> row{r < rows ? w + r * row_bytes : nullptr, cols};
    matmul_window<QuantRow<F>, TOK>(row, r, x, out, rows, cols, n_tokens, xs);
}

template <int F>
__device__ __forceinline__ void embed_q(const unsigned char* __restrict__ table,
                                        const unsigned* __restrict__ tokens,
                                        float* __restrict__ out, unsigned n_tokens,
                                        unsigned vocab, unsigned cols) {
    const size_t row_bytes = (size_t)(cols / Block<F>::elems) * Block<F>::bytes;
    const auto element = [=](unsigned id, unsigned c) {
        return row_element<F>(table + (size_t)id * row_bytes, c);
    };
    embed_rows(element, tokens, out, n_tokens, vocab, cols);
}

#define QUANT_ENTRIES(SUFFIX, F)                                                              \
    extern "C" __global__ void matvec_##SUFFIX(const unsigned char* __restrict__ w,           \
                                               const float* __restrict__ x,                   \
                                               float* __restrict__ out, unsigned rows,        \
                                               unsigned cols, unsigned n_tokens) {            \
        matmul_q<F, 1>(w, x, out, rows, cols, n_tokens);                                      \
    }                                                                                         \
    extern "C" __global__ void matmul_t16_##SUFFIX(const unsigned char* __restrict__ w,       \
                                                   const float* __restrict__ x,               \
                                                   float* __restrict__ out, unsigned rows,    \
                                                   unsigned cols, unsigned n_tokens) {        \
        __shared__ XTile xs;                                                                  \
        matmul_q_tiled<F, 16>(w, x, out, rows, cols, n_tokens, xs);                           \
    }                                                                                         \
    extern "C" __global__ void matmul_t64_##SUFFIX(const unsigned char* __restrict__ w,       \
                                                   const float* __restrict__ x,               \
                                                   float* __restrict__ out, unsigned rows,    \
                                                   unsigned cols, unsigned n_tokens) {        \
        __shared__ XTile xs;                                                                  \
        matmul_q_tiled<F, 64>(w, x, out, rows, cols, n_tokens, xs);                           \
    }                                                                                         \
    extern "C" __global__ void embed_##SUFFIX(const unsigned char* __restrict__ table,        \
                                              const unsigned* __restrict__ tokens,            \
                                              float* __restrict__ out, unsigned n_tokens,     \
                                              unsigned vocab, unsigned cols) {                \
        embed_q<F>(table, tokens, out, n_tokens, vocab, cols);                                \
    }

QUANT_ENTRIES(q4_0, Q4_0)
QUANT_ENTRIES(q4_1, Q4_1)
QUANT_ENTRIES(q8_0, Q8_0)
QUANT_ENTRIES(q4_k, Q4_K)
QUANT_ENTRIES(q6_k, Q6_K)
