#!/usr/bin/env python3
"""Regenerate the golden test fixtures under tests/fixtures/, deterministically.

    python3 tools/reference/make_fixtures.py [--smollm2 DIR] [--skip-smollm2]

1. Tiny random models, tests/fixtures/tiny/<name>/{config.json, model.safetensors, logits.json}:
   fixed numpy seeds, weights scaled so activations stay O(1) and logits are well spread.
   logits.json holds 10 token ids and the float64 reference logits for every position.
2. tests/fixtures/smollm2_greedy.json: exact greedy continuations of the real SmolLM2-135M
   (converted by tools/fetch-model) for a few prompts, with the top-1/top-2 logit margin of each
   step. Written only when the converted model dir exists (default
   $SIRIUS_HOME/models/smollm2-135m); otherwise the existing file is left alone.
3. tests/fixtures/tiny/<name>/sparsity.json: Griffin scores/selection/logits and CATS top-k
   logits (sparsity_ref.py) for keep 0.5, 0.25 and 1.0, on 8 prompt + 4 continuation ids chosen
   so every top-k cut is at least MIN_SPARSITY_GAP (relative) away from a tie.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(HERE))
from llama_ref import LlamaRef, cached_vs_full  # noqa: E402
import sparsity_ref as sp  # noqa: E402
from safetensors_np import write_safetensors  # noqa: E402

REFERENCE = "tools/reference/llama_ref.py float64"
N_TOKENS = 10

# ---------------------------------------------------------------------------------------------
# Tiny random models
# ---------------------------------------------------------------------------------------------

TORCH_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}

# Each spec: architecture, dims, dtype, tying, extras. Sizes keep every file well under 200 KB.
TINY_SPECS = [
    {
        "name": "llama-tied-gqa-bf16", "seed": 1, "arch": "LlamaForCausalLM", "dtype": "bf16",
        "hidden": 64, "layers": 2, "ffn": 96, "vocab": 128, "heads": 4, "kv_heads": 2,
        "head_dim": None, "tied": True, "bias": False, "rope_theta": 10000.0, "eps": 1e-5,
    },
    {
        # MHA, untied, Llama 3.1 rope scaling with a short original context so that within
        # ten positions the kept, blended and slowed frequency bands all differ measurably.
        "name": "llama-untied-f32", "seed": 2, "arch": "LlamaForCausalLM", "dtype": "f32",
        "hidden": 32, "layers": 2, "ffn": 64, "vocab": 128, "heads": 2, "kv_heads": 2,
        "head_dim": None, "tied": False, "bias": False, "rope_theta": 10000.0, "eps": 1e-5,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    },
    {
        "name": "qwen2-bias-f16", "seed": 3, "arch": "Qwen2ForCausalLM", "dtype": "f16",
        "hidden": 64, "layers": 2, "ffn": 96, "vocab": 128, "heads": 4, "kv_heads": 2,
        "head_dim": None, "tied": True, "bias": True, "rope_theta": 1000000.0, "eps": 1e-6,
    },
    {
        # head_dim 24 != hidden/heads (16): q/o projections are 96 wide.
        "name": "mistral-headdim-bf16", "seed": 4, "arch": "MistralForCausalLM", "dtype": "bf16",
        "hidden": 64, "layers": 2, "ffn": 64, "vocab": 128, "heads": 4, "kv_heads": 2,
        "head_dim": 24, "tied": False, "bias": False, "rope_theta": 10000.0, "eps": 1e-5,
    },
]


def tiny_config(s: dict) -> dict:
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                  "MistralForCausalLM": "mistral"}[s["arch"]]
    cfg = {
        "architectures": [s["arch"]],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "intermediate_size": s["ffn"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "max_position_embeddings": 256,
        "rms_norm_eps": s["eps"],
        "rope_theta": s["rope_theta"],
        "rope_scaling": s.get("rope_scaling"),
        "vocab_size": s["vocab"],
        "tie_word_embeddings": s["tied"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": TORCH_DTYPE[s["dtype"]],
    }
    if s["head_dim"] is not None:
        cfg["head_dim"] = s["head_dim"]
    if model_type == "mistral":
        cfg["sliding_window"] = None   # as in Mistral v0.2+: full causal attention
    if model_type == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def tiny_weights(s: dict) -> dict[str, np.ndarray]:
    """Random weights, HF names and [out, in] shapes, in HF order."""
    rng = np.random.default_rng(s["seed"])
    h, ff, v = s["hidden"], s["ffn"], s["vocab"]
    hd = s["head_dim"] or h // s["heads"]
    q_out, kv_out = s["heads"] * hd, s["kv_heads"] * hd

    def lin(out_f: int, in_f: int, gain: float) -> np.ndarray:
        # gain/sqrt(fan_in) keeps each projection's output O(gain) for O(1) inputs.
        return rng.standard_normal((out_f, in_f)) * (gain / np.sqrt(in_f))

    def norm(n: int) -> np.ndarray:
        return 1.0 + 0.1 * rng.standard_normal(n)

    # Embedding rows of norm ~2-3 make the (tied) logits spread over a few units.
    w = {"model.embed_tokens.weight": rng.standard_normal((v, h)) * 0.3}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        # Larger q/k gains give attention patterns that are far from uniform.
        w[p + "self_attn.q_proj.weight"] = lin(q_out, h, 1.5)
        w[p + "self_attn.k_proj.weight"] = lin(kv_out, h, 1.5)
        w[p + "self_attn.v_proj.weight"] = lin(kv_out, h, 1.0)
        if s["bias"]:
            w[p + "self_attn.q_proj.bias"] = 0.2 * rng.standard_normal(q_out)
            w[p + "self_attn.k_proj.bias"] = 0.2 * rng.standard_normal(kv_out)
            w[p + "self_attn.v_proj.bias"] = 0.2 * rng.standard_normal(kv_out)
        w[p + "self_attn.o_proj.weight"] = lin(h, q_out, 0.8)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = lin(ff, h, 1.0)
        w[p + "mlp.up_proj.weight"] = lin(ff, h, 1.0)
        w[p + "mlp.down_proj.weight"] = lin(h, ff, 0.8)
    w["model.norm.weight"] = norm(h)
    if not s["tied"]:
        w["lm_head.weight"] = rng.standard_normal((v, h)) * 0.3
    return w


def make_tiny(s: dict, root: Path) -> None:
    out = root / s["name"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(tiny_config(s), indent=2) + "\n")
    size = write_safetensors(out / "model.safetensors", tiny_weights(s), s["dtype"])

    # The reference reads back the file just written, so rounding to bf16/f16 is included.
    model = LlamaRef(out)
    tokens = [int(t) for t in np.random.default_rng(100 + s["seed"]).integers(0, s["vocab"],
                                                                            N_TOKENS)]
    logits = model.forward(tokens)
    diff = cached_vs_full(model, tokens)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    fixture = {
        "model": s["name"],
        "tokens": tokens,
        "dtype": s["dtype"],
        "reference": REFERENCE,
        "logits": [[float(x) for x in row] for row in logits],
    }
    (out / "logits.json").write_text(json.dumps(fixture) + "\n")
    print(f"  {s['name']:22s} {size / 1024:6.1f} KB  logit std {logits.std(axis=-1).mean():.2f}"
          f"  min top1-top2 {np.min(top2[:, 1] - top2[:, 0]):.3f}  cached-vs-full {diff:.1e}")
    if s.get("rope_scaling"):
        # Show that the fixture would catch an implementation that ignores rope_scaling.
        plain = LlamaRef(out, config_override={"rope_scaling": None})
        delta = np.abs(plain.forward(tokens) - logits).max()
        print(f"  {'':22s} ignoring rope_scaling would move logits by up to {delta:.3f}")
    make_sparsity(s, model, out / "sparsity.json")


# ---------------------------------------------------------------------------------------------
# Contextual-sparsity fixtures (Griffin, CATS top-k) on the tiny models
# ---------------------------------------------------------------------------------------------

SPARSITY_REFERENCE = "tools/reference/sparsity_ref.py float64"
SPARSITY_KEEPS = [0.5, 0.25]          # keep * d_ff is an integer for every tiny model
N_PROMPT, N_CONT = 8, 4
MIN_SPARSITY_GAP = 1e-3               # relative; f32 rounding is ~1e-6, so f32 selects the same
MAX_PROMPT_TRIES = 200


def sig9(x: float) -> float:
    """Round to 9 significant digits (keeps the JSON small; float64 -> ~1e-9 relative)."""
    return float(f"{x:.9g}")


def make_sparsity(s: dict, model: LlamaRef, path: Path) -> None:
    """sparsity.json: the first prompt seed (1000 * model seed + try) whose Griffin and CATS
    top-k cuts are all at least MIN_SPARSITY_GAP from a tie, with reference numbers for it."""
    d_ff = sp.d_ff_of(model)
    for k in SPARSITY_KEEPS:
        if (k * d_ff) % 1 == 0.5:
            raise SystemExit(f"keep {k} * d_ff {d_ff} lands on .5 (rounding differs in Rust)")
    for attempt in range(MAX_PROMPT_TRIES):
        seed = 1000 * s["seed"] + attempt
        ids = [int(t) for t in np.random.default_rng(seed).integers(0, s["vocab"],
                                                                     N_PROMPT + N_CONT)]
        prompt, cont = ids[:N_PROMPT], ids[N_PROMPT:]
        runs = [(keep, sp.griffin_run(model, prompt, keep, cont),
                 sp.cats_topk_run(model, ids, keep)) for keep in SPARSITY_KEEPS]
        if all(g["min_gap"] > MIN_SPARSITY_GAP and c["min_gap"] > MIN_SPARSITY_GAP
               for _, g, c in runs):
            break
    else:
        raise SystemExit(f"{s['name']}: no prompt with all sparsity gaps > {MIN_SPARSITY_GAP}")

    sp.self_check(model, prompt, cont, SPARSITY_KEEPS)
    dense = model.forward(ids)
    runs.append((1.0, sp.griffin_run(model, prompt, 1.0, cont), sp.cats_topk_run(model, ids, 1.0)))
    # keep=1.0 is the dense model (also asserted inside self_check against llama_ref).
    assert np.abs(runs[-1][1]["logits"] - dense[N_PROMPT:]).max() < 1e-10
    assert np.abs(runs[-1][2]["logits"] - dense).max() < 1e-10

    def gap(x: float):
        return None if np.isinf(x) else float(f"{x:.6g}")

    cases = []
    for keep, g, c in runs:
        assert all(sel.size == g["k"] for sel in g["selection"])
        cases.append({
            "keep": keep,
            "k": g["k"],
            "griffin_scores": [[sig9(x) for x in sc] for sc in g["scores"]],
            "griffin_selection": [[int(i) for i in sel] for sel in g["selection"]],
            "griffin_boundary_gap": gap(g["min_gap"]),
            "griffin_logits": [[sig9(x) for x in row] for row in g["logits"]],
            "cats_logits": [[sig9(x) for x in row] for row in c["logits"]],
            "cats_min_boundary_gap": gap(c["min_gap"]),
        })
    fixture = {
        "model": s["name"],
        "reference": SPARSITY_REFERENCE,
        "d_ff": d_ff,
        "num_layers": model.n_layers,
        "prompt_seed": seed,
        "prompt_choice": (f"numpy default_rng(prompt_seed).integers(0, vocab, {N_PROMPT + N_CONT})"
                          f": {N_PROMPT} prompt ids then {N_CONT} continuation ids; first seed "
                          f"from 1000 * model seed whose Griffin and CATS boundary gaps all "
                          f"exceed min_gap for keep {SPARSITY_KEEPS}"),
        "min_gap": MIN_SPARSITY_GAP,
        "prompt_ids": prompt,
        "continuation_ids": cont,
        "cases": cases,
    }
    text = dumps_readable(fixture) + "\n"
    path.write_text(text)
    gaps = ", ".join(f"keep {keep}: griffin {g['min_gap']:.2e} cats {c['min_gap']:.2e}"
                     for keep, g, c in runs[:-1])
    print(f"  {'':22s} sparsity.json {len(text) / 1024:5.1f} KB  seed {seed}  {gaps}")


# ---------------------------------------------------------------------------------------------
# SmolLM2 greedy fixture
# ---------------------------------------------------------------------------------------------

CHAT_QUESTION = "What is the capital of France?"
# Chosen for comfortable top-1/top-2 margins at every step (printed when regenerating); many
# natural prompts ("Once upon a time...") have near-ties that f32 rounding could flip.
RAW_PROMPTS = [
    "The first ten prime numbers are",
    "Photosynthesis is the process by which",
    "def fibonacci(n):\n",
]
N_NEW = 24
MIN_MARGIN = 0.05


def render_chat(template: str, messages: list[dict]) -> str:
    """Render a chat template the way HF's apply_chat_template does (jinja2, trim/lstrip)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def dumps_readable(obj, indent: int = 0) -> str:
    """JSON with one key per line but lists of plain numbers kept on a single line."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps_readable(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
    if isinstance(obj, list) and not all(isinstance(x, (int, float)) for x in obj):
        items = [inner + dumps_readable(v, indent + 2) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def make_smollm2(model_dir: Path, out_path: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    gen_cfg = json.loads((model_dir / "generation_config.json").read_text())
    eos = gen_cfg["eos_token_id"]
    eos_ids = eos if isinstance(eos, list) else [eos]
    add_bos = bool(tok_cfg.get("add_bos_token", False))
    bos_id = gen_cfg.get("bos_token_id")

    chat_text = render_chat(tok_cfg["chat_template"],
                            [{"role": "user", "content": CHAT_QUESTION}])
    # Cross-check the jinja render against the template's plain meaning, written by hand.
    by_hand = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face<|im_end|>\n<|im_start|>user\n" + CHAT_QUESTION +
               "<|im_end|>\n<|im_start|>assistant\n")
    if chat_text != by_hand:
        raise SystemExit(f"chat template render differs from expectation:\n{chat_text!r}")

    model = LlamaRef(model_dir)
    prompts = [("chat", chat_text)] + [("raw", t) for t in RAW_PROMPTS]
    cases = []
    for kind, text in prompts:
        case = {"kind": kind}
        if kind == "chat":
            # What the runtime's own template rendering must turn into prompt_text.
            case["messages"] = [{"role": "user", "content": CHAT_QUESTION}]
            case["add_generation_prompt"] = True
        ids = tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids = [bos_id] + ids
        gen, margins = model.greedy_with_margins(ids, N_NEW, eos_ids)
        decoded = tok.decode(gen, skip_special_tokens=False)
        case.update({
            "prompt_text": text,
            "prompt_ids": ids,
            "greedy_ids": gen,
            "greedy_text": decoded,
            "stopped_at_eos": gen[-1] in eos_ids,
            "margins": [round(m, 6) for m in margins],
            "min_margin": round(min(margins), 6),
        })
        cases.append(case)
        flag = "ok" if min(margins) > MIN_MARGIN else "TOO CLOSE"
        print(f"  [{kind}] {text!r:60.60s} min margin {min(margins):.4f} ({flag})")
        print(f"        -> {decoded!r}")
    chat = cases[0]
    if "Paris" not in chat["greedy_text"]:
        raise SystemExit(f"chat answer lacks 'Paris': {chat['greedy_text']!r}")
    close = [c["prompt_text"] for c in cases if c["min_margin"] <= MIN_MARGIN]
    if close:
        raise SystemExit(f"prompts with a near-tie (margin <= {MIN_MARGIN}): {close}")

    cfg = model.config
    fixture = {
        "model": "smollm2-135m",
        "preset": "configs/models/smollm2-135m.toml",
        "reference": REFERENCE,
        "decoding": {"greedy": True, "max_new_tokens": N_NEW, "stop_at": eos_ids,
                     "eos_included": True, "add_bos": add_bos},
        "dims": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "intermediate_size", "vocab_size")},
        "cases": cases,
    }
    out_path.write_text(dumps_readable(fixture) + "\n", encoding="utf-8")
    print(f"  chat answer: {chat['greedy_text']!r} (contains Paris)")


def main(argv=None) -> int:
    home = Path(os.environ.get("SIRIUS_HOME") or Path.home() / ".cache" / "sirius-offload")
    ap = argparse.ArgumentParser(description="regenerate tests/fixtures")
    ap.add_argument("--smollm2", type=Path, default=home / "models" / "smollm2-135m",
                    help="converted SmolLM2 model dir (tools/fetch-model smollm2-135m)")
    ap.add_argument("--skip-smollm2", action="store_true", help="only the tiny models")
    args = ap.parse_args(argv)

    print("tiny models -> tests/fixtures/tiny/")
    for spec in TINY_SPECS:
        make_tiny(spec, FIXTURES / "tiny")

    if args.skip_smollm2:
        return 0
    if not (args.smollm2 / "model.safetensors").is_file():
        print(f"smollm2: {args.smollm2} not found; run tools/fetch-model smollm2-135m "
              "(tests/fixtures/smollm2_greedy.json left as it is)")
        return 0
    print(f"smollm2 greedy -> tests/fixtures/smollm2_greedy.json (model {args.smollm2})")
    make_smollm2(args.smollm2, FIXTURES / "smollm2_greedy.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
