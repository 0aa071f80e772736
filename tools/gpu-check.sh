#!/usr/bin/env bash
# The CUDA backend's check on a GPU machine (issue 6, item 6). Runs from a pack that
# tools/gpu-pack.sh built (no Rust toolchain, network or pip needed here) and writes ONE
# markdown report:
#   1. machine: GPU, driver, where libcuda / libnvrtc / cuBLAS / the CUDA headers come from
#   2. NVRTC compiles every kernel for this GPU (tests/nvrtc_kernels)
#   3. parity: every Backend op, CUDA vs CPU, plus greedy tokens and the Sirius invariants
#      (tests/gpu_parity with SIRIUS_REQUIRE_GPU=1)
#   4. pinned vs pageable host-to-device GB/s
#   5. decode tokens/s: CPU dense (baseline), CUDA dense, Griffin, Sirius
#   6. an offloaded run with --gpu-mem below the model's size, when the binary has it
#      (`run --device cuda --gpu-mem SIZE --sirius --sparsity griffin`, 60% then 80% of the
#      weights), and tests/gpu_offload (its tokens vs the unconstrained and CPU runs) when
#      the pack has it
#   7. Llama-3-8B's shape, offloaded: a random-weights model of its shape (hidden 4096, 32
#      heads / 8 kv heads, FFN 14336, vocab 128256, untied, bf16; LLAMA8B_LAYERS of its 32
#      layers, default 8, so that writing it fits the time: 5.6 GB instead of 16 GB) is
#      written here in the background while steps 2-6 run, then run with --gpu-mem at 60% of
#      its weights plus the reserves `plan` books; the report compares predicted and measured
#      ms/token, shows overlap, link GB/s, launches per token and host gather time, and checks
#      that `plan` for the same request books the run's budget lines exactly
# Each step has a timeout and the whole check stops starting steps after 7.5 minutes.
#
# Usage: gpu-check.sh [MODEL_DIR]
#   MODEL_DIR: a HF model directory (config.json, *.safetensors, tokenizer.json) to time and
#   to compare greedy tokens on; without it a random-weights model of SmolLM2-135M's shape
#   (hidden 576, 30 layers, 9/3 heads, FFN 1536, vocab 49152, tied, bf16) is generated here.
# Environment: REPORT (default ./gpu-check-report.md), WORK (scratch, default a temp dir),
# LLAMA8B_LAYERS (layers of the Llama-3-8B-shaped model, 1..32, default 8; 0 skips step 7).
# Exit status: 0 when every step that ran passed, 1 when a check failed, 2 without a GPU.
set -uo pipefail

PACK=$(cd "$(dirname "$0")" && pwd)
MODEL=${1:-}
REPORT=${REPORT:-$PWD/gpu-check-report.md}
WORK=${WORK:-$(mktemp -d -t gpu-check.XXXXXX)}
DEADLINE=450 # seconds: under 8 minutes with the last step's cap
BIN=$PACK/bin/sirius-offload
failed=0

if [ ! -x "$BIN" ] || [ ! -x "$PACK/tests/gpu_parity" ] || [ ! -x "$PACK/tests/gpu_end_to_end" ]; then
    echo "gpu-check: no pack in $PACK (bin/sirius-offload, tests/gpu_parity missing):" \
        "run tools/gpu-pack.sh on a build machine, copy gpu-pack/ here and run" \
        "gpu-pack/gpu-check.sh" >&2
    exit 1
fi
if [ -n "$MODEL" ] && [ ! -f "$MODEL/config.json" ]; then
    echo "gpu-check: $MODEL is not a model directory (no config.json)" >&2
    exit 1
fi
mkdir -p "$WORK"

# ---- report helpers
: >"$REPORT"
say() { printf '%s\n' "$*" >>"$REPORT"; }
log() { printf '== %s\n' "$*" >&2; }
# Seconds a step may take: its cap, or what is left before the deadline.
budget() {
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
# Runs a step under `timeout`; its output goes to $WORK/<name>.log. Returns its status,
# 124 on timeout, 125 when no time is left.
step() {
    local name=$1 cap=$2
    shift 2
    local t
    t=$(budget "$cap")
    if [ "$t" -lt 10 ]; then
        echo "(skipped: the check's 8-minute budget is spent)" >"$WORK/$name.log"
        return 125
    fi
    timeout --kill-after=5 "$t" "$@" >"$WORK/$name.log" 2>&1
}
status_word() {
    case $1 in
    0) echo "passed" ;;
    124 | 137) echo "TIMED OUT" ;;
    125) echo "skipped (out of time)" ;;
    *) echo "FAILED (exit $1)" ;;
    esac
}
# A number field of a --stats-json file, to 2 decimals when it has decimals.
json_num() {
    grep -o "\"$2\": *[-0-9.eE+]*" "$1" 2>/dev/null | head -1 | sed 's/.*: *//' |
        awk '{ if ($0 ~ /[.eE]/) printf "%.2f", $0; else printf "%s", $0 }'
}
fence() { say '```'; sed -e 's/\x1b\[[0-9;]*m//g' "$1" | tail -n "${2:-40}" >>"$REPORT"; say '```'; }

say "# GPU check: sirius-offload CUDA backend"
say ""
say "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host: $(uname -n) ($(uname -srm))"
say "- pack: $(sed -n 's/^commit: //p' "$PACK/MANIFEST" 2>/dev/null || echo unknown)"

# ---- 1. machine and libraries
log "machine"
find_lib() { # first path of a shared library named $1 on this machine
    local hit
    hit=$(ldconfig -p 2>/dev/null | grep -F "$1 " | head -1 | sed 's/.*=> //')
    if [ -z "$hit" ]; then
        hit=$(timeout 20 find /usr/local/cuda* /usr/lib /usr/lib64 /opt /usr/local/lib \
            -name "$1" 2>/dev/null | head -1)
    fi
    echo "$hit"
}
libcuda=$(find_lib libcuda.so.1)
[ -n "$libcuda" ] || libcuda=$(find_lib libcuda.so)
gpu_line=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
say "- GPU: ${gpu_line:-nvidia-smi not available}"
say "- libcuda: ${libcuda:-not found}"
if [ -z "$libcuda" ]; then
    say ""
    say "**No GPU here**: the NVIDIA driver library (libcuda.so) is missing, so nothing was run."
    echo "gpu-check: no NVIDIA driver (libcuda.so) on this machine: nothing to check;" \
        "report: $REPORT" >&2
    exit 2
fi
# NVRTC and headers: the pack's copy (the version CI compiles the kernels with) when it has
# one, else the machine's.
extra_lib=""
unpack_xz() { # archive dir: xz where the machine has it, else Python's lzma module
    if command -v xz >/dev/null; then
        xz -dc "$1" | tar -C "$2" -xf -
    else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1" |
            tar -C "$2" -xf -
    fi
}
if [ -f "$PACK/cuda/nvrtc.tar.xz" ]; then
    mkdir -p "$WORK/cuda" && unpack_xz "$PACK/cuda/nvrtc.tar.xz" "$WORK/cuda"
    extra_lib=$WORK/cuda/lib
    export CUDA_INCLUDE_DIR=$WORK/cuda/include
    say "- NVRTC: the pack's ($(sed -n 's/^nvrtc: //p' "$PACK/MANIFEST"))"
else
    nvrtc=$(find_lib libnvrtc.so.13)
    [ -n "$nvrtc" ] && extra_lib=$(dirname "$nvrtc")
    say "- NVRTC: ${nvrtc:-not found (the backend cannot compile its kernels)}"
fi
cublas=$(find_lib libcublas.so.13)
if [ -n "$cublas" ]; then
    extra_lib=${extra_lib:+$extra_lib:}$(dirname "$cublas")
fi
say "- cuBLAS: ${cublas:-not found (the GEMM path cannot run)}"
export LD_LIBRARY_PATH=${extra_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
say "- CUDA headers: ${CUDA_INCLUDE_DIR:-searched by the backend (CUDA_HOME, /usr/local/cuda/include, ...)}"
say "- CPU: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')"

# ---- 7, started now: the Llama-3-8B-shaped model is written in the background (one CPU
# core and the disk) while steps 2-6 use the GPU; step 7 waits for it.
LLAMA8B_LAYERS=${LLAMA8B_LAYERS:-8}
LLAMA8B=$WORK/model-llama3-8b-shape
llama8b_pid=""
llama8b_why=""
llama8b_bytes() { # bf16 bytes of $1 of Llama-3-8B's layers plus its embedding and head
    echo $(($1 * 2 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336) + 4 * 128256 * 4096))
}
if ! [[ $LLAMA8B_LAYERS =~ ^[0-9]+$ ]] || [ "$LLAMA8B_LAYERS" -gt 32 ]; then
    llama8b_why="LLAMA8B_LAYERS=$LLAMA8B_LAYERS is not a layer count of 0..32"
elif [ "$LLAMA8B_LAYERS" -eq 0 ]; then
    llama8b_why="skipped (LLAMA8B_LAYERS=0)"
elif [ ! -x "$PACK/bin/random_model" ]; then
    llama8b_why="the pack has no bin/random_model"
else
    need=$(llama8b_bytes "$LLAMA8B_LAYERS")
    disk=$(df -B1 --output=avail "$WORK" 2>/dev/null | tail -1 | tr -d ' ')
    ram=$(awk '/^MemAvailable:/ { printf "%.0f", $2 * 1024 }' /proc/meminfo 2>/dev/null)
    say "- for step 7: $((${disk:-0} / 1000000000)) GB free on $WORK, $((${ram:-0} / 1000000000)) GB of RAM available"
    if [ -n "$disk" ] && [ "$disk" -lt $((need + 2000000000)) ]; then
        llama8b_why="$((disk / 1000000000)) GB free on $WORK, $((need / 1000000000 + 2)) GB needed"
    elif [ -n "$ram" ] && [ "$ram" -lt $((2 * need + 4000000000)) ]; then
        # The file in the page cache plus the runtime's host copy of the FFN.
        llama8b_why="$((ram / 1000000000)) GB of RAM available, $((2 * need / 1000000000 + 4)) GB needed"
    else
        llama8b_start=$SECONDS
        timeout --kill-after=5 "$(budget 400)" "$PACK/bin/random_model" "$LLAMA8B" \
            hidden=4096 layers="$LLAMA8B_LAYERS" heads=32 kv_heads=8 ffn=14336 vocab=128256 \
            tied=0 dtype=bf16 >"$WORK/llama8b_model.log" 2>&1 &
        llama8b_pid=$!
    fi
fi

# ---- 2. NVRTC
log "NVRTC compiles every kernel"
SIRIUS_REQUIRE_NVRTC=1 step nvrtc 120 "$PACK/tests/nvrtc_kernels" --test-threads 2
rc=$?
say ""
say "## NVRTC: $(status_word $rc)"
[ $rc -eq 0 ] || { failed=1; fence "$WORK/nvrtc.log" 20; }

# ---- 3. parity
log "parity (tests/gpu_parity)"
parity_env=(SIRIUS_REQUIRE_GPU=1)
[ -n "$MODEL" ] && parity_env+=(SIRIUS_GPU_MODEL_DIR="$MODEL")
# Op-by-op parity, then end to end (greedy tokens, Sirius invariants): one step, one log.
step parity 240 env "${parity_env[@]}" bash -c \
    '"$1" --skip host_to_device --test-threads 4 --nocapture && "$2" --test-threads 2 --nocapture' \
    _ "$PACK/tests/gpu_parity" "$PACK/tests/gpu_end_to_end"
rc=$?
say ""
say "## Parity (CUDA vs CPU): $(status_word $rc)"
say ""
say "\`max |gpu - cpu| / max(1, max |cpu|)\` over whole output buffers poisoned with NaN;"
say "tolerances per op are justified in tests/gpu_parity.rs."
say ""
say "| op | checks | failed | worst error | tolerance |"
say "| --- | --- | --- | --- | --- |"
grep '^PARITY ' "$WORK/parity.log" | awk '
    { op = $2; n[op]++; if ($NF == "FAIL") f[op]++
      for (i = 3; i <= NF; i++) {
        if ($i ~ /^err=/) { e = substr($i, 5); if (!(op in w) || e + 0 > w[op] + 0) w[op] = e }
        if ($i ~ /^tol=/) t[op] = substr($i, 5)
        if ($i ~ /^same=/) w[op] = substr($i, 6)
      }
      if (!(op in order)) { order[op] = ++k; names[k] = op } }
    END { for (i = 1; i <= k; i++) { op = names[i]
          printf "| %s | %d | %d | %s | %s |\n", op, n[op], f[op] + 0, w[op], t[op] } }' \
    >>"$REPORT"
say ""
grep -E '^test result|^SKIPPED' "$WORK/parity.log" | sort | uniq -c | sed 's/^ */- /' >>"$REPORT"
if [ $rc -ne 0 ]; then
    failed=1
    say ""
    say "Failures:"
    say '```'
    grep -E -A1 'panicked at' "$WORK/parity.log" | grep -v '^--$' | head -40 >>"$REPORT"
    say '```'
fi

# ---- 4. bandwidth
log "pinned vs pageable host-to-device"
SIRIUS_REQUIRE_GPU=1 step bandwidth 60 "$PACK/tests/gpu_parity" --exact host_to_device_bandwidth --nocapture
rc=$?
bw=$(grep -o 'BANDWIDTH .*' "$WORK/bandwidth.log" | head -1)
say ""
say "## Host-to-device copy (256 MiB, best of 5)"
if [ -n "$bw" ]; then
    pinned=$(sed -n 's/.*pinned_gbps=\([0-9.]*\).*/\1/p' <<<"$bw")
    pageable=$(sed -n 's/.*pageable_gbps=\([0-9.]*\).*/\1/p' <<<"$bw")
    say "| memory | GB/s |"
    say "| --- | --- |"
    say "| pinned (cuMemHostAlloc, write-combined) | $pinned |"
    say "| pageable (Vec<u8>) | $pageable |"
else
    say "No measurement: $(status_word $rc)"
    fence "$WORK/bandwidth.log" 8
fi

# ---- 5. decode tokens/s
say ""
if [ -z "$MODEL" ]; then
    log "random model of SmolLM2-135M's shape"
    MODEL=$WORK/model-smollm2-shape
    if ! step random_model 60 "$PACK/bin/random_model" "$MODEL"; then
        say "## Decode: the random model could not be written"
        fence "$WORK/random_model.log" 10
        MODEL=""
    fi
    PROMPT="w17 w230 w4096 w99 w1234 w777 w31337 w12 w555 w8080 w42 w64 w2048 w300 w9 w10"
    model_label="random weights, SmolLM2-135M shape (bf16; tokens meaningless, speed real)"
else
    PROMPT="The history of the printing press begins in the fifteenth century, when"
    model_label="$MODEL"
fi
decode_row() { # label, tokens, then run options
    local label=$1 tokens=$2 name
    shift 2
    name=run_$(tr -c 'a-zA-Z0-9' _ <<<"$label")
    step "$name" 90 "$BIN" run -m "$MODEL" -p "$PROMPT" --max-tokens "$tokens" --temperature 0 \
        --no-fetch --stats-json "$WORK/$name.json" "$@"
    local rc=$?
    if [ $rc -eq 0 ] && [ -f "$WORK/$name.json" ]; then
        local extra=""
        local aal
        aal=$(json_num "$WORK/$name.json" aal)
        [ -n "$aal" ] && extra="AAL $aal"
        # Kernel launches per decoded token (CUDA runs count them).
        local launches
        launches=$(json_num "$WORK/$name.json" decode_launches_per_token)
        [ -n "$launches" ] && extra="${extra:+$extra, }$launches launches/token"
        # Device allocations of the decode steps: 0 once the temporaries' region is warm.
        local allocs
        allocs=$(json_num "$WORK/$name.json" decode_device_allocations)
        [ -n "$allocs" ] && extra="${extra:+$extra, }$allocs decode allocations"
        say "| $label | $(json_num "$WORK/$name.json" decode_tokens_per_s) | $(json_num "$WORK/$name.json" prefill_tokens_per_s) | $(json_num "$WORK/$name.json" generated_tokens) | $extra |"
    else
        local why
        why=$(grep -v '^\s*$' "$WORK/$name.log" | tail -1 | cut -c1-200)
        say "| $label | $(status_word $rc) | | | ${why//|/\\|} |"
        return 1
    fi
}
if [ -n "$MODEL" ]; then
    log "decode tokens/s"
    say "## Decode tokens/s: $model_label"
    say ""
    say "Greedy tokens (32 on the CPU, 128 on the GPU) after a short prompt; \`run --stats-json\`"
    say "numbers."
    say ""
    say "| run | decode tok/s | prefill tok/s | tokens | notes |"
    say "| --- | --- | --- | --- | --- |"
    decode_row "cpu dense ($(nproc) threads)" 32 --device cpu
    cuda_ok=0
    decode_row "cuda dense" 128 --device cuda && cuda_ok=1
    decode_row "cuda griffin keep 0.5" 128 --device cuda --sparsity griffin --keep 0.5
    decode_row "cuda sirius griffin 0.5 K=8" 128 --device cuda --sparsity griffin --keep 0.5 \
        --sirius --period 8
    if [ $cuda_ok -eq 0 ]; then
        say ""
        say "\`run --device cuda\` did not run (see notes): the CUDA runs above are not measured."
    fi

    # ---- 6. offloaded
    say ""
    say "## Offloaded run (--gpu-mem below the model's size)"
    say ""
    weights=$(du -cb "$MODEL"/*.safetensors 2>/dev/null | tail -1 | cut -f1)
    if ! "$BIN" run --help 2>/dev/null | grep -q -- '--gpu-mem'; then
        say "Not run: this build's \`run\` has no \`--gpu-mem\` option, i.e. offloading on"
        say "\`--device cuda\` is not implemented yet."
    else
        log "offloaded run"
        offloaded=0
        for pct in 60 80; do
            mem=$((weights * pct / 100 / 1000000))MB
            name=offload_$pct
            step "$name" 120 "$BIN" run -m "$MODEL" -p "$PROMPT" --max-tokens 64 \
                --temperature 0 --no-fetch --device cuda --sparsity griffin --keep 0.5 \
                --sirius --period 8 --gpu-mem "$mem" --trace "$WORK/trace_$pct.json" \
                --stats-json "$WORK/$name.json"
            rc=$?
            if [ $rc -eq 0 ]; then
                j=$WORK/$name.json
                say "--gpu-mem $mem ($pct% of $((weights / 1000000)) MB of weights), Sirius K=8, Griffin 0.5:"
                say ""
                say "| decode tok/s | streamed bytes | overlap | achieved link GB/s | copy wait s | full passes | predicted / measured ms per token |"
                say "| --- | --- | --- | --- | --- | --- | --- |"
                say "| $(json_num "$j" decode_tokens_per_s) | $(json_num "$j" streamed_bytes) | $(json_num "$j" overlap) | $(json_num "$j" achieved_link_gbps) | $(json_num "$j" copy_wait_s) | $(json_num "$j" full_passes) | $(json_num "$j" predicted_ms_per_token) / $(json_num "$j" measured_ms_per_token) |"
                say ""
                # The run's own summary (stderr): what was resident, what streamed.
                summary=$(grep -o '\[offload\].*' "$WORK/$name.log" | tail -1)
                [ -n "$summary" ] && say "\`$summary\`" && say ""
                say "Overlap and copy wait come from CUDA events (copy stream busy time, compute"
                say "stream stalls); the trace's spans are host-side (when copies and layers were issued)."
                say ""
                say "Trace: $WORK/trace_$pct.json ($(du -h "$WORK/trace_$pct.json" 2>/dev/null | cut -f1), open in Perfetto)."
                offloaded=1
                break
            fi
            say "--gpu-mem $mem: $(status_word $rc)"
            fence "$WORK/$name.log" 5
        done
        [ $offloaded -eq 1 ] || failed=1
        if [ -x "$PACK/tests/gpu_offload" ]; then
            log "offloaded tokens (tests/gpu_offload)"
            SIRIUS_REQUIRE_GPU=1 step gpu_offload 90 "$PACK/tests/gpu_offload" --test-threads 1 --nocapture
            rc=$?
            say ""
            say "tests/gpu_offload (tiny random model, budget below its size: tokens equal the"
            say "unconstrained CUDA run's and the CPU offloaded run's): $(status_word $rc)"
            say ""
            grep '^OFFLOAD ' "$WORK/gpu_offload.log" | sed 's/^/- /' >>"$REPORT"
            if [ $rc -ne 0 ]; then
                failed=1
                fence "$WORK/gpu_offload.log" 15
            fi
        fi
    fi
fi

# ---- 7. Llama-3-8B's shape, offloaded
# The raw value of a number field of a JSON file (json_num rounds).
json_raw() { grep -o "\"$2\": *[-0-9.eE+]*" "$1" 2>/dev/null | head -1 | sed 's/.*: *//'; }
# The first "budget_lines" array of a pretty JSON file, one `what bytes` line per entry
# (run's stats and plan's report print it alike, so equal budgets give equal text).
budget_lines_of() {
    awk '/"budget_lines": *\[/ { on = 1 }
        on { line = $0; gsub(/^[ \t]+|[ \t]+$/, "", line); gsub(/": /, "\":", line); all = all line
             depth += gsub(/\[/, "[", line) - gsub(/\]/, "]", line); if (depth == 0) { print all; exit } }' \
        "$1" 2>/dev/null | grep -o '"what":"[^"]*","bytes":[0-9]*' | sed 's/"what":"\([^"]*\)","bytes":/\1\t/'
}
llama8b_wait() { # waits for the background writer, leaving the run 40 s of the budget
    while kill -0 "$llama8b_pid" 2>/dev/null && [ $((DEADLINE - SECONDS)) -gt 40 ]; do
        sleep 1
    done
    if kill -0 "$llama8b_pid" 2>/dev/null; then
        kill "$llama8b_pid" 2>/dev/null
        wait "$llama8b_pid" 2>/dev/null
        say "Not run: writing the model did not finish within the check's budget (set"
        say "LLAMA8B_LAYERS lower): not measured."
        fence "$WORK/llama8b_model.log" 5
        return 0
    fi
    wait "$llama8b_pid"
    local rc=$?
    if [ $rc -ne 0 ]; then
        say "The model could not be written: $(status_word $rc)"
        fence "$WORK/llama8b_model.log" 10
        return 1
    fi
    say "Written in the background in $((SECONDS - llama8b_start))s or less: $(tail -1 "$WORK/llama8b_model.log")."
    say ""
}
llama8b_plan() { # plan for a request: context, prompt tokens, budget, format, output file
    "$BIN" plan --model "$LLAMA8B" --gpu-mem "$3" --context "$1" --prompt-tokens "$2" \
        --period 8 --keep 0.5 --format "$4" >"$5" 2>>"$WORK/llama8b_plan.log"
}
llama8b() {
    if [ -n "$llama8b_why" ]; then
        say "Not run: $llama8b_why."
        return 0
    fi
    if ! "$BIN" run --help 2>/dev/null | grep -q -- '--gpu-mem'; then
        kill "$llama8b_pid" 2>/dev/null
        say "Not run: this build's \`run\` has no \`--gpu-mem\` option."
        return 0
    fi
    llama8b_wait || return 1
    local weights reserves mem j=$WORK/llama8b_run.json
    weights=$(du -cb "$LLAMA8B"/*.safetensors 2>/dev/null | tail -1 | cut -f1)
    # The reserves plan books on a GPU (backend scratch, driver context, allocator margin),
    # from a plan with room for everything.
    llama8b_plan 128 16 1000GB json "$WORK/llama8b_reserves.json"
    reserves=$(budget_lines_of "$WORK/llama8b_reserves.json" |
        awk -F'\t' '$1 ~ /^(backend scratch|driver context|allocator margin)$/ { s += $2 } END { printf "%.0f", s }')
    mem=$((weights * 60 / 100 + reserves))
    say "--gpu-mem $mem bytes: 60% of $((weights / 1000000)) MB of weights plus $((reserves / 1000000)) MB"
    say "of reserves (plan's backend scratch, driver context and allocator margin); Sirius K=8,"
    say "Griffin 0.5, 64 tokens."
    # Few layers leave the head and two whole-layer stream buffers above 60%: then the
    # plan's minimum, 5% over.
    local least
    if ! llama8b_plan 128 16 "$mem" json /dev/null; then
        least=$(grep -o 'give at least [0-9]*' "$WORK/llama8b_plan.log" | tail -1 | grep -o '[0-9]*$')
        if [ -n "$least" ] && [ "$least" -lt "$weights" ]; then
            mem=$((least + least / 20))
            say "That is below the plan's minimum ($least bytes): --gpu-mem $mem instead."
        fi
    fi
    say ""
    step llama8b_run 180 "$BIN" run -m "$LLAMA8B" -p "$PROMPT8B" --max-tokens 64 \
        --temperature 0 --no-fetch --device cuda --sparsity griffin --keep 0.5 --sirius \
        --period 8 --gpu-mem "$mem" --stats-json "$j"
    local rc=$?
    if [ $rc -eq 125 ]; then
        say "The offloaded run: $(status_word $rc): not measured."
        return 0
    fi
    if [ $rc -ne 0 ] || [ ! -f "$j" ]; then
        say "The offloaded run: $(status_word $rc)"
        fence "$WORK/llama8b_run.log" 10
        return 1
    fi
    local pred meas ratio goal
    pred=$(json_raw "$j" predicted_ms_per_token)
    meas=$(json_raw "$j" measured_ms_per_token)
    ratio=$(awk -v p="$pred" -v m="$meas" 'BEGIN { if (p > 0 && m > 0) printf "%.2f", p / m }')
    goal=$(awk -v r="$ratio" 'BEGIN { if (r == "") print "no prediction";
        else if (r >= 0.85 && r <= 1.15) print "within 15%"; else print "OUTSIDE 15%" }')
    say "| predicted ms/token | measured ms/token | predicted / measured | overlap | achieved link GB/s | launches/token | decode allocations | host gather s | decode tok/s | AAL |"
    say "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    local row="" field v
    for field in predicted_ms_per_token measured_ms_per_token ratio overlap achieved_link_gbps \
        launches_per_token decode_device_allocations host_gather_s decode_tokens_per_s aal; do
        case $field in
        ratio) v="${ratio:-n/a} ($goal)" ;;
        *) v=$(json_num "$j" "$field") ;;
        esac
        row="$row| ${v:-n/a} "
    done
    say "$row|"
    say ""
    local summary
    summary=$(grep -o '\[offload\].*' "$WORK/llama8b_run.log" | tail -1)
    [ -n "$summary" ] && say "\`$summary\`" && say ""
    # The plan for the same request: the run's context and prompt length.
    local ctx ptoks
    ctx=$(json_raw "$j" kv_cache_rows)
    ptoks=$(json_raw "$j" prompt_tokens)
    if ! llama8b_plan "$ctx" "$ptoks" "$mem" json "$WORK/llama8b_plan.json"; then
        say "\`plan\` for the same request failed:"
        fence "$WORK/llama8b_plan.log" 5
        return 1
    fi
    budget_lines_of "$WORK/llama8b_plan.json" >"$WORK/llama8b_plan.lines"
    budget_lines_of "$j" >"$WORK/llama8b_run.lines"
    local same=FAIL
    [ -s "$WORK/llama8b_run.lines" ] && cmp -s "$WORK/llama8b_plan.lines" "$WORK/llama8b_run.lines" && same=pass
    say "Budget lines, \`plan --gpu-mem $mem --context $ctx --prompt-tokens $ptoks --period 8"
    say "--keep 0.5\` vs the run's arena: **$same** (they must be equal, byte for byte)."
    say ""
    say "| line | plan bytes | run bytes |"
    say "| --- | --- | --- |"
    # In the plan's order, then any line only the run has.
    awk -F'\t' 'NR == FNR { run[$1] = $2; next }
        { printf "| %s | %s | %s |\n", $1, $2, ($1 in run) ? run[$1] : "-"; seen[$1] = 1 }
        END { for (k in run) if (!(k in seen)) printf "| %s | - | %s |\n", k, run[k] }' \
        "$WORK/llama8b_run.lines" "$WORK/llama8b_plan.lines" >>"$REPORT"
    say ""
    llama8b_plan "$ctx" "$ptoks" "$mem" md "$WORK/llama8b_plan.md"
    say "The plan (\`plan --format md\`) for the same request:"
    say ""
    say '```'
    head -n 70 "$WORK/llama8b_plan.md" >>"$REPORT"
    say '```'
    [ $same = pass ]
}
PROMPT8B="w17 w230 w4096 w99 w1234 w777 w31337 w12 w555 w8080 w42 w64 w2048 w300 w9 w10"
say ""
say "## Llama-3-8B's shape, offloaded (random bf16 weights, $LLAMA8B_LAYERS of its 32 layers)"
say ""
log "Llama-3-8B's shape, offloaded"
llama8b || failed=1

say ""
say "Finished in ${SECONDS}s. Logs: $WORK"
log "report: $REPORT (${SECONDS}s)"
cat "$REPORT"
exit $failed
