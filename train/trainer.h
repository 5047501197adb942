// The training loop of `convnext train`, after the official main.py / engine.py: AdamW with
// per-iteration warmup + cosine schedules, gradient accumulation (update_freq), label
// smoothing, optional gradient clipping, layer-wise lr decay and an EMA of the weights;
// evaluation on the test split every epoch; checkpoints that resume bitwise.
//
// Reproducibility: everything random is drawn from generators seeded by `seed` (initial
// weights, the data order and augmentation of each epoch, drop path), and their states are in
// every checkpoint, so a resumed run continues exactly as the uninterrupted one would.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "models/convnext.h"
#include "train/data/loader.h"
#include "train/dist/communicator.h"

namespace cnx {

// The defaults are the default job: a small ConvNeXt (1.6M parameters) on Fashion-MNIST,
// which reaches 90.7% test top-1 in 10 epochs, 11m43s on a 2-core CPU (README). Flags keep
// main.py's names; where a default differs from main.py's, the comment says so.
struct TrainConfig {
  // ---- model ----
  std::string model;                     // a named model, or "" for depths/dims
  std::vector<int64_t> depths{2, 2, 2, 2};
  std::vector<int64_t> dims{32, 64, 128, 256};
  double drop_path = 0.0;
  // main.py: 1e-6 (for deep models trained 300 epochs). -1: the model's own (kDefaultLayerScale
  // for the ConvNeXt family and custom models, a roadmap step's own value: 0 for the ResNet-style
  // steps 0 to 10, 1e-6 for step 11).
  double layer_scale_init_value = -1;
  static constexpr double kDefaultLayerScale = 0.1;
  double head_init_scale = 1.0;
  // Every width and depth of the model times these (ConvNeXtConfig::scaled): the roadmap's
  // way to shrink each step alike for small images and CPUs.
  double width_mult = 1.0, depth_mult = 1.0;
  // ---- data ----
  std::string data_set = "fashion_mnist";  // fashion_mnist | cifar10 | cifar100 | image_folder
  std::string data_path;                   // "" = the dataset's default location; image_folder:
                                           // the root holding train/ and val/
  bool augment = false;                    // in-memory sets: random crop + flip (+ the erasing
                                           // and mixing below) on the training split
  int num_workers = 2;
  // ---- the paper's recipe (image_folder always; erasing and mixing also in-memory with augment) ----
  int64_t input_size = 224;                // image_folder: train crop and eval size
  double crop_pct = -1;                    // image_folder eval: <= 0: 0.875 below 384, else warp
  std::string aa = "rand-m9-mstd0.5-inc1";  // image_folder: RandAugment; "none": colour jitter
  double color_jitter = 0.4;               // image_folder, when --aa none
  double reprob = -1;                      // Random Erasing; -1: 0.25 on image_folder, else 0
  double mixup = -1;                       // Mixup alpha; -1: 0.8 on image_folder, else 0
  double cutmix = -1;                      // CutMix alpha; -1: 1.0 on image_folder, else 0
  double mixup_prob = 1.0;                 // probability of mixing a batch
  double mixup_switch_prob = 0.5;          // probability of CutMix when both are on
  // ---- optimisation ----
  int64_t batch_size = 128;
  int64_t update_freq = 1;      // gradient accumulation steps
  int64_t epochs = 10;
  double lr = -1;               // the peak lr as given, as main.py's --lr; -1: from --blr
  double blr = -1;              // no --lr: lr = blr * total batch / 256; -1: 8e-3 (4e-3 at
                                // the default batch 128, main.py's default lr)
  std::string lr_rule = "absolute";  // how `lr` was meant: "absolute", or "per_4096" in the
                                     // configs of checkpoints made before --lr meant main.py's
                                     // (it was then scaled by total batch / 4096)
  double min_lr = 1e-6;         // the cosine schedule's end value (not scaled, as in main.py)
  double warmup_lr = 0.0;       // the warmup's start value
  int64_t warmup_epochs = 1;
  int64_t warmup_steps = -1;    // > 0 overrides warmup_epochs
  double weight_decay = 0.05;
  double clip_grad = 0.0;       // > 0: clip the gradient norm to this
  double layer_decay = 1.0;     // < 1: layer-wise lr decay (fine-tuning)
  double smoothing = 0.1;       // label smoothing
  // ---- EMA ----
  bool model_ema = false;
  double model_ema_decay = 0.9999;
  bool model_ema_eval = false;  // also evaluate the EMA every epoch
  // ---- run ----
  uint64_t seed = 0;
  std::string output_dir;       // "" = no checkpoints or metrics files
  std::string resume;           // a checkpoint to continue from
  bool auto_resume = true;      // continue from the newest checkpoint in output_dir
  bool save_ckpt = true;
  int64_t save_ckpt_freq = 1;   // epochs
  int64_t save_ckpt_num = 3;    // numbered checkpoints kept
  std::string finetune;         // weights to start from (head re-initialised if its size differs)
  std::string device = "auto";  // auto | cpu | cuda | cuda:N (resolve_device)
  // bf16 mixed precision (ConvNeXt::forward's activations): auto = on on a CUDA device, off on
  // the CPU (where bf16 is emulated: slower than f32, for checking the numerics); true | false.
  std::string use_amp = "auto";
  // CUDA graphs: the whole training step (every micro-batch's forward and backward, the clip,
  // AdamW and the EMA) captured once and replayed with one launch. auto = on with a CUDA device
  // for a model without BatchNorm (the roadmap's ResNet-style steps have it), unless
  // CNX_CUDA_SYNC=1 (a synchronisation after every launch); true (errors where
  // auto would be off) | false. The shapes are fixed: the training loader drops a last partial
  // batch. Bitwise the same run either way.
  std::string cuda_graphs = "auto";
  int64_t log_every = 50;       // optimiser steps between log lines
  int64_t max_steps = -1;       // > 0: stop after this many optimiser steps, leaving a
                                // recovery checkpoint (as a signal does)
  bool progress_bar = true;     // on a terminal; plain lines otherwise
  int64_t skip_nonfinite = 5;   // optimiser steps with a non-finite loss or gradient skipped in
                                // a row before the run stops (0: stop at the first)
  // Testing only (not a flag, not saved): the optimiser steps whose loss is made NaN.
  std::vector<int64_t> poison_steps_for_testing;
  // Testing only: the training step's capture (--cuda_graphs) makes a call that fails it.
  bool fail_capture_for_testing = false;

  // The training loader's options these flags describe (the -1 defaults resolved by dataset).
  LoaderOptions train_loader_options() const;
  // The model configuration these flags describe (num_classes from the dataset).
  ConvNeXtConfig model_config(int64_t num_classes, int64_t in_chans) const;
  // Throws cnx::Error with one line naming the first bad value.
  void validate() const;
  // The activation dtype of the model on `device`: bf16 when use_amp says so, else f32.
  DType activations(const Device& device) const;
  // Whether the training step is captured (cuda_graphs) on `device` for a model with or without
  // BatchNorm; throws cnx::Error for --cuda_graphs true where it cannot be (no CUDA device, a
  // model with BatchNorm, whose num_batches_tracked a replay would not count, CNX_CUDA_SYNC=1).
  // With more than one rank (world_size), auto is off and true refuses: the NCCL collectives
  // of the gradient buckets are not captured yet.
  bool use_cuda_graphs(const Device& device, bool batch_norm, int world_size = 1) const;
  std::string to_json() const;  // every field (but the testing one)
  // The fields present in a to_json() text (others keep their defaults).
  static TrainConfig from_json(const std::string& text);
};

// The configuration recorded in a training checkpoint (std::nullopt for plain weights), and the
// model weights of a weights or checkpoint file under their official names ("model." stripped;
// with use_ema, a checkpoint's EMA weights instead).
std::optional<TrainConfig> checkpoint_config(const std::string& path);
NamedTensors load_weights(const std::string& path, bool use_ema = false);

// What a finished (or interrupted) run reports.
struct TrainResult {
  int64_t epochs_done = 0;
  int64_t steps = 0;
  double best_acc1 = 0.0;
  double last_acc1 = 0.0, last_acc5 = 0.0, last_loss = 0.0;
  std::vector<double> losses;  // the training loss of every optimiser step, in order
  bool interrupted = false;    // stopped by a signal; a recovery checkpoint was written
                               // (if training had begun and there is an --output_dir)
  int64_t nonfinite_skipped = 0;  // optimiser steps skipped for a non-finite loss or gradient
  int64_t graph_replays = 0;      // optimiser steps run as a replay of the captured step
                                  // (--cuda_graphs; the first two steps are not replays)
  int64_t image_height = 0, image_width = 0;  // of the training batches
  int64_t num_parameters = 0;                 // of the model trained
  int64_t macs_per_image = 0;                 // its multiply-adds at that size (ConvNeXt::macs)
  int world_size = 1;                         // ranks that trained together
  uint64_t weights_digest = 0;  // several ranks: FNV-1a of every parameter's bytes after the last epoch
};

// The peak learning rate of a run, and how it was obtained (printed at start):
//   --lr given        as given (main.py's meaning: the paper's 4e-3 goes with a total batch
//                     of 4096, reached through --update_freq)
//   --blr given       blr * total batch / 256 (ConvNeXt V2's and MAE's fine-tuning scripts)
//   neither           --blr 8e-3: 4e-3 at the default total batch 128 (main.py's default lr)
//   resuming a checkpoint whose config has lr_rule "per_4096" (made when --lr was scaled by
//   total batch / 4096): the lr that run trained with, whatever --lr and --blr say now.
// total batch = batch_size * update_freq * world_size (the ranks of a data-parallel run).
struct LrChoice {
  double value = 0;
  std::string description;
};
LrChoice resolve_lr(const TrainConfig& config, const std::optional<TrainConfig>& resumed = std::nullopt,
                    int world_size = 1);

// The device a --device flag names: "cpu"; "cuda" or "cuda:N", which must exist (otherwise a
// cnx::Error says whether the build has the CUDA backend and how many devices are visible); and
// "auto", the CPU for now: the GPU path is chosen explicitly until it has been measured against
// the CPU on a device (then auto should pick cuda:0 when one is visible).
Device resolve_device(const std::string& flag);

// The seed of a rank's drop-path generator: rank 0's is a one-process run's (so one rank is
// bitwise a run without MPI), every other rank's its own: the ranks drop different samples,
// reproducibly from (seed, rank), the generator's position following the step.
uint64_t drop_path_seed(uint64_t seed, int rank);

// Set by the SIGINT/SIGTERM/SIGHUP/SIGUSR1 handlers (install_stop_handlers): a dropped SSH session
// (SIGHUP) stops a run like Ctrl-C; SIGUSR1 is the one mpirun forwards to every rank.
// Checked between steps, between evaluation batches and between the phases of a run's start;
// with several ranks, all stop at the same step. (SIGQUIT keeps its default: a core dump.)
std::atomic<int>& stop_signal();
void install_stop_handlers();

// Runs training; prints progress to stdout. Throws cnx::Error on bad input.
//
// Data-parallel (train/dist/): every rank of `world` runs train() with the same configuration.
// Each reads its own shard of every epoch's order (LoaderOptions::rank), so the total batch is
// batch_size x update_freq x world size; the gradients are averaged over the ranks before the
// clip and AdamW (train/dist/grad_reducer.h), so every rank keeps bitwise the same weights;
// drop path draws from a generator of its own per rank. Rank 0 alone prints, writes metrics and
// checkpoints; the losses and accuracies it reports are over all ranks (the evaluation is
// sharded, its counts summed). A checkpoint holds every rank's drop-path generator: resumed
// with the same world size, a run continues bitwise; with another, with a warning. On CUDA each
// rank takes the GPU of its local rank (--device cuda) and the gradients go through NCCL.
// A world of one (a process started without an MPI launcher) is exactly the one-process run.
TrainResult train(const TrainConfig& config);
TrainResult train(const TrainConfig& config, dist::Communicator& world);

// Accuracy of a model on a dataset split, computed on the model's device.
struct EvalResult {
  double acc1 = 0, acc5 = 0, loss = 0;
  int64_t images = 0;
  bool interrupted = false;  // a stop signal arrived: the figures cover `images` only
};
// image_folder: the val split at input_size with crop_pct (the eval transform).
// With a world of several ranks (each calls it with the same model): each evaluates its shard
// and the counts are summed: the same Acc@1 and Acc@5 as one process, every image once.
EvalResult evaluate(const ConvNeXt& model, const std::string& data_set,
                    const std::string& data_path, int64_t batch_size, int workers,
                    int64_t input_size = 224, double crop_pct = -1, dist::Communicator* world = nullptr);

}  // namespace cnx
