#!/usr/bin/env python3
"""Checks that the emulated-device test suite launched every CUDA kernel instantiation.

Each test process of the emulator build writes, at exit, one line per kernel instantiation
compiled into it: "<launches>\\t<kernel name>" (CNX_EMU_COVERAGE_DIR, kernels/cuda/emulator).
This script adds the launches of every process, prints the table, and fails (exit 1) when one
of the project's kernel instantiations (namespace cnx::) was never launched: a kernel variant
(a dwconv tile plan, a LayerNorm specialisation, a bf16 form) that no test reaches. The tests'
own kernels are listed but not required (some run only in death-test children, which die
before they can report).

    tools/check_emulator_coverage.py build-emu/emu_coverage
"""
import argparse
import collections
import pathlib
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=pathlib.Path)
    args = parser.parse_args()
    files = sorted(args.directory.glob("*.txt"))
    if not files:
        print(f"check_emulator_coverage: no coverage files in {args.directory} "
              "(run the emulator tests with CNX_EMU_COVERAGE_DIR set)", file=sys.stderr)
        return 2
    launches = collections.Counter()
    for path in files:
        for line in path.read_text().splitlines():
            count, _, name = line.partition("\t")
            if name:
                launches[name] += int(count)
    project = {name for name in launches if name.startswith("cnx::")}
    missing = sorted(name for name in project if launches[name] == 0)
    width = max(len(str(n)) for n in launches.values())
    for name in sorted(launches):
        print(f"{launches[name]:>{width}}  {name}")
    print(f"{len(project) - len(missing)} of the project's {len(project)} kernel instantiations "
          f"launched by {len(files)} test processes ({len(launches) - len(project)} test kernels besides)")
    for name in missing:
        print(f"NOT LAUNCHED: {name}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
