// Fuzz target "jpeg": the input is a whole file as an ImageFolder dataset would hold it. It is
// written to the process's scratch folder and decoded by cnx::decode_jpeg(path, out, error)
// (train/data/image_folder.h, libjpeg-turbo), which must never throw on bad content: it returns
// false with a reason. What decodes then goes through the evaluation transform
// (cnx::eval_transform, train/data/augment.h: bicubic resize of the shorter side to 36, centre
// crop to 32x32), as `convnext eval` / `predict` would use it.
//
// Beyond "no crash": a decoded image has H, W > 0 and exactly H x W x 3 bytes; a failure has a
// non-empty reason; the transform returns 32 x 32 x 3 bytes.
#include <exception>

#include "fuzz_util.h"
#include "train/data/augment.h"
#include "train/data/image_folder.h"

namespace {

const cnx_fuzz::ScratchDir& scratch() {
  static const cnx_fuzz::ScratchDir dir("jpeg");
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = scratch().file("input.jpg");
  cnx_fuzz::write_file(path, data, size);

  cnx::DecodedImage img;
  std::string error;
  // decode_jpeg promises not to throw: an exception out of it is a finding (not caught here).
  if (!cnx::decode_jpeg(path, img, error)) {
    FUZZ_EXPECT(!error.empty());
    return 0;
  }
  FUZZ_EXPECT(img.H > 0 && img.W > 0);
  FUZZ_EXPECT(cnx_fuzz::product_is(img.rgb.size(), {img.H, img.W, 3}));
  try {
    const std::vector<uint8_t> out = cnx::eval_transform(img.rgb, img.H, img.W, 3, 32);
    FUZZ_EXPECT(out.size() == 32 * 32 * 3);
  } catch (const std::exception&) {
  }
  return 0;
}
