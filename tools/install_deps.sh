#!/usr/bin/env bash
# Installs the Debian packages the build needs, only those missing. Needs root (or sudo) when
# something is missing; does nothing otherwise. The CUDA toolkit is optional and not installed
# here: without nvcc the build is CPU-only.
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config  # the build
  libgtest-dev                      # tests
  libbenchmark-dev                  # bench/
  nlohmann-json3-dev                # safetensors headers, metadata
  libcli11-dev                      # the convnext command line
  libopenblas-dev                   # f32 CPU matrix products (optional: without it, the loops)
  zlib1g-dev                        # Fashion-MNIST .gz files
  libturbojpeg0-dev                 # JPEG decoding (ImageFolder datasets)
  libboost-context-dev              # the emulated CUDA device's fibers (kernels/cuda/emulator)
  llvm                              # llvm-symbolizer: source lines in the sanitizer reports
  clang libclang-rt-14-dev          # the fuzz targets (tests/fuzz): clang's libFuzzer, sanitizers
  libomp-dev                        # OpenMP for the clang build of the library (tests/fuzz)
  libopenmpi-dev openmpi-bin        # data-parallel ranks (train/dist/; mpirun runs the 2-rank tests)
  dataset-fashion-mnist             # the default training data (/usr/share/datasets/fashion-mnist)
)

# cuobjdump, for the sm_90 resource check of the real build (ctest kernels.resource_usage_sm90,
# tools/check_kernel_resources.py). Some CUDA installs have nvcc without it; NVIDIA's wheel
# carries it, unpacked into .deps-py/ in the repository (git-ignored; CMake looks there).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if { command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; } &&
   ! command -v cuobjdump >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/cuobjdump ] &&
   [ ! -x "$root/.deps-py/cuobjdump/nvidia/cu13/bin/cuobjdump" ]; then
  echo "install_deps: installing cuobjdump (pip: nvidia-cuda-cuobjdump) into .deps-py/"
  python3 -m pip install -q --disable-pip-version-check --target "$root/.deps-py/cuobjdump" \
    'nvidia-cuda-cuobjdump>=13,<14' ||
    echo "install_deps: could not install cuobjdump: the kernel resource check will be skipped" >&2
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install_deps: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
