#!/usr/bin/env bash
# Mutation testing with cargo-mutants on the modules that carry the product's promises. Slow
# (each mutant is a build plus the tests), so it is not part of CI or scripts/test.sh: run it by
# hand and record the survivors in docs/TESTING.md, each caught by a new test or explained as
# equivalent.
#
# Usage: scripts/mutants.sh [FILE...] [-- extra cargo-mutants args]
#   With no FILE, mutates src/outcome.rs, src/schedule/, src/dispatch.rs, src/deadletter.rs,
#   src/store/ and src/intake/. MUTANTS_TIMEOUT (seconds per test run, default 300) and
#   MUTANTS_JOBS (parallel builds, default 1) tune it. Kafka tests need POULPE_TEST_PYTHON and
#   POULPE_TEST_TANSU (see scripts/test.sh); without them those tests fail and every mutant
#   looks caught by them, so set them or pass `-- --test-package poulpe` filters accordingly.
# Results land in mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo mutants --version >/dev/null 2>&1; then
  echo "cargo-mutants is missing; installing it (cargo install --locked cargo-mutants)" >&2
  cargo install --locked cargo-mutants
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
  --jobs "${MUTANTS_JOBS:-1}" \
  "${extra[@]}"
