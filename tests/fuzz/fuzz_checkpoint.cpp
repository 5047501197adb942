// Fuzz target "checkpoint": the input is a whole training-checkpoint file (safetensors with
// "format", "step" and "state" in its __metadata__, train/checkpoint.h). It is written to the
// process's scratch folder and read by cnx::load_checkpoint(path) (train/checkpoint.h), then by
// cnx::checkpoint_config(path) and cnx::load_weights(path) with and without use_ema
// (train/trainer.h): the readers behind --resume, --finetune, --weights and `convnext eval`.
// A config that checkpoint_config accepts is written back with to_json, as a resumed run does.
#include <exception>

#include "fuzz_util.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace {

const cnx_fuzz::ScratchDir& scratch() {
  static const cnx_fuzz::ScratchDir dir("checkpoint");
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = scratch().file("checkpoint-1.safetensors");
  cnx_fuzz::write_file(path, data, size);

  try {
    const cnx::Checkpoint c = cnx::load_checkpoint(path);
    for (const auto& [name, t] : c.tensors) FUZZ_EXPECT(t.defined());
  } catch (const std::exception&) {
  }
  try {
    const std::optional<cnx::TrainConfig> config = cnx::checkpoint_config(path);
    if (config) (void)config->to_json();  // what `convnext train --resume` would print back
  } catch (const std::exception&) {
  }
  for (const bool use_ema : {false, true}) {
    try {
      const cnx::NamedTensors weights = cnx::load_weights(path, use_ema);
      for (const auto& [name, t] : weights) {
        FUZZ_EXPECT(t.defined());
        (void)name;
      }
    } catch (const std::exception&) {
    }
  }
  return 0;
}
