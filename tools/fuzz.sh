#!/usr/bin/env bash
# Fuzzes the file readers with libFuzzer under AddressSanitizer and UndefinedBehaviorSanitizer
# (tests/fuzz/README.md). Builds build-fuzz/ (clang, -DCNX_FUZZ=ON) if needed, replays the
# saved reproducers of tests/fuzz/regressions/<target>/, then runs each target for the given
# time on a copy of its seed corpus tests/fuzz/corpus/<target>/ (the committed corpus never
# grows). Exits non-zero on any finding, printing where its input was written.
#
#   bash tools/fuzz.sh                  # every target, 1800 s each
#   bash tools/fuzz.sh 60               # every target, 60 s each (CI: tools/test.sh)
#   bash tools/fuzz.sh 300 pnm jpeg     # some targets
#
#   FUZZ_JOBS=2        targets run at a time (default: nproc)
#   FUZZ_BUILD_DIR=... the build folder (default build-fuzz)
#   FUZZ_OUT=...       where the runs go (default $FUZZ_BUILD_DIR/runs/<date-time>): per target
#                      its log, its grown corpus and any crash-/leak-/timeout-/oom- file
#   FUZZ_KEEP_GOING=1  go on after a finding (libFuzzer -fork=1, -ignore_crashes...), to collect
#                      several; the exit status still says whether there was one
#   FUZZ_ARGS="..."    more libFuzzer flags (e.g. -seed=1 -max_len=8192)
#
# Limits: an input that allocates more than 2 GB at once, makes the process pass 4 GB, or takes
# more than 10 s is a finding, like a sanitizer report, a crash or an uncaught exception.
# To reproduce a finding: build-fuzz/tests/fuzz/fuzz_<target> <crash file>.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS_ALL=(safetensors checkpoint idx cifar pnm jpeg)
SECONDS_EACH=${1:-1800}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${TARGETS_ALL[@]}")
for t in "${TARGETS[@]}"; do
  [ -d "tests/fuzz/corpus/$t" ] || { echo "fuzz.sh: unknown target '$t' (${TARGETS_ALL[*]})" >&2; exit 2; }
done
BUILD=${FUZZ_BUILD_DIR:-build-fuzz}
JOBS=${FUZZ_JOBS:-$(nproc)}
LIMITS=(-malloc_limit_mb=2048 -rss_limit_mb=4096 -timeout=10)
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_NUM_THREADS=1  # one core per target

# ---- build ---------------------------------------------------------------------------------------
if [ ! -f "$BUILD/build.ninja" ]; then
  launcher=()
  command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DCNX_FUZZ=ON -DCNX_ENABLE_CUDA=OFF \
    -DCNX_BUILD_TESTS=OFF -DCNX_BUILD_BENCH=OFF "${launcher[@]}"
fi
cmake --build "$BUILD" -j "$(nproc)" --target "${TARGETS[@]/#/fuzz_}"

OUT=${FUZZ_OUT:-$BUILD/runs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
failed=()

# The lines of a log that say what went wrong: the sanitizer's or libFuzzer's report and the
# top of its stack.
show_report() {
  grep -E -A14 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|FUZZ_EXPECT|==[0-9]+== ERROR|uncaught exception' "$1" |
    grep -v -E '^INFO:|^MS:|^base unit:' | head -40 | sed 's/^/    /' || true
}

# ---- the saved reproducers ---------------------------------------------------------------------
for t in "${TARGETS[@]}"; do
  dir=tests/fuzz/regressions/$t
  files=()
  [ -d "$dir" ] && mapfile -t files < <(find "$dir" -type f ! -name '*.md' ! -name '.*' | sort)
  [ ${#files[@]} -eq 0 ] && continue
  for f in "${files[@]}"; do
    log=$OUT/regression-$t-$(basename "$f").log
    if "$BUILD/tests/fuzz/fuzz_$t" "${LIMITS[@]}" "$f" >"$log" 2>&1; then
      echo "fuzz.sh: $t: regression $f: ok"
    else
      echo "fuzz.sh: $t: regression $f: FAILS (log $log)"
      show_report "$log"
      failed+=("$t:$f")
    fi
  done
done

# ---- fuzzing -------------------------------------------------------------------------------------
run_target() {  # target: fuzzes it, writes $OUT/<target>/{log,status}
  local t=$1 dir=$OUT/$1
  mkdir -p "$dir/corpus"
  cp -r "tests/fuzz/corpus/$t/." "$dir/corpus/"
  local extra=()
  [ "${FUZZ_KEEP_GOING:-0}" = "1" ] && extra=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
  local rc=0
  # shellcheck disable=SC2086
  "$BUILD/tests/fuzz/fuzz_$t" "${LIMITS[@]}" -max_total_time="$SECONDS_EACH" \
    -print_final_stats=1 -artifact_prefix="$dir/" "${extra[@]}" ${FUZZ_ARGS:-} "$dir/corpus" \
    >"$dir/log" 2>&1 || rc=$?
  echo "$rc" >"$dir/status"
}

echo "fuzz.sh: fuzzing ${TARGETS[*]} for ${SECONDS_EACH} s each, $JOBS at a time, in $OUT"
running=0
for t in "${TARGETS[@]}"; do
  run_target "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

for t in "${TARGETS[@]}"; do
  dir=$OUT/$t
  rc=$(cat "$dir/status" 2>/dev/null || echo "?")
  # libFuzzer's last status line: "#<execs> DONE cov: .. ft: .. corp: .. exec/s: .. rss: .."
  # (fork mode: "#<execs>: cov: .. ft: .. corp: .. exec/s .. oom/timeout/crash: ..")
  stats=$(grep -E '^#[0-9]+' "$dir/log" | tail -1 |
          sed -E 's/^#([0-9]+):?[[:space:]]+([A-Z]+[[:space:]]+)?/execs \1 /; s/ lim: [0-9]+//; s/ (time|job|dft_time): [0-9]+s?//g')
  mapfile -t found < <(find "$dir" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'leak-*' \
                       -o -name 'timeout-*' -o -name 'oom-*' -o -name 'slow-unit-*' \) | sort)
  # slow units are not failures (libFuzzer reports them only with -report_slow_units).
  findings=()
  for f in "${found[@]}"; do [[ $(basename "$f") == slow-unit-* ]] || findings+=("$f"); done
  if [ "$rc" = "0" ] && [ ${#findings[@]} -eq 0 ]; then
    echo "fuzz.sh: $t: ok, ${SECONDS_EACH} s, $stats"
  else
    echo "fuzz.sh: $t: FINDING (exit $rc), ${SECONDS_EACH} s, $stats; log $dir/log"
    for f in "${findings[@]}"; do echo "    input: $f"; done
    show_report "$dir/log"
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: FAILED: ${failed[*]} (reproduce: $BUILD/tests/fuzz/fuzz_<target> <input>)"
  exit 1
fi
echo "fuzz.sh: no findings"
