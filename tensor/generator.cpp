#include "tensor/generator.h"

#include <cmath>
#include <numbers>

#include "tensor/error.h"

namespace cnx {

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = static_cast<uint64_t>(kMul0) * c[0];
    uint64_t p1 = static_cast<uint64_t>(kMul1) * c[2];
    uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c = {hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
    k[0] += kWeyl0;
    k[1] += kWeyl1;
  }
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
  const uint64_t hi = next_u32() >> 5;  // 27 bits
  const uint64_t lo = next_u32() >> 6;  // 26 bits
  return static_cast<double>((hi << 26) | lo) * 0x1.0p-53;
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
