#!/usr/bin/env bash
set -uo pipefail
out="${OUT:-/tmp/o}"; mkdir -p "$out"; R="$(pwd)/dist/gpu/run"
echo "== test_att_cuda (device launches on)"
timeout 150 "$R" test_att_cuda > "$out/t.log" 2>&1; echo "rc=$?"
grep -E "PASSED|FAILED" "$out/t.log" | sort | uniq -c; grep -B3 -A10 -E "FAIL" "$out/t.log" | head -30
echo "== bench-gpu --no-timing"
timeout 70 "$R" attnd bench-gpu --no-timing --cases decode,prefill,mixed > "$out/b.log" 2>&1; echo "rc=$?"
grep -E "^case|^decode|^prefill|^mixed|rror" "$out/b.log"
