#!/usr/bin/env python3
"""Sanity checks of the converted SmolLM2 model and of the reference itself.

    python3 tools/reference/check_smollm2.py [MODEL_DIR]

* KV-cached token-by-token decoding equals one full forward pass (max |logit diff|).
* Perplexity of a plain English sentence with the converted Q/K rows, versus the same weights
  left in llama.cpp's interleaved row order, and versus only K left that way.
  Only the correct un-permutation gives a low perplexity and the right answer.
* The greedy fixture (tests/fixtures/smollm2_greedy.json) is reproduced exactly when computing
  in float32 instead of float64, i.e. its margins are wide enough for an f32 implementation.
* The chat answer to "What is the capital of France?" names Paris.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from llama_ref import LlamaRef, cached_vs_full  # noqa: E402

SENTENCE = ("The cat sat on the mat. It was a sunny day, and the children were playing "
            "in the park with their friends.")


def interleave_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order: per head, halves [a..., b...] become pairs [a0, b0, a1, b1...]."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def main() -> int:
    home = Path(os.environ.get("SIRIUS_HOME") or Path.home() / ".cache" / "sirius-offload")
    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else home / "models" / "smollm2-135m"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = LlamaRef(model_dir)
    ids = tok.encode(SENTENCE, add_special_tokens=False).ids

    print(f"cached vs full forward, {len(ids)} tokens: max |diff| = "
          f"{cached_vs_full(model, ids):.2e}")
    print(f"perplexity, {'converted weights:':32s} {model.perplexity(ids):10.2f}")

    # Same weights with Q/K rows put back into the GGUF order (i.e. never un-permuted), and
    # with only K put back (a converter that forgot one of the two).
    chat = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\n")
    chat_ids = tok.encode(chat, add_special_tokens=False).ids
    originals = [(l["self_attn.q_proj.weight"], l["self_attn.k_proj.weight"])
                 for l in model.layers]
    for label, touch_q in (("Q/K left in GGUF row order", True),
                           ("only K left in GGUF order", False)):
        for layer, (q, k) in zip(model.layers, originals):
            layer["self_attn.q_proj.weight"] = interleave_rows(q, model.n_heads) if touch_q else q
            layer["self_attn.k_proj.weight"] = interleave_rows(k, model.n_kv)
        answer = tok.decode(model.greedy(chat_ids, 12, [2]), skip_special_tokens=False)
        print(f"perplexity, {label + ':':32s} {model.perplexity(ids):10.2f}   "
              f"France answer {answer!r}")
    for layer, (q, k) in zip(model.layers, originals):
        layer["self_attn.q_proj.weight"], layer["self_attn.k_proj.weight"] = q, k
    answer = tok.decode(model.greedy(chat_ids, 12, [2]), skip_special_tokens=False)
    print(f"converted weights France answer {answer!r}")

    fixture_path = HERE.parent.parent / "tests" / "fixtures" / "smollm2_greedy.json"
    if fixture_path.is_file():
        fixture = json.loads(fixture_path.read_text())
        stop = fixture["decoding"]["stop_at"]
        m32 = LlamaRef(model_dir, np.float32)
        for case in fixture["cases"]:
            gen = m32.greedy(case["prompt_ids"], fixture["decoding"]["max_new_tokens"], stop)
            same = gen == case["greedy_ids"]
            print(f"float32 reproduces [{case['kind']}] {case['prompt_text'][:40]!r}: {same}")
            if not same:
                return 1
        chat = fixture["cases"][0]
        print(f"chat answer: {chat['greedy_text']!r}; Paris: {'Paris' in chat['greedy_text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
