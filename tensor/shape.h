// Shape: up to 5 dimensions, int64_t sizes, row-major (the last dimension is contiguous).
// Images are NHWC: (N, H, W, C).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace cnx {

class Shape {
 public:
  static constexpr int kMaxRank = 5;

  Shape() = default;  // rank 0: a scalar with one element
  Shape(std::initializer_list<int64_t> dims);
  explicit Shape(const std::vector<int64_t>& dims);

  int rank() const { return rank_; }
  // dims[i]; negative i counts from the end (-1 is the last dimension).
  int64_t operator[](int i) const;
  int64_t numel() const;
  std::vector<int64_t> vec() const { return {dims_.begin(), dims_.begin() + rank_}; }
  std::string str() const;  // "[2, 3, 4]"

  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }

 private:
  void init(const int64_t* d, size_t n);
  std::array<int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

}  // namespace cnx
