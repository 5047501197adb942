#include "tensor/generator.h"

#include <cmath>
#include <numbers>

#include "tensor/error.h"
#include "tensor/philox.h"

namespace cnx {

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  philox4x32_10_inplace(c.data(), k[0], k[1]);  // tensor/philox.h: shared with CUDA kernels
  return c;
}

uint32_t Generator::next_u32() {
  const uint64_t block = offset_ / 4;
  if (!cached_valid_ || cached_block_ != block) {
    cached_ = philox4x32_10(
        {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u},
        {static_cast<uint32_t>(seed_), static_cast<uint32_t>(seed_ >> 32)});
    cached_block_ = block;
    cached_valid_ = true;
  }
  return cached_[offset_++ % 4];
}

double Generator::uniform() {
  const uint32_t hi = next_u32();  // two statements: the draw order is fixed
  const uint32_t lo = next_u32();
  return philox_uniform53(hi, lo);
}

double Generator::uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

double Generator::normal() {
  const double u1 = 1.0 - uniform();  // in (0, 1]: log is finite
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

double Generator::trunc_normal(double mean, double std, double lo, double hi) {
  CNX_CHECK(lo < hi && std > 0, "trunc_normal: need lo < hi and std > 0, got lo=", lo, " hi=", hi,
            " std=", std);
  for (int tries = 0; tries < 1000000; ++tries) {
    const double x = mean + std * normal();
    if (x >= lo && x <= hi) return x;
  }
  fail("trunc_normal: interval [", lo, ", ", hi, "] has no mass for mean ", mean, " std ", std);
}

bool Generator::bernoulli(double p) { return uniform() < p; }

}  // namespace cnx
