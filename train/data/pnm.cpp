#include "train/data/pnm.h"

#include <cctype>
#include <fstream>
#include <limits>

#include "tensor/error.h"
#include "tensor/escape.h"
#include "train/data/dataset.h"

namespace cnx {

Image read_pnm(const std::string& path) {
  // Before opening: a FIFO would block the open forever.
  if (const std::string why = not_a_regular_file(path); !why.empty()) fail(path, ": ", why);
  std::ifstream f(path, std::ios::binary);
  CNX_CHECK(f.good(), path, ": cannot open");
  f.seekg(0, std::ios::end);
  const std::streamoff file_size = f.tellg();
  f.seekg(0);
  CNX_CHECK(file_size >= 0 && f.good(), path, ": cannot read its size");
  std::string magic(2, '\0');
  f.read(magic.data(), 2);
  magic.resize(static_cast<size_t>(f.gcount()));
  CNX_CHECK(magic == "P5" || magic == "P6", path, ": not a binary PGM/PPM image (magic '",
            escape_for_message(magic), "'); models trained on image_folder read JPEG too");
  // A header number: decimal digits after whitespace and comments, in [1, max].
  auto number = [&](const char* field, long long max) {
    f >> std::ws;
    while (f.peek() == '#') {  // comments
      f.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
      f >> std::ws;
    }
    CNX_CHECK(std::isdigit(f.peek()), path, ": bad PGM/PPM header: ", field, " is not a number");
    long long v = 0;
    while (std::isdigit(f.peek())) {
      v = v * 10 + (f.get() - '0');
      CNX_CHECK(v <= max, path, ": PGM/PPM header field ", field, " is above the limit of ", max);
    }
    CNX_CHECK(v > 0, path, ": PGM/PPM header field ", field, " is 0");
    return v;
  };
  Image img;
  img.W = number("width", kMaxImagePixels);
  img.H = number("height", kMaxImagePixels);
  const long long maxval = number("maxval", 65535);
  CNX_CHECK(maxval < 256, path, ": 16-bit PGM/PPM is not supported (maxval ", maxval, ")");
  CNX_CHECK(std::isspace(f.get()), path, ": bad PGM/PPM header: no whitespace after maxval");
  img.C = magic == "P5" ? 1 : 3;
  // The sizes are checked before anything is allocated: the image against the pixel limit
  // (a 30-byte file can declare 60000 x 60000), its bytes against what the file holds.
  int64_t pixels = 0, bytes = 0;
  CNX_CHECK(checked_product({img.W, img.H}, pixels) && pixels <= kMaxImagePixels, path,
            ": PGM/PPM header: width x height = ", img.W, "x", img.H, " is above the limit of ",
            kMaxImagePixels, " pixels");
  bytes = pixels * img.C;
  const std::streamoff data_start = f.tellg();
  const int64_t have = static_cast<int64_t>(file_size - data_start);
  CNX_CHECK(have >= bytes, path, ": truncated image data: the header declares ", img.W, "x", img.H,
            "x", img.C, " (", bytes, " bytes) but ", have, " bytes follow it");
  img.pixels.resize(static_cast<size_t>(bytes));
  f.read(reinterpret_cast<char*>(img.pixels.data()), static_cast<std::streamsize>(bytes));
  CNX_CHECK(f.gcount() == static_cast<std::streamsize>(bytes), path, ": truncated image data");
  return img;
}

}  // namespace cnx
