// The copy engine's gather: packs many short runs of registered, device-mapped host memory
// (neuron bundles of an FFN complement) into one device staging buffer, so that thousands of
// runs cost one launch instead of one DMA call each (see backend::cuda::copy_engine).
//
// gather_pieces(table, entries, dst)
//   table: `entries` rows of three u64 in device memory: (src, dst_offset, len). src is a
//   device address (cuMemHostGetDevicePointer of a registered mapping, plus the run's offset;
//   reads cross the bus), dst_offset is a byte offset into dst. Rows never overlap in dst.
//   grid = (a few blocks, fewer than the rows allowed), blockDim.x = 256; block b copies rows
//   b, b + gridDim.x, ... Rows are at most 256 KiB (the host splits longer runs), so blocks
//   get even shares. A small grid leaves the GPU's SMs to the compute stream while the bus,
//   not the SMs, sets the speed.
#include "common.cuh"

// Loads in flight per thread before their stores: reads of host memory take a bus round trip
// (a microsecond or more), so each thread keeps several outstanding.
#define GATHER_UNROLL 4

// Copies n words of type W from s to d, GATHER_UNROLL loads per thread before the stores.
template <typename W>
__device__ __forceinline__ void copy_words(const W* __restrict__ s, W* __restrict__ d,
                                           unsigned long long n) {
    const unsigned long long step = blockDim.x;
    unsigned long long i = threadIdx.x;
    for (; i + (GATHER_UNROLL - 1) * step < n; i += GATHER_UNROLL * step) {
        W v[GATHER_UNROLL];
#pragma unroll
        for (int u = 0; u < GATHER_UNROLL; ++u) {
            v[u] = s[i + u * step];
        }
#pragma unroll
        for (int u = 0; u < GATHER_UNROLL; ++u) {
            d[i + u * step] = v[u];
        }
    }
    for (; i < n; i += step) {
        d[i] = s[i];
    }
}

// Copies the bytes of s before its first W-aligned address one by one, then whole words of W
// (s and d share their offset within a W), and returns how many bytes that covered.
template <typename W>
__device__ __forceinline__ unsigned long long copy_aligned(const unsigned char* s,
                                                           unsigned char* d,
                                                           unsigned long long len) {
    const unsigned long long size = sizeof(W);
    const unsigned long long head =
        min(len, (size - ((unsigned long long)s & (size - 1))) & (size - 1));
    for (unsigned long long i = threadIdx.x; i < head; i += blockDim.x) {
        d[i] = s[i];
    }
    const unsigned long long words = (len - head) / size;
    copy_words((const W*)(s + head), (W*)(d + head), words);
    return head + words * size;
}

extern "C" __global__ void gather_pieces(const unsigned long long* __restrict__ table,
                                         unsigned entries, unsigned char* __restrict__ dst) {
    for (unsigned e = blockIdx.x; e < entries; e += gridDim.x) {
        const unsigned long long src = table[3ull * e];
        const unsigned long long off = table[3ull * e + 1];
        const unsigned long long len = table[3ull * e + 2];
        const unsigned char* s = (const unsigned char*)src;
        unsigned char* d = dst + off;
        // Where both ends sit at the same offset within a 16-byte (else 4-byte) word, the
        // bytes up to the first whole word go one by one, then whole words; the bytes past
        // the last whole word are copied one by one below. Ends at different offsets copy
        // byte by byte throughout.
        const unsigned long long mis = src ^ (unsigned long long)d;
        unsigned long long body = 0;
        if ((mis & 15ull) == 0) {
            body = copy_aligned<uint4>(s, d, len);
        } else if ((mis & 3ull) == 0) {
            body = copy_aligned<unsigned>(s, d, len);
        }
        for (unsigned long long i = body + threadIdx.x; i < len; i += blockDim.x) {
            d[i] = s[i];
        }
    }
}
