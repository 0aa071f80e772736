// RMS normalisation of activation rows (Backend::rmsnorm).
//
// rmsnorm_f32(x, weight, out, n_rows, dim, eps)
//   x, out: [n_rows, dim] f32 (distinct buffers); weight: [dim] f32.
//   out[t, i] = x[t, i] * (1 / sqrt(mean_i(x[t, i]^2) + eps)) * weight[i]
//   grid = (n_rows), blockDim.x = 32 * warps (256 suggested); one block per row.
#include "common.cuh"

extern "C" __global__ void rmsnorm_f32(const float* __restrict__ x,
                                       const float* __restrict__ weight,
                                       float* __restrict__ out, unsigned n_rows, unsigned dim,
                                       float eps) {
    const unsigned t = blockIdx.x;
    // Uniform per block, so no thread skips the block_sum barrier.
    if (t >= n_rows || dim == 0) {
        return;
    }
    const float* xr = x + (size_t)t * dim;
    float* orow = out + (size_t)t * dim;
    float ss = 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = xr[i];
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss);
    // As the CPU (and the HF reference): normalise, then scale by the weight.
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) {
        orow[i] = xr[i] * inv * weight[i];
    }
}
