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
    // Ascending within a thread, strictly greater to replace: the first of equal values stays,
    // and NaN (never greater) and -inf (never greater than the start) are never taken.
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
