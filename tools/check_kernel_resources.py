#!/usr/bin/env python3
"""Checks the sm_90 resource usage of the CUDA kernels of an nvcc build, without a GPU.

    python3 tools/check_kernel_resources.py build/CMakeFiles/cnx.dir/kernels/cuda/*.cu.o
    python3 tools/check_kernel_resources.py build/libcnx.a

Runs `cuobjdump --dump-resource-usage --gpu-architecture sm_90` on each object file or static
library (fat binaries: only the sm_90 ELF is read), prints every kernel's figures, and fails
(exit 1, one line per offence) when a kernel has
  - a stack frame (STACK > 0) or local memory (LOCAL > 0): register spills, or an array that
    the compiler could not keep in registers; either means traffic to local memory in what
    should be a register-resident hot loop;
  - more than 48 KB of static shared memory (the most a kernel can declare statically; only
    dynamic shared memory, with the cudaFuncSetAttribute opt-in, may go beyond).
A kernel named in ALLOWED below may use up to the figures listed there, so a known cost is
tolerated and any growth beyond it still fails. Registers are printed, not limited: each
kernel's __launch_bounds__ already makes ptxas cap them (and spill instead, which is caught).

cuobjdump comes from the CUDA toolkit (or PyPI's nvidia-cuda-cuobjdump). Without it the check
cannot run: it says so and exits 77 (ctest's SKIP_RETURN_CODE), or 2 with --require-cuobjdump.
Exit 2 also for a file that cannot be read, and when no sm_90 kernel is found at all (a wrong
path or a build without sm_90 must not pass as "no offence").
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

# The most static shared memory one kernel may declare (bytes): 48 KB on every architecture.
STATIC_SHARED_LIMIT = 48 * 1024

# Known costs, by demangled kernel name (a regular expression that must match the whole name
# with "(anonymous namespace)::" removed) -> the most STACK / LOCAL bytes it may use. Keep each
# entry with its reason and the figure measured when it was added; lower the figure when the
# kernel gets better, never raise it without saying why here. The figures are sm_90's (another
# --arch gives other figures: sm_80 has other stack frames).
ALLOWED: dict[str, dict[str, int]] = {
    # Measured with nvcc 13.0 for sm_90, -O3 (ptxas -v in brackets):
    # fp32 LayerNorm forward, fast path with 4 packs a thread and 8 or 16 threads a row:
    # REG 40, STACK 8 [8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads].
    r"void cnx::cuda::layernorm_forward_fast<float, (8|16), 4>\(.*\)": {"STACK": 8},
    # Global average pooling, float4 path: REG 40, STACK 8 [8 bytes stack frame, 4 bytes spill
    # stores, 4 bytes spill loads].
    r"void cnx::cuda::avgpool_forward_kernel<true>\(.*\)": {"STACK": 8},
    # The batch finish (normalise, erase, mix), every <C, G>: STACK 64 [64 bytes stack frame,
    # 0 bytes spill]: no spill; the by-value Normalization parameter is copied to the stack at
    # entry because the look-up-table fill indexes norm.mean / norm.std at run time.
    r"void cnx::cuda::batch_finish_kernel<[123], [14]>\(.*\)": {"STACK": 64},
}

@dataclass
class Kernel:
    mangled: str
    name: str  # demangled (or the mangled name where c++filt is missing)
    source: str  # the file (and archive member) it came from
    figures: dict[str, int]


def find_cuobjdump(explicit: str | None) -> str | None:
    if explicit:
        return explicit if os.path.isfile(explicit) else shutil.which(explicit)
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDAToolkit_ROOT"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def parse_resource_usage(text: str, arch: str, path: str) -> list[tuple[str, str, dict[str, int]]]:
    """(mangled name, source, figures) of every function of an ELF for `arch` in the output of
    cuobjdump -res-usage (one file; an archive lists its members as 'member ARCHIVE:NAME:')."""
    out = []
    source = path
    section = None  # "elf" or "ptx" for a fat binary; None for a plain cubin
    section_arch = None
    function = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("member "):
            source = s[len("member "):].rstrip(":")
            section, section_arch, function = None, None, None
        elif s == "Fatbin elf code:":
            section, section_arch, function = "elf", None, None
        elif s == "Fatbin ptx code:":
            section, section_arch, function = "ptx", None, None
        elif s.startswith("arch = "):
            section_arch = s[len("arch = "):]
        elif s.startswith("Function ") and s.endswith(":"):
            function = s[len("Function "):-1]
        elif function and s.startswith("REG:"):
            if section != "ptx" and (section_arch is None or section_arch == arch):
                figures = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", s)}
                out.append((function, source, figures))
            function = None
    return out


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    try:
        done = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True,
                              text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names
    return done if len(done) == len(names) else names


def clean(name: str) -> str:
    return name.replace("(anonymous namespace)::", "")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="object files (.o) or static libraries (.a)")
    parser.add_argument("--arch", default="sm_90", help="the ELF to read (default sm_90)")
    parser.add_argument("--cuobjdump", help="path of cuobjdump (default: PATH, CUDA_HOME, nvcc's)")
    parser.add_argument("--static-shared-limit", type=int, default=STATIC_SHARED_LIMIT,
                        help="bytes of static shared memory allowed (default 48 KB)")
    parser.add_argument("--require-cuobjdump", action="store_true",
                        help="exit 2 instead of 77 (skip) when cuobjdump is not found")
    args = parser.parse_args(argv)

    cuobjdump = find_cuobjdump(args.cuobjdump)
    if not cuobjdump:
        print("check_kernel_resources: cuobjdump not found (CUDA toolkit, or "
              "`pip install nvidia-cuda-cuobjdump`); pass --cuobjdump PATH or set CUOBJDUMP: "
              "the resource check did not run")
        return 2 if args.require_cuobjdump else 77

    raw: list[tuple[str, str, dict[str, int]]] = []
    for path in args.files:
        if not os.path.isfile(path):
            print(f"check_kernel_resources: no such file: {path}")
            return 2
        r = subprocess.run([cuobjdump, "--dump-resource-usage", "--gpu-architecture", args.arch,
                            path], capture_output=True, text=True)
        if r.returncode != 0:
            if "does not contain device code" in r.stdout + r.stderr:
                continue  # a host-only object (an archive skips those itself)
            print(f"check_kernel_resources: {cuobjdump} failed on {path} (exit {r.returncode}):\n"
                  f"{(r.stderr or r.stdout).strip()}")
            return 2
        raw.extend(parse_resource_usage(r.stdout, args.arch, path))
    if not raw:
        print(f"check_kernel_resources: no {args.arch} kernel in {' '.join(args.files)}")
        return 2

    names = demangle([m for m, _, _ in raw])
    kernels = sorted((Kernel(m, clean(n), src, fig) for (m, src, fig), n in zip(raw, names)),
                     key=lambda k: k.name)

    offences: list[str] = []
    used: set[str] = set()
    allowed_of = {}
    for k in kernels:
        limits = {"STACK": 0, "LOCAL": 0}
        for pattern, allowance in ALLOWED.items():
            if re.fullmatch(pattern, k.name):
                limits.update(allowance)
                used.add(pattern)
                allowed_of[k.mangled] = allowance
        for field, what in (("STACK", "stack frame (register spills or local arrays)"),
                            ("LOCAL", "local memory")):
            value = k.figures.get(field, 0)
            if value > limits[field]:
                limit = f" (allowed {limits[field]})" if limits[field] else ""
                offences.append(f"FAIL {k.name}: {field} {value} bytes: {what}{limit}")
        shared = k.figures.get("SHARED", 0)
        if shared > args.static_shared_limit:
            offences.append(f"FAIL {k.name}: SHARED {shared} bytes of static shared memory "
                            f"> {args.static_shared_limit}")

    print(f"{'REG':>4} {'STACK':>6} {'SHARED':>7} {'LOCAL':>6}  kernel ({args.arch}, "
          f"{len(kernels)} kernels)")
    # A kernel of an unnamed namespace can appear once per file that includes it: say which.
    seen = [k.name for k in kernels]
    for k in kernels:
        f = k.figures
        where = f"  [{os.path.basename(k.source)}]" if seen.count(k.name) > 1 else ""
        mark = "  [allowed]" if k.mangled in allowed_of else ""
        print(f"{f.get('REG', 0):4d} {f.get('STACK', 0):6d} {f.get('SHARED', 0):7d} "
              f"{f.get('LOCAL', 0):6d}  {k.name}{where}{mark}")

    for pattern in ALLOWED:
        if pattern not in used:
            print(f"note: the allow-list entry {pattern!r} matches no kernel (remove it?)")
    for k in kernels:
        allowance = allowed_of.get(k.mangled)
        if allowance and all(k.figures.get(f, 0) < v for f, v in allowance.items()):
            print(f"note: {k.name} now uses less than its allowance {allowance}: lower it")

    if offences:
        print()
        for line in offences:
            print(line)
        print(f"{len(offences)} offence(s) in {len(kernels)} kernels")
        return 1
    print(f"OK: {len(kernels)} kernels, no spill, stack frame or local memory beyond the "
          f"allow-list, static shared memory <= {args.static_shared_limit} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
