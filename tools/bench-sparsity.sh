#!/usr/bin/env bash
# Decode speed of dense vs Griffin vs CATS on one model, measured in ONE run.
#
#   tools/bench-sparsity.sh [--model smollm2-135m] [--threads 2] [--rounds 5] [--reps 5]
#                           [--gen 64] [--keep 0.5]
#
# Each round runs `sirius-offload bench --prompt 0` (tg test; Griffin selects its neurons from a
# 128-token prefill first) for --sparsity none, griffin and cats back to back, rotating which
# goes first. The machine is shared and its memory bandwidth drifts, so the result is the
# per-round ratio sparse/dense, summarised as the median over rounds, next to the ideal ratio
# implied by the weight bytes each decode step reads (dense bytes / sparse bytes).
# Output: a markdown table on stdout; raw JSON of every run in $SIRIUS_HOME/bench/<timestamp>/.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=smollm2-135m THREADS=2 ROUNDS=5 REPS=5 GEN=64 KEEP=0.5
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    --gen) GEN="$2"; shift 2 ;;
    --keep) KEEP="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-sparsity: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

HOME_DIR="${SIRIUS_HOME:-$HOME/.cache/sirius-offload}"
OUT="$HOME_DIR/bench/sparsity-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
source tools/sirius-bin.sh
MODES=(none griffin cats)

run_mode() { # mode round
  "$BIN" bench --model "$MODEL" --threads "$THREADS" --prompt 0 --gen "$GEN" --reps "$REPS" \
    --sparsity "$1" --keep "$KEEP" --json "$OUT/$1-$2.json" >/dev/null
}

for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS ..." >&2
  for i in 0 1 2; do run_mode "${MODES[$(((i + r) % 3))]}" "$r"; done
done

python3 - "$OUT" "$ROUNDS" "$GEN" "$THREADS" "$KEEP" "$MODEL" <<'PY'
import json, statistics, sys
out, rounds, gen, threads, keep, model = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
def load(mode, r):
    d = json.load(open(f"{out}/{mode}-{r}.json"))
    return d["results"][0]["median_tokens_per_s"], d
dense = [load("none", r)[0] for r in range(1, rounds + 1)]
print(f"{model}, threads {threads}, tg{gen}, keep {keep}, {rounds} rounds (each a median of the reps); "
      "ratio = sparse / dense t/s per round\n")
print("| mode | density | weight MB read / token | t/s (median of rounds) | ideal ratio (bytes) | ratio per round | median ratio |")
print("|---|---|---|---|---|---|---|")
dense_bytes = load("none", 1)[1]["decode_weight_bytes_per_token"]
for mode in ("none", "griffin", "cats"):
    runs = [load(mode, r) for r in range(1, rounds + 1)]
    tps = [t for t, _ in runs]
    d = runs[0][1]
    ratios = [t / b for t, b in zip(tps, dense)]
    ideal = dense_bytes / d["decode_weight_bytes_per_token"]
    print(f"| {mode} | {d['density']:.4f} | {d['decode_weight_bytes_per_token'] / 1e6:.1f} | {statistics.median(tps):.1f} | "
          f"{ideal:.2f} | {', '.join(f'{x:.2f}' for x in ratios)} | **{statistics.median(ratios):.2f}** |")
print(f"\nraw results: {out}")
PY
