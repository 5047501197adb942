// Training checkpoints: one safetensors file per checkpoint holding every tensor of the run's
// state (model weights in official names and layouts under "model.", AdamW moments under
// "adamw.", EMA weights under "ema."), with everything else (epoch, step, data position,
// RNG states, best accuracy, the full config) as JSON text in its __metadata__:
//
//   __metadata__ = {"format": "convnext-checkpoint/1", "step": "<global step>",
//                   "state": "<JSON: epoch, step, rng, best_acc1, config, ...>"}
//
// Files in an output directory: checkpoint-<epoch>.safetensors (every --save_ckpt_freq
// epochs, the newest --save_ckpt_num kept), checkpoint-best.safetensors, and
// checkpoint-recovery.safetensors (written on SIGINT/SIGTERM, mid-epoch). Every write is
// atomic (temporary file, fsync, rename): a crash mid-write leaves the previous file intact.
#pragma once

#include <cstdint>
#include <string>

#include "models/convnext.h"

namespace cnx {

constexpr const char* kCheckpointFormat = "convnext-checkpoint/1";

struct Checkpoint {
  NamedTensors tensors;
  std::string state_json;  // what is not a tensor, as a JSON object
  int64_t step = 0;        // the global optimiser step it was taken at (also in state_json)
};

void save_checkpoint(const std::string& path, const Checkpoint& checkpoint);
// Refuses, naming the path, a file that is not a convnext checkpoint (e.g. plain weights).
Checkpoint load_checkpoint(const std::string& path);

// <dir>/checkpoint-<tag>.safetensors, tag an epoch number, "best" or "recovery".
std::string checkpoint_path(const std::string& dir, const std::string& tag);

// The checkpoint --auto_resume continues from: among checkpoint-<epoch> and
// checkpoint-recovery in `dir`, the one taken at the latest step ("" when there is none).
// checkpoint-best is never picked (it may be older than the newest state).
std::string find_resume_checkpoint(const std::string& dir);

// Removes numbered checkpoints but the `keep` newest epochs (keep <= 0 keeps all); "best"
// and "recovery" are left alone.
void prune_checkpoints(const std::string& dir, int keep);

}  // namespace cnx
