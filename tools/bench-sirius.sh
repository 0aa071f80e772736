#!/usr/bin/env bash
# Decode speed of full vs sparse vs Sirius on one model, measured in ONE run.
#
#   tools/bench-sirius.sh [--model smollm2-135m] [--threads 2] [--rounds 3] [--gen 128]
#                         [--sparsity griffin] [--keep 0.5] [--threshold 0.1]
#                         [--configs "16x1 16x4"] [--prompt-file FILE]
#
# Each round runs `sirius-offload run` greedily on the same prompt for: the full model, the
# sparse model, and Sirius for each PERIODxWIDTH in --configs (default K = 16 with W = 1 and
# W = 4), rotating which goes first. The default prompt is a GSM8K-style few-shot prompt
# (about 1,900 tokens: worked problems from `tools/fetch-eval-text gsm-symbolic`, then a new
# question), the setting of the paper's GSM8K-CoT runs. The machine is shared and noisy, so
# each figure is the per-round ratio to the full model's decode tokens/s, summarised as the
# median over rounds; AAL, effective density and the draft/verify split come from the same
# runs' stats. Output: a markdown table on stdout; every run's stats JSON in
# $SIRIUS_HOME/bench/sirius-<timestamp>/.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=smollm2-135m THREADS=2 ROUNDS=3 GEN=128 SPARSITY=griffin KEEP=0.5 THRESHOLD=0.1
CONFIGS="16x1 16x4" PROMPT_FILE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --gen) GEN="$2"; shift 2 ;;
    --sparsity) SPARSITY="$2"; shift 2 ;;
    --keep) KEEP="$2"; shift 2 ;;
    --threshold) THRESHOLD="$2"; shift 2 ;;
    --configs) CONFIGS="$2"; shift 2 ;;
    --prompt-file) PROMPT_FILE="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-sirius: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

HOME_DIR="${SIRIUS_HOME:-$HOME/.cache/sirius-offload}"
OUT="$HOME_DIR/bench/sirius-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
if [ -z "$PROMPT_FILE" ]; then
  GSM="$(tools/fetch-eval-text gsm-symbolic)"
  PROMPT_FILE="$OUT/prompt.txt"
  # Whole worked problems only: cut after the 12th "#### answer" line.
  python3 - "$GSM" "$PROMPT_FILE" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
blocks = text.split("\n\n")[:12]
q = ("Question: A baker makes 4 trays of 18 muffins. She sells 45 muffins and gives away 9. "
     "How many muffins are left?\nAnswer:")
open(sys.argv[2], "w", encoding="utf-8").write("\n\n".join(blocks) + "\n\n" + q)
PY
fi
source tools/sirius-bin.sh

NAMES=(full sparse)
for c in $CONFIGS; do NAMES+=("sirius-$c"); done

run_one() { # name round
  local name="$1" args=()
  case "$name" in
    full) ;;
    sparse) args=(--sparsity "$SPARSITY" --keep "$KEEP") ;;
    sirius-*)
      local kw="${name#sirius-}"
      args=(--sparsity "$SPARSITY" --keep "$KEEP" --sirius --period "${kw%x*}" --width "${kw#*x}"
            --threshold "$THRESHOLD") ;;
  esac
  "$BIN" run --model "$MODEL" --threads "$THREADS" --prompt-file "$PROMPT_FILE" \
    --max-tokens "$GEN" --temperature 0 -q "${args[@]}" --stats-json "$OUT/$name-$2.json" \
    >/dev/null
}

n=${#NAMES[@]}
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS ..." >&2
  for i in $(seq 0 $((n - 1))); do run_one "${NAMES[$(((i + r) % n))]}" "$r"; done
done

python3 - "$OUT" "$ROUNDS" "$GEN" "$THREADS" "$SPARSITY" "$KEEP" "$THRESHOLD" "$MODEL" "${NAMES[@]}" <<'PY'
import json, statistics, sys
out, rounds, gen, threads, sparsity, keep, thr, model, *names = sys.argv[1:]
rounds = int(rounds)
def load(name, r):
    return json.load(open(f"{out}/{name}-{r}.json"))
full = [load("full", r)["decode_tokens_per_s"] for r in range(1, rounds + 1)]
print(f"{model}, {threads} threads, {gen} new tokens, {sparsity} keep {keep}, threshold {thr}, "
      f"{rounds} rounds; ratio = decode tokens/s / the full model's in the same round\n")
print("| config | prompt tokens | AAL | effective density | draft / verify / other s (median) "
      "| t/s (median) | ratio per round | median ratio |")
print("|---|---|---|---|---|---|---|---|")
for name in names:
    runs = [load(name, r) for r in range(1, rounds + 1)]
    tps = [d["decode_tokens_per_s"] for d in runs]
    ratios = [t / f for t, f in zip(tps, full)]
    d = runs[0]
    if "aal" in d:
        k = d["period"]
        aal = f"{statistics.median(x['aal'] for x in runs):.2f}/{k}"
        ed = f"{statistics.median(x['effective_density'] for x in runs):.3f}"
        split = " / ".join(f"{statistics.median(x[key] for x in runs):.2f}"
                           for key in ("draft_seconds", "verify_seconds", "other_seconds"))
    else:
        aal, split = "-", "-"
        ed = f"{d['density']:.3f}"
    print(f"| {name} | {d['prompt_tokens']} | {aal} | {ed} | {split} | {statistics.median(tps):.1f} | "
          f"{', '.join(f'{x:.2f}' for x in ratios)} | **{statistics.median(ratios):.2f}** |")
print(f"\nraw results: {out}")
PY
