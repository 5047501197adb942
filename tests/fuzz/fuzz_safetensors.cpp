// Fuzz target "safetensors": the input is a whole .safetensors file. It is written to the
// process's scratch folder and read by cnx::read_safetensors_metadata(path) and
// cnx::read_safetensors(path) (models/safetensors.h); the same bytes also go through
// cnx::parse_safetensors (the in-memory reader that shares the checks).
//
// Beyond "no crash": the three readers must agree. A file that one accepts and another refuses,
// a metadata map that differs, or tensors that differ (names, order, dtype, shape, bytes) are
// findings, as is a tensor whose byte size is not numel x dtype size.
#include <cstring>
#include <exception>
#include <map>
#include <optional>

#include "fuzz_util.h"
#include "models/safetensors.h"

namespace {

const cnx_fuzz::ScratchDir& scratch() {
  static const cnx_fuzz::ScratchDir dir("safetensors");
  return dir;
}

void check_tensors(const cnx::Safetensors& s) {
  for (const auto& [name, t] : s.tensors) {
    FUZZ_EXPECT(t.defined());
    FUZZ_EXPECT(t.nbytes() == t.numel() * cnx::dtype_size(t.dtype()));
    // Touch every byte: a storage smaller than the shape says is an ASan report here.
    const auto* p = static_cast<const unsigned char*>(t.raw_data());
    unsigned sum = 0;
    for (int64_t i = 0; i < t.nbytes(); ++i) sum += p[i];
    (void)sum;
  }
}

bool same(const cnx::Safetensors& a, const cnx::Safetensors& b) {
  if (a.metadata != b.metadata || a.tensors.size() != b.tensors.size()) return false;
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    const auto& [na, ta] = a.tensors[i];
    const auto& [nb, tb] = b.tensors[i];
    if (na != nb || ta.dtype() != tb.dtype() || ta.shape() != tb.shape()) return false;
    // (An empty tensor may have no storage: memcmp must not see its null pointer.)
    if (ta.nbytes() > 0 &&
        std::memcmp(ta.raw_data(), tb.raw_data(), static_cast<size_t>(ta.nbytes())) != 0)
      return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = scratch().file("input.safetensors");
  cnx_fuzz::write_file(path, data, size);

  std::optional<std::map<std::string, std::string>> metadata;
  try {
    metadata = cnx::read_safetensors_metadata(path);
  } catch (const std::exception&) {
  }
  std::optional<cnx::Safetensors> from_file, from_bytes;
  try {
    from_file = cnx::read_safetensors(path);
    check_tensors(*from_file);
  } catch (const std::exception&) {
  }
  try {
    from_bytes = cnx::parse_safetensors(std::string(reinterpret_cast<const char*>(data), size), path);
    check_tensors(*from_bytes);
  } catch (const std::exception&) {
  }

  // The header-only reader validates the header in full but not the data, so it may accept a
  // file whose data is short; it must never refuse one that the full reader accepts.
  if (from_file) FUZZ_EXPECT(metadata && *metadata == from_file->metadata);
  FUZZ_EXPECT(from_file.has_value() == from_bytes.has_value());
  if (from_file && from_bytes) FUZZ_EXPECT(same(*from_file, *from_bytes));
  return 0;
}
