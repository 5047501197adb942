// Fuzz target "cifar": cnx::load_dataset("cifar10" or "cifar100", dir, train)
// (train/data/dataset.h), the CIFAR binary-version reader, on a folder made from the input:
//
//   byte 0          flags: bit 0 cifar100 (else cifar10), bit 1 the test split, bit 2 the files
//                   go into the subfolder the reader looks for (cifar-10-batches-bin/ or
//                   cifar-100-binary/) and the parent is passed, bit 3 "compact" .bin pieces
//                   (below), bit 4 a class-names file is written (batches.meta.txt /
//                   fine_label_names.txt)
//   if bit 4        a piece (16-bit little-endian length, then the bytes): the names file
//   then            one piece per .bin file the split reads: data_batch_1..5.bin (cifar10
//                   train), test_batch.bin, train.bin or test.bin. When the input ends before a
//                   piece, that file is not created.
//
// A compact piece holds only the label bytes (1 per record for CIFAR-10, coarse + fine for
// CIFAR-100), for at most 64 records; the 3072 planar pixel bytes of each record are made up
// here, and any bytes left over (fewer than a record's label bytes) are appended at the end of
// the file. So the fuzzer explores record counts and labels without carrying 3 KB per record;
// a non-compact piece is written as given (whole-record sizes, truncation).
//
// Beyond "no crash": a dataset that loads has N > 0 records of 32x32x3, N labels in range,
// num_classes names, and, for compact pieces, exactly the planar pixels made up here, in NHWC.
#include <exception>
#include <vector>

#include "fuzz_util.h"
#include "train/data/dataset.h"

namespace {

const cnx_fuzz::ScratchDir& scratch() {
  static const cnx_fuzz::ScratchDir dir("cifar");
  return dir;
}

constexpr size_t kPlane = 32 * 32, kPixels = 3 * kPlane, kMaxCompactRecords = 64;

uint8_t made_up_pixel(size_t record, size_t channel, size_t i) {
  return static_cast<uint8_t>(record * 7 + channel * 3 + i);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cnx_fuzz::Reader in(data, size);
  const uint8_t flags = in.byte();
  const bool cifar100 = flags & 1, train = !(flags & 2), subdir = flags & 4, compact = flags & 8;
  const size_t label_bytes = cifar100 ? 2 : 1;

  scratch().clear();
  std::filesystem::path dir = scratch().path();
  if (subdir) {
    dir /= cifar100 ? "cifar-100-binary" : "cifar-10-batches-bin";
    std::filesystem::create_directory(dir);
  }
  if (flags & 16)
    cnx_fuzz::write_file((dir / (cifar100 ? "fine_label_names.txt" : "batches.meta.txt")).string(),
                         in.piece());

  std::vector<std::string> files;
  if (cifar100)
    files = {train ? "train.bin" : "test.bin"};
  else if (train)
    files = {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
             "data_batch_5.bin"};
  else
    files = {"test_batch.bin"};

  std::vector<uint8_t> expected_labels;  // compact pieces: the (fine) labels written, in order
  size_t records = 0;                    // compact pieces: records written so far
  for (const std::string& name : files) {
    if (in.empty()) break;
    const std::string_view piece = in.piece();
    if (!compact) {
      cnx_fuzz::write_file((dir / name).string(), piece);
      continue;
    }
    const size_t n = std::min(piece.size() / label_bytes, kMaxCompactRecords);
    std::string file;
    for (size_t r = 0; r < n; ++r, ++records) {
      file.append(piece.substr(r * label_bytes, label_bytes));
      expected_labels.push_back(static_cast<uint8_t>(piece[r * label_bytes + label_bytes - 1]));
      for (size_t c = 0; c < 3; ++c)
        for (size_t i = 0; i < kPlane; ++i) file.push_back(static_cast<char>(made_up_pixel(records, c, i)));
    }
    file.append(piece.substr(n * label_bytes));  // what is left: not a whole record
    cnx_fuzz::write_file((dir / name).string(), file);
  }

  try {
    const cnx::Dataset d = cnx::load_dataset(cifar100 ? "cifar100" : "cifar10",
                                             scratch().path().string(), train);
    FUZZ_EXPECT(d.N > 0 && d.H == 32 && d.W == 32 && d.C == 3);
    FUZZ_EXPECT(d.num_classes == (cifar100 ? 100 : 10));
    FUZZ_EXPECT(static_cast<int64_t>(d.labels.size()) == d.N);
    FUZZ_EXPECT(cnx_fuzz::product_is(d.images.size(), {d.N, d.H, d.W, d.C}));
    for (const int64_t label : d.labels) FUZZ_EXPECT(label >= 0 && label < d.num_classes);
    FUZZ_EXPECT(static_cast<int64_t>(d.class_names.size()) == d.num_classes);
    if (compact) {
      FUZZ_EXPECT(static_cast<size_t>(d.N) == records);
      for (size_t r = 0; r < records; ++r) {
        FUZZ_EXPECT(d.labels[r] == expected_labels[r]);
        const uint8_t* img = d.images.data() + r * kPixels;  // (32, 32, 3)
        for (size_t i = 0; i < kPlane; ++i)
          for (size_t c = 0; c < 3; ++c) FUZZ_EXPECT(img[i * 3 + c] == made_up_pixel(r, c, i));
      }
    }
  } catch (const std::exception&) {
  }
  return 0;
}
