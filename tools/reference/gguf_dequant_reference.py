#!/usr/bin/env python3
"""Pinned de-quantization numbers for the Rust test `model::gguf::dequant::tests`.

Builds the same pseudo-random block stream as `reference_blocks` in src/model/gguf/dequant.rs
(a 64-bit LCG's top byte, each block's f16 scales overwritten with small finite values),
de-quantizes 4 blocks of each format with the `gguf` package and prints, per format, the sum,
the sum of squares (both float64) and elements 1, n/2 + 3 and n - 1, as Rust literals.

    python3 tools/reference/gguf_dequant_reference.py
"""
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

M64 = (1 << 64) - 1
# (name in Rust, ggml type, block bytes, block elements, f16 scale positions and values)
FORMATS = [
    ("Q4_0", T.Q4_0, 18, 32, [(0, 0x2C00)]),
    ("Q4_1", T.Q4_1, 20, 32, [(0, 0x2C00), (2, 0xAC00)]),
    ("Q8_0", T.Q8_0, 34, 32, [(0, 0x2C00)]),
    ("Q4K", T.Q4_K, 144, 256, [(0, 0x2C00), (2, 0x3800)]),
    ("Q5K", T.Q5_K, 176, 256, [(0, 0x2C00), (2, 0x3800)]),
    ("Q6K", T.Q6_K, 210, 256, [(208, 0x2C00)]),
]


def blocks(block_bytes: int, n_blocks: int, scales) -> np.ndarray:
    state = 0x51517E5A ^ (block_bytes << 8)
    out = bytearray()
    for _ in range(n_blocks * block_bytes):
        state = (state * 6364136223846793005 + 1442695040888963407) & M64
        out.append(state >> 56)
    for b in range(n_blocks):
        for at, value in scales:
            out[b * block_bytes + at: b * block_bytes + at + 2] = value.to_bytes(2, "little")
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(n_blocks, block_bytes)


def main() -> None:
    for name, qtype, nbytes, nelems, scales in FORMATS:
        y = dequantize(blocks(nbytes, 4, scales), qtype).astype(np.float32).reshape(-1)
        assert y.size == 4 * nelems
        n = y.size
        s = float(np.sum(y.astype(np.float64)))
        sq = float(np.sum(y.astype(np.float64) ** 2))
        picks = ", ".join(f"{float(v)!r}" for v in (y[1], y[n // 2 + 3], y[n - 1]))
        print(f"        (GgmlType::{name}, {s!r}, {sq!r}, [{picks}]),")


if __name__ == "__main__":
    main()
