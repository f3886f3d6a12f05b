#!/usr/bin/env bash
# Sets up a fresh Debian machine, then builds and runs the whole test suite twice: an optimized
# build, and an AddressSanitizer + UndefinedBehaviorSanitizer build. Warnings are errors in both.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
jobs="$(nproc)"

run_suite() { # name build-dir cmake-args...
  local name=$1 dir=$2
  shift 2
  echo "== $name: configure and build ($dir)"
  cmake -S . -B "$dir" -DAT_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j"$jobs"
  echo "== $name: ctest"
  (cd "$dir" && ctest --output-on-failure -j"$jobs" --timeout 1500)
}

run_suite "release" build -DCMAKE_BUILD_TYPE=RelWithDebInfo
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  run_suite "asan+ubsan" build-asan -DCMAKE_BUILD_TYPE=Debug -DAT_ASAN=ON -DAT_UBSAN=ON
echo "== all suites passed"
