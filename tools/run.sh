#!/usr/bin/env bash
# Sets up a fresh Debian machine, builds attnd and serves attnd.v1.Attention over gRPC on the CPU
# backend (127.0.0.1:50051 unless --listen says otherwise). Extra arguments go to `attnd serve`.
# Call it from another shell with the example client: tools/example_client.py 127.0.0.1:50051
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target attnd at_py_stubs
echo "attnd: serving; call it with: tools/example_client.py 127.0.0.1:50051 (Ctrl-C stops)" >&2
exec build/service/attnd serve "$@"
