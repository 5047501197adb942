// Fuzz target "idx": cnx::load_dataset("fashion_mnist", dir, train) (train/data/dataset.h), the
// idx reader, on a folder made from the input:
//
//   byte 0          flags: bit 0 the images file is gzipped here (else written as given),
//                   bit 1 the same for the labels file, bit 2 the test split (t10k-*) instead
//                   of train-*, bit 3 / bit 4 the images / labels file is named without ".gz"
//                   (the reader takes the uncompressed name when there is no .gz)
//   bytes 1-2       n, little-endian; the next n bytes are the images file's content
//                   (train-images-idx3-ubyte)
//   the rest        the labels file's content (train-labels-idx1-ubyte)
//
// Gzipping here lets the fuzzer work on the idx headers themselves; a file "as given" under a
// .gz name exercises zlib's paths (a file that is not gzip passes through gzread unchanged).
//
// Beyond "no crash": a dataset that loads has N > 0 images, N labels in [0, 10), and exactly
// N x H x W x C pixels.
#include <zlib.h>

#include <exception>

#include "fuzz_util.h"
#include "train/data/dataset.h"

namespace {

const cnx_fuzz::ScratchDir& scratch() {
  static const cnx_fuzz::ScratchDir dir("idx");
  return dir;
}

// A gzip stream (RFC 1952) of `bytes`, fast level: the content matters, not the ratio.
std::string gzip(std::string_view bytes) {
  z_stream z{};
  if (deflateInit2(&z, 1, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) std::abort();
  std::string out(deflateBound(&z, bytes.size()) + 32, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(bytes.data()));
  z.avail_in = static_cast<uInt>(bytes.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  if (deflate(&z, Z_FINISH) != Z_STREAM_END) std::abort();
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

void write_idx(const std::string& stem, std::string_view content, bool compress, bool plain_name) {
  if (compress)
    cnx_fuzz::write_file(scratch().file(stem + ".gz"), gzip(content));
  else
    cnx_fuzz::write_file(scratch().file(plain_name ? stem : stem + ".gz"), content);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  cnx_fuzz::Reader in(data, size);
  const uint8_t flags = in.byte();
  const std::string_view images = in.piece();
  const std::string_view labels = in.rest();
  const bool train = !(flags & 4);
  const std::string split = train ? "train" : "t10k";

  scratch().clear();
  write_idx(split + "-images-idx3-ubyte", images, flags & 1, flags & 8);
  write_idx(split + "-labels-idx1-ubyte", labels, flags & 2, flags & 16);

  try {
    const cnx::Dataset d = cnx::load_dataset("fashion_mnist", scratch().path().string(), train);
    FUZZ_EXPECT(d.N > 0 && d.H > 0 && d.W > 0 && d.C == 1 && d.num_classes == 10);
    FUZZ_EXPECT(static_cast<int64_t>(d.labels.size()) == d.N);
    FUZZ_EXPECT(cnx_fuzz::product_is(d.images.size(), {d.N, d.H, d.W, d.C}));
    for (const int64_t label : d.labels) FUZZ_EXPECT(label >= 0 && label < d.num_classes);
    FUZZ_EXPECT(static_cast<int64_t>(d.class_names.size()) == d.num_classes);
  } catch (const std::exception&) {
  }
  return 0;
}
