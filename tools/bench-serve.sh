#!/usr/bin/env bash
# Serving latency and throughput: `sirius-offload serve` vs llama.cpp's llama-server on the
# same GGUF file, CPU, measured in ONE run.
#
#   tools/bench-serve.sh [--gguf FILE.gguf] [--threads 2] [--rounds 3] [--clients 1,8,32]
#                        [--requests 4] [--max-tokens 32] [--no-peer]
#
# Default model: the SmolLM2-135M-Instruct Q4_1 GGUF that tools/fetch-model keeps beside its
# conversion. Each round starts each server in turn (alternating which goes first), waits
# for /health, and runs tools/serve-load.py: at each client count every client sends
# --requests streamed greedy chat requests one after another (8 distinct questions),
# reporting p50/p99 time to first token and total generated tokens/s. llama-server runs with
# its defaults (its parallel slots batch concurrent requests; ours runs them one at a time).
# Output: per-round tables, then medians over rounds and ours/theirs ratios; raw JSON in
# $SIRIUS_HOME/bench/serve-<timestamp>/. Needs the `openai` package
# (tools/requirements-test.txt); the peer is built by tools/peers/llamacpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

GGUF="" THREADS=2 ROUNDS=3 CLIENTS=1,8,32 REQUESTS=4 MAX_TOKENS=32 PEER=1
while [ $# -gt 0 ]; do
  case "$1" in
    --gguf) GGUF="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --clients) CLIENTS="$2"; shift 2 ;;
    --requests) REQUESTS="$2"; shift 2 ;;
    --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
    --no-peer) PEER=0; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-serve: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

HOME_DIR="${SIRIUS_HOME:-$HOME/.cache/sirius-offload}"
GGUF="${GGUF:-$HOME_DIR/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$GGUF" ] || { echo "bench-serve: $GGUF not found (tools/fetch-model smollm2-135m)" >&2; exit 1; }
OUT="$HOME_DIR/bench/serve-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"

source tools/sirius-bin.sh
OURS="$BIN"
if [ "$PEER" = 1 ]; then
  LLAMA_BENCH="$(tools/peers/llamacpp.sh --build-only | tail -n1)"
  LLAMA_SERVER="$(dirname "$LLAMA_BENCH")/llama-server"
  [ -x "$LLAMA_SERVER" ] || { echo "bench-serve: $LLAMA_SERVER was not built" >&2; exit 1; }
fi

PORT=18931
PID=""
stop_server() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; PID=""; }
trap stop_server EXIT

# start NAME: the server in the background on $PORT, then wait until /health answers 200.
start() {
  case "$1" in
    ours) "$OURS" serve -m "$GGUF" --threads "$THREADS" --port "$PORT" \
              --served-model-name model --max-queue 256 2> "$OUT/$1.log" & ;;
    llama.cpp) "$LLAMA_SERVER" -m "$GGUF" -t "$THREADS" --port "$PORT" --alias model \
              > "$OUT/$1.log" 2>&1 & ;;
  esac
  PID=$!
  for _ in $(seq 600); do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health')" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  echo "bench-serve: $1 did not become ready (log: $OUT/$1.log)" >&2; exit 1
}

NAMES=(ours)
[ "$PEER" = 1 ] && NAMES+=(llama.cpp)
for round in $(seq "$ROUNDS"); do
  order=("${NAMES[@]}")
  if [ $((round % 2)) = 0 ] && [ "${#NAMES[@]}" = 2 ]; then order=("${NAMES[1]}" "${NAMES[0]}"); fi
  for name in "${order[@]}"; do
    echo "== round $round: $name" >&2
    start "$name"
    python3 tools/serve-load.py --base-url "http://127.0.0.1:$PORT/v1" --model model \
        --clients "$CLIENTS" --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" \
        --json "$OUT/$name-$round.json" >&2
    stop_server
  done
done

python3 - "$OUT" "$ROUNDS" "${NAMES[@]}" <<'PY'
import json, statistics, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {n: [json.load(open(f"{out}/{n}-{r}.json")) for r in range(1, rounds + 1)] for n in names}
clients = [row["clients"] for row in runs[names[0]][0]]
def med(name, i, key):
    return statistics.median(run[i][key] for run in runs[name])
head = "| clients | " + " | ".join(f"{n} TTFT p50 (s) | {n} TTFT p99 (s) | {n} tok/s" for n in names)
if len(names) == 2:
    head += " | tok/s ours/theirs (median of rounds) | TTFT p50 ours/theirs"
head += " |"
print(head)
print("|---:" * (head.count("|") - 1) + "|")
for i, c in enumerate(clients):
    cells = [f"{c}"]
    for n in names:
        cells += [f"{med(n, i, 'ttft_p50_s'):.3f}", f"{med(n, i, 'ttft_p99_s'):.3f}",
                  f"{med(n, i, 'tokens_per_s'):.1f}"]
    if len(names) == 2:
        tps = statistics.median(a[i]["tokens_per_s"] / b[i]["tokens_per_s"]
                                for a, b in zip(runs[names[0]], runs[names[1]]))
        ttft = statistics.median(a[i]["ttft_p50_s"] / b[i]["ttft_p50_s"]
                                 for a, b in zip(runs[names[0]], runs[names[1]]))
        cells += [f"{tps:.2f}x", f"{ttft:.2f}x"]
    print("| " + " | ".join(cells) + " |")
failed = sum(row["failed"] for n in names for run in runs[n] for row in run)
print(f"\nfailed requests: {failed}; raw JSON: {out}")
PY
