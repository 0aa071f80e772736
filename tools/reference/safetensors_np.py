"""Minimal safetensors reader/writer built on numpy alone.

The format is simple enough to handle by hand, which keeps the reference independent of the
`safetensors` package (and numpy has no bfloat16, so that package cannot hand us BF16 arrays):

    [u64 little-endian N][N bytes of JSON header][raw tensor bytes]

The header maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end]}, offsets being
relative to the first byte after the header. An optional "__metadata__" entry holds strings.

BF16 is stored as the upper 16 bits of an IEEE float32, so widening is a shift into the high half
of a uint32, and narrowing rounds the low 16 bits away (round to nearest, ties to even).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# safetensors dtype tag -> numpy storage dtype (BF16 is stored as raw uint16 bit patterns).
_STORAGE = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen BF16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 values to BF16 (nearest, ties to even) and return the uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds to nearest with ties going to the even value.
    rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    out = rounded.astype(np.uint16)
    # NaNs must stay NaNs (the rounding add could carry them into infinity): force a quiet NaN.
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def read_header(path: str | Path) -> tuple[dict, int]:
    """Return (header dict, byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    return header, 8 + n


def read_safetensors(path: str | Path, widen: bool = True) -> dict[str, np.ndarray]:
    """Load every tensor of a .safetensors file.

    With widen=True, BF16 tensors come back as float32 (exact); otherwise as uint16 bit
    patterns. Other dtypes come back in their stored numpy dtype.
    """
    header, base = read_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tag = info["dtype"]
        if tag not in _STORAGE:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {tag}")
        begin, end = info["data_offsets"]
        storage = _STORAGE[tag]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if end - begin != count * storage.itemsize:
            raise ValueError(f"{path}: tensor {name} byte range does not match shape {shape}")
        arr = np.frombuffer(raw[base + begin : base + end].tobytes(), dtype=storage).reshape(shape)
        if tag == "BF16" and widen:
            arr = bf16_bits_to_f32(arr)
        out[name] = arr
    return out


def tensor_dtypes(path: str | Path) -> dict[str, str]:
    """Map tensor name -> safetensors dtype tag, without reading the data."""
    header, _ = read_header(path)
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """Convert a float array to the storage array for dtype 'bf16', 'f16' or 'f32'."""
    if dtype == "bf16":
        return f32_to_bf16_bits(np.asarray(x, dtype=np.float32))
    if dtype == "f16":
        return np.asarray(x, dtype=np.float32).astype("<f2")
    if dtype == "f32":
        return np.asarray(x, dtype="<f4")
    raise ValueError(f"unknown dtype {dtype!r} (expected bf16, f16 or f32)")


_TAG_OF = {"bf16": "BF16", "f16": "F16", "f32": "F32"}


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], dtype: str,
                      metadata: dict[str, str] | None = None) -> int:
    """Write float tensors (any float numpy dtype) converted to `dtype` ('bf16'|'f16'|'f32').

    Tensors are laid out back to back in the given order, and the header is padded with spaces to
    a multiple of 8 bytes, so every tensor starts aligned to its element size (all tensors share
    one dtype). Returns the number of bytes written.
    """
    tag = _TAG_OF[dtype]
    encoded = {name: np.ascontiguousarray(encode(arr, dtype)) for name, arr in tensors.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in encoded.items():
        header[name] = {"dtype": tag, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in encoded.values():
            f.write(arr.tobytes())
    return 8 + len(blob) + offset
