#!/usr/bin/env bash
# Every GPU check of the CUDA backend, sized for the lent GPU machine (the `device` tool's `run`):
# 15 minutes of device time per issue in all, the machine's start included, at most 10 minutes a
# command. It has CUDA, CMake, ninja, compute-sanitizer and PyTorch but none of the -dev
# packages. Prepare on the workstation, once:
#
#   ../shared/tools/device-deps.sh          # unpacks GoogleTest, Google Benchmark, ... into .deps/
#
# then on the device (carry [".deps"]), two calls:
#
#   bash tools/device_check.sh first        # under 8 minutes: build, GPU tests, step bench, eager baseline
#   bash tools/device_check.sh second       # compute-sanitizer, every kernel benchmark, torch.compile
#
# or any list of steps: build tests step pytorch_eager sanitize kernels pytorch_compile.
# Each step has its own time limit and writes its result under $OUT (the device tool's output
# folder; ./out/device elsewhere) as soon as it finishes, so a call cut short still returns
# everything done before the cut:
#   build            configure + build build-gpu/ for sm_90 against .deps: the GPU test binaries,
#                    bench_cuda_kernels, convnext (cuDNN optional: PyTorch's wheel copy is
#                    used when there is no system one)                             -> build.log
#   tests            the GPU tests (Cuda*, bf16, AMP, readback/upload)             -> ctest.log
#   step             the training-step benchmark: ConvNeXt-T fp32 and bf16, batch 128 and 256,
#                    launched kernel by kernel and replayed as a CUDA graph (_graph) -> bench_train_step.{json,txt}
#   pytorch_eager    tools/bench_pytorch.py eager, bf16 and fp32, batch 128 and 256 -> bench_pytorch_eager*.json
#   sanitize         compute-sanitizer memcheck, racecheck, initcheck on the GPU tests -> sanitizer.log
#   kernels          every kernel benchmark                                        -> bench_cuda_kernels.{json,txt}
#   pytorch_compile  tools/bench_pytorch.py torch.compile, bf16, batch 128 and 256 -> bench_pytorch_compile.json
# The device name and driver go to nvidia-smi.txt; a line per step with its time to steps.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/device}
mkdir -p "$OUT"
DEPS=$PWD/.deps/usr
export LD_LIBRARY_PATH=$DEPS/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
B=build-gpu
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)
case "${steps[0]}" in
  first) steps=(build tests step pytorch_eager) ;;
  second) steps=(build sanitize kernels pytorch_compile) ;;
  all) steps=(build tests step pytorch_eager sanitize kernels pytorch_compile) ;;
esac
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

run_build() {
  [ -d "$DEPS" ] || { echo "device_check: .deps/ is missing: run ../shared/tools/device-deps.sh here and carry .deps"; return 1; }
  # cuDNN only for the dwconv baselines: the system's, else the copy inside PyTorch's wheels.
  local cudnn_root
  cudnn_root=$(python3 -c 'import nvidia.cudnn, os; print(os.path.dirname(nvidia.cudnn.__file__))' 2>/dev/null || true)
  # A second call finds the build of the first one done (ninja has nothing left to do).
  { cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$DEPS" \
        -DCMAKE_CUDA_ARCHITECTURES=90 ${cudnn_root:+-DCNX_CUDNN_ROOT=$cudnn_root} &&
      ninja -C $B convnext bench_cuda_kernels $(gpu_test_binaries); } > "$OUT/build.log" 2>&1
  local rc=$?
  tail -5 "$OUT/build.log"
  return $rc
}

# The test binaries that hold GPU tests.
# Every tests/test_cuda_*.cpp (conv2d, BatchNorm, ReLU/max pool and the roadmap's models
# included), and the files that hold Cuda/Bf16/Amp tests besides.
gpu_test_binaries() {
  local t
  for t in $(cd tests && ls test_cuda_*.cpp | sed 's/\.cpp$//') test_bf16_ops test_bf16_dwconv \
           test_bf16_gemm test_bf16_layernorm test_bf16_weights test_scaled_residual test_amp \
           test_batch_finish; do
    [ -f tests/$t.cpp ] && echo $t
  done
}

run_tests() {
  # Only the binaries built above (a ctest -R over all would stop at the missing ones).
  local t rc=0
  : > "$OUT/ctest.log"
  for t in $(gpu_test_binaries); do
    local filter="*"
    case $t in test_cuda_*) ;; *) filter="*Cuda*:*Bf16*:*Amp*" ;; esac
    echo "== $t" >> "$OUT/ctest.log"
    $B/tests/$t --gtest_filter="$filter" --gtest_brief=1 >> "$OUT/ctest.log" 2>&1 || rc=1
  done
  grep -E "^==|PASSED|FAILED|tests ran" "$OUT/ctest.log"
  return $rc
}

run_sanitize() {
  local rc=0
  : > "$OUT/sanitizer.log"
  # The CUDA test binaries, then the GPU tests (Cuda*) of the files that also hold CPU tests.
  for t in $(gpu_test_binaries); do
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

run_step() {
  $B/bench/bench_cuda_kernels --benchmark_filter=train_step --benchmark_out="$OUT/bench_train_step.json" \
      --benchmark_out_format=json --benchmark_counters_tabular=true > "$OUT/bench_train_step.txt" 2>&1
  local rc=$?
  cat "$OUT/bench_train_step.txt" | tail -12
  return $rc
}

run_kernels() {
  $B/bench/bench_cuda_kernels --benchmark_filter=-train_step --benchmark_out="$OUT/bench_cuda_kernels.json" \
      --benchmark_out_format=json --benchmark_counters_tabular=true > "$OUT/bench_cuda_kernels.txt" 2>&1
  local rc=$?
  head -30 "$OUT/bench_cuda_kernels.txt"
  return $rc
}

run_pytorch_eager() {
  python3 tools/bench_pytorch.py --batch 128 256 --modes eager --precision bf16 --json "$OUT/bench_pytorch_eager.json" &&
    python3 tools/bench_pytorch.py --batch 128 256 --modes eager --precision fp32 --json "$OUT/bench_pytorch_eager_fp32.json"
}

run_pytorch_compile() {
  python3 tools/bench_pytorch.py --batch 128 256 --modes compile --precision bf16 --json "$OUT/bench_pytorch_compile.json"
}

# Runs step $1 under a time limit of $2 seconds, and logs its time and exit status.
timed() {
  local name=$1 limit=$2 t0=$SECONDS rc
  echo "=== $name (limit ${limit}s)"
  timeout --foreground -k 10 "$limit" bash -c "$(declare -f); B=$B; OUT=$OUT; DEPS=$DEPS; run_$name"
  rc=$?
  [ $rc -eq 124 ] && echo "device_check: $name ran past its ${limit}s limit"
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.log"
  return $rc
}

status=0
for s in "${steps[@]}"; do
  case $s in
    build) timed build 270 || { status=1; break; } ;;
    tests) timed tests 90 || status=1 ;;
    step) timed step 110 || status=1 ;;
    pytorch_eager) timed pytorch_eager 100 || status=1 ;;
    sanitize) timed sanitize 300 || status=1 ;;
    kernels) timed kernels 150 || status=1 ;;
    pytorch_compile) timed pytorch_compile 240 || status=1 ;;
    *) echo "device_check: unknown step '$s' (first second all, or: build tests step pytorch_eager sanitize kernels pytorch_compile)"; exit 2 ;;
  esac
done
exit $status
