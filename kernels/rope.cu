// Rotary position embedding, Hugging Face "rotate_half" convention (Backend::rope, rope_at).
//
// The cos/sin come from a device copy of RopeTable's table: `table_positions` rows of head_dim
// floats, row p = [cos(p * inv_freq[i]) for i < head_dim/2, then sin(...) likewise] (computed
// on the host in f64, exactly as RopeTable does). Pair i of every head rotates elements
// (i, i + head_dim/2):
//   x1' = x1 * cos - x2 * sin,   x2' = x2 * cos + x1 * sin
// Rows are `n_heads * head_dim` floats, contiguous.
//
// rope_f32(x, cos_sin, n_rows, n_heads, head_dim, start_pos, table_positions)
//   row t is at position start_pos + t.
// rope_at_f32(x, cos_sin, positions, n_rows, n_heads, head_dim, table_positions)
//   row t is at position positions[t] (u32; tree nodes sit at their depth, not their row).
//   Both: grid = (ceil(n_heads * (head_dim / 2) / blockDim.x), n_rows), blockDim.x = 32 * warps
//   (128 suggested); one thread per (row, head, pair). A position at or past
//   `table_positions` leaves its row untouched: the host grows the table first.
#include "common.cuh"

__device__ __forceinline__ void rope_row(float* __restrict__ x,
                                         const float* __restrict__ cos_sin, unsigned row,
                                         unsigned pos, unsigned n_heads, unsigned head_dim,
                                         unsigned table_positions) {
    const unsigned half = head_dim / 2;
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (half == 0 || idx >= (size_t)n_heads * half || pos >= table_positions) {
        return;
    }
    const unsigned h = (unsigned)(idx / half), i = (unsigned)(idx % half);
    const float* cs = cos_sin + (size_t)pos * head_dim;
    const float c = cs[i], s = cs[half + i];
    float* head = x + ((size_t)row * n_heads + h) * head_dim;
    const float a = head[i], b = head[half + i];
    // Rounded products, no fused multiply-add: the same arithmetic as the CPU's.
    head[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    head[half + i] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

extern "C" __global__ void rope_f32(float* __restrict__ x, const float* __restrict__ cos_sin,
                                    unsigned n_rows, unsigned n_heads, unsigned head_dim,
                                    unsigned start_pos, unsigned table_positions) {
    const unsigned t = blockIdx.y;
    if (t >= n_rows) {
        return;
    }
    // 64-bit sum: start_pos + t past u32 means "not in the table", never a wrapped position.
    const unsigned long long pos = (unsigned long long)start_pos + t;
    if (pos >= table_positions) {
        return;
    }
    rope_row(x, cos_sin, t, (unsigned)pos, n_heads, head_dim, table_positions);
}

extern "C" __global__ void rope_at_f32(float* __restrict__ x, const float* __restrict__ cos_sin,
                                       const unsigned* __restrict__ positions, unsigned n_rows,
                                       unsigned n_heads, unsigned head_dim,
                                       unsigned table_positions) {
    const unsigned t = blockIdx.y;
    if (t >= n_rows) {
        return;
    }
    rope_row(x, cos_sin, t, positions[t], n_heads, head_dim, table_positions);
}
