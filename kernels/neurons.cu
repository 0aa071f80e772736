// The FFN over neuron bundles (Backend::bundle_ffn: Griffin / CATS contextual sparsity).
// The kernels here read a bundle once per (token, listed neuron): one token (decode), or
// CATS lists that differ between tokens. Several tokens sharing one list (a dense pass of a
// verification window or tree, the tree beam's CATS list) take bundle_window.cu's kernels,
// which read each bundle once per window of tokens.
//
// bundles: [neurons, parts * hidden] of the stored dtype, one row per FFN neuron i:
//   parts = 3: gate row | up row | down column (BundleLayout::GateUpDown)
//   parts = 2: up row | down column              (BundleLayout::UpDown, CATS)
// The FFN is out[t] = sum_i act(t, i) * down_i over the neurons listed for token t, in two
// launches (bundle_act_*, then bundle_down_*), plus reduce_splits_f32 when the down sums are
// split over several blocks. The neuron lists:
//   offsets != null: token t uses ids[offsets[t] .. offsets[t + 1]] (u32, offsets[0] = 0,
//     ascending; NeuronLists as uploaded), and its activations sit at act[offsets[t] + j];
//     total = offsets[n_tokens];
//   offsets == null: every token uses the same `count` neurons, ids[0..count] (ids != null)
//     or 0..count (ids == null: every bundle), activations at act[t * count + j];
//     total = n_tokens * count.
// Activation of token t, neuron i (up . x = dot of i's up row with x[t]):
//   coeff != null (CATS):  act = coeff[t * neurons + i] * (up . x + up_bias[i])
//   coeff == null (parts = 3): act = silu(gate . x + gate_bias[i]) * (up . x + up_bias[i])
//   (a null bias counts as 0; coeff == null with parts = 2 is a host error: act = NaN)
//
// bundle_act_bf16 / _f16 / _f32(bundles, x, ids, offsets, coeff, gate_bias, up_bias, act,
//                               n_tokens, count, total, neurons, hidden, parts)
//   x: [n_tokens, hidden] f32; act: [total] f32.
//   grid = (ceil(total / warps)), blockDim.x = 32 * warps (256 suggested); one warp per
//   (token, listed neuron), 16-byte loads of the gate and up rows as in matvec.cu. A listed
//   neuron >= neurons gets act = NaN (the host checks the lists first).
// bundle_down_bf16 / _f16 / _f32(bundles, act, ids, offsets, out, n_tokens, count, total,
//                                neurons, hidden, parts)
//   out[s, t, c] = sum over split s of token t's list of act[slot] * down_i[c]
//   (out: [splits, n_tokens, hidden]; with one split that is the FFN output itself, every
//   row t < n_tokens overwritten, zeros for an empty list).
//   grid = (ceil(hidden / (8 * blockDim.x)), splits, n_tokens), blockDim.x = 32 * warps
//   (128 suggested); each thread owns 8 consecutive columns, so a warp reads 256 contiguous
//   down elements of a neuron per step; split s takes the s-th of `splits` equal parts of
//   the list (splits give the GPU enough blocks when n_tokens * hidden is small).
// reduce_splits_f32(partials, out, splits, len)
//   out[k] = sum_s partials[s * len + k], k < len, in split order (deterministic, no
//   atomics). Grid-stride: grid = (ceil(len / blockDim.x)), blockDim.x = 256 suggested.
//
// Griffin statistics (Backend::accumulate_neuron_scores), two launches:
// row_inv_norm2_f32(z, inv, n_rows, width)
//   inv[t] = 1 / sum_j z[t, j]^2 in f64, or 0 for a row whose sum is 0 or not finite (the
//   CPU skips those rows). grid = (n_rows), blockDim.x = 32 * warps (256 suggested).
// accumulate_neuron_scores_f32(z, inv, acc, n_rows, width)
//   acc[j] += sum_t f32(z[t, j]^2 * inv[t]) (f64 product, rows in order, as the CPU adds
//   them). grid = (ceil(width / blockDim.x)), blockDim.x = 256 suggested; a thread per column.
//
// CATS selection by threshold (Backend::select_neurons with NeuronRule::Threshold):
// select_threshold_f32(act, ids, counts, n_rows, width, threshold)
//   per row t of act ([n_rows, width]): keeps the neurons with |act| >= threshold (a NaN
//   magnitude counts as 0, as on the CPU), zeroes the others in place, writes the kept ids
//   ascending to ids[t * width ..] and their number to counts[t]. grid = (n_rows),
//   blockDim.x = 32 * warps (256 suggested).
// Top-k selection and the shared (tree-beam) selection stay on the host for now: they need
// a per-row k-th largest value (a radix select), and the Backend trait returns host lists
// either way.
#include "common.cuh"

// Token t and list slot j of activation slot s (see the list rules above).
__device__ __forceinline__ void slot_token(const unsigned* __restrict__ offsets, unsigned s,
                                           unsigned n_tokens, unsigned count, unsigned* t,
                                           unsigned* j) {
    if (offsets != nullptr) {
        // Largest t with offsets[t] <= s: binary search (lists may be empty).
        unsigned lo = 0, hi = n_tokens;
        while (hi - lo > 1) {
            const unsigned mid = lo + (hi - lo) / 2;
            if (offsets[mid] <= s) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        *t = lo;
        *j = s - offsets[lo];
    } else {
        *t = s / count;
        *j = s % count;
    }
}

template <typename T>
__device__ __forceinline__ void bundle_act(
    const T* __restrict__ bundles, const float* __restrict__ x, const unsigned* __restrict__ ids,
    const unsigned* __restrict__ offsets, const float* __restrict__ coeff,
    const float* __restrict__ gate_bias, const float* __restrict__ up_bias,
    float* __restrict__ act, unsigned n_tokens, unsigned count, unsigned total, unsigned neurons,
    unsigned hidden, unsigned parts) {
    const unsigned lane = threadIdx.x & 31u;
    const size_t slot = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    // Uniform per warp: the warp leaves together.
    if (slot >= total || n_tokens == 0 || (offsets == nullptr && count == 0)) {
        return;
    }
    const unsigned s = (unsigned)slot;
    unsigned t, j;
    slot_token(offsets, s, n_tokens, count, &t, &j);
    // Per-token lists without ids are a host error; u32 max then fails the range check.
    const unsigned i = ids != nullptr ? ids[offsets != nullptr ? s : j]
                                      : (offsets != nullptr ? 0xffffffffu : j);
    if (t >= n_tokens || i >= neurons || parts < 2 || (coeff == nullptr && parts < 3)) {
        if (lane == 0) {
            act[s] = quiet_nan();
        }
        return;
    }
    const T* bundle = bundles + (size_t)i * parts * hidden;
    const float* xt = x + (size_t)t * hidden;
    const bool wide = wide_ok(bundles, x, hidden);
    float u[1] = {0.0f};
    row_dot<T, 1>(bundle + (size_t)(parts - 2) * hidden, xt, hidden, 1, wide, lane, u);
    const float up = warp_sum(u[0]) + (up_bias != nullptr ? up_bias[i] : 0.0f);
    float a;
    if (coeff != nullptr) {
        a = coeff[(size_t)t * neurons + i] * up;
    } else {
        float g[1] = {0.0f};
        row_dot<T, 1>(bundle, xt, hidden, 1, wide, lane, g);
        const float gate = warp_sum(g[0]) + (gate_bias != nullptr ? gate_bias[i] : 0.0f);
        a = silu(gate) * up;
    }
    if (lane == 0) {
        act[s] = a;
    }
}

template <typename T>
__device__ __forceinline__ void bundle_down(const T* __restrict__ bundles,
                                            const float* __restrict__ act,
                                            const unsigned* __restrict__ ids,
                                            const unsigned* __restrict__ offsets,
                                            float* __restrict__ out, unsigned n_tokens,
                                            unsigned count, unsigned total, unsigned neurons,
                                            unsigned hidden, unsigned parts) {
    const unsigned t = blockIdx.z, split = blockIdx.y, splits = gridDim.y;
    const size_t c0 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (t >= n_tokens || c0 >= hidden || parts < 2 || (offsets != nullptr && ids == nullptr)) {
        return;
    }
    // Token t's slots, clamped to [0, total) so malformed lists cannot read past act or ids.
    size_t start, end;
    if (offsets != nullptr) {
        start = min(offsets[t], total);
        end = max(start, (size_t)min(offsets[t + 1], total));
    } else {
        start = min((size_t)t * count, (size_t)total);
        end = min(start + count, (size_t)total);
    }
    const unsigned len = (unsigned)(end - start);
    const unsigned per = (len + splits - 1) / splits;
    const unsigned j0 = min(len, split * per), j1 = min(len, j0 + per);
    const unsigned valid = (unsigned)min((size_t)8, hidden - c0);
    // 16-byte loads when every down column chunk is aligned: hidden % 8 == 0 makes each
    // bundle, each part and each 8-column chunk start on a 16-byte boundary.
    const bool wide = hidden % 8 == 0 && aligned16(bundles);
    const size_t down_at = (size_t)(parts - 1) * hidden + c0;
    float acc[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        acc[k] = 0.0f;
    }
    for (unsigned j = j0; j < j1; ++j) {
        const size_t slot = start + j;
        const unsigned i = offsets != nullptr ? ids[slot] : (ids != nullptr ? ids[j] : j);
        // Out-of-range ids already made act NaN; skipping keeps the read in bounds.
        if (i >= neurons) {
            continue;
        }
        const float a = __ldg(act + slot);
        float d[8];
        load8(bundles + (size_t)i * parts * hidden + down_at, wide, valid, d);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            acc[k] = fmaf(a, d[k], acc[k]);
        }
    }
    float* o = out + ((size_t)split * n_tokens + t) * hidden + c0;
#pragma unroll
    for (unsigned k = 0; k < 8; ++k) {
        if (k < valid) {
            o[k] = acc[k];
        }
    }
}

#define NEURON_ENTRIES(SUFFIX, T)                                                             \
    extern "C" __global__ void bundle_act_##SUFFIX(                                           \
        const T* __restrict__ bundles, const float* __restrict__ x,                           \
        const unsigned* __restrict__ ids, const unsigned* __restrict__ offsets,               \
        const float* __restrict__ coeff, const float* __restrict__ gate_bias,                 \
        const float* __restrict__ up_bias, float* __restrict__ act, unsigned n_tokens,        \
        unsigned count, unsigned total, unsigned neurons, unsigned hidden, unsigned parts) {  \
        bundle_act<T>(bundles, x, ids, offsets, coeff, gate_bias, up_bias, act, n_tokens,     \
                      count, total, neurons, hidden, parts);                                  \
    }                                                                                         \
    extern "C" __global__ void bundle_down_##SUFFIX(                                          \
        const T* __restrict__ bundles, const float* __restrict__ act,                         \
        const unsigned* __restrict__ ids, const unsigned* __restrict__ offsets,               \
        float* __restrict__ out, unsigned n_tokens, unsigned count, unsigned total,           \
        unsigned neurons, unsigned hidden, unsigned parts) {                                  \
        bundle_down<T>(bundles, act, ids, offsets, out, n_tokens, count, total, neurons,      \
                       hidden, parts);                                                        \
    }

NEURON_ENTRIES(bf16, __nv_bfloat16)
NEURON_ENTRIES(f16, __half)
NEURON_ENTRIES(f32, float)

extern "C" __global__ void reduce_splits_f32(const float* __restrict__ partials,
                                             float* __restrict__ out, unsigned splits,
                                             unsigned len) {
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < len;
         k += (size_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (unsigned p = 0; p < splits; ++p) {
            s += partials[(size_t)p * len + k];
        }
        out[k] = s;
    }
}

extern "C" __global__ void row_inv_norm2_f32(const float* __restrict__ z,
                                             double* __restrict__ inv, unsigned n_rows,
                                             unsigned width) {
    const unsigned t = blockIdx.x;
    if (t >= n_rows) {
        return;
    }
    const float* row = z + (size_t)t * width;
    double ss = 0.0;
    for (unsigned j = threadIdx.x; j < width; j += blockDim.x) {
        const double v = row[j];
        ss += v * v;
    }
    ss = block_sum(ss);
    if (threadIdx.x == 0) {
        inv[t] = (ss == 0.0 || !isfinite(ss)) ? 0.0 : 1.0 / ss;
    }
}

extern "C" __global__ void accumulate_neuron_scores_f32(const float* __restrict__ z,
                                                        const double* __restrict__ inv,
                                                        float* __restrict__ acc,
                                                        unsigned n_rows, unsigned width) {
    const size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= width) {
        return;
    }
    float a = acc[j];
    for (unsigned t = 0; t < n_rows; ++t) {
        const double w = inv[t];
        if (w != 0.0) {
            const double v = z[(size_t)t * width + j];
            a += (float)(v * v * w);
        }
    }
    acc[j] = a;
}

extern "C" __global__ void select_threshold_f32(float* __restrict__ act,
                                                unsigned* __restrict__ ids,
                                                unsigned* __restrict__ counts, unsigned n_rows,
                                                unsigned width, float threshold) {
    __shared__ unsigned warp_kept[32];
    const unsigned t = blockIdx.x;
    if (t >= n_rows) {
        return;
    }
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float* row = act + (size_t)t * width;
    unsigned* out = ids + (size_t)t * width;
    // Kept so far, before this tile; the tiles go in column order, so the ids come out
    // ascending.
    unsigned base = 0;
    for (unsigned c0 = 0; c0 < width; c0 += blockDim.x) {
        const unsigned c = c0 + threadIdx.x;
        bool keep = false;
        if (c < width) {
            float m = fabsf(row[c]);
            m = isnan(m) ? 0.0f : m;
            keep = m >= threshold;
            if (!keep) {
                row[c] = 0.0f;
            }
        }
        const unsigned ballot = __ballot_sync(FULL_MASK, keep);
        if (lane == 0) {
            warp_kept[warp] = __popc(ballot);
        }
        __syncthreads();
        unsigned before = __popc(ballot & ((1u << lane) - 1u)), tile = 0;
        for (unsigned w = 0; w < warps; ++w) {
            before += w < warp ? warp_kept[w] : 0u;
            tile += warp_kept[w];
        }
        if (keep) {
            out[base + before] = c;
        }
        base += tile;
        // warp_kept is rewritten by the next tile.
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        counts[t] = base;
    }
}
