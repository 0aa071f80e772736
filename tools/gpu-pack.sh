#!/usr/bin/env bash
# Builds and collects what tools/gpu-check.sh needs on a GPU machine that has no Rust
# toolchain, no network and no pip, into gpu-pack/ (under 64 MiB):
#   bin/sirius-offload        release binary (--features cuda), debug info stripped
#   bin/random_model          examples/random_model.rs: writes a random model of a real shape
#   tests/gpu_parity          op-by-op and end-to-end parity test binary (cargo test --no-run)
#   tests/gpu_offload         the offloading runtime on CUDA vs the unconstrained and CPU runs
#   tests/nvrtc_kernels       compiles every kernel with NVRTC for the device's architecture
#   cuda/nvrtc.tar.xz         libnvrtc + builtins (pip nvidia-cuda-nvrtc==13.0.88) and the
#                             CUDA headers (pip nvidia-cuda-runtime==13.0.96), when installed
#                             here (pip install -r tools/requirements-cuda.txt): the GPU
#                             machine may lack them; cuBLAS (hundreds of MB) cannot travel
#   gpu-check.sh, MANIFEST    the check script and what was packed from which commit
# The kernels need nothing at run time: they are embedded in the binaries.
#
# Usage: tools/gpu-pack.sh            (GPU_PACK_NVRTC=0 leaves the NVRTC archive out)
# Then copy gpu-pack/ to the GPU machine and run gpu-pack/gpu-check.sh [MODEL_DIR].
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT=$((64 * 1024 * 1024))
PACK=gpu-pack
for tool in cargo objcopy xz; do
    command -v "$tool" >/dev/null || { echo "gpu-pack: $tool is needed" >&2; exit 1; }
done

echo "== build: release binary and the random-model generator (--features cuda)"
cargo build --release --locked --features cuda --bin sirius-offload --example random_model

echo "== build: test binaries (cargo test --no-run)"
# The JSON messages name each test binary's path (the hash in its name changes per build).
messages=$(cargo test --release --locked --features cuda --no-run \
    --test gpu_parity --test gpu_end_to_end --test gpu_offload --test nvrtc_kernels \
    --message-format=json)
test_exe() {
    grep '"reason":"compiler-artifact"' <<<"$messages" | grep "\"name\":\"$1\"" |
        grep -o '"executable":"[^"]*"' | head -1 | cut -d'"' -f4
}

rm -rf "$PACK"
mkdir -p "$PACK/bin" "$PACK/tests" "$PACK/cuda"
# Debug info is most of each binary (profile.release keeps debug = 1 for profiling); the
# symbol table stays so a panic's backtrace still names functions.
strip_into() { objcopy --strip-debug "$1" "$2"; }
strip_into target/release/sirius-offload "$PACK/bin/sirius-offload"
strip_into target/release/examples/random_model "$PACK/bin/random_model"
for t in gpu_parity gpu_end_to_end gpu_offload nvrtc_kernels; do
    exe=$(test_exe "$t")
    [ -n "$exe" ] && [ -f "$exe" ] || { echo "gpu-pack: no test binary for $t" >&2; exit 1; }
    strip_into "$exe" "$PACK/tests/$t"
done

nvrtc_note="not packed (GPU_PACK_NVRTC=0)"
if [ "${GPU_PACK_NVRTC:-1}" != 0 ]; then
    echo "== NVRTC and CUDA headers from the pip wheels (tools/requirements-cuda.txt)"
    # Found as .ci/run finds them: site-packages/nvidia/cu13/{lib,include}.
    dirs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os
import nvidia
for root in nvidia.__path__:
    libs = sorted(glob.glob(os.path.join(root, "**", "libnvrtc.so.13"), recursive=True))
    heads = sorted(glob.glob(os.path.join(root, "**", "cuda_bf16.h"), recursive=True))
    if libs and heads:
        print(os.path.dirname(libs[0]))
        print(os.path.dirname(heads[0]))
        break
PY
)
    lib=$(sed -n 1p <<<"$dirs")
    inc=$(sed -n 2p <<<"$dirs")
    if [ -n "$lib" ] && [ -n "$inc" ] && ls "$lib"/libnvrtc-builtins.so.13.* >/dev/null 2>&1; then
        staging=$(mktemp -d)
        mkdir -p "$staging/lib"
        cp "$lib/libnvrtc.so.13" "$lib"/libnvrtc-builtins.so.13.* "$staging/lib/"
        cp -r "$inc" "$staging/include"
        # xz, not gzip: libnvrtc is 109 MB, 45 MB gzipped, 32 MB as xz, and the pack must stay
        # under 64 MiB with the test binaries. gpu-check.sh unpacks it with xz, or with
        # Python's lzma module where xz is missing.
        tar -C "$staging" -cf - lib include | xz -6 -T0 >"$PACK/cuda/nvrtc.tar.xz"
        rm -rf "$staging"
        nvrtc_note="libnvrtc.so.13 + builtins from $lib, headers from $inc"
    else
        nvrtc_note="not packed: the pip wheels are not installed here (python3 -m pip install -r tools/requirements-cuda.txt); the GPU machine must have libnvrtc.so.13 and cuda_bf16.h"
        echo "gpu-pack: warning: NVRTC $nvrtc_note" >&2
    fi
fi
[ -n "$(ls -A "$PACK/cuda")" ] || rmdir "$PACK/cuda"

cp tools/gpu-check.sh "$PACK/gpu-check.sh"
chmod +x "$PACK/gpu-check.sh" "$PACK/bin/"* "$PACK/tests/"*
{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    echo "nvrtc: $nvrtc_note"
    echo "files:"
    (cd "$PACK" && find . -type f ! -name MANIFEST -printf '  %p %s\n' | sort)
} >"$PACK/MANIFEST"

total=$(du -sb "$PACK" | cut -f1)
echo "== $PACK: $((total / 1024 / 1024)) MiB ($total bytes), limit 64 MiB"
(cd "$PACK" && find . -type f -printf '%10s  %p\n' | sort -k2)
if [ "$total" -gt "$LIMIT" ]; then
    echo "gpu-pack: $PACK is $total bytes, over the 64 MiB limit (try GPU_PACK_NVRTC=0)" >&2
    exit 1
fi
echo "== done: copy $PACK/ to the GPU machine and run $PACK/gpu-check.sh [MODEL_DIR]"
