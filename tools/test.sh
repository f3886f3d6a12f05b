#!/usr/bin/env bash
# Sets up a fresh Debian machine, then builds and runs the whole test suite twice: an optimized
# build, and an AddressSanitizer + UndefinedBehaviorSanitizer build; then the tests of the
# threaded parts (server, device pools and workers, tenancy) in a ThreadSanitizer build.
# Warnings are errors in all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh --tests
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
# ATTND_KERNEL_VARIANTS=few: NVRTC is not instrumented, so the sanitizer build compiles only a
# few kernel variants (the release build compiles them all).
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ATTND_KERNEL_VARIANTS=few run_suite "asan+ubsan" build-asan -DCMAKE_BUILD_TYPE=Debug -DAT_ASAN=ON -DAT_UBSAN=ON

# TSan: the server end to end (C clients, attnd-bench's caller threads and the Python suites
# against a TSan attnd: the worker pool, tenants, quotas, reloads, fair share) and the tenancy
# unit tests that run threads. gRPC and ZeroMQ are not built with TSan; tests/tsan.supp says what
# that costs. It is built without the CUDA backend (the HIP one stays when its headers are
# here): the configuration of a fresh Debian, which has no CUDA toolkit, and of an AMD machine,
# so CI builds that too.
echo "== tsan: configure and build (build-tsan, without CUDA)"
cmake -S . -B build-tsan -DAT_WERROR=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAT_TSAN=ON \
  -DAT_WITH_CUDA=OFF >/dev/null
tsan_tests=(test_svc_e2e test_svc_tenants test_ten_tenant test_ab_bench test_svc_tuning)
cmake --build build-tsan -j"$jobs" --target attnd at_py_stubs "${tsan_tests[@]}"
echo "== tsan: ctest"
regex="^($(IFS='|'; echo "${tsan_tests[*]}")|test_interop|test_tenants|test_workers|test_tuning)\$"
(cd build-tsan && TSAN_OPTIONS="suppressions=$PWD/../tests/tsan.supp:halt_on_error=1" \
  ctest --output-on-failure --timeout 1500 -R "$regex")
echo "== all suites passed"
