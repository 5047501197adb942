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
// checkpoint-recovery.safetensors (written on SIGINT/SIGTERM/SIGHUP and --max_steps). Every
// write is atomic (temporary file, fsync, rename): a crash mid-write leaves the previous file
// intact, and only a temporary <name>.tmp behind (remove_stale_temporaries). Nothing
// non-finite is ever written: save_checkpoint refuses a NaN or an infinity in any tensor.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "models/convnext.h"

namespace cnx {

constexpr const char* kCheckpointFormat = "convnext-checkpoint/1";

struct Checkpoint {
  NamedTensors tensors;
  std::string state_json;  // what is not a tensor, as a JSON object
  int64_t step = 0;        // the global optimiser step it was taken at (also in state_json)
};

// Refuses (cnx::Error naming the tensor, before anything is written) a checkpoint with a NaN or
// an infinity in a floating-point tensor: a diverged state never replaces a good file.
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
// and "recovery" are left alone, and so are names whose number is not an int64 (not ours).
void prune_checkpoints(const std::string& dir, int keep);

// Deletes checkpoint-*.safetensors.tmp in `dir`: what a save killed before its rename leaves
// (a whole checkpoint each). Call it only while holding the folder's lock (RunDir). Returns
// how many were removed.
int remove_stale_temporaries(const std::string& dir);

// The name of the first floating-point tensor with a NaN or an infinity, if any.
std::optional<std::string> first_nonfinite(const NamedTensors& tensors);

// ---- the state a checkpoint continues from --------------------------------------------------

// The shape of the run a checkpoint is resumed into: what its state's numbers must fit.
struct ResumeBounds {
  int64_t epochs = 0;             // --epochs
  int64_t batches_per_epoch = 0;  // micro-batches the loader makes per epoch
  int64_t update_freq = 1;
};

// The parsed "state" of a checkpoint. Every field is checked for type and range against the run
// it resumes (a crafted or corrupted file gets one line naming the file and the field, never an
// out-of-range index or an overflow):
//   0 <= epoch <= epochs;  0 <= batch <= the epoch's last whole group of update_freq, a multiple
//   of update_freq (0 at epoch == epochs);  step == epoch * steps_per_epoch + batch / update_freq;
//   0 <= best_acc1 <= 100 (and acc1, when present);  the counters >= 0.
struct ResumeState {
  int64_t epoch = 0, batch = 0, step = 0;
  double best_acc1 = 0;
  std::optional<double> acc1;  // this checkpoint's own test top-1 (epoch-end checkpoints)
  uint64_t drop_seed = 0, drop_offset = 0;
  int64_t nonfinite_skipped = 0;  // optimiser steps skipped so far for a non-finite loss/gradient
  int64_t nonfinite_streak = 0;   // ... of them in a row just before this checkpoint
  std::string resume_key;         // JSON: the configuration it must agree with
  std::string config;             // JSON: the whole configuration it was trained with
};
ResumeState parse_resume_state(const std::string& path, const std::string& state_json,
                               const ResumeBounds& bounds);

}  // namespace cnx
