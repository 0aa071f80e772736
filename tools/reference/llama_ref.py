#!/usr/bin/env python3
"""Independent numpy reference forward pass for Llama-family causal LMs (HF semantics).

Supports LlamaForCausalLM (default / linear / llama3 rope_scaling), MistralForCausalLM (explicit
head_dim, sliding window) and Qwen2ForCausalLM (q/k/v biases); tied or untied embeddings; GQA.
Weights come from config.json + model.safetensors in an HF model dir, read by hand with numpy
(safetensors_np.py). All math runs in float64 by default (`compute_dtype`), so golden fixtures
carry essentially no rounding of their own; weights are widened exactly from bf16/f16/f32.

API:
    m = LlamaRef(model_dir)
    m.forward(ids)                 -> logits [n, vocab] for the whole sequence, from scratch
    cache = m.new_cache(); m.step(ids, cache) -> logits for `ids`, appended after the cache
    m.greedy(prompt_ids, n_new, eos_ids=()) -> generated ids (KV-cached, argmax, lowest id on tie)
    m.greedy_with_margins(...)     -> (ids, top1 - top2 logit margin per step)
    m.ffn_hook = fn                -> optional; fn(li, silu(gate), up) replaces silu(gate) * up
                                      before down_proj (contextual sparsity, sparsity_ref.py)

CLI:
    llama_ref.py MODEL_DIR --text "some prompt" [--n 24]      greedy continuation
    llama_ref.py MODEL_DIR --ppl "an English sentence"        perplexity of a sentence
    llama_ref.py MODEL_DIR --check                            cached decode vs full forward
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from safetensors_np import read_safetensors  # noqa: E402

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


# ---------------------------------------------------------------------------------------------
# Rotary embedding frequencies
# ---------------------------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Per-pair angular frequencies, length head_dim/2, after any rope_scaling."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        # Positions are divided by the factor, which is the same as slowing every frequency.
        return inv_freq / factor
    if kind == "llama3":
        # Llama 3.1 scaling: wavelengths longer than original_ctx/low_freq_factor are slowed by
        # `factor`, shorter than original_ctx/high_freq_factor are kept, and the band between
        # is a linear blend in "how many wavelengths fit in the original context".
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2.0 * math.pi / inv_freq
        blend = np.clip((ctx / wavelen - low) / (high - low), 0.0, 1.0)
        scaled = (1.0 - blend) * (inv_freq / factor) + blend * inv_freq
        # Outside the band the clip already gives the pure cases; write them out for clarity.
        scaled = np.where(wavelen > ctx / low, inv_freq / factor, scaled)
        scaled = np.where(wavelen < ctx / high, inv_freq, scaled)
        return scaled
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """HF rotate_half RoPE. x: [heads, n, hd]; cos/sin: [n, hd/2]. Pairs are (i, i + hd/2)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

@dataclass
class KVCache:
    """Per-layer keys/values [n_kv, T, head_dim] for the positions processed so far."""
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


class LlamaRef:
    def __init__(self, model_dir: str | Path, compute_dtype=np.float64,
                 config_override: dict | None = None):
        """Load config.json + model.safetensors. config_override replaces config keys (used to
        show what a fixture would catch, e.g. an implementation that ignores rope_scaling)."""
        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        self.config = cfg = {**cfg, **(config_override or {})}
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED:
            raise ValueError(f"unsupported architecture {arch}")
        self.arch = arch
        self.dt = np.dtype(compute_dtype)
        self.hidden = cfg["hidden_size"]
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.vocab = cfg["vocab_size"]
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')}")
        if self.n_heads % self.n_kv:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        # Sliding-window attention: Mistral applies it whenever sliding_window is set. Qwen2 only
        # with use_sliding_window, and then per layer; that variant is not modelled here.
        self.window = None
        if arch == "MistralForCausalLM":
            self.window = cfg.get("sliding_window")
        elif arch == "Qwen2ForCausalLM" and cfg.get("use_sliding_window"):
            raise ValueError("Qwen2 use_sliding_window=true is not supported by the reference")
        self.inv_freq = rope_inv_freq(self.head_dim, float(cfg.get("rope_theta", 10000.0)),
                                      cfg.get("rope_scaling"))
        # Optional FFN hook, None by default (plain dense FFN). When set, every layer's FFN calls
        # ffn_hook(layer_index, silu(gate) [n, d_ff], up [n, d_ff]) and feeds what it returns
        # ([n, d_ff]) to down_proj instead of silu(gate) * up. Used by sparsity_ref.py.
        self.ffn_hook = None

        raw = read_safetensors(model_dir / "model.safetensors")
        w = {k: np.asarray(v, dtype=self.dt) for k, v in raw.items()}
        self.embed = w.pop("model.embed_tokens.weight")          # [vocab, hidden]
        self.final_norm = w.pop("model.norm.weight")             # [hidden]
        if "lm_head.weight" in w:
            self.lm_head = w.pop("lm_head.weight")               # [vocab, hidden]
        elif cfg.get("tie_word_embeddings", False):
            self.lm_head = self.embed
        else:
            raise ValueError("no lm_head.weight and tie_word_embeddings is false")
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            layer = {k[len(p):]: w.pop(k) for k in list(w) if k.startswith(p)}
            if arch == "Qwen2ForCausalLM":
                for b in ("q_proj", "k_proj", "v_proj"):
                    if f"self_attn.{b}.bias" not in layer:
                        raise ValueError(f"Qwen2 layer {i} lacks self_attn.{b}.bias")
            self.layers.append(layer)
        if w:
            raise ValueError(f"unused tensors in checkpoint: {sorted(w)[:5]}")

    # -- building blocks ----------------------------------------------------------------------

    def _rmsnorm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        var = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(var + self.eps) * weight

    @staticmethod
    def _linear(x: np.ndarray, layer: dict, name: str) -> np.ndarray:
        """y = x W^T (+ b); W is HF [out, in]. Biases are used wherever the checkpoint has them."""
        y = x @ layer[name + ".weight"].T
        bias = layer.get(name + ".bias")
        return y + bias if bias is not None else y

    def _attention(self, x: np.ndarray, layer: dict, positions: np.ndarray,
                   cache: KVCache, li: int) -> np.ndarray:
        n, hd = x.shape[0], self.head_dim
        q = self._linear(x, layer, "self_attn.q_proj").reshape(n, self.n_heads, hd)
        k = self._linear(x, layer, "self_attn.k_proj").reshape(n, self.n_kv, hd)
        v = self._linear(x, layer, "self_attn.v_proj").reshape(n, self.n_kv, hd)
        q, k, v = (t.transpose(1, 0, 2) for t in (q, k, v))   # [heads, n, hd]

        angles = positions[:, None].astype(np.float64) * self.inv_freq[None, :]
        cos, sin = np.cos(angles).astype(self.dt), np.sin(angles).astype(self.dt)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if len(cache.keys) <= li:
            cache.keys.append(k)
            cache.values.append(v)
        else:
            cache.keys[li] = np.concatenate([cache.keys[li], k], axis=1)
            cache.values[li] = np.concatenate([cache.values[li], v], axis=1)
        keys, values = cache.keys[li], cache.values[li]        # [n_kv, T, hd]
        total = keys.shape[1]

        # Query i (absolute position positions[i]) sees key j if j <= pos_i and, with a
        # sliding window W, pos_i - j < W.
        kpos = np.arange(total)
        allowed = kpos[None, :] <= positions[:, None]
        if self.window:
            allowed &= (positions[:, None] - kpos[None, :]) < self.window

        group = self.n_heads // self.n_kv
        keys = np.repeat(keys, group, axis=0)                   # [heads, T, hd]
        values = np.repeat(values, group, axis=0)
        scores = q @ keys.transpose(0, 2, 1) / math.sqrt(hd)    # [heads, n, T]
        scores = np.where(allowed[None], scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = (probs @ values).transpose(1, 0, 2).reshape(n, self.n_heads * hd)
        return self._linear(out, layer, "self_attn.o_proj")

    def _mlp(self, x: np.ndarray, layer: dict, li: int | None = None) -> np.ndarray:
        gate = self._linear(x, layer, "mlp.gate_proj")
        up = self._linear(x, layer, "mlp.up_proj")
        act = gate / (1.0 + np.exp(-gate))                      # silu
        if self.ffn_hook is not None:
            # Contextual-sparsity experiments (sparsity_ref.py) observe or mask the FFN here.
            return self._linear(self.ffn_hook(li, act, up), layer, "mlp.down_proj")
        return self._linear(act * up, layer, "mlp.down_proj")

    # -- public API -----------------------------------------------------------------------------

    def new_cache(self) -> KVCache:
        return KVCache()

    def step(self, token_ids, cache: KVCache) -> np.ndarray:
        """Run `token_ids` at positions cache.length.. and extend the cache; return their logits."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token_ids must be a non-empty 1-D sequence")
        if ids.min() < 0 or ids.max() >= self.vocab:
            raise ValueError("token id out of range")
        positions = np.arange(cache.length, cache.length + ids.size)
        h = self.embed[ids]                                     # [n, hidden]
        for li, layer in enumerate(self.layers):
            h = h + self._attention(self._rmsnorm(h, layer["input_layernorm.weight"]),
                                    layer, positions, cache, li)
            h = h + self._mlp(self._rmsnorm(h, layer["post_attention_layernorm.weight"]), layer,
                              li)
        return self._rmsnorm(h, self.final_norm) @ self.lm_head.T   # [n, vocab]

    def forward(self, token_ids) -> np.ndarray:
        """Logits [n, vocab] for every position of `token_ids`, computed from scratch."""
        return self.step(token_ids, self.new_cache())

    def greedy_with_margins(self, prompt_ids, n_new: int, eos_ids=()):
        """Greedy decode with a KV cache. Returns (new ids, top1-top2 margin at each step)."""
        cache = self.new_cache()
        logits = self.step(prompt_ids, cache)[-1]
        out, margins = [], []
        for _ in range(n_new):
            top2 = np.argsort(-logits, kind="stable")[:2]
            nxt = int(top2[0])
            margins.append(float(logits[top2[0]] - logits[top2[1]]))
            out.append(nxt)
            if nxt in eos_ids or len(out) == n_new:
                break
            logits = self.step([nxt], cache)[-1]
        return out, margins

    def greedy(self, prompt_ids, n_new: int, eos_ids=()) -> list[int]:
        return self.greedy_with_margins(prompt_ids, n_new, eos_ids)[0]

    def perplexity(self, token_ids) -> float:
        """exp(mean negative log-likelihood) of tokens 1.. given their prefixes."""
        ids = np.asarray(token_ids)
        logits = self.forward(ids)[:-1].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def cached_vs_full(model: LlamaRef, ids) -> float:
    """Max |logit| difference between token-by-token cached decoding and one full forward."""
    full = model.forward(ids)
    cache = model.new_cache()
    inc = np.concatenate([model.step([t], cache) for t in ids], axis=0)
    return float(np.abs(full - inc).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="numpy reference Llama forward pass")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--text", help="raw prompt text for greedy decoding (needs tokenizer.json)")
    ap.add_argument("--n", type=int, default=24, help="tokens to generate (default 24)")
    ap.add_argument("--ppl", help="print perplexity of this text")
    ap.add_argument("--check", action="store_true", help="cached decode vs full forward")
    ap.add_argument("--f32", action="store_true", help="compute in float32 instead of float64")
    args = ap.parse_args(argv)

    model = LlamaRef(args.model_dir, np.float32 if args.f32 else np.float64)
    tok = None
    if args.text or args.ppl:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    if args.check:
        ids = list(np.random.default_rng(0).integers(0, model.vocab, 12))
        print(f"cached vs full max |diff| = {cached_vs_full(model, ids):.3e}")
    if args.ppl:
        ids = tok.encode(args.ppl).ids
        print(f"perplexity {model.perplexity(ids):.3f} over {len(ids)} tokens")
    if args.text:
        ids = tok.encode(args.text).ids
        gen, margins = model.greedy_with_margins(ids, args.n)
        print(tok.decode(gen, skip_special_tokens=False))
        print(f"min margin {min(margins):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
