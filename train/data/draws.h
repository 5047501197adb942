// The two small drawing helpers the augmentations share (train/data/augment.h explains the
// conventions): an integer in an inclusive range, and Python's round.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "tensor/generator.h"

namespace cnx::draws {

// An integer in [lo, hi] inclusive (Python's random.randint / torch.randint(lo, hi + 1)):
// lo + floor(gen.uniform() * (hi - lo + 1)), one uniform (two words).
inline int64_t randint(Generator& gen, int64_t lo, int64_t hi) {
  const int64_t n = hi - lo + 1;
  const auto k = static_cast<int64_t>(std::floor(gen.uniform() * static_cast<double>(n)));
  return lo + std::min(k, n - 1);
}

// Python's round(): nearest, ties to even (the default floating-point rounding mode).
inline int64_t py_round(double x) { return static_cast<int64_t>(std::nearbyint(x)); }

}  // namespace cnx::draws
