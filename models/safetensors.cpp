#include "models/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <string_view>
#include <system_error>
#include <thread>

#include <nlohmann/json.hpp>

#include "tensor/escape.h"

namespace cnx {

// The format is little-endian and tensors are copied byte for byte between the file and memory.
static_assert(std::endian::native == std::endian::little,
              "safetensors I/O copies little-endian bytes as they are: a big-endian host needs "
              "byte swapping here");

namespace {

using json = nlohmann::json;

constexpr int64_t kSizePrefix = 8;  // the u64 header size at the start of the file
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// ---- errors ----------------------------------------------------------------------------------

// Throws cnx::Error "<what>: <message>". Strings from the file reach the message escaped
// (quoted, excerpt, escape_for_message); as a last guard, control characters left (a path
// given with a newline) become spaces so that the message stays on one line.
template <class... Args>
[[noreturn]] void fail_in(const std::string& what, const Args&... args) {
  std::string message = detail::concat(what, ": ", args...);
  for (char& c : message)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = ' ';
  throw Error(message);
}

// At most `max` characters of `text`: a corrupt header can hold megabytes where a name or a
// number belongs, and a message should stay readable.
std::string shortened(std::string text, size_t max = 200) {
  if (text.size() > max) {
    const size_t full = text.size();
    text.resize(max);
    text += "... (";
    text += std::to_string(full);
    text += " bytes)";
  }
  return text;
}

// A name (or a dtype string, a metadata key) from a file, in double quotes, escaped
// (tensor/escape.h: "\n", "\x1b", "\"", ...) so that newlines, terminal escape sequences,
// invalid UTF-8 and empty names read unambiguously, and cut short when huge (the size then
// counts the quoted text).
std::string quoted(const std::string& name) {
  std::string out = "\"";
  for (const char c : escape_for_message(name)) {
    if (c == '"') out += '\\';
    out += c;
  }
  return shortened(out + "\"");
}

// A JSON value as it would appear in the header, for messages (non-ASCII as JSON's \u escapes,
// so that nothing unprintable reaches the message).
std::string excerpt(const json& value) {
  return escape_for_message(shortened(value.dump(-1, ' ', true, json::error_handler_t::replace)));
}

// strerror, but thread-safe.
std::string errno_message(int error) { return std::generic_category().message(error); }

// ---- dtypes ----------------------------------------------------------------------------------

struct DTypeName {
  const char* file_name;
  DType dtype;
};
constexpr DTypeName kDTypeNames[] = {
    {"F32", DType::f32}, {"F16", DType::f16}, {"BF16", DType::bf16}, {"F64", DType::f64},
    {"I64", DType::i64}, {"I32", DType::i32}, {"U8", DType::u8},
};
constexpr const char* kSupportedDTypes = "F32, F16, BF16, F64, I64, I32, U8";

const char* file_dtype_name(DType dtype) {
  for (const DTypeName& d : kDTypeNames)
    if (d.dtype == dtype) return d.file_name;
  fail("safetensors: dtype ", dtype_name(dtype), " has no safetensors name");
}

// ---- reading: the header ---------------------------------------------------------------------

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  int64_t begin;  // [begin, end): bytes of the data buffer
  int64_t end;
};

struct Header {
  std::vector<Entry> entries;  // by offset: file order
  std::map<std::string, std::string> metadata;
};

// A file too short to hold the header size is refused before anything is read.
void check_file_size(int64_t file_size, const std::string& what) {
  if (file_size < kSizePrefix)
    fail_in(what, "too short: ", file_size, " bytes, fewer than the ", kSizePrefix,
            "-byte header size that starts a safetensors file");
}

// The header size N from the first 8 bytes, checked against the limit and the file's size.
int64_t header_size(const unsigned char (&prefix)[kSizePrefix], int64_t file_size,
                    const std::string& what) {
  // A PyTorch checkpoint given by mistake: a zip archive (torch.save since 1.6) or a legacy
  // pickle (protocol 2 to 5). Said so before its first bytes are misread as a header size.
  const bool zip = std::memcmp(prefix, "PK\x03\x04", 4) == 0;
  if (zip || (prefix[0] == 0x80 && prefix[1] >= 2 && prefix[1] <= 5))
    fail_in(what, "this looks like a PyTorch .pth file (", zip ? "a zip archive" : "a pickle",
            "), not safetensors; convert it with tools/convert_checkpoint.py");
  uint64_t n;
  std::memcpy(&n, prefix, sizeof n);  // little-endian, like the host (static_assert above)
  if (n > static_cast<uint64_t>(kSafetensorsMaxHeader))
    fail_in(what, "header size ", n, " bytes exceeds the limit of ", kSafetensorsMaxHeader,
            " bytes (100 MB); this is not a safetensors file or it is corrupt");
  if (static_cast<int64_t>(n) > file_size - kSizePrefix)
    fail_in(what, "header size ", n, " bytes runs past the end of the file (", file_size,
            " bytes in all)");
  return static_cast<int64_t>(n);
}

// Parses the header text into JSON, refusing duplicate keys: nlohmann keeps the last of two
// equal keys without a word, which would hide a duplicate tensor name (or a second "dtype").
json parse_header_json(std::string_view text, const std::string& what) {
  // JSON text never holds a raw NUL, and nlohmann stops at one as if the input had ended,
  // which would accept anything after it.
  if (const size_t nul = text.find('\0'); nul != std::string_view::npos)
    fail_in(what, "header holds a NUL byte at offset ", nul, " (it must be JSON, padded with spaces)");

  std::vector<std::set<std::string>> open_objects;  // the keys seen in each enclosing object
  std::string tensor_name;                          // the current top-level key
  const json::parser_callback_t track_keys = [&](int depth, json::parse_event_t event,
                                                  json& parsed) {
    switch (event) {
      case json::parse_event_t::array_start:
        if (depth == 0) fail_in(what, "header is a JSON array, not an object");
        break;
      case json::parse_event_t::object_start: open_objects.emplace_back(); break;
      case json::parse_event_t::object_end: open_objects.pop_back(); break;
      case json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!open_objects.back().insert(key).second) {
          if (depth == 1 && key == "__metadata__") fail_in(what, "duplicate \"__metadata__\"");
          if (depth == 1) fail_in(what, "duplicate tensor name ", quoted(key));
          fail_in(what, "duplicate key ", quoted(key), " in ", quoted(tensor_name));
        }
        if (depth == 1) tensor_name = key;
        break;
      }
      default: break;
    }
    return true;
  };
  json header;
  try {
    header = json::parse(text.begin(), text.end(), track_keys);
  } catch (const json::exception& e) {
    fail_in(what, "header is not valid JSON: ", escape_for_message(shortened(e.what(), 1000)));
  }
  if (!header.is_object())
    fail_in(what, "header is a JSON ", header.type_name(), ", not an object");
  // JSON allows leading whitespace; the format, and the reference reader, do not.
  if (text.front() != '{') fail_in(what, "header does not start with '{'");
  return header;
}

// A JSON integer in [0, 2^63): a shape entry or an offset. `where` names it in messages.
int64_t non_negative_int64(const json& value, const std::string& what, const std::string& where) {
  if (value.is_number_unsigned()) {
    const uint64_t u = value.get<uint64_t>();
    if (u > static_cast<uint64_t>(kInt64Max)) fail_in(what, where, " ", u, " is too large");
    return static_cast<int64_t>(u);
  }
  if (value.is_number_integer()) {
    const int64_t i = value.get<int64_t>();
    if (i < 0) fail_in(what, where, " ", i, " is negative");
    return i;
  }
  fail_in(what, where, " ", excerpt(value), " is not an integer");
}

// product = a * b for a, b >= 0; false instead when that overflows int64.
bool checked_multiply(int64_t a, int64_t b, int64_t& product) {
  if (a != 0 && b > kInt64Max / a) return false;
  product = a * b;
  return true;
}

Entry parse_entry(const std::string& name, const json& value, const std::string& what) {
  const std::string tensor = "tensor " + quoted(name);
  if (!value.is_object())
    fail_in(what, tensor, ": entry is a JSON ", value.type_name(),
            ", not an object with dtype, shape and data_offsets");
  const auto field = [&](const char* key) -> const json& {
    const auto it = value.find(key);
    if (it == value.end()) fail_in(what, tensor, ": missing \"", key, "\"");
    return *it;
  };

  Entry entry;
  entry.name = name;

  const json& dtype = field("dtype");
  if (!dtype.is_string())
    fail_in(what, tensor, ": \"dtype\" is a JSON ", dtype.type_name(), ", not a string");
  const std::string& dtype_string = dtype.get_ref<const std::string&>();
  const auto known = std::find_if(std::begin(kDTypeNames), std::end(kDTypeNames),
                                  [&](const DTypeName& d) { return dtype_string == d.file_name; });
  if (known == std::end(kDTypeNames))
    fail_in(what, tensor, ": unsupported dtype ", quoted(dtype_string), " (cnx reads ",
            kSupportedDTypes, ")");
  entry.dtype = known->dtype;

  const json& shape = field("shape");
  if (!shape.is_array())
    fail_in(what, tensor, ": \"shape\" is a JSON ", shape.type_name(), ", not an array");
  // Checked before anything prints the array, which a corrupt file could make huge.
  if (shape.size() > static_cast<size_t>(Shape::kMaxRank))
    fail_in(what, tensor, ": rank ", shape.size(), " is above cnx's limit of ", Shape::kMaxRank,
            " dimensions");
  const std::string shape_text = excerpt(shape);
  std::vector<int64_t> dims;
  int64_t numel = 1;
  for (const json& d : shape) {
    dims.push_back(non_negative_int64(d, what, tensor + ": shape " + shape_text + ": entry"));
    if (!checked_multiply(numel, dims.back(), numel))
      fail_in(what, tensor, ": shape ", shape_text,
              " has more elements than int64 can count (overflow)");
  }
  entry.shape = Shape(dims);
  int64_t nbytes;
  if (!checked_multiply(numel, dtype_size(entry.dtype), nbytes))
    fail_in(what, tensor, ": ", dtype_string, " ", shape_text,
            " takes more bytes than int64 can count (overflow)");

  const json& offsets = field("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2)
    fail_in(what, tensor, ": \"data_offsets\" is ", excerpt(offsets), ", not [begin, end]");
  entry.begin = non_negative_int64(offsets[0], what, tensor + ": data_offsets begin");
  entry.end = non_negative_int64(offsets[1], what, tensor + ": data_offsets end");
  if (entry.end < entry.begin)
    fail_in(what, tensor, ": data_offsets [", entry.begin, ", ", entry.end,
            "]: end before begin");
  if (entry.end - entry.begin != nbytes)
    fail_in(what, tensor, ": data_offsets [", entry.begin, ", ", entry.end, "] hold ",
            entry.end - entry.begin, " bytes but ", dtype_string, " ", shape_text, " takes ",
            nbytes, " bytes");
  // Unknown extra fields are ignored, as the reference reader does.
  return entry;
}

std::map<std::string, std::string> parse_metadata(const json& value, const std::string& what) {
  std::map<std::string, std::string> metadata;
  // null: the reference reader deserialises metadata as an Option, so it reads null as absent.
  if (value.is_null()) return metadata;
  if (!value.is_object())
    fail_in(what, "\"__metadata__\" is a JSON ", value.type_name(), ", not an object");
  for (const auto& [key, v] : value.items()) {
    if (!v.is_string())
      fail_in(what, "\"__metadata__\" value for ", quoted(key), " is a JSON ", v.type_name(),
              ", not a string");
    metadata.emplace(key, v.get<std::string>());
  }
  return metadata;
}

// Validates the header against a data buffer of `buffer_size` bytes: every entry well formed,
// and the entries, by offset, tiling the buffer exactly (no gap, no overlap, nothing after).
Header parse_header(std::string_view text, int64_t buffer_size, const std::string& what) {
  const json header_json = parse_header_json(text, what);
  Header header;
  for (const auto& [name, value] : header_json.items()) {
    if (name == "__metadata__") header.metadata = parse_metadata(value, what);
    else header.entries.push_back(parse_entry(name, value, what));
  }

  // Stable: zero-size tensors at the same offset keep their (name) order.
  std::stable_sort(header.entries.begin(), header.entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  int64_t covered = 0;  // the buffer's bytes [0, covered) belong to the tensors so far
  const Entry* previous = nullptr;
  for (const Entry& e : header.entries) {
    if (e.begin > covered)
      fail_in(what, "gap: bytes [", covered, ", ", e.begin, ") of the data buffer belong to no tensor ",
              "(between ", previous ? quoted(previous->name) : "the start", " and ", quoted(e.name),
              ")");
    if (e.begin < covered)
      fail_in(what, "tensor ", quoted(e.name), " data_offsets [", e.begin, ", ", e.end,
              "] overlap tensor ", quoted(previous->name), ", which ends at ", covered);
    if (e.end > buffer_size)
      fail_in(what, "truncated: tensor ", quoted(e.name), " ends at byte ", e.end,
              " of the data buffer, which holds only ", buffer_size, " bytes");
    covered = e.end;
    previous = &e;
  }
  if (covered < buffer_size)
    fail_in(what, buffer_size - covered, " trailing bytes after the last tensor (the data buffer holds ",
            buffer_size, " bytes, the tensors end at ", covered, ")");
  return header;
}

// ---- reading: the file -----------------------------------------------------------------------

class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Reads exactly `size` bytes at `offset`; `part` names what they are in messages.
void read_exactly(int fd, void* dst, int64_t size, int64_t offset, const std::string& path,
                  const std::string& part) {
  char* p = static_cast<char*>(dst);
  while (size > 0) {
    const ssize_t got = ::pread(fd, p, static_cast<size_t>(size), static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) fail_in(path, "cannot read ", part, ": ", errno_message(errno));
    // The size was checked against fstat: the file shrank while being read.
    if (got == 0) fail_in(path, "truncated: the file ended while reading ", part);
    p += got;
    size -= got;
    offset += got;
  }
}

// ---- writing ---------------------------------------------------------------------------------

// The 8-byte header size and the header, padded with spaces so that the data buffer starts at
// a multiple of 8 bytes (as the reference writer does). Validates the names.
std::string make_head(const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata, const std::string& what) {
  // The text is put together entry by entry, in data order with the metadata first, so that
  // it reads in file order; a JSON object built whole would sort the names (std::map) or find
  // each one by a linear search (ordered_json).
  std::string text = "{";
  std::set<std::string> names;
  int64_t offset = 0;
  try {
    if (!metadata.empty()) text += "\"__metadata__\":" + json(metadata).dump();
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& [name, t] = tensors[i];
      if (name.empty()) fail_in(what, "tensor ", i, " has an empty name");
      if (name == "__metadata__")
        fail_in(what, "tensor ", i,
                " is called \"__metadata__\", a name the format reserves for metadata");
      if (!names.insert(name).second) fail_in(what, "duplicate tensor name ", quoted(name));
      if (!t.defined()) fail_in(what, "tensor ", quoted(name), " is undefined");
      const nlohmann::ordered_json entry = {{"dtype", file_dtype_name(t.dtype())},
                                            {"shape", t.shape().vec()},
                                            {"data_offsets", {offset, offset + t.nbytes()}}};
      if (text.size() > 1) text += ',';
      text += json(name).dump() + ":" + entry.dump();
      offset += t.nbytes();
    }
  } catch (const json::exception& e) {  // a name or metadata string that is not UTF-8
    fail_in(what, "cannot encode the header: ", e.what());
  }
  text += '}';
  text.append((kSizePrefix - text.size() % kSizePrefix) % kSizePrefix, ' ');
  if (static_cast<int64_t>(text.size()) > kSafetensorsMaxHeader)
    fail_in(what, "header of ", text.size(), " bytes exceeds the readers' limit of ",
            kSafetensorsMaxHeader, " bytes (100 MB)");

  const uint64_t n = text.size();
  std::string head(kSizePrefix, '\0');
  std::memcpy(head.data(), &n, sizeof n);  // little-endian, like the host
  return head + text;
}

void write_all(int fd, const void* src, int64_t size, const std::string& path,
               const std::string& tmp) {
  const char* p = static_cast<const char*>(src);
  while (size > 0) {
    const ssize_t put = ::write(fd, p, static_cast<size_t>(size));
    if (put < 0 && errno == EINTR) continue;
    if (put < 0) fail_in(path, "cannot write ", tmp, ": ", errno_message(errno));
    p += put;
    size -= put;
  }
}

// After rename(2), the new directory entry is durable only once the directory is synced.
// Best effort: the file is already in place, so a failure here is not a failed write.
void sync_parent_directory(const std::string& path) {
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

}  // namespace

// ---- public ----------------------------------------------------------------------------------

Tensor Safetensors::find(const std::string& name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return t;
  return {};
}

Safetensors parse_safetensors(const std::string& bytes, const std::string& what) {
  const int64_t file_size = static_cast<int64_t>(bytes.size());
  check_file_size(file_size, what);
  unsigned char prefix[kSizePrefix];
  std::memcpy(prefix, bytes.data(), kSizePrefix);
  const int64_t n = header_size(prefix, file_size, what);
  const int64_t data_start = kSizePrefix + n;
  Header header = parse_header(std::string_view(bytes).substr(kSizePrefix, n),
                               file_size - data_start, what);

  Safetensors out;
  out.metadata = std::move(header.metadata);
  for (const Entry& e : header.entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype);
    if (e.end > e.begin)
      std::memcpy(t.raw_data(), bytes.data() + data_start + e.begin,
                  static_cast<size_t>(e.end - e.begin));
    out.tensors.emplace_back(e.name, std::move(t));
  }
  return out;
}

// Reads the file piecewise rather than through parse_safetensors, so that a checkpoint is
// read straight into its tensors instead of being held twice in memory.
namespace {
// Opens `path` for reading without blocking: open(2) of a FIFO with O_RDONLY waits for a
// writer, forever (`eval --weights <a FIFO>`). O_NONBLOCK makes it return at once; read_header
// then refuses anything but a regular file (for which O_NONBLOCK changes nothing).
int open_for_reading(const std::string& path) {
  return ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
}

// Validates the whole header of an open file against its size; returns it and sets the
// data buffer's offset.
Header read_header(const FileDescriptor& fd, const std::string& path, int64_t& data_start) {
  if (fd.get() < 0) fail_in(path, "cannot open: ", errno_message(errno));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) fail_in(path, "cannot stat: ", errno_message(errno));
  // open(2) succeeds on a directory; reading it would fail with a less clear message.
  if (S_ISDIR(st.st_mode)) fail_in(path, "cannot open: ", errno_message(EISDIR));
  if (!S_ISREG(st.st_mode))
    fail_in(path, "cannot open: not a regular file (",
            S_ISFIFO(st.st_mode)   ? "a FIFO"
            : S_ISCHR(st.st_mode)  ? "a character device"
            : S_ISBLK(st.st_mode)  ? "a block device"
            : S_ISSOCK(st.st_mode) ? "a socket"
                                   : "not a file",
            ")");

  const int64_t file_size = st.st_size;
  check_file_size(file_size, path);
  unsigned char prefix[kSizePrefix];
  read_exactly(fd.get(), prefix, kSizePrefix, 0, path, "the header size");
  const int64_t n = header_size(prefix, file_size, path);
  std::string text(static_cast<size_t>(n), '\0');
  read_exactly(fd.get(), text.data(), n, kSizePrefix, path, "the header");
  data_start = kSizePrefix + n;
  return parse_header(text, file_size - data_start, path);
}
}  // namespace

std::map<std::string, std::string> read_safetensors_metadata(const std::string& path) {
  const FileDescriptor fd(open_for_reading(path));
  int64_t data_start = 0;
  return read_header(fd, path, data_start).metadata;
}

Safetensors read_safetensors(const std::string& path) {
  const FileDescriptor fd(open_for_reading(path));
  int64_t data_start = 0;
  Header header = read_header(fd, path, data_start);

  Safetensors out;
  out.metadata = std::move(header.metadata);
  for (const Entry& e : header.entries) {
    Tensor t = Tensor::empty(e.shape, e.dtype);
    if (e.end > e.begin)
      read_exactly(fd.get(), t.raw_data(), e.end - e.begin, data_start + e.begin, path,
                   "tensor " + quoted(e.name));
    out.tensors.emplace_back(e.name, std::move(t));
  }
  return out;
}

std::string serialize_safetensors(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  std::string out = make_head(tensors, metadata, "serialize_safetensors");
  for (const auto& [name, t] : tensors) {
    const Tensor host = t.to(Device::cpu());
    out.append(static_cast<const char*>(host.raw_data()), static_cast<size_t>(host.nbytes()));
  }
  return out;
}

namespace {
// Testing only: CNX_TEST_PAUSE_BEFORE_RENAME_MS=<ms> holds every write between its complete
// temporary and the rename, so that tests/kill_resume_test.py can kill a run inside a save.
void pause_before_rename_for_testing() {
  static const long ms = [] {
    const char* v = std::getenv("CNX_TEST_PAUSE_BEFORE_RENAME_MS");
    return v ? std::strtol(v, nullptr, 10) : 0L;
  }();
  if (ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}
}  // namespace

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Everything that can be checked is checked before the disk is touched.
  const std::string head = make_head(tensors, metadata, path);
  const std::string tmp = path + ".tmp";
  // O_NONBLOCK: a FIFO left at the temporary's name would block the open (regular files are
  // unaffected); anything but a regular file is refused below.
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NONBLOCK, 0644);
  if (fd < 0) fail_in(path, "cannot create ", tmp, ": ", errno_message(errno));
  if (struct stat st; ::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail_in(path, "cannot create ", tmp, ": it exists and is not a regular file");
  }
  try {
    write_all(fd, head.data(), static_cast<int64_t>(head.size()), path, tmp);
    for (const auto& [name, t] : tensors) {
      const Tensor host = t.to(Device::cpu());  // one tensor at a time: no second full copy
      write_all(fd, host.raw_data(), host.nbytes(), path, tmp);
    }
    // Without fsync, a crash after the rename can leave `path` naming a file whose data
    // never reached the disk: the old checkpoint would be lost along with the new one.
    if (::fsync(fd) != 0) fail_in(path, "cannot fsync ", tmp, ": ", errno_message(errno));
    const int closed = ::close(fd);
    fd = -1;
    if (closed != 0) fail_in(path, "cannot close ", tmp, ": ", errno_message(errno));
    pause_before_rename_for_testing();
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      fail_in(path, "cannot rename ", tmp, " over it: ", errno_message(errno));
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  sync_parent_directory(path);
}

}  // namespace cnx
