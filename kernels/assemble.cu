// A layer's new compact Griffin FFN built on the device when a request picks its neurons
// (OffloadBackend::assemble_compact): the neurons the layer already holds are copied within
// device memory from its old compact FFN, and only the new ones come over the link, as
// gate|up|down bundles staged by the copy engine. Copies elements unchanged, so the result
// is byte for byte what gathering the new set on the host gives.
//
// Layouts (elements of one 16- or 32-bit float type; k new neurons, ko old, h = hidden):
//   old: the old compact matrix of this part: gate / up [ko, h], down [h, ko]
//   staged: [moved, 3 * h], one bundle per moved neuron: gate row | up row | down column
//   src: [k] u32, where new neuron j comes from: src[j] < ko is old neuron src[j], else
//     staged bundle src[j] - ko (the host builds the table; an entry past both writes 0)
//   out: the new matrix of this part: gate / up [k, h] (part 0 / 1), down [h, k] (part 2)
//
// assemble_compact_u16 / _u32(old, staged, src, out, k, ko, moved, hidden, part)
//   Grid-stride over the k * h elements of out, in out's order (coalesced writes; the
//   old matrix is read in nearly the same order, since kept neurons stay ascending).
//   grid = (min(ceil(k * h / blockDim.x), 4 * SMs)), blockDim.x = 256 suggested; one launch
//   per part, so the caller can free each old matrix as soon as its new one is queued.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void assemble_compact(const T* __restrict__ old,
                                                 const T* __restrict__ staged,
                                                 const unsigned* __restrict__ src,
                                                 T* __restrict__ out, unsigned k, unsigned ko,
                                                 unsigned moved, unsigned hidden,
                                                 unsigned part) {
    const size_t total = (size_t)k * hidden;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        // New neuron j and element c of its row (gate, up) or column (down).
        size_t j, c;
        if (part < 2) {
            j = e / hidden;
            c = e % hidden;
        } else {
            c = e / k;
            j = e % k;
        }
        const unsigned s = src[j];
        T v = 0;
        if (s < ko && old != nullptr) {
            v = part < 2 ? old[(size_t)s * hidden + c] : old[c * ko + s];
        } else if (s >= ko && s - ko < moved && staged != nullptr && part < 3) {
            v = staged[((size_t)(s - ko) * 3 + part) * hidden + c];
        }
        out[e] = v;
    }
}

extern "C" __global__ void assemble_compact_u16(const unsigned short* __restrict__ old,
                                                const unsigned short* __restrict__ staged,
                                                const unsigned* __restrict__ src,
                                                unsigned short* __restrict__ out, unsigned k,
                                                unsigned ko, unsigned moved, unsigned hidden,
                                                unsigned part) {
    assemble_compact(old, staged, src, out, k, ko, moved, hidden, part);
}

extern "C" __global__ void assemble_compact_u32(const unsigned* __restrict__ old,
                                                const unsigned* __restrict__ staged,
                                                const unsigned* __restrict__ src,
                                                unsigned* __restrict__ out, unsigned k,
                                                unsigned ko, unsigned moved, unsigned hidden,
                                                unsigned part) {
    assemble_compact(old, staged, src, out, k, ko, moved, hidden, part);
}
