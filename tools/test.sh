#!/usr/bin/env bash
# One command for a fresh Debian 12 machine with the CUDA toolkit (or without it):
# installs the missing build packages, configures, builds and runs the whole test suite.
#
#   bash tools/test.sh                # build/ in the repo root, Release
#   BUILD_DIR=out bash tools/test.sh  # elsewhere
#   JOBS=4 bash tools/test.sh         # parallel build and ctest jobs (default: nproc)
#
# GPU tests skip themselves (GTEST_SKIP, with the reason) when no CUDA device is visible.
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/build_env.sh
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS"
