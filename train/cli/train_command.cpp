// convnext train / eval / predict. Flag names follow the official ConvNeXt main.py, so its
// documented commands carry over (booleans take a value, as there: --model_ema true).
#include <charconv>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "models/safetensors.h"
#include "train/cli/commands.h"
#include "train/data/dataset.h"
#include "train/data/image_folder.h"
#include "train/data/loader.h"
#include "train/data/pnm.h"
#include "train/data/synthetic_folder.h"
#include "train/trainer.h"

namespace cnx {

// A seed: decimal digits only, at most 2^64 - 1.
uint64_t parse_seed(const std::string& text) {
  uint64_t v = 0;
  const auto r = std::from_chars(text.data(), text.data() + text.size(), v);
  CNX_CHECK(!text.empty() && r.ec == std::errc() && r.ptr == text.data() + text.size(),
            "--seed must be an integer from 0 to 18446744073709551615, got '", text, "'");
  return v;
}

namespace {

// --model NAME, or --depths/--dims: shared by train, eval and predict.
struct ModelFlags {
  std::string model, depths, dims;
  void add(CLI::App* sub) { add_model_flags(sub, model, depths, dims); }
  // Applies the flags given on the command line to `cfg`.
  void apply(TrainConfig& cfg) const {
    if (!model.empty()) cfg.model = model;
    if (!depths.empty()) {
      cfg.model.clear();
      cfg.depths = parse_int_list("--depths", depths);
      cfg.dims = parse_int_list("--dims", dims);
    }
  }
};

// ---- train ----
struct TrainFlags {
  TrainConfig cfg;
  ModelFlags model;
  std::string seed_text = "0";  // parsed here: CLI11 would wrap -1 and 2^64 into a uint64
  double dist_timeout = -1;      // seconds; -1: CNX_DIST_TIMEOUT or 600
};


int run_train(TrainFlags& f) {
  f.model.apply(f.cfg);
  f.cfg.seed = parse_seed(f.seed_text);
  install_stop_handlers();
  if (f.dist_timeout != -1) dist::Communicator::set_timeout_seconds(f.dist_timeout);
  const TrainResult r = train(f.cfg);
  if (r.interrupted) return 128 + stop_signal().load();  // the shell's convention: 130, 143
  return 0;
}

// ---- eval and predict: a trained model ----
struct UseFlags {
  std::string weights, data_set, data_path;
  ModelFlags model;
  bool use_ema = false;
  int64_t batch_size = 256;
  int num_workers = 2;
  int64_t input_size = -1;  // image_folder: -1 = the checkpoint's
  double crop_pct = -2;     // image_folder: -2 = the checkpoint's
  std::string device = "auto";
  std::vector<std::string> images;
};

// The model a weights file was trained as: a checkpoint's own config, overridden by flags.
// Sets `info` to the dataset's description (for image_folder: the val split's classes) and
// `cfg` to the configuration used.
std::unique_ptr<ConvNeXt> load_trained(const UseFlags& f, Dataset& info, TrainConfig& used) {
  const std::optional<TrainConfig> saved = checkpoint_config(f.weights);
  const bool from_checkpoint = saved.has_value();
  TrainConfig cfg = saved.value_or(TrainConfig{});
  if (!f.data_set.empty()) cfg.data_set = f.data_set;
  if (!f.data_path.empty()) cfg.data_path = f.data_path;
  f.model.apply(cfg);
  CNX_CHECK(from_checkpoint || !f.model.model.empty() || !f.model.depths.empty(), f.weights,
            " holds plain weights: give --model NAME or --depths and --dims");
  const Device device = resolve_device(f.device);  // a clear error for a missing CUDA device
  if (f.input_size != -1) cfg.input_size = f.input_size;
  if (f.crop_pct != -2) cfg.crop_pct = f.crop_pct;
  if (cfg.data_set == "image_folder") {
    CNX_CHECK(!cfg.data_path.empty(), "--data_set image_folder needs --data_path");
    const ImageFolder val = scan_image_folder(cfg.data_path, "val");
    info = Dataset{};
    info.name = "image_folder";
    info.C = 3;
    info.num_classes = static_cast<int64_t>(val.classes.size());
    info.class_names = val.classes;
  } else {
    info = dataset_info(cfg.data_set);
  }
  cfg.drop_path = 0;
  used = cfg;
  Generator g(0);
  auto model = std::make_unique<ConvNeXt>(cfg.model_config(info.num_classes, info.C), g);
  model->load_state_dict(load_weights(f.weights, f.use_ema));
  model->to(device);
  return model;
}

int run_eval(UseFlags& f) {
  Dataset info;
  TrainConfig cfg;
  auto model = load_trained(f, info, cfg);
  const EvalResult r = evaluate(*model, info.name, cfg.data_path, f.batch_size, f.num_workers,
                                cfg.input_size, cfg.crop_pct);
  std::printf("%s on %s test (%lld images): Acc@1 %.2f Acc@5 %.2f loss %.4f\n",
              model->config().name.c_str(), info.name.c_str(), static_cast<long long>(r.images),
              r.acc1, r.acc5, r.loss);
  return 0;
}

// image_folder models: a JPEG (or PGM/PPM) of any size, through the evaluation transform.
Image read_any_size(const std::string& path, const TrainConfig& cfg) {
  Image img;
  DecodedImage jpeg;
  std::string error;
  // Not a FIFO or a device: opening one would wait for a writer.
  if (const std::string why = not_a_regular_file(path); !why.empty()) fail(path, ": ", why);
  std::ifstream probe(path, std::ios::binary);
  CNX_CHECK(probe.good(), path, ": cannot open");
  const int first = probe.get();
  probe.close();
  if (first == 'P') {
    img = read_pnm(path);
  } else {
    CNX_CHECK(decode_jpeg(path, jpeg, error), path, ": ", error);
    img.H = jpeg.H;
    img.W = jpeg.W;
    img.C = 3;
    img.pixels = std::move(jpeg.rgb);
  }
  // A grey PGM stays one channel here; run_predict converts channels like any other image.
  try {
    img.pixels = eval_transform(img.pixels, img.H, img.W, img.C, cfg.input_size, cfg.crop_pct);
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
  img.H = img.W = cfg.input_size;
  return img;
}

int run_predict(UseFlags& f) {
  Dataset info;
  TrainConfig cfg;
  auto model = load_trained(f, info, cfg);
  const bool folder = info.name == "image_folder";
  if (folder) {  // ImageNet's normalisation, the loader's FolderTransform defaults
    const FolderTransform t;
    info.mean = t.mean;
    info.std = t.std;
    info.H = info.W = cfg.input_size;
  }
  NoGradGuard no_grad;
  Generator unused(0);
  for (const std::string& path : f.images) {
    Image img = folder ? read_any_size(path, cfg) : read_pnm(path);
    CNX_CHECK(img.H == info.H && img.W == info.W, path, ": image is ", img.W, "x", img.H, "; ",
              info.name, " models take ", info.W, "x", info.H, " (resizing comes with the data pipeline)");
    if (img.C != info.C) {  // grey <-> colour
      std::vector<uint8_t> px(static_cast<size_t>(img.H * img.W * info.C));
      for (int64_t i = 0; i < img.H * img.W; ++i)
        for (int64_t c = 0; c < info.C; ++c) {
          const uint8_t* s = &img.pixels[static_cast<size_t>(i * img.C)];
          px[static_cast<size_t>(i * info.C + c)] =
              img.C == 1 ? s[0] : static_cast<uint8_t>((299 * s[0] + 587 * s[1] + 114 * s[2]) / 1000);
        }
      img.pixels = std::move(px);
      img.C = info.C;
    }
    const Tensor x = normalize_image(img.pixels, img.H, img.W, img.C, info.mean, info.std);
    const std::vector<float> logits =
        model->forward(x.to(model->device()), false, unused).to_vector<float>();
    double mx = logits[0], sum = 0;
    for (float v : logits) mx = std::max(mx, static_cast<double>(v));
    std::vector<std::pair<double, int64_t>> probs;
    for (size_t k = 0; k < logits.size(); ++k) sum += std::exp(logits[k] - mx);
    for (size_t k = 0; k < logits.size(); ++k)
      probs.emplace_back(std::exp(logits[k] - mx) / sum, static_cast<int64_t>(k));
    std::sort(probs.begin(), probs.end(), [](auto& a, auto& b) { return a.first > b.first; });
    std::printf("%s:", path.c_str());
    for (size_t i = 0; i < std::min<size_t>(5, probs.size()); ++i) {
      const int64_t k = probs[i].second;
      const std::string name = k < static_cast<int64_t>(info.class_names.size()) ? info.class_names[k] : std::to_string(k);
      std::printf("%s %s %.1f%%", i ? "," : "", name.c_str(), 100.0 * probs[i].first);
    }
    std::printf("\n");
  }
  return 0;
}

void add_use_flags(CLI::App* sub, UseFlags& f) {
  sub->add_option("--weights", f.weights, "Weights (official names) or a training checkpoint")->required();
  f.model.add(sub);
  sub->add_option("--data_set", f.data_set, "fashion_mnist, cifar10, cifar100 or image_folder (default: the checkpoint's)");
  sub->add_option("--data_path", f.data_path, "Dataset folder");
  sub->add_option("--use_ema", f.use_ema, "Use a checkpoint's EMA weights")->capture_default_str();
  sub->add_option("--device", f.device, "auto (the CPU for now), cpu, cuda or cuda:N")->capture_default_str();
}

}  // namespace

// Every flag of a training recipe (all of train's but --model, --depths and --dims), bound to
// `c`; --seed to `seed_text` (parse_seed reads it). Shared by train and roadmap.
void add_recipe_flags(CLI::App* sub, TrainConfig& c, std::string& seed_text) {
  auto opt = [&](const char* name, auto& field, const char* help) {
    sub->add_option(name, field, help)->capture_default_str();
  };
  opt("--drop_path", c.drop_path, "Drop path rate (linear over the blocks)");
  opt("--layer_scale_init_value", c.layer_scale_init_value, "Layer scale init (0: no layer scale; -1: 0.1, or a roadmap step's own)");
  opt("--head_init_scale", c.head_init_scale, "Scale of the head's initial weights");
  opt("--width_mult", c.width_mult, "Every width of the model times this (multiples of 8; the roadmap's shrinking)");
  opt("--depth_mult", c.depth_mult, "Every stage depth of the model times this (at least 1 block)");
  opt("--data_set", c.data_set, "fashion_mnist, cifar10, cifar100 or image_folder");
  opt("--data_path", c.data_path, "Dataset folder (default for fashion_mnist: Debian's; image_folder: the root of train/ and val/)");
  opt("--augment", c.augment, "In-memory sets: random crop + flip (+ --reprob, --mixup, --cutmix) on the training images");
  opt("--num_workers", c.num_workers, "Data loader threads");
  opt("--input_size", c.input_size, "image_folder: image side for training and evaluation");
  opt("--crop_pct", c.crop_pct, "image_folder eval: resize to input_size / crop_pct, centre crop (<= 0: 0.875 below 384, else warp)");
  opt("--aa", c.aa, "image_folder: RandAugment policy, or none (then --color_jitter)");
  opt("--color_jitter", c.color_jitter, "image_folder: colour jitter strength when --aa none");
  opt("--reprob", c.reprob, "Random Erasing probability (-1: 0.25 on image_folder, else 0)");
  opt("--mixup", c.mixup, "Mixup alpha (-1: 0.8 on image_folder, else 0)");
  opt("--cutmix", c.cutmix, "CutMix alpha (-1: 1.0 on image_folder, else 0)");
  opt("--mixup_prob", c.mixup_prob, "Probability of mixing a batch");
  opt("--mixup_switch_prob", c.mixup_switch_prob, "Probability of CutMix when both are on");
  opt("--batch_size", c.batch_size, "Images per micro-batch");
  opt("--update_freq", c.update_freq, "Gradient accumulation steps");
  opt("--epochs", c.epochs, "Epochs");
  opt("--lr", c.lr, "Peak learning rate, used as given as in main.py (-1: from --blr)");
  opt("--blr", c.blr, "Without --lr: lr = blr x total batch / 256 (-1: 8e-3, so 4e-3 at batch 128)");
  opt("--min_lr", c.min_lr, "Final learning rate of the cosine schedule");
  opt("--warmup_lr", c.warmup_lr, "Learning rate at the start of the warmup");
  opt("--warmup_epochs", c.warmup_epochs, "Linear warmup epochs");
  opt("--warmup_steps", c.warmup_steps, "Linear warmup steps (> 0 overrides --warmup_epochs)");
  opt("--weight_decay", c.weight_decay, "AdamW weight decay (not for 1-D tensors and biases)");
  opt("--clip_grad", c.clip_grad, "Clip the gradient norm to this (0: off)");
  opt("--layer_decay", c.layer_decay, "Layer-wise lr decay (1: off)");
  opt("--smoothing", c.smoothing, "Label smoothing");
  opt("--model_ema", c.model_ema, "Keep an EMA of the weights");
  opt("--model_ema_decay", c.model_ema_decay, "EMA decay");
  opt("--model_ema_eval", c.model_ema_eval, "Evaluate the EMA every epoch too");
  sub->add_option("--seed", seed_text, "Seed of every random draw (0 to 2^64-1)")->default_str("0");
  opt("--output_dir", c.output_dir, "Checkpoints, metrics.jsonl and config.json go here");
  opt("--resume", c.resume, "Continue from this checkpoint");
  opt("--auto_resume", c.auto_resume, "Continue from the newest checkpoint in --output_dir");
  opt("--save_ckpt", c.save_ckpt, "Save checkpoints");
  opt("--save_ckpt_freq", c.save_ckpt_freq, "Save every this many epochs");
  opt("--save_ckpt_num", c.save_ckpt_num, "Numbered checkpoints to keep");
  opt("--finetune", c.finetune, "Start from these weights (the head is re-initialised if it does not fit)");
  opt("--device", c.device, "auto (the CPU for now), cpu, cuda or cuda:N");
  opt("--use_amp", c.use_amp, "bf16 mixed precision: auto (on for CUDA), true (on the CPU: emulated, slow) or false");
  opt("--cuda_graphs", c.cuda_graphs,
      "Capture the training step as one CUDA graph and replay it: auto (on for CUDA, models without BatchNorm), true or false");
  opt("--log_every", c.log_every, "Optimiser steps between log lines");
  opt("--max_steps", c.max_steps, "Stop after this many optimiser steps (-1: no limit)");
  opt("--progress_bar", c.progress_bar, "A live progress line on a terminal");
  opt("--skip_nonfinite", c.skip_nonfinite,
      "Optimiser steps with a non-finite loss or gradient skipped in a row before the run stops (0: stop at the first)");
}

Command train_command(CLI::App& app) {
  auto f = std::make_shared<TrainFlags>();
  CLI::App* sub = app.add_subcommand("train", "Train a ConvNeXt (defaults: a small model on Fashion-MNIST)");
  f->model.add(sub);
  add_recipe_flags(sub, f->cfg, f->seed_text);
  sub->add_option("--dist_timeout", f->dist_timeout,
                  "Under mpirun: seconds a rank waits for the others in one collective before it ends the job "
                  "(-1: CNX_DIST_TIMEOUT, else 600)");
  return {sub, [f] { return run_train(*f); }};
}

Command eval_command(CLI::App& app) {
  auto f = std::make_shared<UseFlags>();
  CLI::App* sub = app.add_subcommand("eval", "Acc@1, Acc@5 and loss of trained weights on a test split");
  add_use_flags(sub, *f);
  sub->add_option("--batch_size", f->batch_size, "Images per batch")->capture_default_str();
  sub->add_option("--num_workers", f->num_workers, "Data loader threads")->capture_default_str();
  sub->add_option("--input_size", f->input_size, "image_folder: eval image side (default: the checkpoint's)");
  sub->add_option("--crop_pct", f->crop_pct, "image_folder: eval crop fraction (default: the checkpoint's)");
  return {sub, [f] { return run_eval(*f); }};
}

Command predict_command(CLI::App& app) {
  auto f = std::make_shared<UseFlags>();
  CLI::App* sub = app.add_subcommand("predict", "Top-5 classes of images (PGM/PPM at the dataset's size; image_folder models: JPEG too, any size)");
  add_use_flags(sub, *f);
  sub->add_option("images", f->images, "Image files")->required();
  return {sub, [f] { return run_predict(*f); }};
}

}  // namespace cnx

namespace cnx {

Command make_folder_command(CLI::App& app) {
  struct Flags {
    std::string out;
    SyntheticFolderOptions opt;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* sub = app.add_subcommand(
      "make-folder", "Write a synthetic two-class ImageFolder of JPEGs (horizontal vs vertical stripes)");
  sub->add_option("--out", f->out, "Folder to create (must not exist, or be empty)")->required();
  sub->add_option("--train_per_class", f->opt.train_per_class, "Training images per class")->capture_default_str();
  sub->add_option("--val_per_class", f->opt.val_per_class, "Validation images per class")->capture_default_str();
  sub->add_option("--height", f->opt.height, "Image height")->capture_default_str();
  sub->add_option("--width", f->opt.width, "Image width")->capture_default_str();
  sub->add_option("--seed", f->opt.seed, "Seed")->capture_default_str();
  return {sub, [f] {
            write_stripes_folder(f->out, f->opt);
            std::printf("wrote %s/{train,val}/{horizontal,vertical}: %lld + %lld images per class, %lldx%lld\n",
                        f->out.c_str(), static_cast<long long>(f->opt.train_per_class),
                        static_cast<long long>(f->opt.val_per_class), static_cast<long long>(f->opt.height),
                        static_cast<long long>(f->opt.width));
            return 0;
          }};
}

}  // namespace cnx
