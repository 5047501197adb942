// Fuzz target "pnm": the input is a whole PGM (P5) or PPM (P6) file. It is written to the
// process's scratch folder and read by cnx::read_pnm(path) (train/data/pnm.h), the reader of
// `convnext predict` for models trained on Fashion-MNIST or CIFAR.
//
// Beyond "no crash": an image that reads has H, W > 0, C 1 or 3 and exactly H x W x C bytes.
#include <exception>

#include "fuzz_util.h"
#include "train/data/pnm.h"

namespace {

const cnx_fuzz::ScratchDir& scratch() {
  static const cnx_fuzz::ScratchDir dir("pnm");
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = scratch().file("input.pnm");
  cnx_fuzz::write_file(path, data, size);
  try {
    const cnx::Image img = cnx::read_pnm(path);
    FUZZ_EXPECT(img.H > 0 && img.W > 0 && (img.C == 1 || img.C == 3));
    FUZZ_EXPECT(cnx_fuzz::product_is(img.pixels.size(), {img.H, img.W, img.C}));
  } catch (const std::exception&) {
  }
  return 0;
}
