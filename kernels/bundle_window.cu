// The FFN over neuron bundles for a window of tokens that share one neuron list
// (Backend::bundle_ffn with BundleSelection::All: the dense pass of a verification window or
// a tree over streamed / resident bundles; or CATS lists that are the same for every token,
// as the tree beam's). Same bundles, lists and activation rules as neurons.cu (see there),
// with offsets == null: every token uses `count` neurons, ids[0..count] (ids != null) or
// 0..count, and token t's activation of list slot j sits at act[t * count + j].
//
// Each bundle is read once per window of TOK tokens (16 or 64) instead of once per token:
//
// bundle_act_t16_bf16 / _f16 / _f32, bundle_act_t64_*(bundles, x, ids, coeff, gate_bias,
//                                                      up_bias, act, n_tokens, count,
//                                                      neurons, hidden, parts)
//   x: [n_tokens, hidden] f32; act: [n_tokens * count] f32. One warp per listed neuron:
//   its up row (and gate row, without coeff) is dotted with the TOK tokens of a window in
//   one pass over the row (window_dot in common.cuh: x staged in 16 KiB of shared memory,
//   one sum per token in registers; the gate row, then the up row). Sums per lane in
//   neurons.cu's order, so act is the same. A listed neuron >= neurons gets act = NaN.
//   grid = (ceil(count / warps)), blockDim.x = 32 * warps (256 suggested).
// bundle_down_t16_*(bundles, act, ids, out, n_tokens, count, neurons, hidden, parts)
//   each thread owns 4 consecutive columns; grid.z = ceil(n_tokens / 16)
// bundle_down_t64_*(same arguments)
//   each thread owns 1 column; grid.z = ceil(n_tokens / 64)
//   out[s, t, c] = sum over split s of the list of act[t * count + j] * down_{ids[j]}[c]
//   (out: [splits, n_tokens, hidden]; one split: the FFN output, every row overwritten).
//   grid = (ceil(hidden / (cols per thread * blockDim.x)), splits, windows), blockDim.x =
//   32 * warps (128 suggested). A thread loads each listed neuron's down columns once and
//   applies them to the window's TOK tokens (TOK x cols-per-thread = 64 sums in registers);
//   the window's activations come through shared memory, 32 neurons at a time. Split s
//   takes the s-th of `splits` equal parts of the list and adds in list order, as
//   neurons.cu, so the sums are the same.
#include "common.cuh"

// Neurons whose activations are staged in shared memory at a time (bundle_down).
#define DOWN_NEURONS 32u

// Token windows of bundle_act: the gate pass, then the up pass, each leaving token j's
// sum with lane j % 32 (keep[j / 32]).
template <typename T, int TOK>
__device__ __forceinline__ void window_sums(const T* row, bool wide, const float* x,
                                            unsigned hidden, unsigned t0, unsigned nt,
                                            bool vec, XTile& xs,
                                            float (&keep)[(TOK + 31) / 32]) {
    const unsigned lane = threadIdx.x & 31u;
    float acc[TOK];
    window_dot<FloatRow<T>, TOK>(FloatRow<T>{row, hidden, wide}, x, hidden, t0, nt, vec, xs,
                                 acc);
#pragma unroll
    for (int j = 0; j < TOK; ++j) {
        if ((unsigned)j < nt) {
            const float s = warp_sum(acc[j]);
            if (lane == (unsigned)j % 32u) {
                keep[j / 32] = s;
            }
        }
    }
}

template <typename T, int TOK>
__device__ __forceinline__ void bundle_act_window(
    const T* __restrict__ bundles, const float* __restrict__ x, const unsigned* __restrict__ ids,
    const float* __restrict__ coeff, const float* __restrict__ gate_bias,
    const float* __restrict__ up_bias, float* __restrict__ act, unsigned n_tokens,
    unsigned count, unsigned neurons, unsigned hidden, unsigned parts, XTile& xs) {
    constexpr int KEEP = (TOK + 31) / 32;
    const unsigned lane = threadIdx.x & 31u;
    const size_t slot = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    // No early return: every warp takes part in staging x (barriers in window_dot).
    const unsigned i = slot >= count ? 0xffffffffu : (ids != nullptr ? ids[slot] : (unsigned)slot);
    const bool ok = i < neurons && parts >= 2 && (coeff != nullptr || parts >= 3);
    const T* bundle = ok ? bundles + (size_t)i * parts * hidden : nullptr;
    const bool wide = wide_ok(bundles, x, hidden), vec = x_vec_ok(x, hidden);
    for (unsigned t0 = 0; t0 < n_tokens; t0 += TOK) {
        const unsigned nt = min((unsigned)TOK, n_tokens - t0);
        float gate[KEEP] = {}, up[KEEP] = {};
        if (coeff == nullptr) {
            window_sums<T, TOK>(bundle, wide, x, hidden, t0, nt, vec, xs, gate);
        }
        const T* up_row = ok ? bundle + (size_t)(parts - 2) * hidden : nullptr;
        window_sums<T, TOK>(up_row, wide, x, hidden, t0, nt, vec, xs, up);
#pragma unroll
        for (int k = 0; k < KEEP; ++k) {
            const unsigned j = 32u * k + lane;
            if (slot >= count || j >= nt) {
                continue;
            }
            const size_t t = t0 + j;
            float a = quiet_nan();
            if (ok) {
                const float u = up[k] + (up_bias != nullptr ? up_bias[i] : 0.0f);
                if (coeff != nullptr) {
                    a = coeff[t * neurons + i] * u;
                } else {
                    const float g = gate[k] + (gate_bias != nullptr ? gate_bias[i] : 0.0f);
                    a = silu(g) * u;
                }
            }
            act[t * count + slot] = a;
        }
    }
}

// C consecutive weights at p as f32 (C = 4: one 8- or 16-byte load when `wide`, i.e. p is
// 16-byte aligned for f32 or 8-byte aligned for 16-bit types); element loads of the first
// `valid` otherwise (the rest read as 0).
template <typename T, int C>
__device__ __forceinline__ void load_cols(const T* p, bool wide, unsigned valid,
                                          float (&out)[C]) {
    if constexpr (C == 4) {
        if (wide) {
            if constexpr (sizeof(T) == 4) {
                Wide<T>::load(p, out);
            } else {
                const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
                const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    out[k] = to_f32(e[k]);
                }
            }
            return;
        }
    }
#pragma unroll
    for (int k = 0; k < C; ++k) {
        out[k] = (unsigned)k < valid ? to_f32(p[k]) : 0.0f;
    }
}

template <typename T, int TOK, int C>
__device__ __forceinline__ void bundle_down_window(
    const T* __restrict__ bundles, const float* __restrict__ act,
    const unsigned* __restrict__ ids, float* __restrict__ out, unsigned n_tokens,
    unsigned count, unsigned neurons, unsigned hidden, unsigned parts) {
    // Activations of DOWN_NEURONS listed neurons x TOK tokens: as4[jj * TOK / 4 + t / 4].
    __shared__ float4 as4[DOWN_NEURONS * TOK / 4];
    const unsigned split = blockIdx.y, splits = gridDim.y, t0 = blockIdx.z * TOK;
    // Uniform over the block, so the block leaves together.
    if (t0 >= n_tokens || parts < 2) {
        return;
    }
    const unsigned nt = min((unsigned)TOK, n_tokens - t0);
    const size_t c0 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * C;
    // Threads past hidden stay for the staging barriers.
    const bool cols = c0 < hidden;
    const unsigned valid = cols ? (unsigned)min((size_t)C, hidden - c0) : 0u;
    const unsigned per = (count + splits - 1) / splits;
    const unsigned j0 = min(count, split * per), j1 = min(count, j0 + per);
    // hidden % 4 == 0 puts every bundle, part and 4-column group on an 8-byte (16-bit) or
    // 16-byte (f32) boundary of an aligned matrix.
    const bool wide = hidden % 4 == 0 && aligned16(bundles);
    const size_t down_at = (size_t)(parts - 1) * hidden + c0;
    float acc[TOK][C];
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
#pragma unroll
        for (int k = 0; k < C; ++k) {
            acc[t][k] = 0.0f;
        }
    }
    float* as = reinterpret_cast<float*>(as4);
    for (unsigned jb = j0; jb < j1; jb += DOWN_NEURONS) {
        const unsigned nj = min(DOWN_NEURONS, j1 - jb);
        __syncthreads();
        for (unsigned s = threadIdx.x; s < DOWN_NEURONS * TOK; s += blockDim.x) {
            const unsigned jj = s / TOK, t = s % TOK;
            as[s] = jj < nj && t < nt ? __ldg(act + (size_t)(t0 + t) * count + jb + jj) : 0.0f;
        }
        __syncthreads();
        for (unsigned jj = 0; cols && jj < nj; ++jj) {
            const unsigned j = jb + jj;
            const unsigned i = ids != nullptr ? ids[j] : j;
            // Out-of-range ids already made act NaN; skipping keeps the read in bounds.
            if (i >= neurons) {
                continue;
            }
            float d[C];
            load_cols<T, C>(bundles + (size_t)i * parts * hidden + down_at, wide, valid, d);
#pragma unroll
            for (int t4 = 0; t4 < TOK / 4; ++t4) {
                if ((unsigned)(4 * t4) < nt) {
                    const float4 a = as4[jj * (TOK / 4) + t4];
                    const float av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
#pragma unroll
                        for (int k = 0; k < C; ++k) {
                            acc[4 * t4 + q][k] = fmaf(av[q], d[k], acc[4 * t4 + q][k]);
                        }
                    }
                }
            }
        }
    }
    if (!cols) {
        return;
    }
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
        if ((unsigned)t < nt) {
            float* o = out + ((size_t)split * n_tokens + t0 + t) * hidden + c0;
#pragma unroll
            for (int k = 0; k < C; ++k) {
                if ((unsigned)k < valid) {
                    o[k] = acc[t][k];
                }
            }
        }
    }
}

#define WINDOW_ENTRIES(SUFFIX, T, TOK, C)                                                     \
    extern "C" __global__ void bundle_act_t##TOK##_##SUFFIX(                                  \
        const T* __restrict__ bundles, const float* __restrict__ x,                           \
        const unsigned* __restrict__ ids, const float* __restrict__ coeff,                    \
        const float* __restrict__ gate_bias, const float* __restrict__ up_bias,               \
        float* __restrict__ act, unsigned n_tokens, unsigned count, unsigned neurons,         \
        unsigned hidden, unsigned parts) {                                                    \
        __shared__ XTile xs;                                                                  \
        bundle_act_window<T, TOK>(bundles, x, ids, coeff, gate_bias, up_bias, act, n_tokens,  \
                                  count, neurons, hidden, parts, xs);                         \
    }                                                                                         \
    extern "C" __global__ void bundle_down_t##TOK##_##SUFFIX(                                 \
        const T* __restrict__ bundles, const float* __restrict__ act,                         \
        const unsigned* __restrict__ ids, float* __restrict__ out, unsigned n_tokens,         \
        unsigned count, unsigned neurons, unsigned hidden, unsigned parts) {                  \
        bundle_down_window<T, TOK, C>(bundles, act, ids, out, n_tokens, count, neurons,       \
                                      hidden, parts);                                         \
    }

WINDOW_ENTRIES(bf16, __nv_bfloat16, 16, 4)
WINDOW_ENTRIES(f16, __half, 16, 4)
WINDOW_ENTRIES(f32, float, 16, 4)
WINDOW_ENTRIES(bf16, __nv_bfloat16, 64, 1)
WINDOW_ENTRIES(f16, __half, 64, 1)
WINDOW_ENTRIES(f32, float, 64, 1)
