// ImageFolder: listing (scan_image_folder) and JPEG decoding with the TurboJPEG API of
// libjpeg-turbo 2.1 (decode_jpeg). The rules are in image_folder.h.
#include "train/data/image_folder.h"

#include <turbojpeg.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iomanip>
#include <memory>
#include <mutex>
#include <sstream>
#include <system_error>

#include "tensor/error.h"
#include "train/data/dataset.h"

namespace cnx {

namespace fs = std::filesystem;

namespace {

constexpr const char* kName = "image_folder";

bool hidden(const fs::path& p) {
  const std::string n = p.filename().string();
  return !n.empty() && n[0] == '.';
}

// Fails unless `dir` is an existing, listable folder.
void require_folder(const fs::path& dir, const char* what) {
  std::error_code ec;
  const fs::file_status st = fs::status(dir, ec);
  if (!fs::exists(st)) fail(kName, ": ", dir.string(), ": missing ", what, " folder");
  if (!fs::is_directory(st)) fail(kName, ": ", dir.string(), ": ", what, " is not a folder");
}

// The non-hidden entries of `dir` for which keep(entry) holds, by name (byte-wise sorted).
template <class Keep>
std::vector<std::string> list_names(const fs::path& dir, Keep keep) {
  std::vector<std::string> names;
  std::error_code ec;
  fs::directory_iterator it(dir, ec), end;
  if (ec) fail(kName, ": ", dir.string(), ": cannot read folder: ", ec.message());
  for (; it != end; it.increment(ec)) {
    if (ec) break;
    if (hidden(it->path())) continue;
    if (keep(*it)) names.push_back(it->path().filename().string());
  }
  if (ec) fail(kName, ": ", dir.string(), ": cannot read folder: ", ec.message());
  std::sort(names.begin(), names.end());
  return names;
}

bool is_dir(const fs::directory_entry& e) {
  std::error_code ec;
  return e.is_directory(ec);  // follows symbolic links
}

bool is_file(const fs::directory_entry& e) {
  std::error_code ec;
  return e.is_regular_file(ec);  // follows symbolic links
}

// "a, b, c" of at most 3 names, then "and N more".
std::string some_names(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < 3; ++i) s += (i ? ", " : "") + ("\"" + v[i] + "\"");
  if (v.size() > 3) s += " and " + std::to_string(v.size() - 3) + " more";
  return s;
}

std::string percent(double fraction) {
  std::ostringstream os;
  os << std::setprecision(3) << fraction * 100 << "%";
  return os.str();
}

struct TjHandle {
  tjhandle h = tjInitDecompress();
  ~TjHandle() {
    if (h) tjDestroy(h);
  }
};

// The largest JPEG file read: 512 MiB, 6 bytes a pixel at the pixel limit (a JPEG of noise at
// quality 100 without subsampling takes about 3).
constexpr uintmax_t kMaxJpegFileBytes = uintmax_t{1} << 29;

bool read_file(const std::string& path, std::vector<unsigned char>& bytes, std::string& error) {
  // Before opening: fopen of a FIFO blocks until a writer appears.
  if (const std::string why = not_a_regular_file(path); !why.empty()) {
    error = why == "missing file" ? "cannot open: " + std::generic_category().message(ENOENT) : why;
    return false;
  }
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) {
    error = std::string("cannot open: ") + std::strerror(errno);
    return false;
  }
  // The whole file is read into memory: refuse one larger than any JPEG within the pixel limit.
  std::error_code ec;
  if (const uintmax_t size = fs::file_size(path, ec); !ec && size > kMaxJpegFileBytes) {
    error = "file of " + std::to_string(size) + " bytes is larger than the " +
            std::to_string(kMaxJpegFileBytes) + " bytes a JPEG may take";
    return false;
  }
  bytes.clear();
  unsigned char chunk[1 << 16];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof chunk, f.get())) > 0)
    bytes.insert(bytes.end(), chunk, chunk + n);
  if (std::ferror(f.get())) {
    error = "read error";
    return false;
  }
  return true;
}

std::string hex_start(const std::vector<unsigned char>& b) {
  std::ostringstream os;
  os << std::hex << std::setfill('0');
  for (size_t i = 0; i < b.size() && i < 4; ++i) os << (i ? " " : "") << std::setw(2) << int(b[i]);
  return os.str();
}

// libjpeg-turbo's warning for bytes of garbage between two markers, e.g. "Corrupt JPEG data:
// 240 extraneous bytes before marker 0xd9" (a few ImageNet files have it; the image is
// complete). The one warning that does not make a file fail (image_folder.h).
bool harmless_warning(const char* message) {
  return std::strstr(message, "extraneous bytes before marker") != nullptr;
}

}  // namespace

ImageFolder scan_image_folder(const std::string& root, const std::string& split) {
  require_folder(root, "root");
  const fs::path dir = fs::path(root) / split;
  require_folder(dir, "split");

  ImageFolder f;
  f.root = root;
  f.split = split;
  f.classes = list_names(dir, is_dir);
  if (f.classes.empty())
    fail(kName, ": ", dir.string(), ": no class folders (expected ", dir.string(),
         "/<class>/<image files>)");

  // The other official split, when it is there, must have the same classes: a label is an index
  // into the class list, and a model trained on one list is evaluated with the other.
  const std::string other = split == "train" ? "val" : split == "val" ? "train" : "";
  if (!other.empty()) {
    const fs::path odir = fs::path(root) / other;
    std::error_code ec;
    if (fs::is_directory(odir, ec)) {
      const std::vector<std::string> oc = list_names(odir, is_dir);
      if (oc != f.classes) {
        std::vector<std::string> only_here, only_there;
        std::set_difference(f.classes.begin(), f.classes.end(), oc.begin(), oc.end(),
                            std::back_inserter(only_here));
        std::set_difference(oc.begin(), oc.end(), f.classes.begin(), f.classes.end(),
                            std::back_inserter(only_there));
        std::string what;
        if (!only_here.empty()) what += "only in " + split + ": " + some_names(only_here);
        if (!only_there.empty())
          what += std::string(what.empty() ? "" : "; ") + "only in " + other + ": " +
                  some_names(only_there);
        fail(kName, ": ", dir.string(), ": class folders differ from those of ", odir.string(),
             " (", f.classes.size(), " vs ", oc.size(), " classes; ", what, ")");
      }
    }
  }

  for (size_t c = 0; c < f.classes.size(); ++c) {
    const fs::path cdir = dir / f.classes[c];
    const std::vector<std::string> files = list_names(cdir, is_file);
    if (files.empty()) fail(kName, ": ", cdir.string(), ": empty class folder (no image files)");
    for (const std::string& name : files)
      f.samples.emplace_back((cdir / name).string(), static_cast<int64_t>(c));
  }
  return f;
}

bool decode_jpeg(const std::string& path, DecodedImage& out, std::string& error) {
  int w = 0, h = 0;  // once the header is read: for an out-of-memory message
  try {
    std::vector<unsigned char> b;
    if (!read_file(path, b, error)) return false;
    if (b.empty()) {
      error = "empty file (0 bytes)";
      return false;
    }
    static const unsigned char png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (b.size() >= 8 && std::memcmp(b.data(), png_sig, 8) == 0) {
      error = "a PNG file, not a JPEG (only JPEG is decoded)";
      return false;
    }
    if (b.size() < 3 || b[0] != 0xFF || b[1] != 0xD8 || b[2] != 0xFF) {
      error = "not a JPEG file (no SOI marker FF D8 FF; the file starts with " + hex_start(b) +
              ", " + std::to_string(b.size()) + " bytes)";
      return false;
    }
    TjHandle tj;
    if (!tj.h) {
      error = std::string("cannot create a TurboJPEG decompressor: ") + tjGetErrorStr2(nullptr);
      return false;
    }
    int subsamp = 0, colorspace = 0;
    if (tjDecompressHeader3(tj.h, b.data(), b.size(), &w, &h, &subsamp, &colorspace) != 0) {
      error = std::string("corrupt or truncated JPEG header: ") + tjGetErrorStr2(tj.h);
      return false;
    }
    if (w <= 0 || h <= 0) {  // libjpeg-turbo 2.1 returns 0x0 when the file ends before the frame
      error = "corrupt or truncated JPEG header: no image size (frame header) in the " +
              std::to_string(b.size()) + " bytes of the file";
      return false;
    }
    // From the header, before anything is allocated: a 2 KB file can declare 16384 x 16384.
    if (int64_t(w) * h > kMaxImagePixels) {
      error = "image of " + std::to_string(w) + "x" + std::to_string(h) + " = " +
              std::to_string(int64_t(w) * h) + " pixels is above the limit of " +
              std::to_string(kMaxImagePixels) + " pixels (a decompression bomb?)";
      return false;
    }
    // libjpeg-turbo 2.1 has no CMYK/YCCK -> RGB conversion: decode to CMYK and convert below.
    const bool cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
    const int channels = cmyk ? 4 : 3;
    std::vector<unsigned char> px(size_t(w) * size_t(h) * channels);
    if (tjDecompress2(tj.h, b.data(), b.size(), px.data(), w, 0, h, cmyk ? TJPF_CMYK : TJPF_RGB,
                      0) != 0) {
      const char* message = tjGetErrorStr2(tj.h);
      // A warning ("Premature end of JPEG file": the data are cut short and the missing rows
      // come out grey) is a failure too, except the harmless one.
      if (tjGetErrorCode(tj.h) != TJERR_WARNING) {
        error = std::string("corrupt JPEG data: ") + message;
        return false;
      }
      if (!harmless_warning(message)) {
        error = std::string("truncated or corrupt JPEG data (libjpeg-turbo: ") + message + ")";
        return false;
      }
    }
    out.H = h;
    out.W = w;
    if (!cmyk) {
      out.rgb = std::move(px);
    } else {
      // Adobe's inverted CMYK (libjpeg-turbo's cmyk.h): R = C K / 255, rounded.
      out.rgb.resize(size_t(w) * size_t(h) * 3);
      const size_t n = size_t(w) * size_t(h);
      for (size_t i = 0; i < n; ++i) {
        const unsigned k = px[4 * i + 3];
        for (int c = 0; c < 3; ++c)
          out.rgb[3 * i + c] = static_cast<uint8_t>((px[4 * i + c] * k + 127) / 255);
      }
    }
    return true;
  } catch (const std::bad_alloc&) {
    error = w > 0 ? "out of memory for the pixels of a " + std::to_string(w) + "x" + std::to_string(h) + " image"
                  : "out of memory reading the file";
    return false;
  }
}

void warn_skipped(const std::string& path, const std::string& reason) {
  static std::mutex mu;
  const std::string line = std::string(kName) + ": skipping " + path + ": " + reason + "\n";
  std::lock_guard<std::mutex> lock(mu);
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

void DecodeStats::check(double max_fraction, int64_t out_of) const {
  const int64_t t = out_of < 0 ? total() : out_of, f = failed();
  if (t == 0) return;
  const double frac = double(f) / double(t);
  if (frac > max_fraction)
    fail(kName, ": ", f, " of ", t, " files (", percent(frac),
         ") could not be decoded, more than the allowed ", percent(max_fraction));
}

bool decode_jpeg_or_warn(const std::string& path, DecodedImage& out, DecodeStats* stats) {
  std::string error;
  const bool ok = decode_jpeg(path, out, error);
  if (!ok) warn_skipped(path, error);
  if (stats) stats->record(ok);
  return ok;
}

}  // namespace cnx
