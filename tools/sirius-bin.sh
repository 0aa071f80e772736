# Sourced by the bench scripts: sets BIN to the sirius-offload binary they time.
# SIRIUS_BIN runs another build (e.g. an older commit's binary, to compare two builds in one
# session); by default this checkout's release build, built first.
if [ -n "${SIRIUS_BIN:-}" ]; then
  if [ ! -x "$SIRIUS_BIN" ]; then
    echo "SIRIUS_BIN=$SIRIUS_BIN is not an executable file" >&2
    exit 1
  fi
  BIN="$SIRIUS_BIN"
else
  cargo build --release --locked --quiet
  BIN=target/release/sirius-offload
fi
