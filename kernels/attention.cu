// Causal multi-head attention over the KV cache, with GQA and an optional token-tree mask
// (Backend::attention for decode and K-token windows, Backend::tree_attention).
//
// q, out: [n_tokens, n_heads * head_dim]; k_cache, v_cache: [capacity, n_kv_heads * head_dim]
// (row = position, as model::kv_cache). Query token t sits at position start_pos + t and sees
// cache rows 0..=start_pos + t, minus those a tree mask hides. Query head h reads kv head
// h / (n_heads / n_kv_heads). Scores are scaled by `scale` (the host passes the CPU's
// 1 / sqrt(head_dim) as f32), softmax with max subtraction, computed online (running max,
// running sum, rescaled running values) in steps of 4 cache rows.
//
// Tree mask (mask_bits != null): TreeMask::visible(t, row) as bits, built on the host from
// `visible`: row < mask_prefix is always visible; else j = row - mask_prefix is visible when
// j < mask_span and bit j % 64 of word mask_bits[t * mask_words + j / 64] is set
// (mask_words >= ceil(mask_span / 64)). The causal limit still applies, as on the CPU.
//
// attention_chunk_f32(q, k_cache, v_cache, mask_bits, out, part_o, part_ml, n_tokens,
//                     n_heads, n_kv_heads, head_dim, start_pos, chunk_rows, mask_prefix,
//                     mask_span, mask_words, scale)
// attention_chunk_f16: the same over an f16 cache (keys and values widened to f32 as read;
//   everything else, q, scores, softmax and outputs, stays f32)
//   grid = (ceil(n_tokens * group / warps), n_chunks, n_kv_heads), group = n_heads /
//   n_kv_heads; blockDim.x = 32 * warps (4 warps suggested, fewer when n_tokens * group is
//   smaller). One warp per query row (token t, head h of kv head blockIdx.z): the warps of a
//   block share their kv head, so its cache rows come from L1/L2 after the first warp.
//   Chunk c covers cache rows [c * chunk_rows, (c + 1) * chunk_rows) (n_chunks * chunk_rows
//   >= start_pos + n_tokens).
//   n_chunks = 1: writes the finished rows to `out` (part_o, part_ml unused, may be null).
//   n_chunks > 1 (flash-decoding split, for long histories and few query rows): writes each
//   chunk's unnormalised result, part_o[((t * n_heads + h) * n_chunks + c) * head_dim + d] =
//   sum_p e^(s_p - m) v_p[d], and part_ml[2 * (...) + 0 / 1] = (m, l = sum_p e^(s_p - m));
//   (-inf, 0) and zero values for a chunk the row sees nothing of. Then attention_merge_f32.
//   head_dim <= 256 and n_heads % n_kv_heads == 0 (the host checks; otherwise nothing is
//   written).
// attention_merge_f32(part_o, part_ml, out, n_tokens, n_heads, head_dim, n_chunks)
//   out[t, h] = sum_c e^(m_c - m) o_c / sum_c e^(m_c - m) l_c over the chunks with l_c != 0,
//   m = their largest m_c (the CPU's merge). grid = (n_tokens * n_heads), blockDim.x =
//   32 * warps (128 suggested); threads over head_dim.
#include "common.cuh"

#define MAX_HEAD_DIM 256
// Cache rows scored per step: four independent dot products in flight per warp.
#define ROWS 4

struct TreeBits {
    const unsigned long long* bits;
    unsigned prefix, span, words;
};

// Whether token t sees cache row p through the tree mask (always without one).
__device__ __forceinline__ bool tree_visible(const TreeBits& m, unsigned t, size_t p) {
    if (m.bits == nullptr || p < m.prefix) {
        return true;
    }
    const size_t j = p - m.prefix;
    return j < m.span && j / 64 < m.words &&
           ((m.bits[(size_t)t * m.words + j / 64] >> (j % 64)) & 1ull) != 0;
}

// One warp: query row (t, h) over the cache rows [r0, r1) of kv head g. DPL head elements
// per lane (d = lane + 32 * k), so head_dim <= 32 * DPL.
// Long function: one kernel body, the online softmax over the rows (score, rescale,
// accumulate) and the write of the row or of the chunk's partials; pieces of it would pass
// the per-lane q and running-output registers through device-function arguments.
template <typename KV, int DPL>
__device__ __forceinline__ void attend(const float* __restrict__ q,
                                       const KV* __restrict__ k_cache,
                                       const KV* __restrict__ v_cache, const TreeBits& mask,
                                       float* __restrict__ out, float* __restrict__ part_o,
                                       float* __restrict__ part_ml, unsigned t, unsigned h,
                                       unsigned g, unsigned n_heads, unsigned n_kv_heads,
                                       unsigned head_dim, size_t r0, size_t r1, float scale) {
    const unsigned lane = threadIdx.x & 31u;
    const size_t kv_dim = (size_t)n_kv_heads * head_dim;
    const float* qrow = q + ((size_t)t * n_heads + h) * head_dim;
    const KV* kbase = k_cache + (size_t)g * head_dim;
    const KV* vbase = v_cache + (size_t)g * head_dim;
    float qv[DPL], o[DPL];
#pragma unroll
    for (int k = 0; k < DPL; ++k) {
        const unsigned d = lane + 32u * k;
        qv[k] = d < head_dim ? qrow[d] : 0.0f;
        o[k] = 0.0f;
    }
    float m = neg_inf(), l = 0.0f;
    for (size_t p = r0; p < r1; p += ROWS) {
        float s[ROWS];
        bool vis[ROWS];
        bool any = false;
#pragma unroll
        for (int u = 0; u < ROWS; ++u) {
            // Depends on (t, row) only: the same for every lane, so no divergence.
            vis[u] = p + u < r1 && tree_visible(mask, t, p + u);
            any = any || vis[u];
            float part = 0.0f;
            if (vis[u]) {
                const KV* kr = kbase + (p + u) * kv_dim;
#pragma unroll
                for (int k = 0; k < DPL; ++k) {
                    const unsigned d = lane + 32u * k;
                    if (d < head_dim) {
                        part = fmaf(qv[k], to_f32(__ldg(kr + d)), part);
                    }
                }
            }
            s[u] = warp_sum(part) * scale;
        }
        if (!any) {
            continue;
        }
        float mx = m;
#pragma unroll
        for (int u = 0; u < ROWS; ++u) {
            mx = vis[u] ? fmaxf(mx, s[u]) : mx;
        }
        // e^(-inf) = 0 rescales the empty start away.
        const float a = expf(m - mx);
        float b[ROWS];
        float bsum = 0.0f;
#pragma unroll
        for (int u = 0; u < ROWS; ++u) {
            b[u] = vis[u] ? expf(s[u] - mx) : 0.0f;
            bsum += b[u];
        }
        l = l * a + bsum;
        m = mx;
#pragma unroll
        for (int k = 0; k < DPL; ++k) {
            const unsigned d = lane + 32u * k;
            if (d < head_dim) {
                float acc = o[k] * a;
#pragma unroll
                for (int u = 0; u < ROWS; ++u) {
                    if (vis[u]) {
                        acc = fmaf(b[u], to_f32(__ldg(vbase + (p + u) * kv_dim + d)), acc);
                    }
                }
                o[k] = acc;
            }
        }
    }
    const unsigned n_chunks = gridDim.y, c = blockIdx.y;
    if (n_chunks == 1) {
        // Every row sees at least itself, so l > 0 unless the inputs were not finite.
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float* orow = out + ((size_t)t * n_heads + h) * head_dim;
#pragma unroll
        for (int k = 0; k < DPL; ++k) {
            const unsigned d = lane + 32u * k;
            if (d < head_dim) {
                orow[d] = o[k] * inv;
            }
        }
    } else {
        const size_t slot = ((size_t)t * n_heads + h) * n_chunks + c;
#pragma unroll
        for (int k = 0; k < DPL; ++k) {
            const unsigned d = lane + 32u * k;
            if (d < head_dim) {
                part_o[slot * head_dim + d] = o[k];
            }
        }
        if (lane == 0) {
            part_ml[2 * slot] = m;
            part_ml[2 * slot + 1] = l;
        }
    }
}

template <typename KV>
__device__ __forceinline__ void attention_chunk(
    const float* __restrict__ q, const KV* __restrict__ k_cache,
    const KV* __restrict__ v_cache, const unsigned long long* __restrict__ mask_bits,
    float* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
    unsigned n_tokens, unsigned n_heads, unsigned n_kv_heads, unsigned head_dim,
    unsigned start_pos, unsigned chunk_rows, unsigned mask_prefix, unsigned mask_span,
    unsigned mask_words, float scale) {
    const unsigned g = blockIdx.z;
    if (n_kv_heads == 0 || n_heads % n_kv_heads != 0 || g >= n_kv_heads || head_dim == 0 ||
        head_dim > MAX_HEAD_DIM || chunk_rows == 0) {
        return;
    }
    const unsigned group = n_heads / n_kv_heads;
    const size_t qr = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    // Uniform per warp: the warp leaves together.
    if (qr >= (size_t)n_tokens * group) {
        return;
    }
    const unsigned t = (unsigned)(qr / group);
    const unsigned h = g * group + (unsigned)(qr % group);
    // This chunk's part of the rows token t sees (empty when the chunk starts past them).
    const size_t limit = (size_t)start_pos + t + 1;
    const size_t r0 = (size_t)blockIdx.y * chunk_rows;
    const size_t r1 = max(r0, min(r0 + chunk_rows, limit));
    const TreeBits mask = {mask_bits, mask_prefix, mask_span, mask_words};
    // The per-lane arrays sized to the head: fewer registers and no dead lanes for 64 / 128.
    if (head_dim <= 64) {
        attend<KV, 2>(q, k_cache, v_cache, mask, out, part_o, part_ml, t, h, g, n_heads,
                  n_kv_heads, head_dim, r0, r1, scale);
    } else if (head_dim <= 128) {
        attend<KV, 4>(q, k_cache, v_cache, mask, out, part_o, part_ml, t, h, g, n_heads,
                  n_kv_heads, head_dim, r0, r1, scale);
    } else {
        attend<KV, 8>(q, k_cache, v_cache, mask, out, part_o, part_ml, t, h, g, n_heads,
                  n_kv_heads, head_dim, r0, r1, scale);
    }
}

#define ATTENTION_CHUNK(name, KV)                                                          \
    extern "C" __global__ void name(                                                       \
        const float* __restrict__ q, const KV* __restrict__ k_cache,                       \
        const KV* __restrict__ v_cache, const unsigned long long* __restrict__ mask_bits,  \
        float* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,  \
        unsigned n_tokens, unsigned n_heads, unsigned n_kv_heads, unsigned head_dim,       \
        unsigned start_pos, unsigned chunk_rows, unsigned mask_prefix, unsigned mask_span, \
        unsigned mask_words, float scale) {                                                \
        attention_chunk<KV>(q, k_cache, v_cache, mask_bits, out, part_o, part_ml, n_tokens, \
                            n_heads, n_kv_heads, head_dim, start_pos, chunk_rows,           \
                            mask_prefix, mask_span, mask_words, scale);                     \
    }

ATTENTION_CHUNK(attention_chunk_f32, float)
ATTENTION_CHUNK(attention_chunk_f16, __half)

extern "C" __global__ void attention_merge_f32(const float* __restrict__ part_o,
                                               const float* __restrict__ part_ml,
                                               float* __restrict__ out, unsigned n_tokens,
                                               unsigned n_heads, unsigned head_dim,
                                               unsigned n_chunks) {
    const size_t row = blockIdx.x;  // t * n_heads + h
    if (row >= (size_t)n_tokens * n_heads || n_chunks == 0) {
        return;
    }
    const float* ml = part_ml + row * n_chunks * 2;
    float m = neg_inf();
    for (unsigned c = 0; c < n_chunks; ++c) {
        if (ml[2 * c + 1] != 0.0f) {
            m = fmaxf(m, ml[2 * c]);
        }
    }
    float total = 0.0f;
    for (unsigned c = 0; c < n_chunks; ++c) {
        const float lc = ml[2 * c + 1];
        if (lc != 0.0f) {
            total += expf(ml[2 * c] - m) * lc;
        }
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    const float* po = part_o + row * n_chunks * head_dim;
    for (unsigned d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (unsigned c = 0; c < n_chunks; ++c) {
            const float lc = ml[2 * c + 1];
            if (lc != 0.0f) {
                acc = fmaf(expf(ml[2 * c] - m), po[(size_t)c * head_dim + d], acc);
            }
        }
        out[row * head_dim + d] = acc * inv;
    }
}
