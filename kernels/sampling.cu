// Greedy token choice on the device: the argmax of rows of logits, so a greedy step reads
// back one u32 per row instead of a row of vocab floats.
//
// argmax_f32(logits, out, n_rows, vocab)
//   out[r] = index of the largest logits[r, :] (u32), the lowest index on ties; NaN never
//   wins, and a row with nothing above -inf gives 0 (backend::argmax, the CPU's rule).
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

// The block's argmax of z[0, vocab) by argmax_f32's rule: in lane 0 of warp 0, *v = the
// largest value (-inf when nothing beats it) and *i = its first index (NO_INDEX then); other
// threads' results are partial. Every thread of the block must call it.
__device__ __forceinline__ void block_argmax(const float* z, unsigned vocab, float* v,
                                             unsigned* i) {
    __shared__ float warp_v[32];
    __shared__ unsigned warp_i[32];
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    float bv = neg_inf();
    unsigned bi = NO_INDEX;
    // Ascending within a thread, strictly greater to replace: the first of equal values stays,
    // and NaN (never greater) and -inf (never greater than the start) are never taken.
    for (unsigned k = threadIdx.x; k < vocab; k += blockDim.x) {
        const float x = z[k];
        if (x > bv) {
            bv = x;
            bi = k;
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
    }
    *v = bv;
    *i = bi;
}

extern "C" __global__ void argmax_f32(const float* __restrict__ logits,
                                      unsigned* __restrict__ out, unsigned n_rows,
                                      unsigned vocab) {
    const unsigned row = blockIdx.x;
    if (row >= n_rows) {
        return;
    }
    float bv;
    unsigned bi;
    block_argmax(logits + (size_t)row * vocab, vocab, &bv, &bi);
    if (threadIdx.x == 0) {
        out[row] = bi == NO_INDEX ? 0u : bi;
    }
}

// row_verdict_f32(logits, next, n_next, out_ids, out_prob, n_rows, vocab, temperature)
//   What Sirius's acceptance test reads of each row: out_ids[r] = the argmax (argmax_f32's
//   rule), and for r < n_next out_prob[r] = softmax(logits[r, :] / temperature)[next[r]] in
//   f64 (backend::argmax::token_probability's rule: NaN logits left out; 0 when the row's
//   largest value is not finite, or next[r] is past the row or on a NaN). A verification
//   window then reads back a few numbers per row instead of a row of vocab floats.
//   grid = (n_rows), blockDim.x = 32 * warps (1024 suggested); one block per row.
__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, o);
    }
    return v;
}

extern "C" __global__ void row_verdict_f32(const float* __restrict__ logits,
                                           const unsigned* __restrict__ next, unsigned n_next,
                                           unsigned* __restrict__ out_ids,
                                           double* __restrict__ out_prob, unsigned n_rows,
                                           unsigned vocab, float temperature) {
    __shared__ double warp_s[32];
    __shared__ float row_max;
    const unsigned row = blockIdx.x;
    if (row >= n_rows) {
        return;
    }
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const float* z = logits + (size_t)row * vocab;
    // The argmax and the row's largest value: the same reduction (NaN never taken).
    float bv;
    unsigned bi;
    block_argmax(z, vocab, &bv, &bi);
    if (threadIdx.x == 0) {
        out_ids[row] = bi == NO_INDEX ? 0u : bi;
        row_max = bv;
    }
    __syncthreads();
    if (row >= n_next) {
        return;
    }
    const float mx = row_max;
    // Not finite: nothing above -inf, or +inf (isfinite without <cmath>: x - x is 0 only
    // for finite x).
    if (!(mx - mx == 0.0f)) {
        if (threadIdx.x == 0) {
            out_prob[row] = 0.0;
        }
        return;
    }
    const double m = (double)mx, t = (double)temperature;
    double sum = 0.0;
    for (unsigned i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = z[i];
        if (v == v) {
            sum += exp(((double)v - m) / t);
        }
    }
    sum = warp_sum_f64(sum);
    if (lane == 0) {
        warp_s[warp] = sum;
    }
    __syncthreads();
    if (warp == 0) {
        sum = warp_sum_f64(lane < warps ? warp_s[lane] : 0.0);
        if (lane == 0) {
            const unsigned tok = next[row];
            const float v = tok < vocab ? z[tok] : quiet_nan();
            out_prob[row] = v == v ? exp(((double)v - m) / t) / sum : 0.0;
        }
    }
}
