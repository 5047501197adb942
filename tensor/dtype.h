// Element types. f32 is the working type; f64 exists so that the CPU reference and the
// finite-difference gradient checks can run in double; bf16 is the mixed-precision activation
// type (activations and GEMM inputs in bf16; parameters, optimiser state, statistics and
// reductions stay fp32: see param_t below); f16 is storage only
// (checkpoints saved in half precision); i64 holds class labels, u8 raw image bytes, i32
// general integers.
#pragma once

#include <bit>
#include <cstdint>
#include <string>
#include <type_traits>

namespace cnx {

enum class DType : uint8_t { f32, f64, bf16, f16, i64, i32, u8 };

constexpr int64_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::f16: return 2;
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
    case DType::f16: return "f16";
    case DType::i64: return "i64";
    case DType::i32: return "i32";
    case DType::u8: return "u8";
  }
  return "?";
}

constexpr bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16 || t == DType::f16;
}

// bfloat16: the top 16 bits of an IEEE float. Conversion from float rounds to nearest even;
// NaN stays NaN (quiet).
struct bf16 {
  uint16_t bits = 0;

  bf16() = default;
  explicit bf16(float f) : bits(from_float(f)) {}
  explicit operator float() const { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

  static uint16_t from_float(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
    uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // round half to even
    return static_cast<uint16_t>((u + rounding) >> 16);
  }
};

// IEEE 754 binary16. Conversion from float rounds to nearest even, overflows to infinity and
// keeps subnormals; NaN stays NaN.
struct f16 {
  uint16_t bits = 0;

  f16() = default;
  explicit f16(float f) : bits(from_float(f)) {}
  explicit operator float() const {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t exp = (bits >> 10) & 0x1fu, man = bits & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
      u = sign | 0x7f800000u | (man << 13);  // inf or NaN
    } else if (exp != 0) {
      u = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
    } else if (man == 0) {
      u = sign;  // zero
    } else {     // subnormal: value = man * 2^-24, exact in float
      u = sign | std::bit_cast<uint32_t>(static_cast<float>(man) * 0x1.0p-24f);
    }
    return std::bit_cast<float>(u);
  }

  static uint16_t from_float(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
    if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
    if (a < 0x38800000u) {  // below 2^-14: subnormal or zero; round a * 2^24 to an integer
      const float scaled = std::bit_cast<float>(a) * 0x1.0p24f;  // exact; < 1024
      uint32_t m = static_cast<uint32_t>(scaled);
      const float rest = scaled - static_cast<float>(m);
      if (rest > 0.5f || (rest == 0.5f && (m & 1u))) ++m;  // to nearest even
      return static_cast<uint16_t>(sign | m);
    }
    // Normal: drop 13 mantissa bits with round to nearest even, rebias the exponent.
    const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13));
  }
};

// The DType of a C++ element type: dtype_of<float>() == DType::f32.
template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<bf16>() { return DType::bf16; }
template <> constexpr DType dtype_of<f16>() { return DType::f16; }
template <> constexpr DType dtype_of<int64_t>() { return DType::i64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::u8; }

// Mixed precision: the element type of the parameters (weights, biases, layer-scale gammas)
// and of the saved statistics (LayerNorm mean and rstd) of an op whose activations are T.
// bf16 activations keep fp32 parameters and statistics; f32 and f64 ops use T throughout.
template <class T> using param_t = std::conditional_t<std::is_same_v<T, bf16>, float, T>;
constexpr DType param_dtype(DType activations) {
  return activations == DType::bf16 ? DType::f32 : activations;
}

}  // namespace cnx
