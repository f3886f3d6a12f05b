#!/usr/bin/env bash
# Installs the Debian packages attnd needs to build and run (and with --tests, to run the whole
# test suite), only those that are missing.
# Usage: tools/setup.sh [--tests]   (root, or a user with sudo)
set -euo pipefail

packages=(build-essential cmake pkg-config libcmocka-dev python3
  libgrpc-dev grpc-proto protobuf-compiler protobuf-c-compiler libprotobuf-c-dev libzmq3-dev
  libjansson-dev libssl-dev protobuf-compiler-grpc python3-grpcio python3-protobuf python3-numpy
  libamdhip64-dev rocm-device-libs)
# hipcc (with clang, llvm and lld 15) only compiles the kernels for gfx940 in a test.
if [ "${1:-}" = "--tests" ]; then
  packages+=(hipcc)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "setup: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
