#include "tensor/shape.h"

#include "tensor/error.h"

namespace cnx {

Shape::Shape(std::initializer_list<int64_t> dims) { init(dims.begin(), dims.size()); }
Shape::Shape(const std::vector<int64_t>& dims) { init(dims.data(), dims.size()); }

void Shape::init(const int64_t* d, size_t n) {
  CNX_CHECK(n <= static_cast<size_t>(kMaxRank), "Shape: rank ", n, " exceeds the maximum of ",
            kMaxRank);
  for (size_t i = 0; i < n; ++i) {
    CNX_CHECK(d[i] >= 0, "Shape: negative dimension ", d[i], " at index ", i);
    dims_[i] = d[i];
  }
  rank_ = static_cast<int>(n);
}

int64_t Shape::operator[](int i) const {
  int j = i < 0 ? i + rank_ : i;
  CNX_CHECK(j >= 0 && j < rank_, "Shape: index ", i, " out of range for ", str());
  return dims_[j];
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank_; ++i)
    CNX_CHECK(!__builtin_mul_overflow(n, dims_[i], &n), "Shape ", str(), ": the element count overflows int64");
  return n;
}

std::string Shape::str() const {
  std::string s = "[";
  for (int i = 0; i < rank_; ++i) s += (i ? ", " : "") + std::to_string(dims_[i]);
  return s + "]";
}

bool Shape::operator==(const Shape& o) const {
  if (rank_ != o.rank_) return false;
  for (int i = 0; i < rank_; ++i)
    if (dims_[i] != o.dims_[i]) return false;
  return true;
}

}  // namespace cnx
