// safetensors: read and write, done to the format's specification
// (https://github.com/huggingface/safetensors, "Format"):
//
//   bytes 0..7      N, the header size, unsigned 64-bit little-endian
//   bytes 8..8+N    a UTF-8 JSON object: for each tensor name
//                     {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}
//                   and optionally "__metadata__": {string: string}; the header may be padded
//                   at the end with spaces (0x20)
//   the rest        the byte buffer; offsets are relative to its start, little-endian,
//                   row-major (C order) data
//
// The reader refuses, with a cnx::Error that starts with the file's path and says what is
// wrong: a file shorter than 8 bytes, a header size over 100 MB or past the end of the file,
// a header that is not a JSON object or does not start with '{', an entry without a valid
// dtype (F32, F16, BF16, F64, I64, I32, U8), shape (non-negative integers) or data_offsets
// (two integers, begin <= end), a byte size that is not numel x dtype size (computed without
// overflow), offsets that are not contiguous from 0 to the end of the buffer (no gaps, no
// overlaps, nothing left over), a duplicate tensor name (or a key twice in one object),
// non-string metadata values, a rank above 5 (cnx's Shape::kMaxRank), a NUL byte in the header.
// Like the reference reader it ignores unknown fields in an entry and reads
// "__metadata__": null as no metadata. Messages are one line.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tensor/tensor.h"

namespace cnx {

// Tensors in file order (by offset), CPU tensors of the file's dtypes (F32 -> f32, F16 -> f16,
// BF16 -> bf16, F64 -> f64, I64 -> i64, I32 -> i32, U8 -> u8).
struct Safetensors {
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::map<std::string, std::string> metadata;  // "__metadata__"

  // The tensor called `name`, or an undefined Tensor.
  Tensor find(const std::string& name) const;
};

constexpr int64_t kSafetensorsMaxHeader = 100'000'000;  // bytes

Safetensors read_safetensors(const std::string& path);

// Only the "__metadata__" of a file (the header is read and validated in full; the tensor
// data is not read). For picking a checkpoint without loading it.
std::map<std::string, std::string> read_safetensors_metadata(const std::string& path);

// Writes the tensors (any device; copied to the host) in the given order, names unique and
// non-empty and not "__metadata__". Atomic: writes path + ".tmp", fsyncs, renames over `path`;
// on any failure `path` is untouched and the temporary file removed. The header is padded with
// spaces so that the data buffer starts at a multiple of 8 bytes, as the reference writer does.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// The same, from and to a byte string; `what` starts parse errors as the path does above. The
// file functions share the checks but move the data between the file and the tensors directly,
// so that a checkpoint is never held twice in memory. Handy for tests.
Safetensors parse_safetensors(const std::string& bytes, const std::string& what);
std::string serialize_safetensors(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata = {});

}  // namespace cnx
