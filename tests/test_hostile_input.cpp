// Hostile input files (issue 13, items 2, 3 and 7): crafted files, small and written here, that
// declare sizes whose products overflow, more data than they hold, gzip and JPEG bombs, a FIFO
// in place of a file, names with terminal escapes, a PyTorch checkpoint in place of a
// safetensors file. Each must be refused with a one-line cnx::Error (or, for an image folder's
// JPEG, a failed decode that the loader counts) that names the file and the field, before
// anything large is allocated or inflated, and without blocking.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <turbojpeg.h>
#include <unistd.h>
#include <fcntl.h>
#include <zlib.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <string>
#include <vector>

#include "models/safetensors.h"
#include "tensor/escape.h"
#include "tests/testing.h"
#include "train/data/augment.h"
#include "train/data/dataset.h"
#include "train/data/image_folder.h"
#include "train/data/loader.h"
#include "train/data/pnm.h"

using namespace cnx;
using cnx::test::error_of;
using cnx::test::expect_error;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<uint8_t>;

void put_be32(Bytes& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s));
}

Bytes idx_header(uint32_t magic, std::initializer_list<uint32_t> fields) {
  Bytes b;
  put_be32(b, magic);
  for (uint32_t f : fields) put_be32(b, f);
  return b;
}

void write_bytes(const fs::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary).write(s.data(), static_cast<std::streamsize>(s.size()));
}
void write_bytes(const fs::path& p, const Bytes& b) {
  write_bytes(p, std::string(b.begin(), b.end()));
}

// `head`, then `zeros` zero bytes, gzipped (level 9: zeros compress about 1000:1, a bomb).
void write_gz(const fs::path& p, const Bytes& head, size_t zeros = 0) {
  gzFile f = gzopen(p.c_str(), "wb9");
  ASSERT_NE(f, nullptr);
  if (!head.empty()) gzwrite(f, head.data(), static_cast<unsigned>(head.size()));
  const std::vector<char> chunk(1 << 20, 0);
  for (size_t left = zeros; left > 0;) {
    const size_t n = std::min(left, chunk.size());
    gzwrite(f, chunk.data(), static_cast<unsigned>(n));
    left -= n;
  }
  gzclose(f);
}


// The error of fn, which reads the FIFO `fifo`; "BLOCKED" when it is still waiting after 3 s
// (then a writer is opened and closed to release it, so that the test ends).
std::string error_without_blocking(const fs::path& fifo, const std::function<void()>& fn) {
  auto result = std::async(std::launch::async, [&] { return error_of(fn); });
  if (result.wait_for(std::chrono::seconds(3)) == std::future_status::ready) return result.get();
  const int w = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
  if (w >= 0) ::close(w);
  (void)result.get();
  return "BLOCKED";
}

void expect_one_line_with(const std::string& msg, const std::vector<std::string>& parts) {
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_FALSE(msg.empty()) << "no error";
  for (const std::string& part : parts)
    EXPECT_NE(msg.find(part), std::string::npos) << "error message lacks '" << part << "': " << msg;
}

class Hostile : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("cnx_hostile_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

// ---- the escape helper ---------------------------------------------------------------------------

TEST(EscapeForMessage, ControlCharactersAndInvalidUtf8BecomeEscapes) {
  EXPECT_EQ(escape_for_message("plain name.weight"), "plain name.weight");
  EXPECT_EQ(escape_for_message("a\nb\tc\rd"), "a\\nb\\tc\\rd");
  EXPECT_EQ(escape_for_message("\x1b[2J\x1b]0;owned\x07"), "\\x1b[2J\\x1b]0;owned\\x07");
  EXPECT_EQ(escape_for_message(std::string("nul\0x", 5)), "nul\\x00x");
  EXPECT_EQ(escape_for_message("del\x7f"), "del\\x7f");
  EXPECT_EQ(escape_for_message("back\\slash"), "back\\\\slash");
  // Valid UTF-8 stays readable; C1 controls (U+009B is a one-byte CSI), bidi overrides
  // (U+202E) and invalid bytes do not.
  EXPECT_EQ(escape_for_message("caf\xc3\xa9 \xe2\x82\xac"), "caf\xc3\xa9 \xe2\x82\xac");
  EXPECT_EQ(escape_for_message("\xc2\x9b" "31m"), "\\xc2\\x9b31m");
  EXPECT_EQ(escape_for_message("a\xe2\x80\xae" "b"), "a\\xe2\\x80\\xaeb");
  EXPECT_EQ(escape_for_message("\xff\xfe"), "\\xff\\xfe");
  EXPECT_EQ(escape_for_message("\xc0\xaf"), "\\xc0\\xaf");  // overlong '/'
  EXPECT_EQ(escape_for_message("cut \xe2\x82"), "cut \\xe2\\x82");
}

// ---- safetensors ---------------------------------------------------------------------------------

std::string u64le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>(v >> (8 * i));
  return s;
}
std::string safetensors_file(const std::string& header, const std::string& data = "") {
  return u64le(header.size()) + header + data;
}

TEST(HostileSafetensors, NamesFromTheFileAreEscapedInMessages) {
  // A tensor name with a terminal escape sequence (JSON \u001b) and a one-byte CSI (U+009B).
  const std::string header =
      "{\"evil\\u001b[2Jname\\u009b31m\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[0,1]}}";
  const std::string msg = error_of([&] { (void)parse_safetensors(safetensors_file(header, "x"), "f.st"); });
  expect_one_line_with(msg, {"f.st", "tensor \"evil\\x1b[2Jname\\xc2\\x9b31m\"", "unsupported dtype \"BOOL\""});
  EXPECT_EQ(msg.find('\x1b'), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\x9b'), std::string::npos) << msg;
  // A dtype string and a metadata key from the file: escaped too.
  const std::string dtype_msg = error_of([&] {
    (void)parse_safetensors(
        safetensors_file("{\"a\":{\"dtype\":\"F\\u001b32\",\"shape\":[],\"data_offsets\":[0,4]}}", "xxxx"), "f.st");
  });
  expect_one_line_with(dtype_msg, {"unsupported dtype \"F\\x1b32\""});
  const std::string meta_msg = error_of([&] {
    (void)parse_safetensors(safetensors_file("{\"__metadata__\":{\"k\\u001b\\n\":1}}"), "f.st");
  });
  expect_one_line_with(meta_msg, {"\"k\\x1b\\n\"", "not a string"});
  // The JSON parser's excerpt of a bad header (raw DEL and a C1 byte pair after a name).
  const std::string parse_msg =
      error_of([&] { (void)parse_safetensors(safetensors_file("{\"a\x7f\xc2\x9b\":"), "f.st"); });
  expect_one_line_with(parse_msg, {"f.st", "not valid JSON"});
  EXPECT_EQ(parse_msg.find('\x7f'), std::string::npos) << parse_msg;
  EXPECT_EQ(parse_msg.find('\x9b'), std::string::npos) << parse_msg;
}

TEST_F(Hostile, SafetensorsRefusesAFifoWithoutBlocking) {
  const fs::path fifo = dir_ / "weights.safetensors";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_one_line_with(error_without_blocking(fifo, [&] { (void)read_safetensors(fifo.string()); }),
                       {fifo.string(), "not a regular file", "FIFO"});
  expect_one_line_with(
      error_without_blocking(fifo, [&] { (void)read_safetensors_metadata(fifo.string()); }),
      {fifo.string(), "not a regular file", "FIFO"});
}

TEST_F(Hostile, SafetensorsSaysAPyTorchFileIsOne) {
  // torch.save's zip archive (a local file header: PK\3\4, version 20, flags 0) and a legacy
  // pickle (protocol 2, then a dict).
  const std::string zip = std::string("PK\x03\x04\x14\x00\x00\x00\x08\x00", 10) + std::string(200, 'z');
  const std::string pickle = std::string("\x80\x02}q\x00(X\x06\x00\x00\x00", 11) + std::string(200, 'p');
  for (const auto& [bytes, kind] : {std::pair{zip, "a zip archive"}, std::pair{pickle, "a pickle"}}) {
    const fs::path p = dir_ / "convnext_tiny_1k_224.pth";
    write_bytes(p, bytes);
    expect_one_line_with(error_of([&] { (void)read_safetensors(p.string()); }),
                         {p.string(), "looks like a PyTorch .pth file", kind, "tools/convert_checkpoint.py"});
    expect_one_line_with(error_of([&] { (void)parse_safetensors(bytes, "x.pth"); }),
                         {"x.pth", "looks like a PyTorch .pth file"});
  }
}

// ---- idx (Fashion-MNIST) -------------------------------------------------------------------------

TEST_F(Hostile, IdxSizeProductThatWrapsToZeroIsRefused) {
  // 65536 images of 2^24 x 2^24: 2^64 bytes, 0 in 64-bit arithmetic, "matching" the 0 bytes
  // that follow the header.
  write_bytes(dir_ / "train-images-idx3-ubyte", idx_header(0x803, {65536, 1u << 24, 1u << 24}));
  Bytes labels = idx_header(0x801, {65536});
  labels.resize(labels.size() + 65536, 1);
  write_bytes(dir_ / "train-labels-idx1-ubyte", labels);
  const std::string msg = error_of([&] { (void)load_dataset("fashion_mnist", dir_.string(), true); });
  expect_one_line_with(msg, {"fashion_mnist:", "train-images-idx3-ubyte", "rows x cols", "16777216x16777216",
                             "limit of 89478485 pixels"});

  // A count whose bytes pass the limit of an in-memory dataset (2^32 - 1 images of 28x28).
  write_bytes(dir_ / "train-images-idx3-ubyte", idx_header(0x803, {0xffffffffu, 28, 28}));
  expect_one_line_with(error_of([&] { (void)load_dataset("fashion_mnist", dir_.string(), true); }),
                       {"train-images-idx3-ubyte", "count", "4294967295 images of 28x28", "limit of 4294967296 bytes"});
}

TEST_F(Hostile, IdxGzipBombStopsAtTheDeclaredSize) {
  // 4 images of 28x28 declared, then 64 MB of zeros that gzip to about 64 KB.
  Bytes labels = idx_header(0x801, {4});
  labels.insert(labels.end(), {1, 2, 3, 4});
  write_gz(dir_ / "train-labels-idx1-ubyte.gz", labels);
  write_gz(dir_ / "train-images-idx3-ubyte.gz", idx_header(0x803, {4, 28, 28}), size_t{64} << 20);
  ASSERT_LT(fs::file_size(dir_ / "train-images-idx3-ubyte.gz"), 200'000u);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string msg = error_of([&] { (void)load_dataset("fashion_mnist", dir_.string(), true); });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // The trailing bytes are counted up to 1 MiB, not inflated to the end.
  expect_one_line_with(msg, {"train-images-idx3-ubyte.gz", "more than 1048576 bytes after the 4 images of 28x28"});
  EXPECT_LT(seconds, 2.0);

  // A bomb whose header's count disagrees with the labels' is refused before it is inflated.
  write_gz(dir_ / "train-images-idx3-ubyte.gz", idx_header(0x803, {60000, 28, 28}), size_t{64} << 20);
  expect_one_line_with(error_of([&] { (void)load_dataset("fashion_mnist", dir_.string(), true); }),
                       {"train-labels-idx1-ubyte.gz", "count mismatch", "4 labels", "60000 images"});

  // Less than declared: truncated, and the buffer never grew past what was there.
  write_gz(dir_ / "train-images-idx3-ubyte.gz", idx_header(0x803, {4, 28, 28}), 1000);
  expect_one_line_with(error_of([&] { (void)load_dataset("fashion_mnist", dir_.string(), true); }),
                       {"truncated", "4 images of 28x28", "3136 bytes", "only 1000"});
}

TEST_F(Hostile, IdxAndCifarRefuseAFifo) {
  ASSERT_EQ(::mkfifo((dir_ / "train-images-idx3-ubyte.gz").c_str(), 0600), 0);
  expect_one_line_with(
      error_without_blocking(dir_ / "train-images-idx3-ubyte.gz",
                             [&] { (void)load_dataset("fashion_mnist", dir_.string(), true); }),
      {"fashion_mnist:", "train-images-idx3-ubyte.gz", "FIFO", "not a regular file"});

  const fs::path cifar = dir_ / "cifar";
  fs::create_directories(cifar);
  ASSERT_EQ(::mkfifo((cifar / "test_batch.bin").c_str(), 0600), 0);
  expect_one_line_with(error_without_blocking(cifar / "test_batch.bin",
                                              [&] { (void)load_dataset("cifar10", cifar.string(), false); }),
                       {"cifar10:", "test_batch.bin", "FIFO", "not a regular file"});
}

TEST_F(Hostile, CifarFileAboveTheDatasetLimitIsRefusedBeforeReading) {
  // A sparse file of 1,400,000 records (4.3 GB, no disk blocks): refused from its size.
  const fs::path cifar = dir_ / "cifar";
  fs::create_directories(cifar);
  write_bytes(cifar / "test_batch.bin", std::string());
  fs::resize_file(cifar / "test_batch.bin", uint64_t{3073} * 1'400'000);
  expect_one_line_with(error_of([&] { (void)load_dataset("cifar10", cifar.string(), false); }),
                       {"cifar10:", "test_batch.bin", "1400000 records", "limit of 4294967296"});
}

TEST(HostileLoader, SizesThatOverflowAreRefused) {
  // A Dataset whose N x H x W x C wraps to 0 (its images, empty, "match").
  Dataset d = dataset_info("fashion_mnist");
  d.N = 65536;
  d.H = d.W = int64_t{1} << 24;
  d.labels.assign(65536, 0);
  expect_error([&] { DataLoader l(d, LoaderOptions::evaluation(4)); }, {"fashion_mnist", "more bytes than int64"});
  // A batch size whose batch block would be petabytes.
  Dataset small = dataset_info("fashion_mnist");
  small.N = 1;
  small.H = small.W = 28;
  small.C = 1;
  small.images.assign(28 * 28, 0);
  small.labels.assign(1, 0);
  expect_error([&] { DataLoader l(small, LoaderOptions::evaluation(int64_t{1} << 40)); },
               {"a batch of 1099511627776 images of 32x32x1", "limit of 17179869184 bytes"});
}

// ---- PGM / PPM -----------------------------------------------------------------------------------

TEST_F(Hostile, PnmSizesAreCheckedBeforeAllocating) {
  const fs::path p = dir_ / "x.pgm";
  // 2^32 x 2^32 x 1: 2^64 bytes, 0 in 64-bit arithmetic.
  write_bytes(p, "P5\n4294967296 4294967296\n255\n");
  expect_one_line_with(error_of([&] { (void)read_pnm(p.string()); }), {p.string(), "width", "above the limit"});
  write_bytes(p, "P5\n65536 65536\n255\n");
  expect_one_line_with(error_of([&] { (void)read_pnm(p.string()); }),
                       {p.string(), "width x height = 65536x65536", "limit of 89478485 pixels"});
  write_bytes(p, "P5\n99999999999999999999999 1\n255\n");
  expect_one_line_with(error_of([&] { (void)read_pnm(p.string()); }), {p.string(), "width", "above the limit"});
  // A 30-byte file declaring 9000 x 9000 (under the pixel limit): refused from the file's size.
  write_bytes(p, "P5\n9000 9000\n255\nabcdefghijklm");
  ASSERT_EQ(fs::file_size(p), 30u);
  expect_one_line_with(error_of([&] { (void)read_pnm(p.string()); }),
                       {p.string(), "truncated", "9000x9000x1 (81000000 bytes) but 13 bytes follow it"});
  write_bytes(p, "P5\n2 1\n65535\n\x01\x02\x03\x04");
  expect_one_line_with(error_of([&] { (void)read_pnm(p.string()); }), {p.string(), "16-bit"});
  write_bytes(p, "P5\n2 x\n255\n");
  expect_one_line_with(error_of([&] { (void)read_pnm(p.string()); }), {p.string(), "height", "not a number"});
  write_bytes(p, "\x1b[2JP5");
  expect_one_line_with(error_of([&] { (void)read_pnm(p.string()); }), {p.string(), "magic '\\x1b['"});

  // A good file still reads, comments and all.
  write_bytes(p, "P6\n# made by hand\n2 # width\n1\n255\n\x01\x02\x03\x04\x05\x06");
  const Image im = read_pnm(p.string());
  EXPECT_EQ(im.W, 2);
  EXPECT_EQ(im.H, 1);
  EXPECT_EQ(im.C, 3);
  EXPECT_EQ(im.pixels, (std::vector<uint8_t>{1, 2, 3, 4, 5, 6}));
}

TEST_F(Hostile, PnmRefusesAFifoWithoutBlocking) {
  const fs::path fifo = dir_ / "image.pgm";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  expect_one_line_with(error_without_blocking(fifo, [&] { (void)read_pnm(fifo.string()); }),
                       {fifo.string(), "FIFO", "not a regular file"});
}

// ---- JPEG ----------------------------------------------------------------------------------------

Bytes encode_rgb(int w, int h, uint8_t seed) {
  std::vector<uint8_t> px(size_t(w) * h * 3);
  for (size_t i = 0; i < px.size(); ++i) px[i] = static_cast<uint8_t>(i * 37 + seed * 101 + (i >> 5));
  tjhandle tj = tjInitCompress();
  unsigned char* jpeg = nullptr;
  unsigned long size = 0;
  EXPECT_EQ(tjCompress2(tj, px.data(), w, 0, h, TJPF_RGB, &jpeg, &size, TJSAMP_444, 90, 0), 0);
  Bytes out(jpeg, jpeg + size);
  tjFree(jpeg);
  tjDestroy(tj);
  return out;
}

// The JPEG with its frame header (SOF0) declaring w x h.
Bytes with_declared_size(Bytes jpeg, int w, int h) {
  for (size_t i = 2; i + 8 < jpeg.size(); ++i)
    if (jpeg[i] == 0xFF && jpeg[i + 1] == 0xC0) {
      jpeg[i + 5] = static_cast<uint8_t>(h >> 8);
      jpeg[i + 6] = static_cast<uint8_t>(h);
      jpeg[i + 7] = static_cast<uint8_t>(w >> 8);
      jpeg[i + 8] = static_cast<uint8_t>(w);
      return jpeg;
    }
  ADD_FAILURE() << "no SOF0 marker";
  return jpeg;
}

TEST_F(Hostile, JpegBombIsRefusedFromItsHeader) {
  // A 16x16 JPEG of about 1 KB whose header declares 16384 x 16384 (0.8 GB of RGB).
  const Bytes bomb = with_declared_size(encode_rgb(16, 16, 1), 16384, 16384);
  ASSERT_LT(bomb.size(), 4096u);
  write_bytes(dir_ / "bomb.jpg", bomb);
  DecodedImage im;
  std::string error;
  EXPECT_FALSE(decode_jpeg((dir_ / "bomb.jpg").string(), im, error));
  EXPECT_NE(error.find("16384x16384 = 268435456 pixels is above the limit of 89478485"), std::string::npos)
      << error;
  EXPECT_TRUE(im.rgb.empty());

  // A 1 GiB file (sparse: no disk blocks) that starts like a JPEG is not read into memory.
  Bytes head = encode_rgb(16, 16, 1);
  head.resize(64);
  write_bytes(dir_ / "huge.jpg", head);
  fs::resize_file(dir_ / "huge.jpg", uint64_t{1} << 30);
  EXPECT_FALSE(decode_jpeg((dir_ / "huge.jpg").string(), im, error));
  EXPECT_NE(error.find("file of 1073741824 bytes is larger than the 536870912 bytes a JPEG may take"),
            std::string::npos)
      << error;
}

TEST_F(Hostile, TruncatedJpegIsABadFile) {
  const Bytes full = encode_rgb(64, 64, 2);
  write_bytes(dir_ / "half.jpg", Bytes(full.begin(), full.begin() + static_cast<long>(full.size() / 2)));
  DecodedImage im;
  std::string error;
  EXPECT_FALSE(decode_jpeg((dir_ / "half.jpg").string(), im, error));
  EXPECT_NE(error.find("truncated or corrupt JPEG data (libjpeg-turbo: Premature end of JPEG file)"),
            std::string::npos)
      << error;

  // Garbage between the data and the end marker: libjpeg-turbo's "extraneous bytes" warning
  // alone, the image complete: decodes, to the same pixels.
  Bytes padded = full;
  ASSERT_EQ(padded[padded.size() - 2], 0xFF);
  ASSERT_EQ(padded[padded.size() - 1], 0xD9);
  padded.insert(padded.end() - 2, {0x12, 0x34, 0x56});
  write_bytes(dir_ / "full.jpg", full);
  write_bytes(dir_ / "padded.jpg", padded);
  DecodedImage a, b;
  ASSERT_TRUE(decode_jpeg((dir_ / "full.jpg").string(), a, error)) << error;
  ASSERT_TRUE(decode_jpeg((dir_ / "padded.jpg").string(), b, error)) << error;
  EXPECT_EQ(a.rgb, b.rgb);

  // A FIFO is refused before it is opened.
  ASSERT_EQ(::mkfifo((dir_ / "fifo.jpg").c_str(), 0600), 0);
  std::string fifo_error;
  const std::string blocked = error_without_blocking(dir_ / "fifo.jpg", [&] {
    if (!decode_jpeg((dir_ / "fifo.jpg").string(), im, fifo_error)) fail(fifo_error);
  });
  expect_one_line_with(blocked, {"FIFO", "not a regular file"});
}

TEST_F(Hostile, LoaderCountsTruncatedAndElongatedJpegsAsBadFiles) {
  const fs::path val = dir_ / "val" / "a";
  fs::create_directories(val);
  const Bytes full = encode_rgb(48, 40, 3);
  write_bytes(val / "0.jpg", full);
  write_bytes(val / "1.jpg", encode_rgb(40, 48, 4));
  write_bytes(val / "2.jpg", Bytes(full.begin(), full.begin() + static_cast<long>(full.size() / 2)));
  // 2000 x 1: resized to a short side of 256, its long side would be 512,000 pixels.
  write_bytes(val / "3.jpg", encode_rgb(2000, 1, 5));
  const ImageFolder folder = scan_image_folder(dir_.string(), "val");
  LoaderOptions o = LoaderOptions::evaluation(4);
  o.workers = 0;
  o.folder.input_size = 224;
  o.folder.max_bad_fraction = 1.0;
  ::testing::internal::CaptureStderr();
  DataLoader loader(folder, o);
  loader.start_epoch(0);
  Batch b;
  ASSERT_TRUE(loader.next(b));
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(b.labels.numel(), 2);
  EXPECT_EQ(loader.decode_failures(), 2);
  EXPECT_NE(log.find("skipping " + (val / "2.jpg").string() + ": truncated or corrupt JPEG data"), std::string::npos)
      << log;
  EXPECT_NE(log.find("skipping " + (val / "3.jpg").string() + ": eval_transform: resizing the 2000x1 image"),
            std::string::npos)
      << log;
}

// ---- the evaluation transform --------------------------------------------------------------------

TEST(HostileEvalTransform, RefusesResizesAboveThePixelLimit) {
  const std::vector<uint8_t> img(40 * 40 * 3, 7);
  // --crop_pct 0.001 with --input_size 32 would resize to 32000 x 32000.
  expect_error([&] { (void)eval_transform(img, 40, 40, 3, 32, 0.001); },
               {"eval_transform", "input_size 32 / crop_pct 0.001", "32000 pixels a side", "crop_pct is too small"});
  expect_error([&] { (void)eval_resize_size(224, 1e-300); }, {"crop_pct is too small"});
  // An image 2000 times wider than high keeps its aspect: 256 x 512000.
  const std::vector<uint8_t> wide(2000 * 1 * 3, 7);
  expect_error([&] { (void)eval_transform(wide, 1, 2000, 3, 224, 0.875); },
               {"eval_transform", "2000x1 image", "short side of 256", "512000 pixels on the long side"});
  expect_error([&] { (void)eval_transform(img, 40, 40, 3, 20000, -1); }, {"input_size 20000", "limit of 9459"});
  // The loader says so when it is built, not as every image fails.
  ImageFolder f;
  f.root = "r";
  f.split = "val";
  f.classes = {"a"};
  f.samples = {{"r/val/a/x.jpg", 0}};
  LoaderOptions o = LoaderOptions::evaluation(1);
  o.folder.input_size = 32;
  o.folder.crop_pct = 0.001;
  expect_error([&] { DataLoader l(f, o); }, {"crop_pct is too small"});
  // Still fine at a sensible crop_pct.
  EXPECT_EQ(eval_transform(img, 40, 40, 3, 32, 0.875).size(), 32u * 32u * 3u);
}

// ---- memory --------------------------------------------------------------------------------------

TEST(HostileStorage, AnImpossibleAllocationSaysHowMuch) {
  // 2^48 f32 values: 1 PiB.
  expect_error([] { (void)Tensor::empty({int64_t{1} << 48}, DType::f32); },
               {"tensor [281474976710656] f32 on cpu:", "cannot allocate 1125899906842624 bytes", "out of memory"});
  expect_error([] { (void)Tensor::empty({int64_t{1} << 62, 4}, DType::f32); }, {"overflows"});
}

}  // namespace
