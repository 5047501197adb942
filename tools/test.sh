#!/usr/bin/env bash
# One command for a fresh Debian 12 machine with the CUDA toolkit (or without it):
# installs the missing build packages, configures, builds and runs the whole test suite.
#
#   bash tools/test.sh                # build/ in the repo root, Release
#   BUILD_DIR=out bash tools/test.sh  # elsewhere (and out-emu/, out-emu-asan/)
#   JOBS=4 bash tools/test.sh         # parallel build and ctest jobs (default: nproc)
#   CNX_TEST_EMULATOR=0 bash tools/test.sh   # only the first part
#   CNX_TEST_FUZZ=0 bash tools/test.sh       # without the fourth part
#
# 1. The real build (nvcc when present): every test. GPU tests skip themselves (GTEST_SKIP, with
#    the reason) when no CUDA device is visible.
# 2. With the CUDA toolkit's headers: the emulated CUDA device (kernels/cuda/emulator/README.md).
#    The GPU tests, which need no GPU there, run on the CPU with the race check (every launch
#    twice, in two thread orders), and must launch every kernel instantiation.
# 3. The same GPU tests in an emulator build with AddressSanitizer and UndefinedBehaviorSanitizer,
#    every tensor its own exact-size allocation (CNX_CUDA_NO_CACHING=1): out-of-bounds global and
#    shared-memory accesses of the kernels, with their source lines.
# 4. The fuzz targets of tests/fuzz (clang, libFuzzer, ASan + UBSan): the saved
#    reproducers, then every file reader fuzzed for 60 s (tools/fuzz.sh 60), two at a time
#    (in $BUILD_DIR-fuzz/).
#    Any sanitizer report, crash, timeout or allocation over the limits fails it.
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/build_env.sh
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS"

# The fourth suite, run last (also when the emulated-device suites are skipped for want of the
# CUDA headers).
fuzz_suite() {
  [ "${CNX_TEST_FUZZ:-1}" = "0" ] && return 0
  echo "test.sh: the file readers fuzzed (libFuzzer, ASan + UBSan), 60 s per target"
  local start=$SECONDS
  FUZZ_JOBS=2 FUZZ_BUILD_DIR="$BUILD_DIR-fuzz" bash tools/fuzz.sh 60
  echo "test.sh: fuzzing took $((SECONDS - start)) s (build included)"
}

[ "${CNX_TEST_EMULATOR:-1}" = "0" ] && exit 0
if [ ! -f "${CUDA_HOME:-/usr/local/cuda}/include/cuda_runtime.h" ]; then
  echo "test.sh: no CUDA toolkit headers (${CUDA_HOME:-/usr/local/cuda}/include): the emulated-device suite is skipped"
  fuzz_suite
  exit 0
fi

# The tests that need a CUDA device (and the emulator's own): every one of them has Cuda,
# Emulator or Cublas in its name. The binaries that hold them, and the CLI that test_cli runs.
GPU_TESTS='Cuda|Emulat|Cublas'
# Every tests/test_cuda_*.cpp, and the other files that hold such tests.
GPU_TARGETS=(convnext $(cd tests && ls test_cuda_*.cpp | sed 's/\.cpp$//')
             test_bf16_ops test_bf16_gemm test_bf16_layernorm test_bf16_dwconv test_bf16_weights
             test_scaled_residual test_batch_finish test_amp test_cli test_safetensors test_tensor
             test_emulator test_emulator_cublas)
# The two-rank tests (dist.Cuda: two emulated GPUs, NCCL over MPI) when MPI is there.
if command -v mpiexec >/dev/null 2>&1; then GPU_TARGETS+=(test_dist); fi

emulator_suite() {  # build dir, extra cmake flags...
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCNX_CUDA_EMULATOR=ON \
        -DCNX_BUILD_BENCH=OFF "$@"
  cmake --build "$dir" -j "$JOBS" --target "${GPU_TARGETS[@]}"
  ctest --test-dir "$dir" --output-on-failure -j "$JOBS" -R "$GPU_TESTS"
}

echo "test.sh: the GPU tests on the emulated CUDA device, race-checked"
CNX_EMU_RACECHECK=1 emulator_suite "$BUILD_DIR-emu"

echo "test.sh: the GPU tests on the emulated CUDA device under ASan + UBSan"
CNX_CUDA_NO_CACHING=1 ASAN_OPTIONS=detect_leaks=1 \
  emulator_suite "$BUILD_DIR-emu-asan" -DCNX_EMU_SANITIZE=ON

fuzz_suite
