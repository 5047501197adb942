// safetensors: round trips of every dtype, byte layouts checked independently of the writer and
// reader (a file laid out by hand; the writer's bytes parsed with nlohmann::json), every
// malformed header or buffer refused with a message that says what is wrong, and atomic writes.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>  // the system include path (nlohmann-json3-dev); cnx links it privately
#include <sstream>

#include "models/safetensors.h"
#include "tensor/tensor.h"
#include "tests/testing.h"

using namespace cnx;
using cnx::test::expect_error;
namespace fs = std::filesystem;

namespace {

// ---- byte helpers, written independently of models/safetensors.cpp ---------------------------

std::string u64le(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

uint64_t read_u64le(const std::string& s) {
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(s[i])) << (8 * i);
  return n;
}

// A file: the header size, the header, the data buffer.
std::string file_of(const std::string& header, const std::string& data = "") {
  return u64le(header.size()) + header + data;
}

std::string raw(std::initializer_list<int> bytes) {
  std::string s;
  for (int b : bytes) s += static_cast<char>(b);
  return s;
}

template <class T> std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

std::string tensor_bytes(const Tensor& t) {
  return std::string(static_cast<const char*>(t.raw_data()), static_cast<size_t>(t.nbytes()));
}

// A base file that the reader accepts: "a" F32 [2] at [0, 8), "b" F32 [1] at [8, 12).
// The malformed cases below change one thing in it.
const std::string kGoodData(12, '\x01');
// Strings are built with += rather than "literal" + std::string: GCC 12 warns wrongly about
// the latter (-Wrestrict, GCC bug 105651).
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  int64_t begin, int64_t end) {
  std::string s = "\"";
  s += name;
  s += "\":{\"dtype\":\"";
  s += dtype;
  s += "\",\"shape\":";
  s += shape;
  s += ",\"data_offsets\":[";
  s += std::to_string(begin);
  s += ",";
  s += std::to_string(end);
  s += "]}";
  return s;
}
// A header object of the given entries.
std::string object(std::initializer_list<std::string> entries) {
  std::string s = "{";
  for (const std::string& e : entries) {
    if (s.size() > 1) s += ",";
    s += e;
  }
  s += "}";
  return s;
}
std::string good_header() { return object({entry("a", "F32", "[2]", 0, 8), entry("b", "F32", "[1]", 8, 12)}); }

const std::string kWhat = "bad.safetensors";

// parse_safetensors refuses `bytes` with a one-line message that starts with the name and
// contains every part.
void expect_rejected(const std::string& bytes, const std::vector<std::string>& parts) {
  expect_error([&] { (void)parse_safetensors(bytes, kWhat); }, parts);
  try {
    (void)parse_safetensors(bytes, kWhat);
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(kWhat + ": ", 0), 0u) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

// A fresh directory under the test temp dir, removed afterwards.
class SafetensorsFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::path(::testing::TempDir()) / "cnx_safetensors_XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr) << pattern;
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  static void write_bytes(const std::string& p, const std::string& bytes) {
    std::ofstream f(p, std::ios::binary);
    f << bytes;
  }
  static std::string read_bytes(const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }
  // The names in the directory (to see that no temporary file was left behind).
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  fs::path dir_;
};

std::vector<std::pair<std::string, Tensor>> every_dtype() {
  const float f16_values[] = {1.0f, -2.5f, 65504.0f, 0x1.0p-24f};  // max and smallest subnormal
  std::vector<f16> halves;
  for (float v : f16_values) halves.push_back(f16(v));
  std::vector<bf16> brains = {bf16(1.0f), bf16(-3.0e38f), bf16(0x1.0p-130f)};
  return {
      {"f32", Tensor::from_data<float>({2, 3}, {0.5f, -1.0f, 3.25f, 1e-30f, -0.0f, 7.0f})},
      {"f16", Tensor::from_data<f16>({4}, halves)},
      {"bf16", Tensor::from_data<bf16>({3, 1}, brains)},
      {"f64", Tensor::from_data<double>({2, 1, 2}, {1.0 / 3, -2e300, 5e-324, 42.0})},
      {"i64", Tensor::from_data<int64_t>({3}, {std::numeric_limits<int64_t>::min(), -1,
                                               std::numeric_limits<int64_t>::max()})},
      {"i32", Tensor::from_data<int32_t>({2}, {std::numeric_limits<int32_t>::min(), 123456})},
      {"u8", Tensor::from_data<uint8_t>({1, 1, 1, 1, 5}, {0, 1, 127, 200, 255})},
  };
}

// Same names, order, dtypes, shapes and bytes.
void expect_same_tensors(const std::vector<std::pair<std::string, Tensor>>& got,
                         const std::vector<std::pair<std::string, Tensor>>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE(want[i].first);
    EXPECT_EQ(got[i].first, want[i].first);
    const Tensor& g = got[i].second;
    const Tensor& w = want[i].second;
    ASSERT_TRUE(g.defined());
    EXPECT_EQ(g.dtype(), w.dtype());
    EXPECT_EQ(g.shape(), w.shape()) << g.shape().str() << " vs " << w.shape().str();
    EXPECT_TRUE(g.device().is_cpu());
    EXPECT_EQ(tensor_bytes(g), tensor_bytes(w.to(Device::cpu())));
  }
}

}  // namespace

// ---- round trips -----------------------------------------------------------------------------

TEST(Safetensors, RoundTripsEveryDType) {
  const auto tensors = every_dtype();
  const Safetensors back = parse_safetensors(serialize_safetensors(tensors), "mem");
  expect_same_tensors(back.tensors, tensors);
  EXPECT_TRUE(back.metadata.empty());
  // Bit patterns, not just byte equality of the same buffer: f16/bf16 through their structs.
  EXPECT_EQ(back.find("f16").to_vector<f16>()[2].bits, 0x7bffu);   // 65504
  EXPECT_EQ(back.find("f16").to_vector<f16>()[3].bits, 0x0001u);   // 2^-24
  EXPECT_EQ(back.find("bf16").to_vector<bf16>()[0].bits, 0x3f80u); // 1.0
  EXPECT_EQ(back.find("i64").to_vector<int64_t>()[0], std::numeric_limits<int64_t>::min());
  EXPECT_EQ(back.find("u8").to_vector<uint8_t>()[4], 255);
}

TEST(Safetensors, RoundTripsScalarsAndZeroSizeTensors) {
  const std::vector<std::pair<std::string, Tensor>> tensors = {
      {"empty_first", Tensor::empty({0}, DType::f32)},
      {"scalar", Tensor::from_data<float>(Shape{}, {3.25f})},
      {"empty_middle", Tensor::empty({2, 0, 3}, DType::i64)},
      {"vector", Tensor::from_data<int32_t>({2}, {5, -6})},
      {"scalar_u8", Tensor::from_data<uint8_t>(Shape{}, {9})},
      {"empty_last", Tensor::empty({0, 4}, DType::bf16)},
  };
  const std::string bytes = serialize_safetensors(tensors);
  const Safetensors back = parse_safetensors(bytes, "mem");
  expect_same_tensors(back.tensors, tensors);
  EXPECT_EQ(back.find("scalar").rank(), 0);
  EXPECT_EQ(back.find("scalar").item(), 3.25);

  // Only zero-size tensors: an empty data buffer. No tensors at all: "{}".
  const std::vector<std::pair<std::string, Tensor>> empties = {
      {"x", Tensor::empty({0}, DType::f64)}, {"y", Tensor::empty({3, 0}, DType::u8)}};
  expect_same_tensors(parse_safetensors(serialize_safetensors(empties), "mem").tensors, empties);
  const Safetensors none = parse_safetensors(serialize_safetensors({}), "mem");
  EXPECT_TRUE(none.tensors.empty());
  EXPECT_TRUE(none.metadata.empty());
}

TEST(Safetensors, RoundTripsMetadata) {
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"quote \" and newline \n", "tab\t backslash \\ unicode \xc3\xa9\xe2\x82\xac"},
      {"", "empty key"},
      {"empty value", ""},
  };
  const std::vector<std::pair<std::string, Tensor>> tensors = {
      {"w", Tensor::from_data<float>({1}, {2.0f})}};
  const Safetensors back = parse_safetensors(serialize_safetensors(tensors, metadata), "mem");
  EXPECT_EQ(back.metadata, metadata);
  expect_same_tensors(back.tensors, tensors);
  // Metadata with no tensors.
  EXPECT_EQ(parse_safetensors(serialize_safetensors({}, metadata), "mem").metadata, metadata);
}

TEST(Safetensors, KeepsTheGivenOrderNotTheNameOrder) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const char* name : {"zeta", "alpha", "mu", "Beta", "_x", "alpha.2"})
    tensors.emplace_back(name, Tensor::full({2}, static_cast<double>(tensors.size()), DType::f32));
  const Safetensors back = parse_safetensors(serialize_safetensors(tensors), "mem");
  expect_same_tensors(back.tensors, tensors);
  EXPECT_EQ(back.find("mu").to_vector<float>()[0], 2.0f);
  EXPECT_FALSE(back.find("nope").defined());
}

TEST(Safetensors, DataBufferStartsAtAMultipleOfEight) {
  // Names of every length mod 8 move the header's natural end around.
  for (int len = 1; len <= 17; ++len) {
    SCOPED_TRACE(len);
    const std::vector<std::pair<std::string, Tensor>> tensors = {
        {std::string(len, 'n'), Tensor::from_data<uint8_t>({3}, {1, 2, 3})}};
    const std::string bytes = serialize_safetensors(tensors);
    const uint64_t n = read_u64le(bytes);
    EXPECT_EQ((8 + n) % 8, 0u);
    EXPECT_EQ(bytes.size(), 8 + n + 3);
    // Padding is spaces after the closing brace, nothing else.
    const std::string header = bytes.substr(8, n);
    const size_t close = header.rfind('}');
    ASSERT_NE(close, std::string::npos);
    EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos) << header;
    EXPECT_LT(n - close - 1, 8u);
  }
}

// ---- the byte layout, checked independently ----------------------------------------------------

TEST(Safetensors, ReadsAFileLaidOutByHand) {
  // Offsets in an order that is neither the header's nor the names', unaligned, padded header.
  const std::string header =
      object({entry("k_i64", "I64", "[1]", 33, 41), entry("w_f64", "F64", "[1]", 0, 8),
              "\"__metadata__\":{\"format\":\"pt\",\"note\":\"by hand\"}",
              entry("a_u8", "U8", "[3]", 24, 27), entry("x_f32", "F32", "[1, 2]", 16, 24),
              entry("c_i32", "I32", "[2]", 8, 16), entry("b_bf16", "BF16", "[]", 31, 33),
              entry("m_f16", "F16", "[2,1]", 27, 31), entry("z_empty", "F32", "[0, 3]", 41, 41)}) +
      "     ";
  const std::string data = raw({0, 0, 0, 0, 0, 0, 0xf0, 0x3f}) +  // f64 1.0
                           raw({7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}) +  // i32 7, -1
                           raw({0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0}) +  // f32 1.5, -2.0
                           raw({0, 200, 255}) +                     // u8
                           raw({0x00, 0x3c, 0x00, 0xc0}) +          // f16 1.0, -2.0
                           raw({0x80, 0x3f}) +                      // bf16 1.0
                           raw({0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff});  // i64 -2
  ASSERT_EQ(data.size(), 41u);
  const Safetensors st = parse_safetensors(file_of(header, data), "hand");

  std::vector<std::string> names;
  for (const auto& [name, t] : st.tensors) names.push_back(name);
  EXPECT_EQ(names, (std::vector<std::string>{"w_f64", "c_i32", "x_f32", "a_u8", "m_f16",
                                             "b_bf16", "k_i64", "z_empty"}));
  EXPECT_EQ(st.metadata, (std::map<std::string, std::string>{{"format", "pt"}, {"note", "by hand"}}));

  EXPECT_EQ(st.find("w_f64").dtype(), DType::f64);
  EXPECT_EQ(st.find("w_f64").to_vector<double>(), std::vector<double>{1.0});
  EXPECT_EQ(st.find("c_i32").to_vector<int32_t>(), (std::vector<int32_t>{7, -1}));
  EXPECT_EQ(st.find("x_f32").shape(), Shape({1, 2}));
  EXPECT_EQ(st.find("x_f32").to_vector<float>(), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(st.find("a_u8").to_vector<uint8_t>(), (std::vector<uint8_t>{0, 200, 255}));
  EXPECT_EQ(st.find("m_f16").dtype(), DType::f16);
  EXPECT_EQ(st.find("m_f16").shape(), Shape({2, 1}));
  const auto halves = st.find("m_f16").to_vector<f16>();
  EXPECT_EQ(static_cast<float>(halves[0]), 1.0f);
  EXPECT_EQ(static_cast<float>(halves[1]), -2.0f);
  EXPECT_EQ(st.find("b_bf16").dtype(), DType::bf16);
  EXPECT_EQ(st.find("b_bf16").rank(), 0);
  EXPECT_EQ(st.find("b_bf16").item(), 1.0);
  EXPECT_EQ(st.find("k_i64").to_vector<int64_t>(), std::vector<int64_t>{-2});
  EXPECT_EQ(st.find("z_empty").shape(), Shape({0, 3}));
}

TEST(Safetensors, WriterBytesFollowTheSpec) {
  const auto tensors = every_dtype();
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  const std::string bytes = serialize_safetensors(tensors, metadata);

  const uint64_t n = read_u64le(bytes);
  ASSERT_LE(8 + n, bytes.size());
  const std::string header_text = bytes.substr(8, n);
  ASSERT_EQ(header_text.front(), '{');
  const nlohmann::json header = nlohmann::json::parse(header_text);
  ASSERT_TRUE(header.is_object());
  EXPECT_EQ(header.size(), tensors.size() + 1);
  EXPECT_EQ(header.at("__metadata__"), nlohmann::json({{"format", "pt"}}));

  const std::string buffer = bytes.substr(8 + n);
  const std::map<std::string, std::string> file_dtype = {
      {"f32", "F32"}, {"f16", "F16"}, {"bf16", "BF16"}, {"f64", "F64"},
      {"i64", "I64"}, {"i32", "I32"}, {"u8", "U8"}};
  uint64_t expected_begin = 0;  // data in the given order, back to back
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    const nlohmann::json& e = header.at(name);
    EXPECT_EQ(e.at("dtype").get<std::string>(), file_dtype.at(name));
    EXPECT_EQ(e.at("shape").get<std::vector<int64_t>>(), t.shape().vec());
    const auto offsets = e.at("data_offsets").get<std::vector<uint64_t>>();
    ASSERT_EQ(offsets.size(), 2u);
    EXPECT_EQ(offsets[0], expected_begin);
    EXPECT_EQ(offsets[1] - offsets[0], static_cast<uint64_t>(t.nbytes()));
    EXPECT_EQ(buffer.substr(offsets[0], offsets[1] - offsets[0]), tensor_bytes(t));
    expected_begin = offsets[1];
  }
  EXPECT_EQ(expected_begin, buffer.size());
  // Little-endian, row-major, checked on known values: f32 0.5 then -1.0.
  EXPECT_EQ(buffer.substr(0, 8), raw({0, 0, 0, 0x3f, 0, 0, 0x80, 0xbf}));
}

TEST(Safetensors, AcceptsOtherWritersChoices) {
  // Header keys in another order than the data, metadata last, whitespace inside the JSON,
  // unknown extra fields in an entry, null metadata (the reference reader's Option).
  const std::string header =
      "{ \"b\" : {\"shape\":[1], \"data_offsets\":[8,12], \"dtype\":\"F32\", \"extra\": 1},\n"
      "  \"a\" : {\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}, \"__metadata__\": null }  ";
  const Safetensors st = parse_safetensors(file_of(header, kGoodData), "other");
  ASSERT_EQ(st.tensors.size(), 2u);
  EXPECT_EQ(st.tensors[0].first, "a");
  EXPECT_EQ(st.tensors[1].first, "b");
  EXPECT_TRUE(st.metadata.empty());
  // And the base file of the malformed cases below is accepted as it is.
  EXPECT_EQ(parse_safetensors(file_of(good_header(), kGoodData), kWhat).tensors.size(), 2u);
}

// ---- malformed input ---------------------------------------------------------------------------

TEST(SafetensorsMalformed, TooShortForTheHeaderSize) {
  expect_rejected("", {"too short", "0 bytes", "8-byte header size"});
  expect_rejected(std::string(7, '\0'), {"too short", "7 bytes"});
}

TEST(SafetensorsMalformed, HeaderSizePastTheEndOrTooLarge) {
  expect_rejected(u64le(100) + "{}", {"header size 100 bytes", "past the end", "10 bytes"});
  // Exactly at the end is fine: covered by every good file; one byte more is not.
  const std::string h = good_header();
  expect_rejected(u64le(h.size() + kGoodData.size() + 1) + h + kGoodData, {"past the end"});
  expect_rejected(u64le(100'000'001) + "{}", {"header size 100000001", "100 MB"});
  expect_rejected(u64le(std::numeric_limits<uint64_t>::max()) + "{}",
                  {"header size 18446744073709551615", "100 MB"});
}

TEST(SafetensorsMalformed, HeaderNotAJsonObject) {
  expect_rejected(file_of("  {}"), {"does not start with '{'"});
  expect_rejected(file_of(""), {"not valid JSON"});
  expect_rejected(file_of("{\"a\":"), {"not valid JSON"});
  expect_rejected(file_of("{} x"), {"not valid JSON"});
  expect_rejected(file_of("[1, 2]"), {"JSON array", "not an object"});
  expect_rejected(file_of("[{\"a\": 1, \"a\": 2}]"), {"JSON array", "not an object"});
  expect_rejected(file_of("7"), {"number", "not an object"});
  // nlohmann would stop at a NUL and accept what came before it.
  expect_rejected(file_of(std::string("{}\0\0xyz", 7)), {"NUL byte at offset 2"});
  // Invalid UTF-8 in a name.
  expect_rejected(file_of("{\"\xff\":{}}"), {"not valid JSON"});
}

TEST(SafetensorsMalformed, EntryFieldsMissingOrIllTyped) {
  expect_rejected(file_of("{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", std::string(8, 0)),
                  {"tensor \"a\"", "missing \"dtype\""});
  expect_rejected(file_of("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", std::string(8, 0)),
                  {"tensor \"a\"", "missing \"shape\""});
  expect_rejected(file_of("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", std::string(8, 0)),
                  {"tensor \"a\"", "missing \"data_offsets\""});
  expect_rejected(file_of("{\"a\":[1]}"), {"tensor \"a\"", "array", "not an object"});
  expect_rejected(file_of("{\"a\":{\"dtype\":32,\"shape\":[2],\"data_offsets\":[0,8]}}", std::string(8, 0)),
                  {"tensor \"a\"", "\"dtype\"", "not a string"});
  expect_rejected(file_of(object({entry("a", "F32", "2", 0, 8)}), std::string(8, 0)),
                  {"tensor \"a\"", "\"shape\"", "not an array"});
  expect_rejected(file_of("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4,8]}}",
                          std::string(8, 0)),
                  {"tensor \"a\"", "data_offsets", "[0,4,8]", "not [begin, end]"});
  expect_rejected(file_of("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}"),
                  {"tensor \"a\"", "data_offsets begin -8 is negative"});
  expect_rejected(file_of("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,\"8\"]}}"),
                  {"tensor \"a\"", "data_offsets end \"8\" is not an integer"});
}

TEST(SafetensorsMalformed, UnknownDType) {
  for (const char* dtype : {"F8_E4M3", "BOOL", "f32", "U16", ""}) {
    SCOPED_TRACE(dtype);
    expect_rejected(file_of(object({entry("a", dtype, "[2]", 0, 8)}), std::string(8, 0)),
                    {"tensor \"a\"", std::string("unsupported dtype \"") + dtype + "\"",
                     "F32, F16, BF16, F64, I64, I32, U8"});
  }
}

TEST(SafetensorsMalformed, BadShapes) {
  expect_rejected(file_of(object({entry("a", "F32", "[2, -1]", 0, 0)})),
                  {"tensor \"a\"", "shape [2,-1]", "entry -1 is negative"});
  expect_rejected(file_of(object({entry("a", "F32", "[2.5]", 0, 10)}), std::string(10, 0)),
                  {"tensor \"a\"", "entry 2.5 is not an integer"});
  expect_rejected(file_of(object({entry("a", "F32", "[2.0]", 0, 8)}), std::string(8, 0)),
                  {"tensor \"a\"", "entry 2.0 is not an integer"});
  expect_rejected(file_of(object({entry("a", "F32", "[\"2\"]", 0, 8)}), std::string(8, 0)),
                  {"tensor \"a\"", "not an integer"});
  expect_rejected(file_of(object({entry("a", "F32", "[18446744073709551615]", 0, 8)})),
                  {"tensor \"a\"", "too large"});
  expect_rejected(file_of(object({entry("a", "U8", "[1,1,1,1,1,1]", 0, 1)}), std::string(1, 0)),
                  {"tensor \"a\"", "rank 6", "limit of 5"});
}

TEST(SafetensorsMalformed, ShapeProductOverflows) {
  // 2^32 * 2^32 elements: the product itself overflows int64 (and wraps to 0 unchecked).
  expect_rejected(file_of(object({entry("a", "F32", "[4294967296, 4294967296]", 0, 0)})),
                  {"tensor \"a\"", "overflow"});
  // 2^62 elements fit, 2^62 * 4 bytes do not (and wrap to 0 unchecked).
  expect_rejected(file_of(object({entry("a", "F32", "[4611686018427387904]", 0, 0)})),
                  {"tensor \"a\"", "F32", "overflow"});
}

TEST(SafetensorsMalformed, ByteSizeMismatch) {
  expect_rejected(file_of(object({entry("a", "F32", "[3]", 0, 8)}), std::string(8, 0)),
                  {"tensor \"a\"", "[0, 8]", "hold 8 bytes", "F32 [3] takes 12 bytes"});
  expect_rejected(file_of(object({entry("a", "F64", "[]", 0, 4)}), std::string(4, 0)),
                  {"tensor \"a\"", "hold 4 bytes", "takes 8 bytes"});
}

TEST(SafetensorsMalformed, OffsetsNotContiguous) {
  // A gap between two tensors, and before the first one.
  expect_rejected(file_of(object({entry("a", "F32", "[2]", 0, 8), entry("b", "F32", "[1]", 12, 16)}),
                          std::string(16, 0)),
                  {"gap", "bytes [8, 12)", "\"a\"", "\"b\""});
  expect_rejected(file_of(object({entry("a", "F32", "[2]", 4, 12)}), std::string(12, 0)),
                  {"gap", "bytes [0, 4)", "the start", "\"a\""});
  // Overlapping tensors, and two at the same offset.
  expect_rejected(file_of(object({entry("a", "F32", "[2]", 0, 8), entry("b", "F32", "[1]", 4, 8)}),
                          std::string(8, 0)),
                  {"tensor \"b\"", "overlap tensor \"a\"", "ends at 8"});
  expect_rejected(file_of(object({entry("a", "F32", "[1]", 0, 4), entry("b", "F32", "[1]", 0, 4)}),
                          std::string(4, 0)),
                  {"overlap"});
  // Trailing bytes after the last tensor.
  expect_rejected(file_of(good_header(), kGoodData + "junk"),
                  {"4 trailing bytes after the last tensor"});
  expect_rejected(file_of("{}", "x"), {"1 trailing bytes"});
  // End before begin.
  expect_rejected(file_of(object({entry("a", "F32", "[0]", 8, 0)}), std::string(8, 0)),
                  {"tensor \"a\"", "[8, 0]", "end before begin"});
}

TEST(SafetensorsMalformed, Truncated) {
  const std::string good = file_of(good_header(), kGoodData);
  expect_rejected(good.substr(0, good.size() - 2),
                  {"truncated", "tensor \"b\" ends at byte 12", "only 10 bytes"});
  expect_rejected(good.substr(0, good.size() - kGoodData.size()), {"truncated"});
}

TEST(SafetensorsMalformed, DuplicateNames) {
  const std::string a = entry("a", "F32", "[2]", 0, 8);
  expect_rejected(file_of(object({a, entry("a", "F32", "[1]", 8, 12)}), kGoodData),
                  {"duplicate tensor name \"a\""});
  // The same key twice inside an entry would also be kept silently by nlohmann.
  expect_rejected(
      file_of("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,8]}}",
              std::string(8, 0)),
      {"duplicate key \"dtype\"", "\"a\""});
  expect_rejected(file_of("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}"),
                  {"duplicate key \"k\"", "__metadata__"});
  expect_rejected(file_of("{\"__metadata__\":{},\"__metadata__\":{}}"),
                  {"duplicate \"__metadata__\""});
}

TEST(SafetensorsMalformed, MetadataNotStrings) {
  expect_rejected(file_of("{\"__metadata__\":{\"epoch\":3}}"),
                  {"\"__metadata__\"", "\"epoch\"", "number", "not a string"});
  expect_rejected(file_of("{\"__metadata__\":{\"k\":null}}"), {"\"k\"", "not a string"});
  expect_rejected(file_of("{\"__metadata__\":[\"k\"]}"), {"\"__metadata__\"", "not an object"});
}

TEST(SafetensorsMalformed, MessagesStayOnOneLineAndShort) {
  // The reader takes any JSON string as a name; messages quote it with escapes.
  expect_rejected(file_of(object({entry("line\\nbreak", "BOOL", "[1]", 0, 1)}), std::string(1, 0)),
                  {"tensor \"line\\nbreak\"", "unsupported dtype \"BOOL\""});
  // A corrupt file's megabyte "name" is cut short in the message.
  expect_rejected(file_of(object({entry(std::string(100'000, 'x'), "BOOL", "[1]", 0, 1)}), "\x01"),
                  {"tensor \"xxxxxxxx", "... (100002 bytes)", "unsupported dtype \"BOOL\""});
  try {
    (void)parse_safetensors(file_of(object({entry(std::string(100'000, 'x'), "BOOL", "[1]", 0, 1)}), "\x01"), "f");
  } catch (const Error& e) {
    EXPECT_LT(std::string(e.what()).size(), 500u);
  }
  // A name given by the caller (a path) with a newline is flattened too.
  try {
    (void)parse_safetensors("", "two\nlines");
    ADD_FAILURE() << "an empty file was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
  }
}

// ---- writer argument checks --------------------------------------------------------------------

TEST(Safetensors, WriterRefusesBadNames) {
  const Tensor t = Tensor::zeros({2});
  expect_error([&] { (void)serialize_safetensors({{"", t}}); }, {"serialize_safetensors", "empty name"});
  expect_error([&] { (void)serialize_safetensors({{"a", t}, {"__metadata__", t}}); },
               {"serialize_safetensors", "tensor 1", "\"__metadata__\"", "reserves"});
  expect_error([&] { (void)serialize_safetensors({{"a", t}, {"b", t}, {"a", t}}); },
               {"duplicate tensor name \"a\""});
  expect_error([&] { (void)serialize_safetensors({{"a", Tensor()}}); }, {"\"a\"", "undefined"});
  expect_error([&] { (void)serialize_safetensors({{"bad \xff utf8", t}}); },
               {"cannot encode the header"});
}

// ---- files ---------------------------------------------------------------------------------------

TEST_F(SafetensorsFiles, WritesAndReadsAFile) {
  const auto tensors = every_dtype();
  const std::string p = path("model.safetensors");
  write_safetensors(p, tensors, {{"epoch", "3"}});
  const Safetensors back = read_safetensors(p);
  expect_same_tensors(back.tensors, tensors);
  EXPECT_EQ(back.metadata, (std::map<std::string, std::string>{{"epoch", "3"}}));
  EXPECT_EQ(read_bytes(p), serialize_safetensors(tensors, {{"epoch", "3"}}));
  EXPECT_EQ(listing(), std::vector<std::string>{"model.safetensors"});
}

TEST_F(SafetensorsFiles, WritesCudaTensors) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const auto host = every_dtype();
  std::vector<std::pair<std::string, Tensor>> on_device;
  for (const auto& [name, t] : host) on_device.emplace_back(name, t.to(Device::cuda()));
  write_safetensors(path("gpu.safetensors"), on_device);
  expect_same_tensors(read_safetensors(path("gpu.safetensors")).tensors, host);
}

TEST_F(SafetensorsFiles, ReadRefusesMissingFilesAndDirectories) {
  const std::string missing = path("missing.safetensors");
  expect_error([&] { (void)read_safetensors(missing); },
               {missing + ": cannot open", "No such file or directory"});
  expect_error([&] { (void)read_safetensors(dir_.string()); },
               {dir_.string() + ": cannot open", "Is a directory"});
}

TEST_F(SafetensorsFiles, ReadRefusesMalformedFilesNamingThePath) {
  const std::string good = file_of(good_header(), kGoodData);
  const std::string p = path("cut.safetensors");
  write_bytes(p, good.substr(0, good.size() - 1));
  expect_error([&] { (void)read_safetensors(p); }, {p + ": ", "truncated", "tensor \"b\""});
  write_bytes(p, "");
  expect_error([&] { (void)read_safetensors(p); }, {p + ": ", "too short", "0 bytes"});
  write_bytes(p, u64le(64) + "{}");
  expect_error([&] { (void)read_safetensors(p); }, {p + ": ", "past the end"});
  write_bytes(p, file_of(object({entry("a", "F8_E4M3", "[1]", 0, 1)}), "x"));
  expect_error([&] { (void)read_safetensors(p); }, {p + ": ", "unsupported dtype \"F8_E4M3\""});
  write_bytes(p, good);
  EXPECT_EQ(read_safetensors(p).tensors.size(), 2u);
}

TEST_F(SafetensorsFiles, WriteIntoAMissingDirectoryLeavesNothing) {
  const std::string p = path("no/such/dir/model.safetensors");
  expect_error([&] { write_safetensors(p, {{"a", Tensor::zeros({2})}}); },
               {p + ": ", "cannot create", p + ".tmp", "No such file or directory"});
  EXPECT_TRUE(listing().empty());
}

TEST_F(SafetensorsFiles, FailedWriteLeavesTheOldFileAndNoTemporary) {
  const std::string p = path("model.safetensors");
  write_safetensors(p, {{"old", Tensor::ones({3})}});
  const std::string old_bytes = read_bytes(p);

  // Refused before anything is written.
  expect_error([&] { write_safetensors(p, {{"new", Tensor::zeros({2})}, {"", Tensor::zeros({1})}}); },
               {p + ": ", "empty name"});
  EXPECT_EQ(read_bytes(p), old_bytes);
  EXPECT_EQ(listing(), std::vector<std::string>{"model.safetensors"});

  // Success replaces it, and leaves no temporary.
  write_safetensors(p, {{"new", Tensor::zeros({2})}});
  EXPECT_EQ(read_safetensors(p).tensors.at(0).first, "new");
  EXPECT_EQ(listing(), std::vector<std::string>{"model.safetensors"});
}

TEST_F(SafetensorsFiles, FailedRenameRemovesTheTemporary) {
  // A non-empty directory at the path: the temporary file is written in full, then rename(2)
  // fails, after the point of no return of an in-place write.
  const std::string p = path("taken");
  fs::create_directory(p);
  write_bytes(path("taken/keep"), "keep");
  expect_error([&] { write_safetensors(p, {{"a", Tensor::ones({4})}}); },
               {p + ": ", "cannot rename", p + ".tmp"});
  EXPECT_EQ(listing(), std::vector<std::string>{"taken"});
  EXPECT_EQ(read_bytes(path("taken/keep")), "keep");
}

TEST_F(SafetensorsFiles, MetadataOnlyReadValidatesTheHeader) {
  const std::string p = path("meta.safetensors");
  write_safetensors(p, {{"w", Tensor::ones({3, 2})}}, {{"epoch", "7"}, {"format", "x"}});
  const auto md = read_safetensors_metadata(p);
  EXPECT_EQ(md, (std::map<std::string, std::string>{{"epoch", "7"}, {"format", "x"}}));
  // A file whose data is cut short is refused even though the data is not read.
  const std::string bytes = read_bytes(p);
  write_bytes(p, bytes.substr(0, bytes.size() - 4));
  expect_error([&] { (void)read_safetensors_metadata(p); }, {p + ": "});
  expect_error([&] { (void)read_safetensors_metadata(path("missing")); }, {"cannot open"});
}
