#!/usr/bin/env bash
# Builds the static x86_64 musl binary (with the default `kafka` feature) and checks it: size
# budget, no dynamic linking, runs in an empty chroot (no /etc, no zoneinfo, no CA bundle), and
# the Dockerfile's COPY source exists. It also builds and checks the variant without Kafka
# (`--no-default-features`), kept beside it as poulpe-nokafka, against its own smaller budget.
# Usage: scripts/build-static.sh [--no-check]
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-unknown-linux-musl
BIN="target/$TARGET/release/poulpe"
LITE="target/$TARGET/release/poulpe-nokafka"
BUDGET_BYTES=$((8 * 1024 * 1024))        # with Kafka (librdkafka linked in)
LITE_BUDGET_BYTES=$((5 * 1024 * 1024))   # without Kafka

need_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "error: '$*' needs root; run it as root or install sudo" >&2; exit 1; fi
}

if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
  rustup target add "$TARGET"
fi
if ! command -v musl-gcc >/dev/null; then
  need_root apt-get update -qq
  need_root apt-get install -y -qq musl-tools
fi
command -v file >/dev/null || { need_root apt-get update -qq; need_root apt-get install -y -qq file; }

export CC_x86_64_unknown_linux_musl=musl-gcc
# Linked by the lld that ships with the Rust toolchain (rustup puts it under the sysroot as
# `gcc-ld/ld.lld`), folding functions whose machine code is identical (`--icf=all`): about 40 KB
# less in the build without Kafka, measured in BENCHMARKS.md. Added to the musl target's
# rustflags of .cargo/config.toml (cargo joins the two lists).
GCC_LD="$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld"
[ -x "$GCC_LD/ld.lld" ] || { echo "error: no $GCC_LD/ld.lld: install Rust with rustup" >&2; exit 1; }
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C link-arg=-fuse-ld=lld -C link-arg=-B$GCC_LD -C link-arg=-Wl,--icf=all"
cargo build --release --locked --target "$TARGET" --bin poulpe --no-default-features
cp "$BIN" "$LITE"
cargo build --release --locked --target "$TARGET" --bin poulpe

fail() { echo "static build check failed: $*" >&2; exit 1; }

# check BINARY BUDGET: prints path, size and `file`, then checks the budget and static linking.
check() {
  local bin=$1 budget=$2 size ldd_out
  size=$(stat -c %s "$bin")
  echo "binary: $bin"
  echo "size:   $size bytes ($(( size / 1024 )) KiB), budget $budget bytes"
  file "$bin"
  [ "$NO_CHECK" = 1 ] && return 0
  [ "$size" -le "$budget" ] || fail "$bin: $size bytes is over the budget of $budget"
  ldd_out=$(ldd "$bin" 2>&1 || true)
  case "$ldd_out" in
    *"not a dynamic executable"*|*"statically linked"*) echo "ldd:    $ldd_out" ;;
    *) fail "$bin: ldd says it is dynamic: $ldd_out" ;;
  esac
  file "$bin" | grep -q "static" || fail "$bin: file does not call it static"
}
NO_CHECK=0
[ "${1:-}" = "--no-check" ] && NO_CHECK=1
check "$LITE" "$LITE_BUDGET_BYTES"
check "$BIN" "$BUDGET_BYTES"
[ "$NO_CHECK" = 1 ] && exit 0

# Run it in an empty root: nothing but the binary and a data directory.
root=$(mktemp -d)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$root"' EXIT
cp "$BIN" "$root/poulpe"
mkdir -p "$root/data"
chroot "$root" /poulpe --version | grep -q "^poulpe " || fail "--version in an empty chroot"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# With the Kafka intake pointed at a port where no broker listens: it must still serve.
kport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
chroot "$root" /poulpe --bind 127.0.0.1 --port "$port" --data /data --tz Europe/Paris --log error \
  --kafka_servers "127.0.0.1:$kport" --kafka_topic tasks &
pid=$!
for _ in $(seq 1 100); do
  chroot "$root" /poulpe health --port "$port" >/dev/null 2>&1 && break
  sleep 0.05
done
chroot "$root" /poulpe health --port "$port" || fail "the server in an empty chroot does not answer /health"
kill -TERM "$pid"; wait "$pid" || fail "the server in the chroot did not exit 0 on SIGTERM"
pid=
echo "chroot: serves and stops cleanly with no /etc"

# The Dockerfile copies the binary from this path.
grep -q "COPY $BIN " Dockerfile || fail "Dockerfile does not COPY $BIN"
echo "static build OK"
