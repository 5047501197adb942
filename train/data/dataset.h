// Image classification datasets held in memory as uint8 NHWC, read from their distribution
// formats:
//
//   fashion_mnist  idx files (optionally gzipped, read with zlib): train-images-idx3-ubyte[.gz],
//                  train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz],
//                  t10k-labels-idx1-ubyte[.gz]. Header: big-endian u32 magic 0x00000803, N,
//                  rows, cols (images) / magic 0x00000801, N (labels); then one byte per pixel
//                  or label. 28x28x1, 10 classes. Default folder: /usr/share/datasets/fashion-mnist
//                  (Debian's dataset-fashion-mnist).
//   cifar10        the "binary version": data_batch_1.bin .. data_batch_5.bin (train),
//                  test_batch.bin (test); records of 1 label byte + 3072 pixel bytes, planar
//                  (1024 R, then 1024 G, then 1024 B, each 32x32 row-major), converted to NHWC.
//                  Class names from batches.meta.txt when present.
//   cifar100       train.bin, test.bin; records of 1 coarse label byte + 1 fine label byte + 3072
//                  pixel bytes (planar as above). The fine labels (100 classes) are used; names
//                  from fine_label_names.txt when present.
//
// For CIFAR, data_path is the folder holding the .bin files or its parent (with
// cifar-10-batches-bin/ or cifar-100-binary/ inside). There is no default CIFAR location.
//
// Bad files are refused with a cnx::Error of one line that starts with the dataset and the
// file's path and says what is wrong (missing, not a regular file, truncated, wrong magic,
// counts that disagree, a label out of range, a size that is not a whole number of records,
// sizes above the limits below).
//
// Hostile files: every size read from a file is checked for overflow (checked_product) and
// against the limits below before anything is allocated. An idx file's header is read first
// and its declared size checked; decompression then stops at that size (bytes after it, a
// gzip bomb's, are counted up to 1 MiB, no further), the buffer grows only with the data
// actually there, and the images' count is checked against the labels' before the images are
// inflated.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace cnx {

// ---- limits on what a file may declare -------------------------------------------------------

// The largest image any reader decodes or any transform produces, in pixels: Pillow's
// decompression-bomb guard (PIL.Image.MAX_IMAGE_PIXELS = 89,478,485, about 0.25 GB of RGB).
// A file declaring more (a 2 KB JPEG can declare 16384 x 16384) is a bad file.
constexpr int64_t kMaxImagePixels = 89'478'485;
// The most pixel bytes an in-memory dataset (all its files together) may hold: 4 GiB, about 90
// times Fashion-MNIST's training split (47,040,000 bytes) and 26 times CIFAR-100's.
constexpr int64_t kMaxDatasetBytes = int64_t{1} << 32;

// a * b * ... of non-negative sizes read from a file; false (and `product` unspecified) when
// the product overflows int64.
inline bool checked_product(std::initializer_list<int64_t> factors, int64_t& product) {
  product = 1;
  for (const int64_t f : factors)
    if (f < 0 || __builtin_mul_overflow(product, f, &product)) return false;
  return true;
}

// Why `path` cannot be read as a data file, or "" when it is a regular file (symbolic links
// followed): "missing", "a folder, not a regular file", "a FIFO, not a regular file", ...
// Readers call it before opening: open(2) of a FIFO blocks until some writer appears, and a
// device can be endless.
std::string not_a_regular_file(const std::string& path);

struct Dataset {
  std::string name;  // "fashion_mnist", "cifar10", "cifar100"
  int64_t N = 0, H = 0, W = 0, C = 0, num_classes = 0;
  std::vector<uint8_t> images;  // (N, H, W, C)
  std::vector<int64_t> labels;  // (N), each in [0, num_classes)
  std::vector<std::string> class_names;  // num_classes names
  // Per-channel statistics of the training pixels in [0, 1] units (channels >= C unused); the
  // loader normalises x -> (x / 255 - mean[c]) / std[c].
  std::array<float, 3> mean{}, std{};
};

// What is known about a dataset without reading it: everything but N, images and labels (for
// `convnext predict`, which needs the normalisation and the class names of a trained model).
Dataset dataset_info(const std::string& name);

// The names load_dataset accepts, in the order the error messages list them.
const std::vector<std::string>& known_datasets();

// Reads the train or test split of `name` from `data_path` ("" = the default location, which
// only fashion_mnist has). Throws cnx::Error (one line) on any bad input.
Dataset load_dataset(const std::string& name, const std::string& data_path, bool train);

}  // namespace cnx
