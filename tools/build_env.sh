# Sourced by tools/test.sh and tools/train.sh: installs what is missing, then sets what the
# build needs. nvcc may be installed without being on PATH (the CUDA toolkit's default prefix).
bash "$(dirname "${BASH_SOURCE[0]}")/install_deps.sh"
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ] && [ -z "${CUDACXX:-}" ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
