#!/usr/bin/env bash
# Builds attnd and the GPU test programs (build-cuda/, Release) and bundles them with the shared
# libraries they need for a machine that has an NVIDIA driver but none of our Debian packages
# (the lent GPU machine): dist/gpu/{bin,lib} and dist/gpu/run, a wrapper that sets
# LD_LIBRARY_PATH. glibc and libstdc++ are left to the target (it must be at least as new as this
# machine's). libcuda is never bundled: it comes with the driver. libnvrtc is bundled
# xz-compressed (109 MB raw) and unpacked by dist/gpu/run on first use. With the HIP backend built
# (Debian's libamdhip64-dev here), test_att_hip, test_att_hip_tune and the HIP test double
# (lib/libattnd_hip_on_cuda_testdouble.so: HIP on CUDA, test-only) come too: `gpu_run.sh hip`.
# With nvcc here, bin/wgmma_check too (tools/wgmma_check.cu: `gpu_run.sh wgmma`); always
# bin/launch_probe (tools/launch_probe.c: `gpu_run.sh launch`) and bin/cdp_probe
# (tools/cdp_probe.c: `gpu_run.sh cdp`, with lib/libcudadevrt.a).
# Usage: tools/gpu_bundle.sh            then carry dist/gpu (see tools/gpu_run.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
build=build-cuda
out=dist/gpu
cuda_lib=${AT_CUDA_ROOT:-/usr/local/cuda}/lib64
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DAT_WITH_CUDA=ON -DAT_WERROR=ON >/dev/null
targets=(attnd attnd-bench test_att_cuda test_att_cuda_tune test_lc test_svc_e2e_gpu
         launch_probe cdp_probe)
bins=("$build/service/attnd" "$build/bench/attnd-bench" "$build/tests/test_att_cuda"
      "$build/tests/test_att_cuda_tune" "$build/tests/test_lc" "$build/tests/test_svc_e2e_gpu")
hip=$(grep -q '^AT_HAVE_HIP:INTERNAL=ON' "$build/CMakeCache.txt" && echo 1 || echo 0)
if [ "$hip" = 1 ]; then
  targets+=(test_att_hip test_att_hip_tune attnd_hip_on_cuda_testdouble)
  bins+=("$build/tests/test_att_hip" "$build/tests/test_att_hip_tune")
fi
cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"
rm -rf "$out/bin" "$out/lib.new"
mkdir -p "$out/bin" "$out/lib.new"
cp "${bins[@]}" "$out/bin/"
# The wgmma body's layout self-check (gpu_run.sh wgmma): runtime linked statically, driver only.
nvcc=${AT_CUDA_ROOT:-/usr/local/cuda}/bin/nvcc
if [ -x "$nvcc" ]; then
  "$nvcc" -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a -I. -o "$out/bin/wgmma_check" \
    tools/wgmma_check.cu
else
  echo "no nvcc: dist/gpu has no wgmma_check"
fi
# The probes (tools/CMakeLists.txt): the bare launch's host time by wait (gpu_run.sh launch) and
# device-side launches (gpu_run.sh cdp, with lib/libcudadevrt.a below).
cp "$build/tools/launch_probe" "$build/tools/cdp_probe" "$out/bin/"
if [ "$hip" = 1 ]; then
  cp "$build/tests/libattnd_hip_on_cuda_testdouble.so" "$out/lib.new/"
fi
rm -rf "$out/bin/presets"
cp -r bench/presets "$out/bin/presets"
skip='^(libc|libm|libpthread|libdl|librt|libresolv|libstdc\+\+|libgcc_s|ld-linux-x86-64)\.so'
for b in "${bins[@]}"; do
  ldd "$b" | awk '/=> \//{print $3}'
done | sort -u | while read -r lib; do
  name=$(basename "$lib")
  [[ "$name" =~ $skip ]] || cp -L "$lib" "$out/lib.new/$name"
done
cp -L "$cuda_lib/libnvrtc-builtins.so.13.0" "$cuda_lib/libcudadevrt.a" "$out/lib.new/"
# xz of libnvrtc takes minutes: reuse it while the library is unchanged
src="$cuda_lib/libnvrtc.so.13"
stamp="$(stat -L -c '%s %Y' "$src")"
if [ ! -f "$out/libnvrtc.so.13.xz" ] || [ "$(cat "$out/libnvrtc.stamp" 2>/dev/null)" != "$stamp" ]; then
  xz -6 -T0 -c "$src" > "$out/libnvrtc.so.13.xz.tmp"
  mv "$out/libnvrtc.so.13.xz.tmp" "$out/libnvrtc.so.13.xz"
  echo "$stamp" > "$out/libnvrtc.stamp"
fi
rm -rf "$out/lib"
mv "$out/lib.new" "$out/lib"
cat > "$out/run" <<'WRAP'
#!/usr/bin/env bash
# dist/gpu/run PROGRAM [args]: runs a bundled program with the bundled libraries.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nv=/tmp/attnd-nvrtc
if [ ! -f "$nv/libnvrtc.so.13" ]; then
  mkdir -p "$nv"
  xz -dc "$here/libnvrtc.so.13.xz" > "$nv/libnvrtc.so.13.tmp" 2>/dev/null ||
    python3 -c "import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())" \
      "$here/libnvrtc.so.13.xz" > "$nv/libnvrtc.so.13.tmp"
  mv "$nv/libnvrtc.so.13.tmp" "$nv/libnvrtc.so.13"
fi
export LD_LIBRARY_PATH="$here/lib:$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# the device runtime library that device-launched calls link with (attention/att_cudl.h)
export ATTND_CUDADEVRT="${ATTND_CUDADEVRT:-$here/lib/libcudadevrt.a}"
prog="$1"
shift
exec "$here/bin/$prog" "$@"
WRAP
chmod +x "$out/run"
du -sh "$out"
