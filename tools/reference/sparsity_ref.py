#!/usr/bin/env python3
"""Independent numpy reference for FFN contextual sparsity (Griffin and CATS top-k), float64.

Builds on llama_ref.LlamaRef: the forward pass is not copied, the FFN is observed or masked
through LlamaRef.ffn_hook (None by default, so the dense model is untouched). Definitions follow
the Sirius paper (Zhou et al., arXiv 2409.03856) and the crate's `sparsity` module docs:

    z_t = silu(gate_t) * up_t            (gate/up include their biases when the checkpoint has them)

Griffin (per prompt): s_j = sqrt(sum_t (z_tj / ||z_t||)^2) over the prompt tokens of a dense
prefill (a token with ||z_t|| == 0 contributes nothing); keep the top k neurons per layer (ties:
lower id first). Generation after the prompt uses only those neurons: the others contribute
nothing to down_proj. The prompt's KV cache is the dense one.

CATS top-k (per token): in every layer, act = silu(gate) is kept only for the k neurons with the
largest |act| of that token (ties: lower id first) and zeroed elsewhere, so their up/down do
nothing. Attention stays dense.

k = kept_neurons(keep, d_ff) = min(d_ff, max(1, round(keep * d_ff))). Python's round() rounds
half to even; Rust's f64::round() rounds half away from zero. They differ only when keep * d_ff
lands exactly on .5, so fixtures avoid such keep values.

API (model = LlamaRef(dir)):
    kept_neurons(keep, d_ff)                                   -> int
    griffin_scores(model, prompt_ids)                          -> [np [d_ff]] per layer
    griffin_selection(scores, keep)                            -> [sorted np int ids] per layer
    griffin_logits(model, prompt_ids, keep, continuation_ids)  -> [len(cont), vocab]
    cats_topk_logits(model, ids, keep)                         -> [len(ids), vocab]
    boundary_gap(values, k)                                    -> relative gap at the top-k cut
    griffin_run / cats_topk_run                                -> the same plus boundary gaps

CLI:
    sparsity_ref.py MODEL_DIR [--keep 0.5] [--prompt 1,2,3] [--cont 4,5]   self-checks + summary
"""

from __future__ import annotations

import argparse
import copy
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_ref import LlamaRef  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def kept_neurons(keep: float, d_ff: int) -> int:
    """Neurons kept per layer. round() is half-to-even here, half-away-from-zero in Rust: avoid
    keep values with keep * d_ff exactly on .5."""
    return min(d_ff, max(1, round(keep * d_ff)))


def d_ff_of(model: LlamaRef) -> int:
    return int(model.layers[0]["mlp.gate_proj.weight"].shape[0])


def top_k_ids(values: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values (ties broken by lower id), sorted ascending."""
    order = np.argsort(-values, kind="stable")
    return np.sort(order[:k])


def boundary_gap(values: np.ndarray, k: int) -> float:
    """Relative gap (v_k - v_{k+1}) / |v_k| between the k-th and (k+1)-th largest values, i.e.
    how far the top-k cut is from a tie. inf when k >= len(values) (no cut)."""
    if k >= values.size:
        return float("inf")
    v = np.sort(values)[::-1]
    hi, lo = float(v[k - 1]), float(v[k])
    if hi == lo:
        return 0.0
    return (hi - lo) / abs(hi)


@contextmanager
def ffn_hook(model: LlamaRef, hook):
    """Install `hook` as model.ffn_hook for the duration of a with-block."""
    previous = model.ffn_hook
    model.ffn_hook = hook
    try:
        yield
    finally:
        model.ffn_hook = previous


# ---------------------------------------------------------------------------------------------
# Griffin
# ---------------------------------------------------------------------------------------------

def scores_from_z(z: np.ndarray) -> np.ndarray:
    """z: [n_tokens, d_ff] -> s [d_ff] = L2 norm over tokens of the unit-normalised rows."""
    norms = np.sqrt(np.sum(z * z, axis=-1, keepdims=True))
    unit = np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)
    return np.sqrt(np.sum(unit * unit, axis=0))


def _dense_prefill_with_scores(model: LlamaRef, prompt_ids, cache):
    """Dense prefill of the prompt into `cache`; returns (logits, Griffin scores per layer)."""
    zs = {}

    def observe(li, act, up):
        z = act * up
        zs[li] = z
        return z

    with ffn_hook(model, observe):
        logits = model.step(prompt_ids, cache)
    return logits, [scores_from_z(zs[li]) for li in range(model.n_layers)]


def griffin_scores(model: LlamaRef, prompt_ids) -> list[np.ndarray]:
    """Per-layer Griffin neuron scores [d_ff] from a dense run over the whole prompt."""
    return _dense_prefill_with_scores(model, prompt_ids, model.new_cache())[1]


def griffin_selection(scores: list[np.ndarray], keep: float) -> list[np.ndarray]:
    """Per layer: the kept_neurons(keep, d_ff) best-scored neuron ids, sorted ascending."""
    return [top_k_ids(s, kept_neurons(keep, s.size)) for s in scores]


def griffin_run(model: LlamaRef, prompt_ids, keep: float, continuation_ids) -> dict:
    """Dense prefill (scores), then the continuation one token at a time with each layer's FFN
    restricted to its selected neurons. Returns scores, selection, min boundary gap, logits."""
    cache = model.new_cache()
    _, scores = _dense_prefill_with_scores(model, prompt_ids, cache)
    selection = griffin_selection(scores, keep)
    masks = []
    for sel, s in zip(selection, scores):
        m = np.zeros(s.size, dtype=bool)
        m[sel] = True
        masks.append(m)

    def restrict(li, act, up):
        return np.where(masks[li], act * up, 0.0)

    with ffn_hook(model, restrict):
        logits = np.stack([model.step([int(t)], cache)[0] for t in continuation_ids])
    k = kept_neurons(keep, scores[0].size)
    return {
        "k": k,
        "scores": scores,
        "selection": selection,
        "min_gap": min(boundary_gap(s, k) for s in scores),
        "logits": logits,
    }


def griffin_logits(model: LlamaRef, prompt_ids, keep: float, continuation_ids) -> np.ndarray:
    """Logits [len(continuation_ids), vocab] of the Griffin-sparse model after a dense prefill."""
    return griffin_run(model, prompt_ids, keep, continuation_ids)["logits"]


def griffin_logits_sliced(model: LlamaRef, prompt_ids, keep: float, continuation_ids):
    """Same as griffin_logits but with physically smaller FFN weights (gate/up rows and down
    columns of the selected neurons): an independent check of the masking hook."""
    cache = model.new_cache()
    _, scores = _dense_prefill_with_scores(model, prompt_ids, cache)
    selection = griffin_selection(scores, keep)
    sliced = copy.copy(model)
    sliced.ffn_hook = None
    sliced.layers = []
    for layer, sel in zip(model.layers, selection):
        small = dict(layer)
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            small[name + ".weight"] = layer[name + ".weight"][sel]
            if name + ".bias" in layer:
                small[name + ".bias"] = layer[name + ".bias"][sel]
        small["mlp.down_proj.weight"] = layer["mlp.down_proj.weight"][:, sel]
        sliced.layers.append(small)
    return np.stack([sliced.step([int(t)], cache)[0] for t in continuation_ids])


# ---------------------------------------------------------------------------------------------
# CATS top-k
# ---------------------------------------------------------------------------------------------

def cats_hook(keep: float, gaps: list | None = None):
    """An ffn_hook keeping, per token row, silu(gate) of the top-k neurons by |silu(gate)|;
    appends each row's boundary gap to `gaps` when given."""
    def topk(li, act, up):
        mag = np.abs(act)
        k = kept_neurons(keep, act.shape[-1])
        mask = np.zeros(act.shape, dtype=bool)
        for t in range(act.shape[0]):
            mask[t, top_k_ids(mag[t], k)] = True
            if gaps is not None:
                gaps.append(boundary_gap(mag[t], k))
        return np.where(mask, act, 0.0) * up
    return topk


def cats_topk_run(model: LlamaRef, ids, keep: float) -> dict:
    """The CATS top-k sparse model over `ids` (each token selects its own neurons in every
    layer). Returns logits for every position and the min relative |silu(gate)| boundary gap
    over tokens and layers."""
    gaps = []
    with ffn_hook(model, cats_hook(keep, gaps)):
        logits = model.forward(ids)
    return {"logits": logits, "min_gap": min(gaps)}


def cats_topk_logits(model: LlamaRef, ids, keep: float) -> np.ndarray:
    """Logits [len(ids), vocab] of the CATS top-k sparse model."""
    return cats_topk_run(model, ids, keep)["logits"]


# ---------------------------------------------------------------------------------------------
# Self-checks
# ---------------------------------------------------------------------------------------------

def self_check(model: LlamaRef, prompt_ids, continuation_ids, keeps, tol: float = 1e-10) -> None:
    """Raise AssertionError unless: keep=1.0 Griffin and CATS equal the dense model; every
    Griffin selection has k ids; the masking hook equals physically sliced weights; CATS run
    token by token with a KV cache equals one pass over the sequence."""
    ids = list(prompt_ids) + list(continuation_ids)
    dense = model.forward(ids)
    d_ff = d_ff_of(model)

    g1 = griffin_logits(model, prompt_ids, 1.0, continuation_ids)
    err = np.abs(g1 - dense[len(prompt_ids):]).max()
    assert err < tol, f"Griffin keep=1.0 differs from dense by {err:.2e}"
    c1 = cats_topk_logits(model, ids, 1.0)
    err = np.abs(c1 - dense).max()
    assert err < tol, f"CATS keep=1.0 differs from dense by {err:.2e}"

    scores = griffin_scores(model, prompt_ids)
    for keep in keeps:
        k = kept_neurons(keep, d_ff)
        for li, sel in enumerate(griffin_selection(scores, keep)):
            assert sel.size == k and np.unique(sel).size == k, f"layer {li}: {sel.size} != {k}"
        masked = griffin_logits(model, prompt_ids, keep, continuation_ids)
        sliced = griffin_logits_sliced(model, prompt_ids, keep, continuation_ids)
        err = np.abs(masked - sliced).max()
        assert err < tol, f"Griffin keep={keep}: masked vs sliced weights differ by {err:.2e}"
        full = cats_topk_logits(model, ids, keep)
        cache = model.new_cache()
        with ffn_hook(model, cats_hook(keep)):
            inc = np.concatenate([model.step([t], cache) for t in ids])
        err = np.abs(full - inc).max()
        assert err < tol, f"CATS keep={keep}: cached vs full differ by {err:.2e}"
    assert model.ffn_hook is None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Griffin / CATS top-k numpy reference")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--keep", type=float, action="append", help="keep fraction (repeatable)")
    ap.add_argument("--prompt", default="1,5,9,13,17,21,25,29", help="comma-separated ids")
    ap.add_argument("--cont", default="3,7,11,15", help="comma-separated continuation ids")
    args = ap.parse_args(argv)
    keeps = args.keep or [0.5, 0.25]
    prompt = [int(x) for x in args.prompt.split(",")]
    cont = [int(x) for x in args.cont.split(",")]

    model = LlamaRef(args.model_dir)
    self_check(model, prompt, cont, keeps)
    print("self-checks passed")
    dense = model.forward(prompt + cont)
    for keep in keeps:
        g = griffin_run(model, prompt, keep, cont)
        c = cats_topk_run(model, prompt + cont, keep)
        print(f"keep {keep}: k {g['k']}/{d_ff_of(model)}  griffin gap {g['min_gap']:.2e}  "
              f"max |dlogit| {np.abs(g['logits'] - dense[len(prompt):]).max():.3f}  "
              f"cats gap {c['min_gap']:.2e}  max |dlogit| {np.abs(c['logits'] - dense).max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
