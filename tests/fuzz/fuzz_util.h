// Helpers shared by the libFuzzer targets of this folder (README.md).
//
// The readers under test take paths, so each run writes its input to files in a folder of its
// own process: /dev/shm/cnx-fuzz-<target>-<pid>/ (memory-backed; $TMPDIR or /tmp where there
// is no /dev/shm). The folder is removed when the process exits normally; a crashing process
// leaves it behind (a few KB).
//
// A reader that throws std::exception (cnx::Error, nlohmann::json's errors, std::bad_alloc
// from a refused size...) has rejected the input cleanly: the targets catch it and return 0.
// Anything else is a finding: a sanitizer report, a crash, an uncaught non-std exception, a
// timeout, going past -malloc_limit_mb / -rss_limit_mb, or a broken invariant of what a reader
// returned (checked with FUZZ_EXPECT, which aborts with the condition's text).
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <string>
#include <string_view>

namespace cnx_fuzz {

// Aborts (a libFuzzer finding, with a crash file) when a returned value breaks an invariant.
#define FUZZ_EXPECT(cond)                                                                 \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "%s:%d: FUZZ_EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                       \
    }                                                                                     \
  } while (0)

// Whether the product of `factors` (each >= 0) is exactly `size`, computed without overflow: a
// reader whose size arithmetic wrapped around returns a buffer of another size.
inline bool product_is(size_t size, std::initializer_list<int64_t> factors) {
  uint64_t p = 1;
  for (const int64_t f : factors)
    if (f < 0 || __builtin_mul_overflow(p, static_cast<uint64_t>(f), &p)) return false;
  return p == size;
}

// The process's scratch folder, created on first use, removed at exit.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& target) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::path base = "/dev/shm";
    if (!fs::is_directory(base, ec) || ::access(base.c_str(), W_OK) != 0) {
      const char* tmp = std::getenv("TMPDIR");
      base = tmp && *tmp ? tmp : "/tmp";
    }
    path_ = base / ("cnx-fuzz-" + target + "-" + std::to_string(::getpid()));
    fs::remove_all(path_, ec);
    fs::create_directories(path_, ec);
    if (ec) {
      std::fprintf(stderr, "fuzz: cannot create %s: %s\n", path_.c_str(), ec.message().c_str());
      std::abort();
    }
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

  // Removes everything inside (the folder stays), so that no file of an earlier run is seen.
  void clear() const {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(path_, ec))
      std::filesystem::remove_all(entry.path(), ec);
  }

 private:
  std::filesystem::path path_;
};

// Writes `size` bytes to `path` (created or truncated). Aborts if that fails: the harness, not
// the reader, would be broken.
inline void write_file(const std::string& path, const void* data, size_t size) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    std::perror(path.c_str());
    std::abort();
  }
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n <= 0) {
      std::perror(path.c_str());
      std::abort();
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  ::close(fd);
}
inline void write_file(const std::string& path, std::string_view bytes) {
  write_file(path, bytes.data(), bytes.size());
}

// Consumes the input front to back: fixed-size fields and length-prefixed pieces (the split of
// one fuzz input into several files). Reads past the end give zeros / empty pieces.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  uint8_t byte() { return at_ < size_ ? data_[at_++] : 0; }
  // A piece of at most `max` bytes whose length is a 16-bit little-endian prefix (clamped to
  // what is left).
  std::string_view piece(size_t max = 0xffff) {
    size_t n = byte();
    n |= static_cast<size_t>(byte()) << 8;
    n = std::min({n, max, size_ - at_});
    const std::string_view out(reinterpret_cast<const char*>(data_ + at_), n);
    at_ += n;
    return out;
  }
  std::string_view rest() {
    const std::string_view out(reinterpret_cast<const char*>(data_ + at_), size_ - at_);
    at_ = size_;
    return out;
  }
  bool empty() const { return at_ >= size_; }

 private:
  const uint8_t* data_;
  size_t size_, at_ = 0;
};

}  // namespace cnx_fuzz
