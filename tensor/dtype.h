// Element types. f32 is the working type; f64 exists so that the CPU reference and the
// finite-difference gradient checks can run in double; bf16 is the planned mixed-precision
// activation type (storage and conversions exist now, kernels come later); i64 holds class
// labels, u8 raw image bytes, i32 general integers.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace cnx {

enum class DType : uint8_t { f32, f64, bf16, i64, i32, u8 };

constexpr int64_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::i64: return 8;
    case DType::i32: return 4;
    case DType::u8: return 1;
  }
  return 0;
}

constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::i64: return "i64";
    case DType::i32: return "i32";
    case DType::u8: return "u8";
  }
  return "?";
}

constexpr bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16;
}

// bfloat16: the top 16 bits of an IEEE float. Conversion from float rounds to nearest even;
// NaN stays NaN (quiet).
struct bf16 {
  uint16_t bits = 0;

  bf16() = default;
  explicit bf16(float f) : bits(from_float(f)) {}
  explicit operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }

  static uint16_t from_float(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
    uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // round half to even
    return static_cast<uint16_t>((u + rounding) >> 16);
  }
};

// The DType of a C++ element type: dtype_of<float>() == DType::f32.
template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<bf16>() { return DType::bf16; }
template <> constexpr DType dtype_of<int64_t>() { return DType::i64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::u8; }

}  // namespace cnx
