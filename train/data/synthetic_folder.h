// Synthetic ImageFolder datasets written as real JPEG files (libjpeg-turbo), for tests, the
// loader benchmark and a quick end-to-end run without downloading anything:
//
//   convnext make-folder --out /tmp/stripes --train_per_class 200 --val_per_class 50 --size 64
//
// Two classes, "horizontal" and "vertical": stripes of a random period (8 to 16 pixels), phase
// and pair of colours, plus uniform noise of +-24 levels. A class is a property of the whole
// image that survives every augmentation of the paper's recipe (crops, flips, small rotations
// and shears, colour changes), so a small ConvNeXt learns to tell them apart.
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace cnx {

// Encodes an (H, W, 3) RGB image as a baseline JPEG (4:2:0, `quality`) at `path`, written
// atomically (a temporary file, then rename). Throws cnx::Error on failure.
void write_jpeg(const std::string& path, std::span<const uint8_t> rgb, int64_t H, int64_t W,
                int quality = 90);

struct SyntheticFolderOptions {
  int64_t train_per_class = 200, val_per_class = 50;
  int64_t height = 64, width = 64;  // the files' size
  uint64_t seed = 0;
  int quality = 90;
};

// Writes root/{train,val}/{horizontal,vertical}/NNNNN.jpg. Throws cnx::Error if root exists and
// is not an empty folder (nothing is overwritten).
void write_stripes_folder(const std::string& root, const SyntheticFolderOptions& opt = {});

}  // namespace cnx
