#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, over the bundle of tools/gpu_bundle.sh
# (carried as dist/gpu): checks the bundle loads, then the phases named in $1 (comma-separated;
# default tests,hosttests,sanitize): tests (the GPU suites, tuning's too, and the launch-cache
# unit test), hosttests (test_att_cuda again with every call launched from the host),
# sanitize (compute-sanitizer memcheck and racecheck on a representative subset), bench (attnd bench-gpu
# plus the torch yardsticks), sweep (tiles side by side through bench-gpu --tile), mixsweep
# (the mixed batch's plan knobs through --plan), e2e (attnd serve on cuda:0 and the C client),
# serve (attnd-bench against a spawned attnd: decode on cuda:0 and on the null device), overlap
# (four sessions' calls through one worker thread, then two), launch (tools/launch_probe.c: a
# bare launch's host time by how long and how the host waited before it), cdp
# (tools/cdp_probe.c: a launch-free call's parts through device-side launches), tune (attnd tune on
# cuda:0 for llama-3.1-8b over the GPU bench's shapes, into a fresh store), tune64 (the same
# for the bench's 8-head D-64 shape), hip (the GPU suite and the tuning tests through the HIP
# backend on hip:0, run on this NVIDIA GPU by the HIP test double, then a short attnd tune
# --device hip:0), wgmma
# (the sm_90a wide tile: wgmma_check, the layouts alone; the GPU suite's prefill cases on both
# wide bodies; then prefill through bench-gpu with the wgmma tiles and the mma.sync one side by
# side).
# Logs go to $OUT (the device tool's folder), a summary to stdout.
set -uo pipefail
phases="${1:-tests,hosttests,sanitize}"
out="${OUT:-/tmp/attnd-gpu-out}"
mkdir -p "$out"
here="$(pwd)"
R="$here/dist/gpu/run"
has() { [[ ",$phases," == *",$1,"* ]]; }
status=0
note() { echo "== $*"; }

note "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
"$R" test_lc > "$out/test_lc.log" 2>&1 && note "test_lc passed (the bundle loads)" ||
  { note "test_lc FAILED"; tail -20 "$out/test_lc.log"; status=1; }
LD_LIBRARY_PATH="$here/dist/gpu/lib" ldd dist/gpu/bin/attnd | grep "not found" && status=1

# One test program of the bundle (environment assignments before the call reach it): its
# summary lines, and its failures when it fails.
gpu_test() { # name timeout-s
  local name=$1 limit=$2 log="$out/$1.log" rc
  if [ ! -f "dist/gpu/bin/$name" ]; then
    note "$name is not in the bundle"; status=1; return
  fi
  timeout "$limit" "$R" "$name" > "$log" 2>&1
  rc=$?
  grep -E "^GPU:|SKIP|PASSED|FAILED|^\[  FAILED|launch caches" "$log" | head -40
  [ $rc -eq 0 ] || { note "$name rc=$rc"; grep -B2 -A8 -E "FAIL|rror" "$log" | head -60; status=1; }
}

if has tests; then
  note "test_att_cuda (calls launched from the device where they can be)"
  gpu_test test_att_cuda 480
  note "test_att_cuda_tune"
  gpu_test test_att_cuda_tune 300
fi

if has hosttests; then
  note "test_att_cuda with ATTND_CUDA_LAUNCH=host (every call launched from the host)"
  cp "$out/test_att_cuda.log" "$out/test_att_cuda_device.log" 2>/dev/null
  ATTND_CUDA_LAUNCH=host gpu_test test_att_cuda 480
fi

if has wgmma; then
  # On sm_90 the default plan takes a wgmma wide tile; wide_bodies runs mma.sync and others.
  note "wgmma_check: the body's shared-memory layouts and fragments, alone"
  timeout 60 "$R" wgmma_check || status=1
  note "test_att_cuda: both wide bodies"
  ATTND_TEST_FILTER='*wide_bodies*' gpu_test test_att_cuda 300
  note "prefill: the default (wgmma 8,1,1,128,3,1 on sm_90), mma.sync and other wgmma tiles"
  for t in "" wide=4,2,1,32,3,0 wide=8,1,1,64,3,1 wide=8,1,1,64,4,1 wide=8,1,1,128,2,1 \
           wide=4,1,1,64,4,1; do
    timeout 120 "$R" attnd bench-gpu --cases prefill ${t:+--tile $t} > "$out/wgmma.log.tmp" 2>&1 ||
      status=1
    grep -E "^prefill|rror" "$out/wgmma.log.tmp" | sed "s/^/${t:-default} /"
    cat "$out/wgmma.log.tmp" >> "$out/wgmma_bench.log"
    rm -f "$out/wgmma.log.tmp"
  done
fi

if has hip; then
  double="$here/dist/gpu/lib/libattnd_hip_on_cuda_testdouble.so"
  note "test_att_hip (the HIP backend through the test double libattnd_hip_on_cuda_testdouble.so)"
  ATTND_HIP_LIB="$double" gpu_test test_att_hip 600
  note "test_att_hip_tune (tuning through the HIP backend and the test double)"
  ATTND_HIP_LIB="$double" gpu_test test_att_hip_tune 300
  note "attnd tune --device hip:0 (the test double: NVIDIA's times), one decode shape, fresh dir"
  rm -rf /tmp/attnd-tune-hip
  ATTND_HIP_LIB="$double" timeout 240 "$R" attnd tune --device hip:0 --model llama-3.1-8b \
    --tuning-dir /tmp/attnd-tune-hip --max-gib 24 --reps 3 --shapes 256x1@1024 > "$out/tune_hip.log" 2> "$out/tune_hip.err" ||
    status=1
  cat "$out/tune_hip.log"
  tr '\r' '\n' < "$out/tune_hip.err" | grep -vE "^ +[^ ]+ +\[" | tail -5
  "$R" attnd tune --show --tuning-dir /tmp/attnd-tune-hip > "$out/tune_hip_show.log" 2>&1 ||
    status=1
  cat "$out/tune_hip_show.log"
  note "e2e on hip:0 (worker processes, the HIP backend through the test double), C client"
  ATTND_E2E_GPU=hip:0 ATTND_HIP_LIB="$double" timeout 300 "$R" test_svc_e2e_gpu \
    > "$out/e2e_hip.log" 2>&1
  rc=$?
  grep -E "PASSED|FAILED|SKIP|matched|came back" "$out/e2e_hip.log" | head -10
  [ $rc -eq 0 ] || { note "e2e hip rc=$rc"; tail -30 "$out/e2e_hip.log"; status=1; }
fi

if has sanitize; then
  export LD_LIBRARY_PATH="$here/dist/gpu/lib:/tmp/attnd-nvrtc"
  export ATTND_CUDADEVRT="$here/dist/gpu/lib/libcudadevrt.a"
  # split-KV (the merge in the kernel), the device-resident block tables, the SM partitions, the
  # last wave's split tiles, q, k and v uploaded in one copy, q and out in host memory,
  # device-launched calls, the copy engine carrying a device-launched call's inputs
  for tool in memcheck racecheck; do
    for f in split_kv tables_follow mixed_on_partitions tail_split adjacent_tensors q_and_out \
             device_launched engine_copies; do
      note "compute-sanitizer $tool on *$f*"
      ATTND_TEST_FILTER="*$f*" timeout 300 compute-sanitizer --tool "$tool" --error-exitcode 99 \
        dist/gpu/bin/test_att_cuda > "$out/sanitizer_${tool}_$f.log" 2>&1
      rc=$?
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$out/sanitizer_${tool}_$f.log" | head
      [ $rc -eq 0 ] || { note "$tool rc=$rc"; head -40 "$out/sanitizer_${tool}_$f.log"; status=1; }
    done
  done
  unset LD_LIBRARY_PATH ATTND_CUDADEVRT
fi

if has bench; then
  note "torch yardsticks"
  PYTHONUNBUFFERED=1 timeout 200 python3 tools/gpu_torch_bench.py > "$out/torch.log" 2>&1
  cat "$out/torch.log"
  mm="$(awk '/^matmul_tflops/{print $2}' "$out/torch.log")"
  note "attnd bench-gpu"
  timeout 300 "$R" attnd bench-gpu --json "$out/bench_gpu.json" ${mm:+--matmul-tflops $mm} \
    > "$out/bench_gpu.log" 2>&1 || status=1
  cat "$out/bench_gpu.log" | tail -30
  note "attnd bench-gpu --plain-host (tensors staged through pinned buffers), decode"
  timeout 120 "$R" attnd bench-gpu --plain-host --cases decode > "$out/bench_gpu_plain.log" 2>&1 ||
    status=1
  grep -E "^tensors|^case|^decode" "$out/bench_gpu_plain.log"
  # Timed runs launch from the host (events around the kernels) and copy q and out; untimed
  # ones, as the server's, launch calls of one launch and partitioned mixed batches from the
  # device, and their kernels read q and write out in host memory. Then the same from the
  # host, with q and out copied, and with every device-launched call's inputs carried by the
  # copy engine (engine), side by side.
  for mode in device host staged engine; do
    note "attnd bench-gpu --no-timing (no events around the kernels, as in the server), $mode"
    if [ "$mode" = host ]; then export ATTND_CUDA_LAUNCH=host; fi
    if [ "$mode" = staged ]; then export ATTND_CUDA_IO=staged; fi
    timeout 120 "$R" attnd bench-gpu --no-timing --cases decode,prefill,mixed \
      $([ "$mode" = engine ] && echo --engine-copies) > "$out/bench_gpu_nt.log" 2>&1 || status=1
    unset ATTND_CUDA_LAUNCH ATTND_CUDA_IO
    grep -E "^case|^decode|^prefill|^mixed|launch from" "$out/bench_gpu_nt.log"
    cat "$out/bench_gpu_nt.log" >> "$out/bench_gpu_nt_all.log"
  done
fi

if has launch; then
  # The bare launch's host time by how long and how the host waited before it, in several
  # processes (it moves between them), then pinned to CPUs 0, 5 and 10.
  note "launch_probe: bare launch host time after waits (us, median/p90)"
  : > "$out/launch_probe.log"
  for a in "" "" "" "" "" "" "--cpu 0" "--cpu 5" "--cpu 10"; do
    # shellcheck disable=SC2086
    timeout 60 dist/gpu/bin/launch_probe $a >> "$out/launch_probe.log" 2>&1 || status=1
  done
  cat "$out/launch_probe.log"
fi

if has cdp; then
  # A launch-free call's parts through device-side launches, in three processes.
  note "cdp_probe: device-side launches from a resident kernel (us)"
  : > "$out/cdp_probe.log"
  for _ in 1 2 3; do
    timeout 120 "$R" cdp_probe >> "$out/cdp_probe.log" 2>&1 || status=1
  done
  cat "$out/cdp_probe.log"
fi

# One bench-gpu run of a sweep: its rows matching $1, labelled $2, on stdout; its log appended
# to sweep.log. The remaining arguments go to bench-gpu.
sweep_run() {
  local pat=$1 label=$2
  shift 2
  timeout 120 "$R" attnd bench-gpu "$@" > "$out/sweep.log.tmp" 2>&1
  grep -E "$pat" "$out/sweep.log.tmp" | sed "s/^/$label /"
  cat "$out/sweep.log.tmp" >> "$out/sweep.log"
  rm -f "$out/sweep.log.tmp"
}

if has sweep; then
  # Tiles side by side (attnd bench-gpu --tile KIND=warps_m,warp_mt,warps_n,tile_k,stages);
  # the first row of each group is the default plan.
  note "tile sweep: prefill (wide tiles)"
  for t in "" wide=4,1,1,64,2 wide=4,1,1,64,3 wide=8,1,1,64,2 wide=4,2,1,32,2 wide=8,2,1,32,2 \
           wide=4,2,1,64,3; do
    sweep_run "^prefill" "${t:-default}" --cases prefill ${t:+--tile $t}
  done
  note "tile sweep: decode and mixed (narrow tiles)"
  for t in "" narrow=1,1,4,64,3 narrow=1,1,4,64,4; do
    sweep_run "^decode|^mixed|floor" "${t:-default}" --cases decode,mixed ${t:+--tile $t} \
      ${mm:+--matmul-tflops $mm}
  done
fi

if has mixsweep; then
  note "plan sweep: mixed batch"
  # the default (on an H200: the 48-SM partition), every SM for both kinds, and other partitions
  # (mixed_part=always: taken whatever the batch's proportions)
  for t in "" "--plan mixed_wide_sms=off" "--plan mixed_wide_sms=off --plan mixed_split_keys=never" \
           "--plan mixed_wide_sms=off --plan mixed_order=narrow" \
           "--plan mixed_wide_sms=off --tile narrow=1,1,4,64,3" \
           "--plan mixed_part=always --plan mixed_wide_sms=32" \
           "--plan mixed_part=always --plan mixed_wide_sms=40" \
           "--plan mixed_part=always --plan mixed_wide_sms=56" \
           "--tile narrow=1,1,4,64,3"; do
    # shellcheck disable=SC2086
    sweep_run "^mixed|floor" "${t:-default}" --cases mixed $t ${mm:+--matmul-tflops $mm}
  done
fi

if has e2e; then
  note "e2e: in-process server with cpu and cuda:0, C client"
  timeout 200 "$R" test_svc_e2e_gpu > "$out/e2e.log" 2>&1
  rc=$?
  grep -E "PASSED|FAILED|SKIP|matched" "$out/e2e.log" | head -10
  [ $rc -eq 0 ] || { note "e2e rc=$rc"; tail -30 "$out/e2e.log"; status=1; }
  note "e2e: attnd serve --devices cpu,cuda:0, C client"
  rm -f /tmp/attnd.ready
  "$R" attnd serve --devices cpu,cuda:0 --listen 127.0.0.1:0 --ready-file /tmp/attnd.ready \
    --kernel-cache-dir /tmp/attnd-kc > "$out/serve.log" 2>&1 &
  spid=$!
  for _ in $(seq 100); do [ -f /tmp/attnd.ready ] && break; sleep 0.2; done
  ATTND_E2E_TARGET="$(cat /tmp/attnd.ready 2>/dev/null)" timeout 200 "$R" test_svc_e2e_gpu \
    > "$out/e2e_serve.log" 2>&1
  rc=$?
  kill -TERM "$spid"; wait "$spid"
  grep -E "PASSED|FAILED|SKIP|matched|server:" "$out/e2e_serve.log" | head -10
  grep -E "devices:|ready|error" "$out/serve.log" | head -10
  [ $rc -eq 0 ] || { note "e2e serve rc=$rc"; tail -30 "$out/e2e_serve.log"; status=1; }
fi
if has serve; then
  note "attnd-bench: decode on cuda:0 through the server, against the null device"
  timeout 240 "$R" attnd-bench --device cuda:0 --model llama-3.1-8b --ctx 4096 --batch 64 \
    --compare-null --duration 8 --json "$out/serve_bench.json" > "$out/serve_bench.log" 2>&1 ||
    status=1
  tail -12 "$out/serve_bench.log"
fi
if has overlap; then
  # Calls of several sessions on one GPU: one worker runs one batch at a time; two worker
  # threads share the context, so their calls overlap on the device.
  for w in 1 2; do
    note "attnd-bench: 4 sessions, 4 callers on cuda:0, $w worker thread(s)"
    timeout 120 "$R" attnd-bench --device cuda:0 --model llama-3.1-8b --ctx 4096 --batch 64 \
      --sessions 4 --callers 4 --duration 6 --server-arg=--workers-per-device=$w \
      --server-arg=--worker-mode=thread --json "$out/overlap_w$w.json" \
      > "$out/overlap_w$w.log" 2>&1 || status=1
    tail -8 "$out/overlap_w$w.log"
  done
fi
if has tune; then
  note "attnd tune --device cuda:0, llama-3.1-8b (fresh tuning dir; kernels compile on every CPU)"
  rm -rf /tmp/attnd-tune
  timeout 360 "$R" attnd tune --device cuda:0 --model llama-3.1-8b --tuning-dir /tmp/attnd-tune \
    --max-gib 24 --reps 3 > "$out/tune.log" 2> "$out/tune.err" || status=1
  cat "$out/tune.log"
  tr '\r' '\n' < "$out/tune.err" | grep -vE "^ +[^ ]+ +\[" | tail -5
  "$R" attnd tune --show --tuning-dir /tmp/attnd-tune > "$out/tune_show.log" 2>&1 || status=1
  cat "$out/tune_show.log"
fi
if has tune64; then
  # The GPU bench's second shape (8 query = 8 KV heads, D 64), which has no model preset.
  note "attnd tune --device cuda:0, the bench's 8-head D-64 shape"
  printf '%s\n' '{"name": "h8-d64", "description": "bench shape: 8 query / 8 KV heads, D 64",' \
    '"num_layers": 1, "num_query_heads": 8, "num_kv_heads": 8, "head_dim": 64,' \
    '"dtype": "bf16", "block_size": 16}' > /tmp/h8-d64.json
  rm -rf /tmp/attnd-tune64
  timeout 240 "$R" attnd tune --device cuda:0 --model /tmp/h8-d64.json \
    --tuning-dir /tmp/attnd-tune64 --max-gib 24 --reps 3 \
    --shapes 256x1@1024,256x1@8192,8x2048@0 > "$out/tune64.log" 2> "$out/tune64.err" || status=1
  cat "$out/tune64.log"
  tr '\r' '\n' < "$out/tune64.err" | grep -vE "^ +[^ ]+ +\[" | tail -5
fi
note "done (status $status)"
exit $status
