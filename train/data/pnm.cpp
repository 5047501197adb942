#include "train/data/pnm.h"

#include <fstream>

#include "tensor/error.h"

namespace cnx {

Image read_pnm(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  CNX_CHECK(f.good(), path, ": cannot open");
  std::string magic;
  f >> magic;
  CNX_CHECK(magic == "P5" || magic == "P6", path, ": not a binary PGM/PPM image (magic '", magic,
            "'); models trained on image_folder read JPEG too");
  auto number = [&]() {
    f >> std::ws;
    while (f.peek() == '#') {  // comments
      std::string line;
      std::getline(f, line);
      f >> std::ws;
    }
    long long v = -1;
    f >> v;
    CNX_CHECK(f.good() && v > 0, path, ": bad PGM/PPM header");
    return v;
  };
  Image img;
  img.W = number();
  img.H = number();
  const long long maxval = number();
  CNX_CHECK(maxval < 256, path, ": 16-bit PGM/PPM is not supported");
  f.get();  // the single whitespace before the data
  img.C = magic == "P5" ? 1 : 3;
  img.pixels.resize(static_cast<size_t>(img.H * img.W * img.C));
  f.read(reinterpret_cast<char*>(img.pixels.data()), static_cast<std::streamsize>(img.pixels.size()));
  CNX_CHECK(f.gcount() == static_cast<std::streamsize>(img.pixels.size()), path, ": truncated image data");
  return img;
}

}  // namespace cnx
