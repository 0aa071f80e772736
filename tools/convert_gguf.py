#!/usr/bin/env python3
"""Convert a llama.cpp GGUF file (arch `llama`, BPE tokenizer) into a Hugging Face style model dir.

    tools/convert_gguf.py IN.gguf OUT_DIR [--dtype bf16|f16|f32]

Writes config.json, model.safetensors (HF tensor names, [out_features, in_features] shapes),
tokenizer.json, tokenizer_config.json and generation_config.json. Quantized tensors (Q4_1, Q8_0,
...) are dequantized with the `gguf` package and stored in the requested float dtype.

Two things llama.cpp changes on the way into GGUF are undone here:
  * Q/K row order. llama.cpp's converter reorders the rows of every attention head of q_proj and
    k_proj so that the two rotary halves (i, i + head_dim/2) used by HF's rotate_half become
    adjacent rows (2i, 2i+1), the pairing its own RoPE kernel uses. We put them back.
  * The tokenizer, which lives in `tokenizer.ggml.*` metadata. We rebuild a byte-level BPE
    tokenizer.json with the `tokenizers` package and check it round-trips.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))
from safetensors_np import write_safetensors  # noqa: E402

TORCH_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


class ConvertError(Exception):
    """A problem with the input file that the user should hear about in one line."""


# ---------------------------------------------------------------------------------------------
# GGUF access
# ---------------------------------------------------------------------------------------------

class Meta:
    """Typed access to GGUF key/value metadata."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise ConvertError(f"GGUF metadata key {key!r} is missing")
        return value


def dequantize_tensor(t) -> np.ndarray:
    """Return a GGUF tensor as float32 with numpy shape [rows, cols] (= HF [out, in])."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    # GGUF lists dimensions innermost first; numpy order is the reverse.
    shape = tuple(int(d) for d in reversed(list(t.shape)))
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        arr = np.asarray(t.data, dtype=np.float32)
    else:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    return arr.reshape(shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's per-head Q/K row interleave.

    In the GGUF, head h's rows are ordered [a0, b0, a1, b1, ...] where a_i is HF row i of the head
    and b_i is HF row i + head_dim/2. View the head as [head_dim/2, 2, in] (pairs), swap to
    [2, head_dim/2, in] (halves) and flatten back.
    """
    rows, cols = w.shape
    if rows % (2 * n_heads):
        raise ConvertError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# blk.N.<suffix> -> model.layers.N.<hf suffix>
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    raise ConvertError(f"unexpected GGUF tensor {gguf_name!r} (not a plain Llama tensor)")


# ---------------------------------------------------------------------------------------------
# Model config
# ---------------------------------------------------------------------------------------------

def build_config(meta: Meta, tensor_names: set[str], dtype: str) -> dict:
    arch = meta.need("general.architecture")
    if arch != "llama":
        raise ConvertError(f"architecture {arch!r} is not supported (only 'llama')")
    p = arch + "."
    hidden = int(meta.need(p + "embedding_length"))
    n_head = int(meta.need(p + "attention.head_count"))
    n_kv = int(meta.get(p + "attention.head_count_kv", n_head))
    head_dim = int(meta.get(p + "attention.key_length", hidden // n_head))
    rope_dim = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConvertError(f"partial rotary (rope dim {rope_dim} != head dim {head_dim}) "
                           "is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise ConvertError("GGUF carries a rope_freqs tensor (Llama 3.1 style scaling); "
                           "this converter cannot express it as an HF rope_scaling block")
    tokens = meta.need("tokenizer.ggml.tokens")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(meta.need(p + "feed_forward_length")),
        "num_hidden_layers": int(meta.need(p + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "rms_norm_eps": float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": int(meta.get(p + "vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": TORCH_DTYPE[dtype],
    }
    # GGUF stores float32 metadata; print eps the way HF configs write it (1e-05, not 9.99e-06).
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.6g}")
    scaling = meta.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ConvertError(f"rope scaling type {scaling!r} is not supported")
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": float(meta.need(p + "rope.scaling.factor"))}
    return config


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# GGUF token types (llama.cpp's enum): 1 normal, 2 unknown, 3 control, 4 user defined,
# 5 unused, 6 byte.
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def build_tokenizer(meta: Meta):
    """Return (tokenizers.Tokenizer, info dict) rebuilt from tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.need("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(f"tokenizer model {kind!r} is not supported (only byte-level BPE, "
                           "'gpt2')")
    tokens = list(meta.need("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.need("tokenizer.ggml.merges")]
    if len(set(tokens)) != len(tokens):
        raise ConvertError("tokenizer vocabulary contains duplicate token strings")
    vocab = {tok: i for i, tok in enumerate(tokens)}

    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                       unk_token=tokens[unk_id] if unk_id is not None else None)
    tok = Tokenizer(model)

    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM: every digit is its own pre-token, then GPT-2's byte-level split.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ConvertError(f"pre-tokenizer type {pre!r} is not supported (smollm, gpt2)")
    tok.decoder = decoders.ByteLevel()

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos:
        if bos_id is None:
            raise ConvertError("add_bos_token is set but there is no bos_token_id")
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|im_start|> ...) must be matched whole in raw text and flagged special;
    # user-defined tokens are matched whole too but are ordinary text.
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(types) if t == TOKEN_CONTROL]
    users = [AddedToken(tokens[i], special=False, normalized=False)
             for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    tok.add_special_tokens(specials)
    if users:
        tok.add_tokens(users)

    info = {"tokens": tokens, "add_bos": add_bos, "pre": pre,
            "n_special": len(specials), "n_user": len(users)}
    return tok, info


def check_tokenizer(tok, tokens: list[str]) -> None:
    """Round-trip a few strings and make sure special tokens stay single ids."""
    samples = [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "Digits: 12345 and 3.14159, year 2024.",
        "Unicode: naïve café, Straße, 東京, Ελληνικά.",
        "Emoji: 🦀🚀 ok",
        "  leading spaces\n\ttabs and\nnewlines  ",
        "<|im_start|>user\nHi<|im_end|>",
    ]
    for s in samples:
        enc = tok.encode(s, add_special_tokens=False)
        back = tok.decode(enc.ids, skip_special_tokens=False)
        if back != s:
            raise ConvertError(f"tokenizer round trip failed: {s!r} -> {enc.ids} -> {back!r}")
    digits = tok.encode("12345", add_special_tokens=False).tokens
    if digits != list("12345"):
        raise ConvertError(f"digits are not split individually: {digits}")
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        if name in tokens:
            ids = tok.encode(name, add_special_tokens=False).ids
            if ids != [tokens.index(name)]:
                raise ConvertError(f"special token {name} encodes to {ids}")


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def convert(in_path: Path, out_dir: Path, dtype: str) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(in_path))
    meta = Meta(reader)
    names = {t.name for t in reader.tensors}
    config = build_config(meta, names, dtype)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = dequantize_tensor(t)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rows(w, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rows(w, n_kv)
        tensors[name] = w

    # Shape checks against the config, in HF [out, in] convention.
    h, hd, ff = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    expect = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        expect["lm_head.weight"] = (config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expect.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (n_head * hd, h),
            p + "self_attn.k_proj.weight": (n_kv * hd, h),
            p + "self_attn.v_proj.weight": (n_kv * hd, h),
            p + "self_attn.o_proj.weight": (h, n_head * hd),
            p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        })
    if set(expect) != set(tensors):
        missing, extra = set(expect) - set(tensors), set(tensors) - set(expect)
        raise ConvertError(f"tensor set mismatch: missing {sorted(missing)[:3]}, "
                           f"extra {sorted(extra)[:3]}")
    for name, shape in expect.items():
        if tensors[name].shape != shape:
            raise ConvertError(f"{name} has shape {tensors[name].shape}, expected {shape}")

    tok, tinfo = build_tokenizer(meta)
    check_tokenizer(tok, tinfo["tokens"])
    tokens = tinfo["tokens"]

    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    # HF order: embeddings, layers in order, final norm, head.
    order = ["model.embed_tokens.weight"]
    order += sorted((k for k in expect if k.startswith("model.layers.")),
                    key=lambda k: (int(k.split(".")[2]), k))
    order += ["model.norm.weight"] + (["lm_head.weight"] if "lm_head.weight" in expect else [])
    written += write_safetensors(out_dir / "model.safetensors",
                                 {k: tensors[k] for k in order}, dtype)

    def dump(name: str, obj: dict) -> None:
        nonlocal written
        text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
        (out_dir / name).write_text(text, encoding="utf-8")
        written += len(text.encode("utf-8"))

    dump("config.json", config)
    tok.save(str(out_dir / "tokenizer.json"))
    written += (out_dir / "tokenizer.json").stat().st_size

    bos_id, eos_id = config["bos_token_id"], config["eos_token_id"]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    pad_id = config["pad_token_id"]
    name_of = lambda i: tokens[i] if i is not None else None  # noqa: E731
    tok_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": name_of(bos_id),
        "eos_token": name_of(eos_id),
        "unk_token": name_of(unk_id),
        "pad_token": name_of(pad_id),
        "add_bos_token": tinfo["add_bos"],
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    dump("tokenizer_config.json", tok_config)

    # Every id that ends a generation: the declared EOS, the chat turn end, the document end.
    eos_ids = [eos_id] if eos_id is not None else []
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        if name in tokens and tokens.index(name) not in eos_ids:
            eos_ids.append(tokens.index(name))
    dump("generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_ids,
                                    "pad_token_id": pad_id})

    return {"config": config, "bytes": written, "tokenizer": tinfo, "eos_ids": eos_ids}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path, help="input .gguf file")
    ap.add_argument("out_dir", type=Path, help="output model directory")
    ap.add_argument("--dtype", choices=sorted(TORCH_DTYPE), default="bf16",
                    help="dtype of model.safetensors (default bf16)")
    args = ap.parse_args(argv)
    if not args.gguf.is_file():
        print(f"convert_gguf: error: {args.gguf} does not exist", file=sys.stderr)
        return 2
    try:
        res = convert(args.gguf, args.out_dir, args.dtype)
    except ConvertError as e:
        print(f"convert_gguf: error: {e}", file=sys.stderr)
        return 1
    c = res["config"]
    print(f"converted {args.gguf.name} -> {args.out_dir}")
    print(f"  arch llama: layers {c['num_hidden_layers']}, hidden {c['hidden_size']}, "
          f"ffn {c['intermediate_size']}, heads {c['num_attention_heads']}/"
          f"{c['num_key_value_heads']} kv, head_dim {c['head_dim']}, rope_theta {c['rope_theta']}, "
          f"tied {c['tie_word_embeddings']}")
    t = res["tokenizer"]
    print(f"  vocab {c['vocab_size']} (pre {t['pre']}, {t['n_special']} special tokens, "
          f"add_bos {t['add_bos']}), eos ids {res['eos_ids']}")
    print(f"  wrote {res['bytes'] / 1e6:.1f} MB ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
