#!/usr/bin/env bash
# The default training run, from a fresh machine: installs what is missing (Fashion-MNIST
# included), builds build/convnext if needed, and trains a small ConvNeXt on Fashion-MNIST
# (on the GPU when the CUDA backend is there, else on the CPU). Extra arguments go to
# `convnext train`, e.g.  bash tools/train.sh --epochs 3 --output_dir runs/fmnist
set -euo pipefail
cd "$(dirname "$0")/.."

source tools/build_env.sh
[ -f "$BUILD_DIR/build.ninja" ] || cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD_DIR" --target convnext -j "$JOBS"
exec "$BUILD_DIR/convnext" train "$@"
