#!/usr/bin/env bash
# Sets up a fresh Debian machine, builds attnd and runs its main job on the CPU backend.
# Extra arguments go to `attnd bench` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target attnd
exec build/service/attnd bench "$@"
