#include "train/data/synthetic_folder.h"

#include <turbojpeg.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <vector>

#include "tensor/error.h"
#include "tensor/generator.h"

namespace cnx {

namespace fs = std::filesystem;

void write_jpeg(const std::string& path, std::span<const uint8_t> rgb, int64_t H, int64_t W,
                int quality) {
  CNX_CHECK(H > 0 && W > 0 && static_cast<int64_t>(rgb.size()) == H * W * 3, "write_jpeg: ", path,
            ": need an H x W x 3 image, got ", rgb.size(), " bytes for ", H, "x", W);
  tjhandle tj = tjInitCompress();
  CNX_CHECK(tj != nullptr, "write_jpeg: tjInitCompress failed");
  unsigned char* jpeg = nullptr;
  unsigned long size = 0;
  const int r = tjCompress2(tj, rgb.data(), static_cast<int>(W), 0, static_cast<int>(H), TJPF_RGB,
                            &jpeg, &size, TJSAMP_420, quality, 0);
  const std::string err = r != 0 ? tjGetErrorStr2(tj) : "";
  tjDestroy(tj);
  if (r != 0) {
    tjFree(jpeg);
    fail("write_jpeg: ", path, ": ", err);
  }
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    f.write(reinterpret_cast<const char*>(jpeg), static_cast<std::streamsize>(size));
    tjFree(jpeg);
    CNX_CHECK(f.good(), "write_jpeg: cannot write ", tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  CNX_CHECK(!ec, "write_jpeg: cannot rename ", tmp, " to ", path, ": ", ec.message());
}

namespace {

// One stripes image: `vertical` stripes run top to bottom (the colour changes along x).
std::vector<uint8_t> stripes(int64_t H, int64_t W, bool vertical, Generator& gen) {
  const int64_t period = 8 + static_cast<int64_t>(gen.uniform() * 9);  // 8..16
  const int64_t phase = static_cast<int64_t>(gen.uniform() * static_cast<double>(period));
  uint8_t a[3], b[3];
  for (int c = 0; c < 3; ++c) a[c] = static_cast<uint8_t>(gen.next_u32() & 0xFF);
  for (int c = 0; c < 3; ++c) {
    // The second colour differs from the first by at least 96 levels in some channel.
    b[c] = static_cast<uint8_t>(gen.next_u32() & 0xFF);
  }
  const int far = static_cast<int>(gen.uniform() * 3);
  b[far] = static_cast<uint8_t>(a[far] < 128 ? a[far] + 96 + (b[far] % 32) : a[far] - 96 - (b[far] % 32));
  std::vector<uint8_t> img(static_cast<size_t>(H * W * 3));
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const int64_t t = (vertical ? x : y) + phase;
      const uint8_t* col = (t / (period / 2 > 0 ? period / 2 : 1)) % 2 ? a : b;
      for (int c = 0; c < 3; ++c) {
        const int noise = static_cast<int>(gen.next_u32() % 49) - 24;
        img[static_cast<size_t>((y * W + x) * 3 + c)] =
            static_cast<uint8_t>(std::clamp(col[c] + noise, 0, 255));
      }
    }
  return img;
}

}  // namespace

void write_stripes_folder(const std::string& root, const SyntheticFolderOptions& opt) {
  CNX_CHECK(opt.train_per_class >= 0 && opt.val_per_class >= 0 && opt.height > 0 && opt.width > 0,
            "write_stripes_folder: counts must be >= 0 and sizes > 0");
  std::error_code ec;
  if (fs::exists(root, ec))
    CNX_CHECK(fs::is_directory(root, ec) && fs::is_empty(root, ec), "make-folder: ", root,
              " exists and is not an empty folder; nothing was written");
  Generator gen(opt.seed);
  for (const char* split : {"train", "val"}) {
    const int64_t n = std::string(split) == "train" ? opt.train_per_class : opt.val_per_class;
    for (const char* cls : {"horizontal", "vertical"}) {
      const fs::path dir = fs::path(root) / split / cls;
      fs::create_directories(dir, ec);
      CNX_CHECK(!ec, "make-folder: cannot create ", dir.string(), ": ", ec.message());
      for (int64_t i = 0; i < n; ++i) {
        const auto img = stripes(opt.height, opt.width, std::string(cls) == "vertical", gen);
        char name[32];
        std::snprintf(name, sizeof name, "%05lld.jpg", static_cast<long long>(i));
        write_jpeg((dir / name).string(), img, opt.height, opt.width, opt.quality);
      }
    }
  }
}

}  // namespace cnx
