// Binary PGM (P5) and PPM (P6) images with 8-bit samples: the format `convnext predict` reads
// for models trained on the small datasets (Fashion-MNIST, CIFAR).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cnx {

// An 8-bit image: pixels holds (H, W, C) bytes, row-major, channels last.
struct Image {
  int64_t H = 0, W = 0, C = 0;
  std::vector<uint8_t> pixels;
};

// Reads a binary PGM (C = 1) or PPM (C = 3) file. Throws cnx::Error (one line naming the file
// and the field) for anything else: another magic, a bad header, 16-bit samples, missing data.
Image read_pnm(const std::string& path);

}  // namespace cnx
