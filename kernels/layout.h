// Index arithmetic for the NHWC layout, kept in one place.
#pragma once

#include <cstdint>

namespace cnx {

// Offsets into a contiguous (N, H, W, C) buffer: the channel is fastest.
struct NHWC {
  int64_t N, H, W, C;
  int64_t operator()(int64_t n, int64_t h, int64_t w, int64_t c) const {
    return ((n * H + h) * W + w) * C + c;
  }
  int64_t size() const { return N * H * W * C; }
};

}  // namespace cnx
