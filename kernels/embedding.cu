// Embedding lookup (Backend::embed): out[t, :] = f32(table[tokens[t], :]).
//
// embed_bf16 / embed_f16 / embed_f32(table, tokens, out, n_tokens, vocab, cols)
//   table: [vocab, cols] of the stored dtype; tokens: [n_tokens] u32; out: [n_tokens, cols].
//   grid = (n_tokens), blockDim.x = 32 * warps (256 suggested); one block per token.
//   The host checks every id against vocab first (Error::TokenOutOfRange, as the CPU does);
//   an id that still is out of range gets a row of NaN rather than a read past the table.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void embed(const T* __restrict__ table,
                                      const unsigned* __restrict__ tokens,
                                      float* __restrict__ out, unsigned n_tokens,
                                      unsigned vocab, unsigned cols) {
    const auto element = [=](unsigned id, unsigned c) {
        return to_f32(table[(size_t)id * cols + c]);
    };
    embed_rows(element, tokens, out, n_tokens, vocab, cols);
}

extern "C" __global__ void embed_bf16(const __nv_bfloat16* __restrict__ table,
                                      const unsigned* __restrict__ tokens,
                                      float* __restrict__ out, unsigned n_tokens,
                                      unsigned vocab, unsigned cols) {
    embed(table, tokens, out, n_tokens, vocab, cols);
}

extern "C" __global__ void embed_f16(const __half* __restrict__ table,
                                     const unsigned* __restrict__ tokens,
                                     float* __restrict__ out, unsigned n_tokens, unsigned vocab,
                                     unsigned cols) {
    embed(table, tokens, out, n_tokens, vocab, cols);
}

extern "C" __global__ void embed_f32(const float* __restrict__ table,
                                     const unsigned* __restrict__ tokens,
                                     float* __restrict__ out, unsigned n_tokens, unsigned vocab,
                                     unsigned cols) {
    embed(table, tokens, out, n_tokens, vocab, cols);
}
