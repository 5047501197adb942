#!/usr/bin/env bash
# Every GPU check of the CUDA backend in one command, for the lent GPU machine (the `device`
# tool's `run`), which has CUDA, CMake, ninja, compute-sanitizer and PyTorch but none of the
# -dev packages. Prepare on the workstation, once:
#
#   ../shared/tools/device-deps.sh          # unpacks GoogleTest, Google Benchmark, ... into .deps/
#
# then on the device (carry [".deps"]):
#
#   bash tools/device_check.sh all          # or any of: build tests sanitize bench pytorch
#
# Steps (each writes under $OUT, the device tool's output folder; ./out/device elsewhere):
#   build     configure + build build-gpu/ for sm_90 against .deps           -> build.log
#   tests     every test (the GPU ones now run), CNX_CUDA_SYNC=1 off         -> ctest.log
#   sanitize  compute-sanitizer memcheck and racecheck (and initcheck) on the
#             GPU test binaries and the Cuda* tests of the bf16 / fused-op /
#             batch-finish files; the summaries                              -> sanitizer.log
#   bench     bench_cuda_kernels (JSON with the device in its context)       -> bench_cuda_kernels.{json,txt}
#   pytorch   tools/bench_pytorch.py, batch 128 and 256, eager and compile  -> bench_pytorch.json
# The device name and driver go to nvidia-smi.txt. At most 8 files come back (device README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/device}
mkdir -p "$OUT"
DEPS=$PWD/.deps/usr
export LD_LIBRARY_PATH=$DEPS/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
B=build-gpu
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)
[ "${steps[0]}" = all ] && steps=(build tests sanitize bench pytorch)
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

run_build() {
  [ -d "$DEPS" ] || { echo "device_check: .deps/ is missing: run ../shared/tools/device-deps.sh here and carry .deps"; return 1; }
  { cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$DEPS" \
        -DCMAKE_CUDA_ARCHITECTURES=90 && ninja -C $B; } > "$OUT/build.log" 2>&1
  local rc=$?
  tail -5 "$OUT/build.log"
  return $rc
}

run_tests() {
  ctest --test-dir $B -j 8 --output-on-failure > "$OUT/ctest.log" 2>&1
  local rc=$?
  grep -E "tests passed|tests failed|\(Failed\)|Timeout" "$OUT/ctest.log"
  return $rc
}

run_sanitize() {
  local rc=0
  : > "$OUT/sanitizer.log"
  # The CUDA test binaries, then the GPU tests (Cuda*) of the files that also hold CPU tests.
  local bins="test_cuda_dwconv test_cuda_ops test_cuda_backend"
  for t in test_bf16_ops test_bf16_dwconv test_bf16_gemm test_bf16_layernorm test_scaled_residual \
           test_amp test_batch_finish; do
    [ -x $B/tests/$t ] && bins="$bins $t"
  done
  for t in $bins; do
    for tool in memcheck racecheck initcheck; do
      # The golden model test is long under racecheck; it runs under memcheck only.
      local filter="*"
      case $t in test_cuda_*) ;; *) filter="Cuda*" ;; esac
      [ $tool != memcheck ] && [ $t = test_cuda_backend ] && filter="-*Golden*:*Training*"
      echo "== $tool $t (filter $filter)" >> "$OUT/sanitizer.log"
      compute-sanitizer --tool $tool --error-exitcode 99 $B/tests/$t --gtest_filter="$filter" \
          > /tmp/san.log 2>&1
      local r=$?
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|tests ran|PASSED|FAILED|Error|error" /tmp/san.log | head -40 >> "$OUT/sanitizer.log"
      echo "exit $r" >> "$OUT/sanitizer.log"
      [ $r -ne 0 ] && rc=1
    done
  done
  grep -E "^==|SUMMARY|exit" "$OUT/sanitizer.log"
  return $rc
}

run_bench() {
  $B/bench/bench_cuda_kernels --benchmark_format=json --benchmark_out="$OUT/bench_cuda_kernels.json" \
      --benchmark_out_format=json --benchmark_counters_tabular=true > "$OUT/bench_cuda_kernels.txt" 2>&1
  local rc=$?
  head -30 "$OUT/bench_cuda_kernels.txt"
  return $rc
}

run_pytorch() {
  python3 tools/bench_pytorch.py --batch 128 256 --modes eager compile --json "$OUT/bench_pytorch.json"
}

status=0
for s in "${steps[@]}"; do
  echo "=== $s"
  case $s in
    build) run_build || { status=1; break; } ;;
    tests) run_tests || status=1 ;;
    sanitize) run_sanitize || status=1 ;;
    bench) run_bench || status=1 ;;
    pytorch) run_pytorch || status=1 ;;
    *) echo "device_check: unknown step '$s' (build tests sanitize bench pytorch all)"; exit 2 ;;
  esac
done
exit $status
