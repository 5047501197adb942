#!/usr/bin/env bash
# CPU scaling of data-parallel training on this machine: the default model on Fashion-MNIST at a
# total batch of 128, as
#   one process with 1 OpenMP thread,
#   one process with N OpenMP threads (N = the cores), and
#   N ranks under mpirun with 1 thread each (batch 128 / N per rank),
# each for STEPS optimiser steps; images/s is read from the last log line (the steps after the
# first log line, so start-up is not counted).
#
#   bash tools/dist_scaling.sh [build dir] [output dir]     (defaults: build, bench/results/<date>-cpu/dist_scaling)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
out=${2:-bench/results/$(date +%F)-cpu/dist_scaling}
steps=${STEPS:-60}
cores=$(nproc)
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
common=(train --max_steps "$steps" --log_every 20 --progress_bar false --num_workers 1 --epochs 1)

run() {  # name, then the command
  local name=$1
  shift
  echo "== $name: $*" | tee "$out/$name.txt"
  "$@" 2>&1 | tee -a "$out/$name.txt" | grep -E "step .*img/s" | tail -1
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
  echo "mpirun: $(mpirun --version 2>/dev/null | head -1)"
} | tee "$out/machine.txt"

OMP_NUM_THREADS=1 run one_process_1_thread "$build/convnext" "${common[@]}" --batch_size 128
OMP_NUM_THREADS=$cores run "one_process_${cores}_threads" "$build/convnext" "${common[@]}" --batch_size 128
OMP_NUM_THREADS=1 run "${cores}_ranks_1_thread" mpirun -np "$cores" --oversubscribe -x OMP_NUM_THREADS \
  "$build/convnext" "${common[@]}" --batch_size $((128 / cores))

echo "images/s of the last log line (steps 41-60):"
for f in "$out"/*.txt; do
  [ "$(basename "$f")" = machine.txt ] && continue
  printf '  %-26s %s\n' "$(basename "$f" .txt)" "$(grep -E 'img/s' "$f" | tail -1 | sed -E 's/.*img\/s ([0-9.]+).*/\1/')"
done | tee "$out/summary.txt"
