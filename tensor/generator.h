// A seeded, counter-based random number generator: Philox4x32-10 (Salmon et al., SC'11, the
// generator behind cuRAND's and PyTorch's CUDA streams).
//
// Why counter-based: the whole state is two integers, (seed, offset), so it is trivial to save
// in a checkpoint and restore bitwise, and the same draws can be reproduced on the GPU from
// (seed, offset) alone. Each call to the Philox function turns the 128-bit counter
// (offset / 4) and the 64-bit key (seed) into four 32-bit words; `offset` counts the words used.
#pragma once

#include <array>
#include <cstdint>

namespace cnx {

// One Philox4x32-10 block: counter (4 words) and key (2 words) to 4 random words.
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

class Generator {
 public:
  explicit Generator(uint64_t seed = 0) : seed_(seed) {}

  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }  // 32-bit words drawn so far
  void set_state(uint64_t seed, uint64_t offset) {
    seed_ = seed;
    offset_ = offset;
    cached_valid_ = false;
  }

  uint32_t next_u32();
  double uniform();                      // in [0, 1), 53 random bits
  double uniform(double lo, double hi);  // in [lo, hi)
  double normal();                       // standard normal (Box-Muller, one value per pair)
  // Normal(mean, std) restricted to [lo, hi] by rejection (the init of ConvNeXt uses
  // std 0.02 on [-2, 2], where a rejection is astronomically rare).
  double trunc_normal(double mean, double std, double lo, double hi);
  bool bernoulli(double p);  // true with probability p

 private:
  uint64_t seed_;
  uint64_t offset_ = 0;
  // The last Philox block computed: a cache only, the state is (seed_, offset_).
  bool cached_valid_ = false;
  uint64_t cached_block_ = 0;
  std::array<uint32_t, 4> cached_{};
};

}  // namespace cnx
