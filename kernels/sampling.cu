// Token choice on the device: greedy argmax and Sirius acceptance probabilities, so a
// verification window reads back n_rows numbers instead of n_rows * vocab logits.
//
// argmax_f32(logits, out, n_rows, vocab)
//   out[r] = index of the largest logits[r, :] (u32), the lowest index on ties; NaN never
//   wins, and a row with nothing above -inf gives 0 (model::sampler::argmax).
//   grid = (n_rows), blockDim.x = 32 * warps (1024 suggested); one block per row.
// accept_probs_f32(logits, tokens, probs, n_rows, vocab, temperature)
//   probs[r] = softmax(logits[r, :] / temperature)[tokens[r]] with max subtraction, NaN
//   logits left out of the max and the sum (sirius::corrector::token_probability); 0 when
//   the row has no finite max, when tokens[r] >= vocab or when its logit is NaN.
//   temperature > 0 (the host validates it). Exponentials in f32, their sum in f64.
//   grid = (n_rows), blockDim.x = 32 * warps (1024 suggested); one block per row.
#include "common.cuh"

#define NO_INDEX 0xffffffffu

// Whether candidate (v, i) beats (bv, bi): larger, or as large with a lower index. Candidates
// only ever hold values that beat -inf, so "none yet" is (-inf, NO_INDEX) and loses to all.
__device__ __forceinline__ bool beats(float v, unsigned i, float bv, unsigned bi) {
    return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ void warp_argmax(float* bv, unsigned* bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(FULL_MASK, *bv, o);
        const unsigned i = __shfl_xor_sync(FULL_MASK, *bi, o);
        if (beats(v, i, *bv, *bi)) {
            *bv = v;
            *bi = i;
        }
    }
}

extern "C" __global__ void argmax_f32(const float* __restrict__ logits,
                                      unsigned* __restrict__ out, unsigned n_rows,
                                      unsigned vocab) {
    __shared__ float warp_v[32];
    __shared__ unsigned warp_i[32];
    const unsigned row = blockIdx.x;
    if (row >= n_rows) {
        return;
    }
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const float* z = logits + (size_t)row * vocab;
    float bv = neg_inf();
    unsigned bi = NO_INDEX;
    // Ascending within a thread, strictly greater to replace: the first of equal values stays.
    for (unsigned i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = z[i];
        if (v > bv) {
            bv = v;
            bi = i;
        }
    }
    warp_argmax(&bv, &bi);
    if (lane == 0) {
        warp_v[warp] = bv;
        warp_i[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const bool has = lane < (blockDim.x >> 5);
        bv = has ? warp_v[lane] : neg_inf();
        bi = has ? warp_i[lane] : NO_INDEX;
        warp_argmax(&bv, &bi);
        if (lane == 0) {
            out[row] = bi == NO_INDEX ? 0u : bi;
        }
    }
}

extern "C" __global__ void accept_probs_f32(const float* __restrict__ logits,
                                            const unsigned* __restrict__ tokens,
                                            float* __restrict__ probs, unsigned n_rows,
                                            unsigned vocab, float temperature) {
    const unsigned row = blockIdx.x;
    if (row >= n_rows) {
        return;
    }
    const float* z = logits + (size_t)row * vocab;
    float mx = neg_inf();
    for (unsigned i = threadIdx.x; i < vocab; i += blockDim.x) {
        mx = fmaxf(mx, z[i]);  // fmaxf drops NaN
    }
    mx = block_max(mx);
    // Same for every thread after the reduction: the whole block leaves together.
    if (!isfinite(mx)) {
        if (threadIdx.x == 0) {
            probs[row] = 0.0f;
        }
        return;
    }
    double sum = 0.0;
    for (unsigned i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = z[i];
        if (!isnan(v)) {
            sum += (double)expf((v - mx) / temperature);
        }
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        const unsigned tok = tokens[row];
        const float v = tok < vocab ? z[tok] : quiet_nan();
        probs[row] = isnan(v) ? 0.0f : (float)((double)expf((v - mx) / temperature) / sum);
    }
}
