#!/usr/bin/env bash
# sirius-offload vs llama.cpp on SmolLM2-135M-Instruct, CPU, measured in ONE run.
#
#   tools/bench-vs-llamacpp.sh [--threads 2] [--rounds 3] [--reps 5] [--prompt 128] [--gen 64]
#                              [--gguf [FILE.gguf]]
#
# Default: bf16 weights on both sides (ours: the converted directory; llama.cpp: the same
# weights as a bf16 GGUF). With --gguf both run the same GGUF file as it is stored (default:
# the Q4_1 GGUF that tools/fetch-model keeps beside the conversion).
#
# Each round runs `sirius-offload bench` and llama.cpp's llama-bench (tools/peers/llamacpp.sh)
# back to back, alternating which goes first, both with the same threads / prompt / gen and a
# median over --reps. The machine is shared and its memory bandwidth drifts, so the result is
# the per-round ratio ours/theirs, summarised as the median over rounds, beside the medians.
# Output: a markdown table on stdout; raw JSON of every run in $SIRIUS_HOME/bench/<timestamp>/.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=2 ROUNDS=3 REPS=5 PROMPT=128 GEN=64 GGUF=""
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    --prompt) PROMPT="$2"; shift 2 ;;
    --gen) GEN="$2"; shift 2 ;;
    --gguf)
      if [ $# -ge 2 ] && [ "${2#--}" = "$2" ]; then GGUF="$2"; shift 2
      else GGUF="default"; shift; fi ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-vs-llamacpp: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

HOME_DIR="${SIRIUS_HOME:-$HOME/.cache/sirius-offload}"
OUT="$HOME_DIR/bench/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"

source tools/sirius-bin.sh
OURS="$BIN"
tools/fetch-model smollm2-135m >/dev/null
tools/peers/llamacpp.sh --build-only >/dev/null

MODEL=smollm2-135m PEER_MODEL=()
if [ -n "$GGUF" ]; then
  [ "$GGUF" = default ] && GGUF="$HOME_DIR/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$GGUF" ] || { echo "bench-vs-llamacpp: $GGUF does not exist (tools/fetch-model smollm2-135m --force keeps it)" >&2; exit 2; }
  MODEL="$GGUF" PEER_MODEL=(--model-file "$GGUF")
fi
run_ours() {
  "$OURS" bench --model "$MODEL" --threads "$THREADS" --prompt "$PROMPT" --gen "$GEN" \
    --reps "$REPS" --json "$OUT/ours-$1.json" >/dev/null
}
run_peer() {
  tools/peers/llamacpp.sh "${PEER_MODEL[@]}" --threads "$THREADS" --reps "$REPS" --prompt "$PROMPT" --gen "$GEN" \
    --no-text-check --out "$OUT/llamacpp-$1.json" >/dev/null 2>"$OUT/llamacpp-$1.log"
}

for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS ..." >&2
  if [ $((r % 2)) -eq 1 ]; then run_ours "$r"; run_peer "$r"; else run_peer "$r"; run_ours "$r"; fi
done

python3 - "$OUT" "$ROUNDS" "$PROMPT" "$GEN" "$THREADS" "$MODEL" <<'PY'
import json, statistics, sys
out, rounds, prompt, gen, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = {f"pp{prompt}": [], f"tg{gen}": []}
for r in range(1, rounds + 1):
    ours = {x["test"]: x["median_tokens_per_s"] for x in json.load(open(f"{out}/ours-{r}.json"))["results"]}
    for x in json.load(open(f"{out}/llamacpp-{r}.json")):
        test = f"pp{x['n_prompt']}" if x["n_gen"] == 0 else f"tg{x['n_gen']}"
        theirs = statistics.median(x["samples_ts"])
        rows[test].append((ours[test], theirs))
print(f"model {sys.argv[6]}, threads {threads}, {rounds} rounds, each a median of the reps; ratio = ours / llama.cpp per round\n")
print("| test | sirius-offload t/s (median of rounds) | llama.cpp t/s (median of rounds) | ratio per round | median ratio |")
print("|---|---|---|---|---|")
for test, pairs in rows.items():
    if not pairs:
        continue
    ratios = [o / t for o, t in pairs]
    print(f"| {test} | {statistics.median(o for o, _ in pairs):.1f} | {statistics.median(t for _, t in pairs):.1f} | "
          f"{', '.join(f'{x:.2f}' for x in ratios)} | **{statistics.median(ratios):.2f}** |")
print(f"\nraw results: {out}")
PY
