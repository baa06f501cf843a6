#!/usr/bin/env bash
# Builds edgemux and runs every test tier: the warnings-as-errors build with
# every test, the AddressSanitizer + UndefinedBehaviorSanitizer build, the
# ThreadSanitizer build with four worker loops, and each libFuzzer target
# for a bounded time. Installs what it needs first.
#   scripts/test.sh            everything
#   EMX_TEST_TIERS="unit abi" scripts/test.sh   only those ctest labels
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=$(nproc)
fuzz_seconds=${EMX_FUZZ_SECONDS:-20}

step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)"; }

step "dependencies"
scripts/deps.sh

labels=${EMX_TEST_TIERS:-}
label_args=()
if [ -n "$labels" ]; then
  label_args=(-L "$(echo "$labels" | tr ' ' '|')")
fi

step "build (-Werror)"
cmake -S . -B build/ci -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEMX_WERROR=ON >/dev/null
cmake --build build/ci -j "$jobs"

step "tests"
ctest --test-dir build/ci --output-on-failure -j "$jobs" "${label_args[@]}"

step "sanitizer build (address,undefined)"
CC=clang cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=Debug -DEMX_WERROR=ON \
  -DEMX_SANITIZE=address,undefined >/dev/null
cmake --build build/asan -j "$jobs"
# Unit and end-to-end tiers (the valgrind scenario runs in the plain build).
# A 32 MiB free quarantine (256 MiB by default) keeps the memory bounds the
# resource tests check meaningful; they allow harness.SLACK on top.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:quarantine_size_mb=32 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir build/asan --output-on-failure -j "$jobs" -L 'unit|abi|e2e' -E valgrind

step "thread sanitizer build (server.workers)"
# ThreadSanitizer over the multi-worker paths: the whole end-to-end tier
# with four worker loops in every edgemux (EMX_E2E_WORKERS; test_workers
# sets its own four). The valgrind scenario runs in the plain build only.
CC=clang cmake -S . -B build/tsan -DCMAKE_BUILD_TYPE=Debug -DEMX_WERROR=ON \
  -DEMX_SANITIZE=thread >/dev/null
cmake --build build/tsan -j "$jobs"
# The harness fails a test whose processes printed a TSan report.
TSAN_OPTIONS="second_deadlock_stack=1 suppressions=$root/tests/integration/e2e/tsan.supp" \
  EMX_E2E_WORKERS=4 \
  ctest --test-dir build/tsan --output-on-failure -j "$jobs" -L e2e -E valgrind

step "fuzz targets (${fuzz_seconds}s each)"
CC=clang cmake -S . -B build/fuzz -DCMAKE_BUILD_TYPE=Debug -DEMX_FUZZ=ON \
  -DEMX_SANITIZE=address,undefined >/dev/null
cmake --build build/fuzz -j "$jobs"
for bin in build/fuzz/tests/fuzz/fuzz_*; do
  [ -x "$bin" ] || continue
  name=$(basename "$bin")
  corpus="$root/tests/fuzz/corpus/${name#fuzz_}"
  work=$(mktemp -d)
  cp -r "$corpus"/. "$work"/ 2>/dev/null || true
  echo "--- $name"
  "$bin" -max_total_time="$fuzz_seconds" -timeout=5 -rss_limit_mb=2048 \
    -artifact_prefix="$root/build/fuzz/$name-" "$work" 2>&1 | tail -n 3
  rm -rf "$work"
done

step "all tests passed"
