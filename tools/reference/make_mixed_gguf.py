#!/usr/bin/env python3
"""Write tests/fixtures/tiny-mixed.gguf: a tiny random Llama in a GGUF whose layers mix block
formats the way llama.cpp's *_K_M files do (some layers' v and down matrices in a wider format).

    python3 tools/reference/make_mixed_gguf.py

Q4_0 everywhere except attn_v and ffn_down of even layers and layer 3's ffn_gate (Q8_0); the
tied embedding Q8_0, norms F32. Hidden 64, 6 layers, 4 heads / 2 KV heads, FFN 160, 96 tokens: every matrix is
whole blocks of 32. The vocabulary is a minimal byte-level BPE (tests feed token ids). Fixed
numpy seed: the file is reproducible byte for byte with the pinned gguf package
(tools/requirements.txt).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

REPO = Path(__file__).resolve().parent.parent.parent
OUT = REPO / "tests" / "fixtures" / "tiny-mixed.gguf"

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB, CONTEXT = 64, 6, 4, 2, 160, 96, 256
Q4, Q8 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0


def main() -> None:
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(OUT), "llama")
    w.add_name("tiny-mixed")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    # Byte-level BPE: 94 printable ASCII characters, one merge, an end token.
    tokens = [chr(c) for c in range(33, 127)] + ["ab", "<eos>"]
    assert len(tokens) == VOCAB
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (VOCAB - 1) + [3])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(VOCAB - 1)

    def matrix(name: str, rows: int, cols: int, kind) -> None:
        # Scaled like a trained model's (activations O(1) through 6 layers).
        data = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        q = gguf.quants.quantize(data, kind)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    head_dim = HIDDEN // HEADS
    matrix("token_embd.weight", VOCAB, HIDDEN, Q8)
    for i in range(LAYERS):
        wide = Q8 if i % 2 == 0 else Q4
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", HEADS * head_dim, HIDDEN, Q4)
        matrix(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN, Q4)
        matrix(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN, wide)
        matrix(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * head_dim, Q4)
        norm(f"blk.{i}.ffn_norm.weight")
        # Layer 3's gate differs from its up: gate and up rows have their own sizes.
        matrix(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN, Q8 if i == 3 else Q4)
        matrix(f"blk.{i}.ffn_up.weight", FFN, HIDDEN, Q4)
        matrix(f"blk.{i}.ffn_down.weight", HIDDEN, FFN, wide)
    norm("output_norm.weight")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
