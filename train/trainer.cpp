#include "train/trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "models/safetensors.h"
#include "train/checkpoint.h"
#include "train/data/dataset.h"
#include "train/data/loader.h"
#include "train/data/rand_augment.h"
#include "train/optim/adamw.h"
#include "train/optim/ema.h"
#include "train/optim/schedule.h"
#include "tensor/cuda_memory.h"

namespace cnx {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
constexpr int64_t kReferenceBatch = 4096;  // the lr flags are given for this total batch
constexpr uint64_t kDropPathStream = 0x64726f7070617468ull;  // "droppath": its own generator
}  // namespace

// ---- configuration -----------------------------------------------------------------------------

ConvNeXtConfig TrainConfig::model_config(int64_t num_classes, int64_t in_chans) const {
  ConvNeXtConfig c;
  if (!model.empty()) {
    c = convnext_config(model);
  } else {
    c.name = "custom";
    c.depths = depths;
    c.dims = dims;
  }
  c.num_classes = num_classes;
  c.in_chans = in_chans;
  c.drop_path_rate = drop_path;
  c.layer_scale_init_value = layer_scale_init_value;  // as main.py: the flag decides, for any model
  c.head_init_scale = head_init_scale;
  return c;
}

void TrainConfig::validate() const {
  auto positive = [](const char* flag, double v) {
    CNX_CHECK(v > 0, flag, " must be positive, got ", v);
  };
  auto non_negative = [](const char* flag, double v) {
    CNX_CHECK(v >= 0, flag, " must be >= 0, got ", v);
  };
  if (!model.empty()) (void)convnext_config(model);  // throws for unknown names
  positive("--batch_size", static_cast<double>(batch_size));
  positive("--update_freq", static_cast<double>(update_freq));
  positive("--epochs", static_cast<double>(epochs));
  non_negative("--lr", lr);
  non_negative("--min_lr", min_lr);
  non_negative("--warmup_lr", warmup_lr);
  non_negative("--warmup_epochs", static_cast<double>(warmup_epochs));
  non_negative("--weight_decay", weight_decay);
  non_negative("--clip_grad", clip_grad);
  CNX_CHECK(layer_decay > 0 && layer_decay <= 1, "--layer_decay must be in (0, 1], got ", layer_decay);
  CNX_CHECK(smoothing >= 0 && smoothing < 1, "--smoothing must be in [0, 1), got ", smoothing);
  CNX_CHECK(drop_path >= 0 && drop_path < 1, "--drop_path must be in [0, 1), got ", drop_path);
  non_negative("--layer_scale_init_value", layer_scale_init_value);
  CNX_CHECK(model_ema_decay > 0 && model_ema_decay < 1, "--model_ema_decay must be in (0, 1), got ",
            model_ema_decay);
  positive("--save_ckpt_freq", static_cast<double>(save_ckpt_freq));
  non_negative("--save_ckpt_num", static_cast<double>(save_ckpt_num));
  positive("--log_every", static_cast<double>(log_every));
  CNX_CHECK(num_workers >= 0, "--num_workers must be >= 0, got ", num_workers);
  CNX_CHECK(device == "auto" || device == "cpu" || device == "cuda" || device.rfind("cuda:", 0) == 0,
            "--device must be auto, cpu or cuda, got '", device, "'");
  CNX_CHECK(use_amp == "auto" || use_amp == "true" || use_amp == "false",
            "--use_amp must be auto, true or false, got '", use_amp, "'");
  bool known = data_set == "image_folder";
  std::string names;
  for (const std::string& d : known_datasets()) {
    known = known || d == data_set;
    names += d + ", ";
  }
  CNX_CHECK(known, "unknown dataset '", data_set, "' (known: ", names, "image_folder)");
  CNX_CHECK(data_set != "image_folder" || !data_path.empty(),
            "--data_set image_folder needs --data_path (the folder that holds train/ and val/)");
  CNX_CHECK(input_size >= 32, "--input_size must be >= 32 (the model downsamples by 32), got ", input_size);
  CNX_CHECK(crop_pct <= 1, "--crop_pct must be in (0, 1] (or <= 0: the default), got ", crop_pct);
  if (aa != "none" && !aa.empty()) (void)parse_rand_augment(aa);
  non_negative("--color_jitter", color_jitter);
  CNX_CHECK(reprob == -1 || (reprob >= 0 && reprob <= 1), "--reprob must be in [0, 1], got ", reprob);
  CNX_CHECK(mixup == -1 || mixup >= 0, "--mixup must be >= 0, got ", mixup);
  CNX_CHECK(cutmix == -1 || cutmix >= 0, "--cutmix must be >= 0, got ", cutmix);
  CNX_CHECK(mixup_prob >= 0 && mixup_prob <= 1, "--mixup_prob must be in [0, 1], got ", mixup_prob);
  CNX_CHECK(mixup_switch_prob >= 0 && mixup_switch_prob <= 1,
            "--mixup_switch_prob must be in [0, 1], got ", mixup_switch_prob);
}

DType TrainConfig::activations(const Device& on) const {
  const bool amp = use_amp == "true" || (use_amp == "auto" && on.is_cuda());
  return amp ? DType::bf16 : DType::f32;
}

LoaderOptions TrainConfig::train_loader_options() const {
  const bool folder = data_set == "image_folder";
  auto pick = [&](double v, double official) { return v == -1 ? (folder ? official : 0.0) : v; };
  LoaderOptions o = LoaderOptions::training(batch_size, seed);
  o.augment = folder || augment;
  o.workers = num_workers;
  o.folder.input_size = input_size;
  o.folder.crop_pct = crop_pct;
  o.folder.auto_augment = aa;
  o.folder.color_jitter = color_jitter;
  o.reprob = pick(reprob, 0.25);
  o.mixup.mixup_alpha = pick(mixup, 0.8);
  o.mixup.cutmix_alpha = pick(cutmix, 1.0);
  o.mixup.prob = mixup_prob;
  o.mixup.switch_prob = mixup_switch_prob;
  o.mixup.label_smoothing = smoothing;  // folded into the soft targets, as main.py
  return o;
}

std::string TrainConfig::to_json() const {
  json j = {{"model", model}, {"depths", depths}, {"dims", dims}, {"drop_path", drop_path},
            {"layer_scale_init_value", layer_scale_init_value}, {"head_init_scale", head_init_scale},
            {"data_set", data_set}, {"data_path", data_path}, {"augment", augment},
            {"num_workers", num_workers}, {"input_size", input_size}, {"crop_pct", crop_pct},
            {"aa", aa}, {"color_jitter", color_jitter}, {"reprob", reprob}, {"mixup", mixup},
            {"cutmix", cutmix}, {"mixup_prob", mixup_prob}, {"mixup_switch_prob", mixup_switch_prob}, {"batch_size", batch_size}, {"update_freq", update_freq},
            {"epochs", epochs}, {"lr", lr}, {"min_lr", min_lr}, {"warmup_lr", warmup_lr},
            {"warmup_epochs", warmup_epochs}, {"warmup_steps", warmup_steps},
            {"weight_decay", weight_decay}, {"clip_grad", clip_grad}, {"layer_decay", layer_decay},
            {"smoothing", smoothing}, {"model_ema", model_ema}, {"model_ema_decay", model_ema_decay},
            {"model_ema_eval", model_ema_eval}, {"seed", seed}, {"output_dir", output_dir},
            {"resume", resume}, {"auto_resume", auto_resume}, {"save_ckpt", save_ckpt},
            {"save_ckpt_freq", save_ckpt_freq}, {"save_ckpt_num", save_ckpt_num},
            {"finetune", finetune}, {"device", device}, {"use_amp", use_amp}, {"log_every", log_every},
            {"max_steps", max_steps}};
  return j.dump(2);
}

TrainConfig TrainConfig::from_json(const std::string& text) {
  const json j = json::parse(text);
  TrainConfig c;
  auto get = [&](const char* key, auto& field) {
    if (j.contains(key)) field = j.at(key).get<std::decay_t<decltype(field)>>();
  };
  get("model", c.model); get("depths", c.depths); get("dims", c.dims);
  get("drop_path", c.drop_path); get("layer_scale_init_value", c.layer_scale_init_value);
  get("head_init_scale", c.head_init_scale); get("data_set", c.data_set);
  get("data_path", c.data_path); get("augment", c.augment); get("num_workers", c.num_workers);
  get("input_size", c.input_size); get("crop_pct", c.crop_pct); get("aa", c.aa);
  get("color_jitter", c.color_jitter); get("reprob", c.reprob); get("mixup", c.mixup);
  get("cutmix", c.cutmix); get("mixup_prob", c.mixup_prob); get("mixup_switch_prob", c.mixup_switch_prob);
  get("batch_size", c.batch_size); get("update_freq", c.update_freq); get("epochs", c.epochs);
  get("lr", c.lr); get("min_lr", c.min_lr); get("warmup_lr", c.warmup_lr);
  get("warmup_epochs", c.warmup_epochs); get("warmup_steps", c.warmup_steps);
  get("weight_decay", c.weight_decay); get("clip_grad", c.clip_grad);
  get("layer_decay", c.layer_decay); get("smoothing", c.smoothing); get("model_ema", c.model_ema);
  get("model_ema_decay", c.model_ema_decay); get("model_ema_eval", c.model_ema_eval);
  get("seed", c.seed); get("output_dir", c.output_dir); get("resume", c.resume);
  get("auto_resume", c.auto_resume); get("save_ckpt", c.save_ckpt);
  get("save_ckpt_freq", c.save_ckpt_freq); get("save_ckpt_num", c.save_ckpt_num);
  get("finetune", c.finetune); get("device", c.device); get("use_amp", c.use_amp);
  get("log_every", c.log_every);
  get("max_steps", c.max_steps);
  return c;
}

std::optional<TrainConfig> checkpoint_config(const std::string& path) {
  const auto md = read_safetensors_metadata(path);
  auto format = md.find("format");
  if (format == md.end() || format->second != kCheckpointFormat) return std::nullopt;
  return TrainConfig::from_json(json::parse(md.at("state")).at("config").dump());
}

NamedTensors load_weights(const std::string& path, bool use_ema) {
  Safetensors file = read_safetensors(path);
  auto format = file.metadata.find("format");
  const bool checkpoint = format != file.metadata.end() && format->second == kCheckpointFormat;
  CNX_CHECK(checkpoint || !use_ema, path, ": plain weights have no EMA (only training checkpoints do)");
  if (!checkpoint) return std::move(file.tensors);
  const std::string prefix = use_ema ? "ema." : "model.";
  NamedTensors out;
  for (auto& [name, t] : file.tensors)
    if (name.rfind(prefix, 0) == 0) out.emplace_back(name.substr(prefix.size()), std::move(t));
  CNX_CHECK(!out.empty(), path, ": the checkpoint holds no ", prefix, "* tensors",
            use_ema ? " (trained without --model_ema)" : "");
  return out;
}

Device resolve_device(const std::string& flag) {
  if (flag == "auto" || flag == "cpu") return Device::cpu();
  const Device d = Device::parse(flag);  // "cuda", "cuda:N"; anything else throws
  CNX_CHECK(cuda_built(), "--device ", flag,
            ": this build has no CUDA backend (nvcc was not found at configure time); use --device cpu");
  const int count = cuda_device_count();
  CNX_CHECK(d.index < count, "--device ", flag, ": ",
            count == 0 ? std::string("no CUDA device found (no driver, or no GPU visible)")
                       : "no such CUDA device (" + std::to_string(count) + " visible)",
            "; use --device cpu");
  return d;
}

// ---- signals ----------------------------------------------------------------------------------

std::atomic<int>& stop_signal() {
  static std::atomic<int> signal_number{0};
  return signal_number;
}

namespace {
extern "C" void on_stop_signal(int sig) { stop_signal().store(sig); }
}  // namespace

void install_stop_handlers() {
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
}

// ---- evaluation -------------------------------------------------------------------------------

namespace {

// Top-1 / top-5 hits and summed cross-entropy of one batch of logits. A row with a NaN or an
// infinity is wrong for both (a comparison with NaN is false, so counting "classes ranked above
// the true one" alone would score a diverged model's NaN rows as hits); its loss is NaN.
void score(const Tensor& logits, const Tensor& labels, int64_t& top1, int64_t& top5, double& loss_sum) {
  const int64_t N = logits.dim(0), K = logits.dim(1);
  const std::vector<float> z = logits.to_vector<float>();
  const std::vector<int64_t> y = labels.to_vector<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    const float* row = z.data() + n * K;
    const float target = row[y[n]];
    int64_t higher = 0;  // classes ranked above the true one (ties count against it)
    bool finite = true;
    double mx = row[0];
    for (int64_t k = 0; k < K; ++k) {
      if (k != y[n] && row[k] >= target) ++higher;
      finite = finite && std::isfinite(row[k]);
      mx = std::max(mx, static_cast<double>(row[k]));
    }
    if (!finite) {
      loss_sum += std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    top1 += higher < 1;
    top5 += higher < 5;
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += std::exp(row[k] - mx);
    loss_sum += mx + std::log(s) - target;
  }
}

EvalResult evaluate_loaded(const ConvNeXt& model, DataLoader& loader,
                           DType activations = DType::f32) {
  NoGradGuard no_grad;
  loader.start_epoch(0);
  Generator unused(0);  // evaluation draws nothing
  const Device device = model.device();
  int64_t top1 = 0, top5 = 0;
  double loss_sum = 0;
  EvalResult r;
  Batch b;
  while (loader.next(b)) {
    // On a CUDA device the loader's uint8 batch is copied and finished there (batch_images).
    score(model.forward(batch_images(b, device), /*training=*/false, unused, activations), b.labels,
          top1, top5, loss_sum);
    r.images += b.labels.numel();
  }
  if (r.images > 0) {
    r.acc1 = 100.0 * static_cast<double>(top1) / static_cast<double>(r.images);
    r.acc5 = 100.0 * static_cast<double>(top5) / static_cast<double>(r.images);
    r.loss = loss_sum / static_cast<double>(r.images);
  }
  return r;
}

double resident_mb() {
  std::ifstream statm("/proc/self/statm");
  long pages = 0, resident = 0;
  statm >> pages >> resident;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1 << 20);
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}
std::string sci(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3e", v);
  return buf;
}

// Appends one JSON object per line to <output_dir>/metrics.jsonl.
class MetricsLog {
 public:
  explicit MetricsLog(const std::string& dir) {
    if (!dir.empty()) file_.open(fs::path(dir) / "metrics.jsonl", std::ios::app);
  }
  void write(const json& j) {
    if (file_) file_ << j.dump() << '\n' << std::flush;
  }

 private:
  std::ofstream file_;
};

// The part of the configuration a checkpoint must agree with to be resumed.
json resume_key(const TrainConfig& c) {
  return {{"model", c.model},           {"depths", c.depths},         {"dims", c.dims},
          {"data_set", c.data_set},     {"batch_size", c.batch_size}, {"update_freq", c.update_freq},
          {"model_ema", c.model_ema}};
}

}  // namespace

namespace {

// The data of a run: an in-memory dataset's split or an ImageFolder's, with its loader. The
// loader points at the dataset, so the dataset lives on the heap: its address survives moves of
// the SplitData.
struct SplitData {
  std::unique_ptr<Dataset> memory;
  std::unique_ptr<ImageFolder> folder;
  std::unique_ptr<DataLoader> loader;
  int64_t size() const { return memory ? memory->N : static_cast<int64_t>(folder->samples.size()); }
  int64_t num_classes() const { return loader->num_classes(); }
  int64_t channels() const { return memory ? memory->C : 3; }
};

SplitData open_split(const std::string& data_set, const std::string& data_path, bool train,
                     const LoaderOptions& opt) {
  SplitData d;
  if (data_set == "image_folder") {
    d.folder = std::make_unique<ImageFolder>(scan_image_folder(data_path, train ? "train" : "val"));
    d.loader = std::make_unique<DataLoader>(*d.folder, opt);
  } else {
    d.memory = std::make_unique<Dataset>(load_dataset(data_set, data_path, train));
    d.loader = std::make_unique<DataLoader>(*d.memory, opt);
  }
  return d;
}

LoaderOptions eval_loader_options(int64_t batch_size, int workers, int64_t input_size, double crop_pct) {
  LoaderOptions o = LoaderOptions::evaluation(batch_size);
  o.workers = workers;
  o.folder.input_size = input_size;
  o.folder.crop_pct = crop_pct;
  return o;
}

}  // namespace

EvalResult evaluate(const ConvNeXt& model, const std::string& data_set, const std::string& data_path,
                    int64_t batch_size, int workers, int64_t input_size, double crop_pct) {
  SplitData test = open_split(data_set, data_path, /*train=*/false,
                              eval_loader_options(batch_size, workers, input_size, crop_pct).for_device(model.device()));
  CNX_CHECK(test.num_classes() == model.config().num_classes, "eval: the model has ",
            model.config().num_classes, " classes, ", data_set, " has ", test.num_classes());
  return evaluate_loaded(model, *test.loader);
}

// ---- training ---------------------------------------------------------------------------------

TrainResult train(const TrainConfig& cfg) {
  cfg.validate();
  const Device device = resolve_device(cfg.device);
  const DType activations = cfg.activations(device);  // bf16 under --use_amp

  // ---- data ----
  // for_device: on a CUDA device the loaders hand out uint8 batches in pinned memory, finished
  // on the device (batch_images below); on the CPU float batches finished by the workers.
  SplitData train_set = open_split(cfg.data_set, cfg.data_path, /*train=*/true, cfg.train_loader_options().for_device(device));
  SplitData test_set = open_split(cfg.data_set, cfg.data_path, /*train=*/false,
                                  eval_loader_options(cfg.batch_size, cfg.num_workers, cfg.input_size, cfg.crop_pct).for_device(device));
  CNX_CHECK(train_set.num_classes() == test_set.num_classes(), cfg.data_set, ": the training split has ",
            train_set.num_classes(), " classes, the test split ", test_set.num_classes());
  DataLoader& loader = *train_set.loader;
  const int64_t batches = loader.batches_per_epoch();
  CNX_CHECK(batches >= cfg.update_freq, "--batch_size ", cfg.batch_size, " x --update_freq ",
            cfg.update_freq, " is more than the ", train_set.size(), " training images");
  const int64_t steps_per_epoch = batches / cfg.update_freq;  // optimiser steps

  // ---- model, optimiser, schedules ----
  Generator init(cfg.seed);
  ConvNeXt model(cfg.model_config(train_set.num_classes(), train_set.channels()), init);
  std::printf("model %s: %zu tensors, %lld parameters; %s: %lld train / %lld test images, %lld classes\n",
              model.config().name.c_str(), model.parameters().size(),
              static_cast<long long>(model.num_parameters()), cfg.data_set.c_str(),
              static_cast<long long>(train_set.size()), static_cast<long long>(test_set.size()),
              static_cast<long long>(train_set.num_classes()));
  std::printf("precision: %s\n", activations == DType::bf16
                                     ? "bf16 mixed (bf16 activations, fp32 weights and optimiser)"
                                     : "fp32");

  if (!cfg.finetune.empty()) {
    NamedTensors weights = load_weights(cfg.finetune);
    const Shape want = model.parameter("head.weight").official_shape;
    for (auto it = weights.begin(); it != weights.end();) {
      const bool head = it->first == "head.weight" || it->first == "head.bias";
      if (head && (it->first == "head.weight" ? it->second.shape() != want
                                              : it->second.shape() != Shape{want[0]})) {
        std::printf("finetune: %s %s does not fit %lld classes: re-initialised (head_init_scale %g)\n",
                    it->first.c_str(), it->second.shape().str().c_str(),
                    static_cast<long long>(want[0]), cfg.head_init_scale);
        it = weights.erase(it);
      } else {
        ++it;
      }
    }
    // Keep this model's freshly initialised head where the file's did not fit.
    for (const char* h : {"head.weight", "head.bias"}) {
      bool present = false;
      for (const auto& [name, t] : weights) present = present || name == h;
      if (!present) weights.emplace_back(h, to_official_layout(model.parameter(h).value, ParamLayout::plain));
    }
    model.load_state_dict(weights);
    std::printf("finetune: loaded %s\n", cfg.finetune.c_str());
  }
  // On its device before the optimiser and the EMA alias its parameters. (The initial values
  // were drawn on the host, so every device starts from the same weights.)
  model.to(device);

  const ScaledValue lr = scale_lr_linear(cfg.lr, cfg.batch_size * cfg.update_freq, kReferenceBatch, "lr");
  std::printf("%s\n", lr.description.c_str());
  const int64_t total_steps = cfg.epochs * steps_per_epoch;
  const std::vector<double> lr_schedule = cosine_scheduler(
      lr.value, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.warmup_lr, cfg.warmup_steps);
  const std::vector<double> lr_scales =
      layer_decay_lr_scales(model.config(), model.parameters(), cfg.layer_decay);
  AdamW opt(model.parameters(), AdamWOptions{}, lr_scales);
  std::unique_ptr<ModelEma> ema;
  if (cfg.model_ema) ema = std::make_unique<ModelEma>(model.parameters(), cfg.model_ema_decay);
  Generator drop_gen(cfg.seed ^ kDropPathStream);

  // ---- resume ----
  int64_t start_epoch = 0, start_batch = 0, step = 0;
  double best_acc1 = 0;
  std::string resume_path = cfg.resume;
  if (resume_path.empty() && cfg.auto_resume && !cfg.output_dir.empty())
    resume_path = find_resume_checkpoint(cfg.output_dir);
  if (!resume_path.empty()) {
    const Checkpoint ck = load_checkpoint(resume_path);
    const json state = json::parse(ck.state_json);
    const json want = resume_key(cfg), have = state.at("resume_key");
    for (const auto& [key, value] : want.items())
      CNX_CHECK(have.contains(key) && have.at(key) == value, "cannot resume from ", resume_path,
                ": it was trained with ", key, " ", have.value(key, json()).dump(), ", this run has ",
                value.dump());
    NamedTensors weights;
    for (const auto& [name, t] : ck.tensors)
      if (name.rfind("model.", 0) == 0) weights.emplace_back(name.substr(6), t);
    model.load_state_dict(weights);
    opt.load_state_dict(ck.tensors);
    if (ema) ema->load_state_dict(ck.tensors);
    start_epoch = state.at("epoch");
    start_batch = state.at("batch");
    step = state.at("step");
    best_acc1 = state.at("best_acc1");
    drop_gen.set_state(state.at("drop_gen").at("seed"), state.at("drop_gen").at("offset"));
    std::printf("resumed from %s: epoch %lld, batch %lld, step %lld\n", resume_path.c_str(),
                static_cast<long long>(start_epoch), static_cast<long long>(start_batch),
                static_cast<long long>(step));
  }

  if (!cfg.output_dir.empty()) {
    fs::create_directories(cfg.output_dir);
    std::ofstream(fs::path(cfg.output_dir) / "config.json") << cfg.to_json() << '\n';
  }
  MetricsLog metrics(cfg.output_dir);

  // The whole state, as a checkpoint that continues at (epoch, batch).
  auto snapshot = [&](int64_t epoch, int64_t batch) {
    Checkpoint ck;
    for (auto& [name, t] : model.state_dict()) ck.tensors.emplace_back("model." + name, t);
    for (auto& nt : opt.state_dict()) ck.tensors.push_back(nt);
    if (ema)
      for (auto& nt : ema->state_dict()) ck.tensors.push_back(nt);
    ck.step = step;
    ck.state_json = json{{"epoch", epoch}, {"batch", batch}, {"step", step}, {"best_acc1", best_acc1},
                         {"drop_gen", {{"seed", drop_gen.seed()}, {"offset", drop_gen.offset()}}},
                         {"data_seed", cfg.seed}, {"resume_key", resume_key(cfg)},
                         {"config", json::parse(cfg.to_json())}}
                        .dump();
    return ck;
  };

  TrainResult result;
  result.best_acc1 = best_acc1;
  const bool tty = cfg.progress_bar && ::isatty(STDOUT_FILENO);
  const Tensor inv_update_freq =
      Tensor::full({}, 1.0 / static_cast<double>(cfg.update_freq), DType::f32, device);
  std::unique_ptr<ConvNeXt> ema_model;  // evaluation copy for the EMA weights
  double current_lr = 0;                // this optimiser step's scheduled lr

  for (int64_t epoch = start_epoch; epoch < cfg.epochs; ++epoch) {
    loader.start_epoch(epoch, epoch == start_epoch ? start_batch : 0);
    model.zero_grad();  // as engine.py: nothing carries over from an earlier epoch
    auto t_log = std::chrono::steady_clock::now();
    const auto t_epoch = t_log;
    const int64_t epoch_first_batch = epoch == start_epoch ? start_batch : 0;
    int64_t images_since_log = 0, steps_since_log = 0;
    double loss_since_log = 0;
    Batch b;
    bool stopped = false;
    while (loader.next(b)) {
      // Batches past the last whole group of update_freq make no optimiser step: skipped, as
      // in engine.py (their gradients would leak into the next epoch's first step).
      if (b.index >= steps_per_epoch * cfg.update_freq) break;
      // ---- one micro-batch: forward, backward (gradients accumulate over update_freq) ----
      const int64_t micro = b.index % cfg.update_freq;
      if (micro == 0) current_lr = lr_schedule[static_cast<size_t>(std::min(step, total_steps - 1))];
      Tensor logits = model.forward(batch_images(b, device), /*training=*/true, drop_gen, activations);
      // Mixup/CutMix: soft targets (smoothing folded in), as main.py's SoftTargetCrossEntropy.
      Tensor loss = b.targets.defined() ? soft_cross_entropy(logits, b.targets.to(device))
                                        : cross_entropy(logits, b.labels.to(device), cfg.smoothing);
      const double loss_value = loss.item();
      CNX_CHECK(std::isfinite(loss_value), "training diverged: loss ", loss_value, " at epoch ",
                epoch, " batch ", b.index);
      (cfg.update_freq > 1 ? mul(loss, inv_update_freq) : loss).backward();
      loss_since_log += loss_value;
      images_since_log += b.labels.numel();
      if (micro != cfg.update_freq - 1) continue;

      // ---- the optimiser step ----
      const double norm = clip_grad_norm(model.parameters(), cfg.clip_grad);
      opt.step(current_lr, cfg.weight_decay);
      model.zero_grad();
      if (ema) ema->update(model.parameters());
      ++step;
      ++steps_since_log;
      result.losses.push_back(loss_value);

      const bool log_now = step % cfg.log_every == 0 || b.index + 1 == steps_per_epoch * cfg.update_freq;
      if (tty && !log_now) {  // a live bar: [=====>    ] done/total, loss, time left in the epoch
        const int64_t done = b.index + 1, width = 30, filled = width * done / batches;
        const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_epoch).count();
        const double left = elapsed / static_cast<double>(done - epoch_first_batch) *
                            static_cast<double>(batches - done);
        std::string bar(static_cast<size_t>(filled), '=');
        if (filled < width) bar += '>' + std::string(static_cast<size_t>(width - filled - 1), ' ');
        std::printf("\r\033[Kepoch %lld [%s] %lld/%lld loss %.4f eta %d:%02d", static_cast<long long>(epoch),
                    bar.c_str(), static_cast<long long>(done), static_cast<long long>(batches), loss_value,
                    static_cast<int>(left) / 60, static_cast<int>(left) % 60);
        std::fflush(stdout);
      }
      if (log_now) {
        const auto now = std::chrono::steady_clock::now();
        const double secs = std::chrono::duration<double>(now - t_log).count();
        const double mean_loss = loss_since_log / static_cast<double>(steps_since_log * cfg.update_freq);
        const double ips = static_cast<double>(images_since_log) / secs;
        const double ms = 1000.0 * secs / static_cast<double>(steps_since_log);
        json record = {{"type", "train"}, {"epoch", epoch}, {"step", step}, {"loss", mean_loss},
                       {"lr", current_lr}, {"grad_norm", norm}, {"images_per_s", ips},
                       {"ms_per_step", ms}, {"mem_mb", resident_mb()}};
        std::string gpu_mem;  // on a GPU: the most device memory in tensors since the last line
        if (device.is_cuda()) {
          const double peak_mb =
              static_cast<double>(cuda::memory_stats(device).peak_allocated_bytes) / (1 << 20);
          cuda::reset_peak_memory_stats(device);
          gpu_mem = " gpu_mem " + fixed(peak_mb, 0) + " MB";
          record["gpu_mem_mb"] = peak_mb;
        }
        std::printf("%sepoch %lld step %lld/%lld loss %s lr %s grad_norm %s img/s %s ms/step %s mem %s MB%s\n",
                    tty ? "\r\033[K" : "", static_cast<long long>(epoch),
                    static_cast<long long>(step - epoch * steps_per_epoch),
                    static_cast<long long>(steps_per_epoch), fixed(mean_loss, 4).c_str(),
                    sci(current_lr).c_str(), fixed(norm, 3).c_str(), fixed(ips, 1).c_str(),
                    fixed(ms, 1).c_str(), fixed(resident_mb(), 0).c_str(), gpu_mem.c_str());
        std::fflush(stdout);
        metrics.write(record);
        t_log = now;
        images_since_log = steps_since_log = 0;
        loss_since_log = 0;
      }

      const int sig = stop_signal().load();
      if (sig != 0 || (cfg.max_steps > 0 && step >= cfg.max_steps)) {
        // Stop between optimiser steps, leaving a checkpoint that continues exactly here.
        stopped = true;
        result.interrupted = sig != 0;
        std::string where;
        if (!cfg.output_dir.empty() && cfg.save_ckpt) {
          where = checkpoint_path(cfg.output_dir, "recovery");
          save_checkpoint(where, snapshot(epoch, b.index + 1));
        }
        std::printf("%sstopped %s at step %lld%s%s\n", tty ? "\r\033[K" : "",
                    sig ? ("by signal " + std::to_string(sig)).c_str() : "by --max_steps",
                    static_cast<long long>(step), where.empty() ? "" : ": recovery checkpoint ",
                    where.c_str());
        break;
      }
    }
    if (stopped) {
      result.steps = step;
      return result;
    }

    // ---- end of epoch: evaluate, log, checkpoint ----
    const EvalResult ev = evaluate_loaded(model, *test_set.loader, activations);
    json record = {{"type", "eval"}, {"epoch", epoch}, {"step", step}, {"acc1", ev.acc1},
                   {"acc5", ev.acc5}, {"loss", ev.loss}};
    std::printf("epoch %lld test: Acc@1 %.2f Acc@5 %.2f loss %.4f", static_cast<long long>(epoch),
                ev.acc1, ev.acc5, ev.loss);
    if (ema && cfg.model_ema_eval) {
      if (!ema_model) {
        Generator g(0);
        ema_model = std::make_unique<ConvNeXt>(model.config(), g);
        ema_model->to(device);
      }
      ema->copy_to(ema_model->parameters());
      const EvalResult ee = evaluate_loaded(*ema_model, *test_set.loader, activations);
      std::printf(" | EMA Acc@1 %.2f Acc@5 %.2f loss %.4f", ee.acc1, ee.acc5, ee.loss);
      record["ema_acc1"] = ee.acc1;
      record["ema_acc5"] = ee.acc5;
      record["ema_loss"] = ee.loss;
    }
    std::printf("\n");
    metrics.write(record);
    result.last_acc1 = ev.acc1;
    result.last_acc5 = ev.acc5;
    result.last_loss = ev.loss;
    result.epochs_done = epoch + 1;
    const bool best = ev.acc1 > best_acc1;
    if (best) best_acc1 = ev.acc1;
    result.best_acc1 = best_acc1;

    if (!cfg.output_dir.empty() && cfg.save_ckpt) {
      const bool last = epoch + 1 == cfg.epochs;
      if ((epoch + 1) % cfg.save_ckpt_freq == 0 || last) {
        save_checkpoint(checkpoint_path(cfg.output_dir, std::to_string(epoch)), snapshot(epoch + 1, 0));
        prune_checkpoints(cfg.output_dir, static_cast<int>(cfg.save_ckpt_num));
      }
      if (best) save_checkpoint(checkpoint_path(cfg.output_dir, "best"), snapshot(epoch + 1, 0));
      std::error_code ec;  // a finished epoch supersedes a recovery checkpoint
      fs::remove(checkpoint_path(cfg.output_dir, "recovery"), ec);
    }
  }
  result.steps = step;
  std::printf("done: %lld epochs, best test Acc@1 %.2f\n", static_cast<long long>(result.epochs_done),
              result.best_acc1);
  return result;
}

}  // namespace cnx
