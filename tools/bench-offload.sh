#!/usr/bin/env bash
# Offloaded Sirius on CPU: measured decode ms/token against the planner's prediction, and
# tokens against an unconstrained run, for a few resident budgets and emulated links.
#
#   tools/bench-offload.sh [--model smollm2-135m] [--threads 2] [--rounds 3] [--gen 128]
#                          [--budgets "161MB"] [--links "1 2 4"] [--mem-gbps 20]
#                          [--period 16] [--keep 0.5] [--prompt TEXT]
#
# Each round runs `sirius-offload run --sirius --sparsity griffin` once unconstrained and once
# per (budget, link) with --resident-mem and --link-gbps. Per configuration it reports the
# median over rounds of measured ms/token, the planner's prediction for the same run (its
# measured AAL, the link, --mem-gbps for compute), their ratio, streamed bytes per token,
# overlap, and whether every round's tokens equal the unconstrained run's. The machine is
# shared: the ratio predicted/measured is the result, not the absolute times. Every run's
# stats JSON goes to $SIRIUS_HOME/bench/offload-<timestamp>/.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=smollm2-135m THREADS=2 ROUNDS=3 GEN=128 BUDGETS="161MB" LINKS="1 2 4" MEM=20 PERIOD=16 KEEP=0.5
PROMPT="Question: A baker made 48 muffins in the morning and half as many in the afternoon. He sold 50 of them. How many muffins are left?
Answer: Let's think step by step."
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --gen) GEN="$2"; shift 2 ;;
    --budgets) BUDGETS="$2"; shift 2 ;;
    --links) LINKS="$2"; shift 2 ;;
    --mem-gbps) MEM="$2"; shift 2 ;;
    --period) PERIOD="$2"; shift 2 ;;
    --keep) KEEP="$2"; shift 2 ;;
    --prompt) PROMPT="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-offload: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

HOME_DIR="${SIRIUS_HOME:-$HOME/.cache/sirius-offload}"
OUT="$HOME_DIR/bench/offload-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
source tools/sirius-bin.sh
COMMON=(run -m "$MODEL" -p "$PROMPT" --temperature 0 --max-tokens "$GEN" --threads "$THREADS"
  --sirius --period "$PERIOD" --sparsity griffin --keep "$KEEP" -q)

for r in $(seq 1 "$ROUNDS"); do
  "$BIN" "${COMMON[@]}" --stats-json "$OUT/r$r-unconstrained.json" > /dev/null
  for b in $BUDGETS; do
    for l in $LINKS; do
      "$BIN" "${COMMON[@]}" --resident-mem "$b" --link-gbps "$l" --mem-gbps "$MEM" \
        --stats-json "$OUT/r$r-$b-$l.json" > /dev/null
    done
  done
  echo "round $r/$ROUNDS done" >&2
done

python3 - "$OUT" "$ROUNDS" "$BUDGETS" "$LINKS" <<'PY'
import json, statistics, sys
out, rounds, budgets, links = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
load = lambda name: json.load(open(f"{out}/{name}.json"))
print("| budget | link GB/s | measured ms/token | predicted | predicted/measured | streamed MB/token | overlap | AAL | same tokens |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
for b in budgets:
    for l in links:
        runs = [load(f"r{r}-{b}-{l}") for r in range(1, rounds + 1)]
        plain = [load(f"r{r}-unconstrained") for r in range(1, rounds + 1)]
        same = all(x["generated_token_ids"] == p["generated_token_ids"] for x, p in zip(runs, plain))
        med = lambda key: statistics.median(x[key] for x in runs)
        ratio = statistics.median(x["predicted_ms_per_token"] / x["measured_ms_per_token"] for x in runs)
        per_tok = statistics.median(x["streamed_bytes"] / 1e6 / max(1, x["generated_tokens"]) for x in runs)
        print(f"| {b} | {l} | {med('measured_ms_per_token'):.1f} | {med('predicted_ms_per_token'):.1f} | "
              f"{ratio:.2f} | {per_tok:.1f} | {med('overlap'):.2f} | {med('aal'):.2f}/{runs[0]['period']} | {'yes' if same else 'NO'} |")
print(f"\nstats JSON: {out}")
PY
