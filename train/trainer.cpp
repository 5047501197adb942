#include "train/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdarg>
#include <chrono>
#include <cmath>
#include <limits>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/linear.h"
#include "models/safetensors.h"
#include "train/checkpoint.h"
#include "train/data/dataset.h"
#include "train/data/loader.h"
#include "train/data/rand_augment.h"
#include "train/dist/grad_reducer.h"
#include "train/optim/adamw.h"
#include "train/optim/ema.h"
#include "train/optim/schedule.h"
#include "train/optim/step_status.h"
#include "train/run_dir.h"
#include "tensor/cuda_graph.h"
#include "tensor/cuda_memory.h"
#include "tensor/escape.h"
#include "tensor/readback.h"

namespace cnx {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
constexpr int64_t kOldReferenceBatch = 4096;  // lr_rule "per_4096": --lr was for this total batch
// Neither --lr nor --blr: blr 8e-3, the project's default before --lr became absolute (its 0.128
// per total batch 4096 is 8e-3 per 256): 4e-3 for the default job's batch 128, as main.py's.
constexpr double kDefaultBlr = 8e-3;
constexpr uint64_t kDropPathStream = 0x64726f7070617468ull;  // "droppath": its own generator
}  // namespace

uint64_t drop_path_seed(uint64_t seed, int rank) {
  return (seed ^ kDropPathStream) + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(rank);
}

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
  c = c.scaled(width_mult, depth_mult);
  c.num_classes = num_classes;
  c.in_chans = in_chans;
  c.drop_path_rate = drop_path;
  // As main.py: the flag decides, for any model; left at -1, a roadmap step keeps its own value
  // (so that step 0 is ResNet-50 without gamma tensors) and the others take the default.
  if (layer_scale_init_value >= 0) c.layer_scale_init_value = layer_scale_init_value;
  else if (model.rfind("roadmap_", 0) != 0) c.layer_scale_init_value = kDefaultLayerScale;
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
  CNX_CHECK(lr == -1 || (std::isfinite(lr) && lr >= 0), "--lr must be >= 0, got ", lr);
  CNX_CHECK(blr == -1 || (std::isfinite(blr) && blr > 0), "--blr must be > 0, got ", blr);
  CNX_CHECK(lr == -1 || blr == -1, "give --lr (the learning rate) or --blr (per 256 images), not both");
  CNX_CHECK(lr_rule == "absolute" || lr_rule == "per_4096", "lr_rule must be absolute or per_4096, got '",
            lr_rule, "'");
  non_negative("--skip_nonfinite", static_cast<double>(skip_nonfinite));
  non_negative("--min_lr", min_lr);
  non_negative("--warmup_lr", warmup_lr);
  non_negative("--warmup_epochs", static_cast<double>(warmup_epochs));
  non_negative("--weight_decay", weight_decay);
  non_negative("--clip_grad", clip_grad);
  CNX_CHECK(layer_decay > 0 && layer_decay <= 1, "--layer_decay must be in (0, 1], got ", layer_decay);
  CNX_CHECK(smoothing >= 0 && smoothing < 1, "--smoothing must be in [0, 1), got ", smoothing);
  CNX_CHECK(drop_path >= 0 && drop_path < 1, "--drop_path must be in [0, 1), got ", drop_path);
  CNX_CHECK(width_mult > 0 && width_mult <= 4, "--width_mult must be in (0, 4], got ", width_mult);
  CNX_CHECK(depth_mult > 0 && depth_mult <= 4, "--depth_mult must be in (0, 4], got ", depth_mult);
  CNX_CHECK(layer_scale_init_value >= 0 || layer_scale_init_value == -1,
            "--layer_scale_init_value must be >= 0 (or -1: the model's own), got ",
            layer_scale_init_value);
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
  CNX_CHECK(cuda_graphs == "auto" || cuda_graphs == "true" || cuda_graphs == "false",
            "--cuda_graphs must be auto, true or false, got '", cuda_graphs, "'");
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
  CNX_CHECK(crop_pct <= 0 || (crop_pct >= 0.1 && crop_pct <= 1),
            "--crop_pct must be in [0.1, 1] (or <= 0: the default), got ", crop_pct);
  if (aa != "none" && !aa.empty()) (void)parse_rand_augment(aa);
  non_negative("--color_jitter", color_jitter);
  CNX_CHECK(reprob == -1 || (reprob >= 0 && reprob <= 1), "--reprob must be in [0, 1], got ", reprob);
  CNX_CHECK(mixup == -1 || mixup >= 0, "--mixup must be >= 0, got ", mixup);
  CNX_CHECK(cutmix == -1 || cutmix >= 0, "--cutmix must be >= 0, got ", cutmix);
  CNX_CHECK(mixup_prob >= 0 && mixup_prob <= 1, "--mixup_prob must be in [0, 1], got ", mixup_prob);
  CNX_CHECK(mixup_switch_prob >= 0 && mixup_switch_prob <= 1,
            "--mixup_switch_prob must be in [0, 1], got ", mixup_switch_prob);
}

bool TrainConfig::use_cuda_graphs(const Device& on, bool batch_norm, int world_size) const {
  if (cuda_graphs == "false") return false;
  const bool required = cuda_graphs == "true";
  CNX_CHECK(!required || world_size == 1, "--cuda_graphs true: a run of ", world_size,
            " ranks is not captured yet (its gradient collectives are not); use --cuda_graphs false");
  CNX_CHECK(!required || on.is_cuda(), "--cuda_graphs true needs a CUDA device (--device cuda); this run is on ",
            on.str());
  // BatchNorm's num_batches_tracked is counted on the host by each forward, which a replay
  // does not run.
  CNX_CHECK(!required || !batch_norm, "--cuda_graphs true: the model has BatchNorm, whose step is not captured "
            "(its num_batches_tracked is counted on the host); use --cuda_graphs false");
  // CNX_CUDA_SYNC=1 (tensor/cuda_check.h) synchronises after every launch, which a capture
  // forbids: the debugging switch runs the step uncaptured.
  const char* sync = std::getenv("CNX_CUDA_SYNC");
  const bool sync_each_launch = sync && std::string(sync) != "0";
  CNX_CHECK(!required || !sync_each_launch, "--cuda_graphs true: CNX_CUDA_SYNC=", sync,
            " synchronises after every launch, which a capture forbids; use --cuda_graphs false");
  return on.is_cuda() && !batch_norm && !sync_each_launch && world_size == 1;
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
            {"width_mult", width_mult}, {"depth_mult", depth_mult},
            {"data_set", data_set}, {"data_path", data_path}, {"augment", augment},
            {"num_workers", num_workers}, {"input_size", input_size}, {"crop_pct", crop_pct},
            {"aa", aa}, {"color_jitter", color_jitter}, {"reprob", reprob}, {"mixup", mixup},
            {"cutmix", cutmix}, {"mixup_prob", mixup_prob}, {"mixup_switch_prob", mixup_switch_prob}, {"batch_size", batch_size}, {"update_freq", update_freq},
            {"epochs", epochs}, {"lr", lr}, {"blr", blr}, {"lr_rule", lr_rule}, {"min_lr", min_lr}, {"warmup_lr", warmup_lr},
            {"warmup_epochs", warmup_epochs}, {"warmup_steps", warmup_steps},
            {"weight_decay", weight_decay}, {"clip_grad", clip_grad}, {"layer_decay", layer_decay},
            {"smoothing", smoothing}, {"model_ema", model_ema}, {"model_ema_decay", model_ema_decay},
            {"model_ema_eval", model_ema_eval}, {"seed", seed}, {"output_dir", output_dir},
            {"resume", resume}, {"auto_resume", auto_resume}, {"save_ckpt", save_ckpt},
            {"save_ckpt_freq", save_ckpt_freq}, {"save_ckpt_num", save_ckpt_num},
            {"finetune", finetune}, {"device", device}, {"use_amp", use_amp}, {"cuda_graphs", cuda_graphs},
            {"log_every", log_every},
            {"max_steps", max_steps}, {"skip_nonfinite", skip_nonfinite}};
  return j.dump(2);
}

TrainConfig TrainConfig::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail("config is not valid JSON (", e.what(), ")");
  }
  CNX_CHECK(j.is_object(), "config is not a JSON object");
  TrainConfig c;
  // A field of the wrong type (or out of its type's range) is an error naming it; the values'
  // ranges are checked where they are used (validate(), ConvNeXtConfig::validate()).
  auto get = [&](const char* key, auto& field) {
    if (!j.contains(key)) return;
    using T = std::decay_t<decltype(field)>;
    const json& v = j.at(key);
    // nlohmann converts between number kinds silently (-1 into a uint64 is 2^64 - 1): the kind
    // must match, and an integer must fit.
    bool ok = true;
    if constexpr (std::is_same_v<T, uint64_t>) ok = v.is_number_unsigned();
    else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>)
      ok = v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<T>::max())) &&
           v.get<int64_t>() >= std::numeric_limits<T>::min() && v.get<int64_t>() <= std::numeric_limits<T>::max();
    else if constexpr (std::is_same_v<T, std::vector<int64_t>>)
      for (const json& e : v.is_array() ? v : json::array({json()}))
        ok = ok && e.is_number_integer() && !(e.is_number_unsigned() && e.get<uint64_t>() > uint64_t(INT64_MAX));
    if (ok) {
      try {
        field = v.get<T>();
      } catch (const json::exception&) {
        ok = false;
      }
    }
    CNX_CHECK(ok, "config field \"", key, "\" has the wrong type: ", escape_for_message(v.dump().substr(0, 80)));
  };
  get("model", c.model); get("depths", c.depths); get("dims", c.dims);
  get("drop_path", c.drop_path); get("layer_scale_init_value", c.layer_scale_init_value);
  get("head_init_scale", c.head_init_scale); get("data_set", c.data_set);
  get("width_mult", c.width_mult); get("depth_mult", c.depth_mult);
  get("data_path", c.data_path); get("augment", c.augment); get("num_workers", c.num_workers);
  get("input_size", c.input_size); get("crop_pct", c.crop_pct); get("aa", c.aa);
  get("color_jitter", c.color_jitter); get("reprob", c.reprob); get("mixup", c.mixup);
  get("cutmix", c.cutmix); get("mixup_prob", c.mixup_prob); get("mixup_switch_prob", c.mixup_switch_prob);
  get("batch_size", c.batch_size); get("update_freq", c.update_freq); get("epochs", c.epochs);
  get("lr", c.lr); get("blr", c.blr); get("min_lr", c.min_lr); get("warmup_lr", c.warmup_lr);
  get("warmup_epochs", c.warmup_epochs); get("warmup_steps", c.warmup_steps);
  get("weight_decay", c.weight_decay); get("clip_grad", c.clip_grad);
  get("layer_decay", c.layer_decay); get("smoothing", c.smoothing); get("model_ema", c.model_ema);
  get("model_ema_decay", c.model_ema_decay); get("model_ema_eval", c.model_ema_eval);
  get("seed", c.seed); get("output_dir", c.output_dir); get("resume", c.resume);
  get("auto_resume", c.auto_resume); get("save_ckpt", c.save_ckpt);
  get("save_ckpt_freq", c.save_ckpt_freq); get("save_ckpt_num", c.save_ckpt_num);
  get("finetune", c.finetune); get("device", c.device); get("use_amp", c.use_amp); get("cuda_graphs", c.cuda_graphs);
  get("log_every", c.log_every);
  get("max_steps", c.max_steps);
  get("skip_nonfinite", c.skip_nonfinite);
  // A config without lr_rule was written when --lr was given for a total batch of 4096.
  c.lr_rule = "per_4096";
  get("lr_rule", c.lr_rule);
  return c;
}

std::optional<TrainConfig> checkpoint_config(const std::string& path) {
  const auto md = read_safetensors_metadata(path);
  auto format = md.find("format");
  if (format == md.end() || format->second != kCheckpointFormat) return std::nullopt;
  try {
    auto state = md.find("state");
    CNX_CHECK(state != md.end(), "no \"state\" in its metadata");
    json parsed;
    try {
      parsed = json::parse(state->second);
    } catch (const json::exception& e) {
      fail("its state is not valid JSON (", e.what(), ")");
    }
    CNX_CHECK(parsed.is_object() && parsed.contains("config"), "its state has no \"config\"");
    return TrainConfig::from_json(parsed.at("config").dump());
  } catch (const Error& e) {
    fail(path, ": checkpoint ", e.what());
  }
}

NamedTensors load_weights(const std::string& path, bool use_ema) {
  Safetensors file = read_safetensors(path);
  // Every LayerNorm here uses eps 1e-6; weights trained with another (timm's convnext_xxlarge:
  // 1e-5, recorded by tools/convert_checkpoint.py) would load and then mismatch.
  if (auto eps = file.metadata.find("layer_norm_eps"); eps != file.metadata.end()) {
    char* end = nullptr;
    const double value = std::strtod(eps->second.c_str(), &end);
    CNX_CHECK(end != eps->second.c_str() && *end == '\0' && value == 1e-6, path, ": trained with LayerNorm eps ",
              escape_for_message(eps->second), "; this implementation uses 1e-6 (the official models')");
  }
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
  std::signal(SIGHUP, on_stop_signal);
  // mpirun forwards SIGUSR1 to every rank (and SIGTERM to it ends the job without a grace
  // period): `kill -USR1 <mpirun>` stops a data-parallel run with a recovery checkpoint.
  std::signal(SIGUSR1, on_stop_signal);
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

// Stops at the next batch when a stop signal arrives (EvalResult::interrupted). With a world of
// several ranks, every rank evaluates its shard of the split (LoaderOptions::rank) and the counts
// are summed over the ranks: every test image counted once, the same Acc@1 and Acc@5 as one
// process (the loss up to the order of its sum). The ranks' shards differ in batches, so no
// collective can run per batch: a signal is acted on after the evaluation.
EvalResult evaluate_loaded(const ConvNeXt& model, DataLoader& loader,
                           DType activations = DType::f32, dist::Communicator* world = nullptr) {
  const bool ranks = world != nullptr && world->size() > 1;
  NoGradGuard no_grad;
  loader.start_epoch(0);
  Generator unused(0);  // evaluation draws nothing
  const Device device = model.device();
  int64_t top1 = 0, top5 = 0;
  double loss_sum = 0;
  EvalResult r;
  Batch b;
  while (loader.next(b)) {
    if (!ranks && stop_signal().load() != 0) {
      r.interrupted = true;
      break;
    }
    // On a CUDA device the loader's uint8 batch is copied and finished there (batch_images).
    score(model.forward(batch_images(b, device), /*training=*/false, unused, activations), b.labels,
          top1, top5, loss_sum);
    r.images += b.labels.numel();
  }
  if (ranks) {
    std::array<int64_t, 3> counts{top1, top5, r.images};
    world->allreduce_sum(counts);
    std::array<double, 1> sums{loss_sum};
    world->allreduce_sum(sums);
    top1 = counts[0];
    top5 = counts[1];
    r.images = counts[2];
    loss_sum = sums[0];
  }
  if (r.images > 0) {
    r.acc1 = 100.0 * static_cast<double>(top1) / static_cast<double>(r.images);
    r.acc5 = 100.0 * static_cast<double>(top5) / static_cast<double>(r.images);
    r.loss = loss_sum / static_cast<double>(r.images);
  }
  return r;
}

// FNV-1a over the bytes of every parameter (copied to the host): equal on every rank of a
// data-parallel run whose ranks are in step.
uint64_t weights_digest(std::vector<Parameter>& params) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const Parameter& p : params) {
    const Tensor host = p.value.to(Device::cpu());
    const auto* bytes = static_cast<const unsigned char*>(host.raw_data());
    for (int64_t i = 0; i < host.nbytes(); ++i) h = (h ^ bytes[i]) * 0x100000001b3ull;
  }
  return h;
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
                    int64_t batch_size, int workers, int64_t input_size, double crop_pct, dist::Communicator* world) {
  const LoaderOptions o = eval_loader_options(batch_size, workers, input_size, crop_pct)
                              .for_device(model.device())
                              .for_rank(world ? world->rank() : 0, world ? world->size() : 1);
  SplitData test = open_split(data_set, data_path, /*train=*/false, o);
  CNX_CHECK(test.num_classes() == model.config().num_classes, "eval: the model has ",
            model.config().num_classes, " classes, ", data_set, " has ", test.num_classes());
  return evaluate_loaded(model, *test.loader, DType::f32, world);
}

LrChoice resolve_lr(const TrainConfig& c, const std::optional<TrainConfig>& resumed, int world_size) {
  const int64_t total = c.batch_size * c.update_freq * world_size;
  // "128" or, with several ranks, "128 = 64 x 1 x 2 ranks" (batch_size x update_freq x ranks)
  const std::string total_text =
      std::to_string(total) + (world_size == 1 ? std::string()
                                               : " = " + std::to_string(c.batch_size) + " x " +
                                                     std::to_string(c.update_freq) + " x " +
                                                     std::to_string(world_size) + " ranks");
  const std::string batch = " (total batch " + total_text + ")";
  if (resumed && resumed->lr_rule == "per_4096") {
    const double given = resumed->lr == -1 ? 0.128 : resumed->lr;  // 0.128: the old default
    const ScaledValue old = scale_lr_linear(given, total, kOldReferenceBatch, "lr");
    return {old.value, "lr " + sci(old.value) + batch +
                           ": the resumed checkpoint's, made when --lr was scaled by total batch / 4096 (" +
                           old.description + ")"};
  }
  if (c.lr != -1) return {c.lr, "lr " + sci(c.lr) + batch + ": --lr as given"};
  const double blr = c.blr != -1 ? c.blr : kDefaultBlr;
  const double lr = blr * static_cast<double>(total) / 256.0;
  return {lr, "lr " + sci(lr) + " = --blr " + sci(blr) + (c.blr != -1 ? "" : " (the default)") + " x total batch " +
                  (world_size == 1 ? total_text : "(" + total_text + ")") + " / 256"};
}

// ---- training ---------------------------------------------------------------------------------
//
// A run, in the order train() calls its phases:
//   open_data       the training and test splits and their loaders
//   build_model     the model (initialised from the seed, or --finetune weights), on its device
//   resume          the checkpoint to continue from, every number in it checked (ResumeState)
//   plan_lr         the learning rate (--lr / --blr, or an old checkpoint's), its schedule
//   train_epoch     the steps of one epoch; false when a signal or --max_steps stopped it
//   end_epoch       evaluate, log, checkpoint (best first, then the numbered one)
// A signal is acted on between any two of these, between steps and between evaluation batches.

namespace {

// What an optimiser step whose loss or gradient norm is not finite does (--skip_nonfinite N):
// the step is skipped (weights, AdamW moments and EMA untouched; the data position, drop-path
// draws and the lr schedule move on), counted and logged; N + 1 in a row stop the run.
struct NonfiniteSteps {
  int64_t skipped = 0;  // in all
  int64_t streak = 0;   // in a row, up to the last step
};

// An optimiser step whose outcome is still on the device. The step runs without the host
// looking at it: the loss is summed on the device, the clip and the skip decision are made
// there (clip_grad_norm_status), and AdamW and the EMA read that decision there. The host reads
// the outcome one step late (after enqueuing the next step's forward and backward, so the GPU
// never runs dry), or at once where a line is printed or a checkpoint written: settle_pending.
struct PendingStep {
  int64_t epoch = 0, batch_end = 0;  // the data position after it
  int64_t step = 0;                  // the optimiser steps taken, it included
  uint64_t drop_offset = 0;          // the drop-path generator's position after it
  Readback status;                   // StepStatus::values on its way to the host
};

// One micro-batch on the device: what a training forward, its loss and its backward read.
struct MicroBatch {
  Tensor images;       // (B, S, S, C), batch_images' dtype
  Tensor labels;       // (B) i64
  Tensor targets;      // (B, K) f32 soft targets (Mixup/CutMix), or undefined
  Tensor drop_scales;  // (drop_path_blocks, B) pre-drawn drop-path multipliers, or undefined:
                       // the forward draws them (ConvNeXt::draw_drop_scales)
};

// The captured training step (--cuda_graphs). A graph replays kernels on the addresses they
// were captured with, and with the arguments they had then; so everything that changes from
// step to step lives in device buffers refilled outside the graph before each replay: each
// micro-batch's images, labels, targets and drop-path multipliers (`inputs`, copied in as the
// batches arrive), AdamW's per-parameter scalars (AdamW::prepare_step), and the poison factor
// of the non-finite-step tests. Everything the step allocates comes from the graph's private
// pool (tensor/cuda_graph.h); `status` is the StepStatus each replay writes.
struct CapturedStep {
  std::vector<MicroBatch> inputs;  // one per micro-batch of a step (update_freq)
  Tensor poison;                   // f32 [] 1 or NaN; defined only with poison_steps_for_testing
  bool warmed_up = false;          // the first step ran (uncaptured)
  bool failed = false;             // the capture failed: every step runs uncaptured
  cuda::Graph graph;               // captured on the second step
  Tensor status;                   // f32 [4] StepStatus::values, written by every replay
};

class TrainingRun {
 public:
  TrainingRun(const TrainConfig& cfg, dist::Communicator& world) : cfg_(cfg), world_(world) {}
  TrainResult run();

 private:
  // Rank 0 prints; the other ranks' lines go nowhere (printf's format, on stdout).
  void say(const char* format, ...) const __attribute__((format(printf, 2, 3)));
  void flush() const {
    if (world_.is_root()) std::fflush(stdout);
  }
  // The device of this rank: --device, or with several ranks and --device cuda, the GPU of its
  // local rank.
  Device rank_device() const;
  void open_data();
  void build_model();
  // Returns the configuration the checkpoint was trained with.
  TrainConfig resume(const std::string& path);
  void plan_lr(const std::optional<TrainConfig>& resumed_config);
  bool train_epoch(int64_t epoch, int64_t first_batch);
  // ---- one optimiser step (train_epoch calls these) ----
  // The micro-batch `b` on the device: fresh tensors (uncaptured), or copied into the captured
  // step's static inputs with its drop-path multipliers drawn now (captured).
  MicroBatch device_batch(const Batch& b, int64_t micro);
  // One micro-batch's forward, loss and backward: the gradients accumulate, the loss (divided
  // by update_freq) is added to step_loss_ on the device.
  // With several ranks, the last micro-batch's backward starts the gradient buckets' averaging
  // (`last`: it is the step's last micro-batch).
  void forward_backward(const MicroBatch& in, bool last);
  // With several ranks: the gradients and the step's loss averaged over them (GradReducer),
  // before the clip. Nothing with one rank.
  void average_over_ranks();
  // The optimiser's device half after the micro-batches: the clip and the skip decision, AdamW
  // (its scalars set by prepare_step), the EMA, the gradients dropped. Returns the status.
  Tensor finish_step_on_device();
  // The whole step from the captured step's inputs: its micro-batches, then the optimiser. The
  // body that is captured; run uncaptured on the first step (the warm-up).
  Tensor captured_step_body();
  // Runs the step whose micro-batches are staged: warm-up, capture or replay. Returns the status.
  Tensor run_captured_step();
  // Whether this step's loss is made NaN (TrainConfig::poison_steps_for_testing).
  bool poisoned_step() const {
    const std::vector<int64_t>& steps = cfg_.poison_steps_for_testing;
    return std::count(steps.begin(), steps.end(), step_) > 0;
  }
  bool end_epoch(int64_t epoch);
  // Reads the pending step's outcome (waiting for that step only): its loss, the skip and its
  // consequences (AdamW's step count, the streak, a stop when too many come in a row).
  void settle_pending();
  void log_step(int64_t epoch, int64_t batch_index);
  // Once, after the run's first step on a GPU: how many GEMMs took which path, and every one
  // that took a slow one (kernels/linear.h, gemm_paths).
  void report_gemm_paths();
  // Stops between steps with a recovery checkpoint that continues at (epoch, batch).
  void stop_with_recovery(int64_t epoch, int64_t batch, const std::string& why,
                          std::optional<uint64_t> drop_offset = std::nullopt);
  // True (after stop_with_recovery, or without a checkpoint before training began) when a
  // signal has arrived.
  bool stop_requested(int64_t epoch, int64_t batch, bool started);
  // drop_offset: the drop-path generator's position to record (default: where it is now).
  Checkpoint snapshot(int64_t epoch, int64_t batch, std::optional<double> acc1,
                      std::optional<uint64_t> drop_offset = std::nullopt) const;
  void keep_best_consistent(const std::string& resumed_path, const ResumeState& state, const Checkpoint& ck);
  void resume_drop_generator(const std::string& path, const ResumeState& state, const json& raw);
  // Every rank must hold bitwise the same weights: compared (a digest each) after every epoch.
  void check_ranks_in_step(int64_t epoch);

  const TrainConfig& cfg_;
  dist::Communicator& world_;
  std::unique_ptr<dist::GradReducer> reducer_;  // with more than one rank
  Device device_ = Device::cpu();
  DType activations_ = DType::f32;
  SplitData train_set_, test_set_;
  int64_t batches_ = 0, steps_per_epoch_ = 0, total_steps_ = 0;
  std::unique_ptr<ConvNeXt> model_;
  std::unique_ptr<AdamW> opt_;
  std::unique_ptr<ModelEma> ema_;
  std::unique_ptr<ConvNeXt> ema_model_;  // evaluation copy for the EMA weights
  std::unique_ptr<Generator> drop_gen_;
  std::vector<double> lr_schedule_;
  std::unique_ptr<RunDir> run_dir_;
  std::unique_ptr<MetricsLog> metrics_;
  Tensor inv_update_freq_;
  bool tty_ = false;
  std::unique_ptr<CapturedStep> captured_;  // with --cuda_graphs (null: every step uncaptured)

  // The position: the next epoch and batch, the optimiser steps taken.
  int64_t start_epoch_ = 0, start_batch_ = 0, step_ = 0;
  double best_acc1_ = 0;
  NonfiniteSteps nonfinite_;
  TrainResult result_;
  std::optional<PendingStep> pending_;
  bool gemm_paths_reported_ = false;
  Tensor step_loss_;  // f32 [] on the device: the current step's loss (mean over its micro-batches)
  double last_norm_ = std::numeric_limits<double>::quiet_NaN();  // of the last settled step

  // Between log lines.
  std::chrono::steady_clock::time_point t_log_, t_epoch_;
  int64_t images_since_log_ = 0, steps_since_log_ = 0, finite_steps_since_log_ = 0;
  double loss_since_log_ = 0, current_lr_ = 0;
};

void TrainingRun::say(const char* format, ...) const {
  if (!world_.is_root()) return;
  va_list args;
  va_start(args, format);
  std::vprintf(format, args);
  va_end(args);
}

Device TrainingRun::rank_device() const {
  const Device d = resolve_device(cfg_.device);
  if (world_.size() == 1 || !d.is_cuda()) return d;
  CNX_CHECK(cfg_.device == "cuda", "--device ", cfg_.device, ": with ", world_.size(),
            " ranks each rank takes the GPU of its local rank; use --device cuda");
#if CNX_CUDA_EMULATOR
  // Each process emulates a GPU of its own: every rank's cuda:0 is a different device.
  return Device::cuda(world_.local_rank() % cuda_device_count());
#else
  CNX_CHECK(world_.local_rank() < cuda_device_count(), world_.describe(), ": this machine has ",
            cuda_device_count(), " GPU(s), one per rank is needed (fewer ranks per machine: mpirun --npernode)");
  return Device::cuda(world_.local_rank());
#endif
}

void TrainingRun::open_data() {
  // for_device: on a CUDA device the loaders hand out uint8 batches in pinned memory, finished
  // on the device (batch_images); on the CPU float batches finished by the workers.
  // Each rank reads its shard of every epoch (DistributedSampler's: the same permutation for any
  // world size, strided by rank), and its shard of the test split.
  train_set_ = open_split(cfg_.data_set, cfg_.data_path, /*train=*/true,
                          cfg_.train_loader_options().for_device(device_).for_rank(world_.rank(), world_.size()));
  test_set_ = open_split(cfg_.data_set, cfg_.data_path, /*train=*/false,
                         eval_loader_options(cfg_.batch_size, cfg_.num_workers, cfg_.input_size, cfg_.crop_pct)
                             .for_device(device_)
                             .for_rank(world_.rank(), world_.size()));
  CNX_CHECK(train_set_.num_classes() == test_set_.num_classes(), cfg_.data_set, ": the training split has ",
            train_set_.num_classes(), " classes, the test split ", test_set_.num_classes());
  batches_ = train_set_.loader->batches_per_epoch();
  CNX_CHECK(batches_ >= cfg_.update_freq, "--batch_size ", cfg_.batch_size, " x --update_freq ",
            cfg_.update_freq, " is more than the ", train_set_.size(), " training images");
  steps_per_epoch_ = batches_ / cfg_.update_freq;
  CNX_CHECK(cfg_.epochs <= std::numeric_limits<int64_t>::max() / steps_per_epoch_, "--epochs ", cfg_.epochs,
            " x ", steps_per_epoch_, " steps per epoch overflows");
  total_steps_ = cfg_.epochs * steps_per_epoch_;
}

void TrainingRun::build_model() {
  Generator init(cfg_.seed);
  model_ = std::make_unique<ConvNeXt>(cfg_.model_config(train_set_.num_classes(), train_set_.channels()), init);
  say("model %s: %zu tensors, %lld parameters; %s: %lld train / %lld test images, %lld classes\n",
              model_->config().name.c_str(), model_->parameters().size(),
              static_cast<long long>(model_->num_parameters()), cfg_.data_set.c_str(),
              static_cast<long long>(train_set_.size()), static_cast<long long>(test_set_.size()),
              static_cast<long long>(train_set_.num_classes()));
  say("precision: %s\n", activations_ == DType::bf16
                                     ? "bf16 mixed (bf16 activations, fp32 weights and optimiser)"
                                     : "fp32");
  if (!cfg_.finetune.empty()) {
    NamedTensors weights = load_weights(cfg_.finetune);
    const Shape want = model_->parameter("head.weight").official_shape;
    for (auto it = weights.begin(); it != weights.end();) {
      const bool head = it->first == "head.weight" || it->first == "head.bias";
      if (head && (it->first == "head.weight" ? it->second.shape() != want
                                              : it->second.shape() != Shape{want[0]})) {
        say("finetune: %s %s does not fit %lld classes: re-initialised (head_init_scale %g)\n",
                    it->first.c_str(), it->second.shape().str().c_str(),
                    static_cast<long long>(want[0]), cfg_.head_init_scale);
        it = weights.erase(it);
      } else {
        ++it;
      }
    }
    // Keep this model's freshly initialised head where the file's did not fit.
    for (const char* h : {"head.weight", "head.bias"}) {
      bool present = false;
      for (const auto& [name, t] : weights) present = present || name == h;
      if (!present) weights.emplace_back(h, to_official_layout(model_->parameter(h).value, ParamLayout::plain));
    }
    model_->load_state_dict(weights);
    say("finetune: loaded %s\n", cfg_.finetune.c_str());
  }
  // On its device before the optimiser and the EMA alias its parameters. (The initial values
  // were drawn on the host, so every device starts from the same weights.)
  model_->to(device_);
  const std::vector<double> lr_scales =
      layer_decay_lr_scales(model_->config(), model_->parameters(), cfg_.layer_decay);
  opt_ = std::make_unique<AdamW>(model_->parameters(), AdamWOptions{}, lr_scales);
  // Mixed precision: AdamW keeps the GEMM weights' bf16 copies, written by its update kernel, so
  // the forward does not cast them every step (a resume's load_state_dict refreshes them).
  if (activations_ == DType::bf16) opt_->keep_bf16_copies(model_->bf16_gemm_weights());
  if (cfg_.model_ema) ema_ = std::make_unique<ModelEma>(model_->parameters(), cfg_.model_ema_decay);
  drop_gen_ = std::make_unique<Generator>(drop_path_seed(cfg_.seed, world_.rank()));
  if (world_.size() > 1) {
    reducer_ = std::make_unique<dist::GradReducer>(world_, model_->parameters(), device_);
    say("data parallel: %d ranks, %s\n", world_.size(), reducer_->describe().c_str());
  }
}

TrainConfig TrainingRun::resume(const std::string& path) {
  const Checkpoint ck = load_checkpoint(path);
  if (const auto bad = first_nonfinite(ck.tensors))
    fail("cannot resume from ", path, ": ", escape_for_message(*bad), " holds a NaN or an infinity");
  const ResumeState state = parse_resume_state(
      path, ck.state_json, ResumeBounds{cfg_.epochs, batches_, cfg_.update_freq});
  const json want = resume_key(cfg_), have = json::parse(state.resume_key);
  for (const auto& [key, value] : want.items())
    CNX_CHECK(have.contains(key) && have.at(key) == value, "cannot resume from ", path,
              ": it was trained with ", key, " ", have.value(key, json()).dump(), ", this run has ",
              value.dump());
  NamedTensors weights;
  for (const auto& [name, t] : ck.tensors)
    if (name.rfind("model.", 0) == 0) weights.emplace_back(name.substr(6), t);
  model_->load_state_dict(weights);
  opt_->load_state_dict(ck.tensors);
  if (ema_) ema_->load_state_dict(ck.tensors);
  start_epoch_ = state.epoch;
  start_batch_ = state.batch;
  step_ = state.step;
  best_acc1_ = state.best_acc1;
  nonfinite_ = {state.nonfinite_skipped, state.nonfinite_streak};
  resume_drop_generator(path, state, json::parse(ck.state_json));
  say("resumed from %s: epoch %lld, batch %lld, step %lld\n", path.c_str(),
              static_cast<long long>(start_epoch_), static_cast<long long>(start_batch_),
              static_cast<long long>(step_));
  if (world_.is_root()) keep_best_consistent(path, state, ck);
  try {
    return TrainConfig::from_json(state.config);
  } catch (const Error& e) {
    fail(path, ": checkpoint ", e.what());
  }
}

// checkpoint-best must hold the best accuracy the resumed state records. Since end_epoch writes
// best before the numbered checkpoint, a kill between the two leaves best newer, never older; an
// older best (a folder from before that order, or a deleted file) is rewritten from the resumed
// checkpoint when that checkpoint is the best one, and reported otherwise.
void TrainingRun::keep_best_consistent(const std::string& resumed_path, const ResumeState& state,
                                       const Checkpoint& ck) {
  if (cfg_.output_dir.empty() || !cfg_.save_ckpt || state.best_acc1 <= 0) return;
  const std::string best = checkpoint_path(cfg_.output_dir, "best");
  std::error_code ec;
  if (fs::equivalent(best, resumed_path, ec)) return;
  double best_file_acc = -1;
  try {
    const json s = json::parse(read_safetensors_metadata(best).at("state"));
    best_file_acc = s.contains("acc1") ? s.at("acc1").get<double>() : s.at("best_acc1").get<double>();
  } catch (const std::exception&) {
    best_file_acc = -1;  // missing or unreadable
  }
  if (best_file_acc >= state.best_acc1) return;
  if (state.acc1 && *state.acc1 == state.best_acc1) {
    save_checkpoint(best, ck);
    say("%s was older than the best accuracy recorded (%.2f): rewritten from %s\n", best.c_str(),
                state.best_acc1, resumed_path.c_str());
  } else {
    std::fprintf(stderr, "warning: %s holds an accuracy of %.2f, the resumed state records a best of %.2f\n",
                 best.c_str(), best_file_acc, state.best_acc1);
  }
}

void TrainingRun::plan_lr(const std::optional<TrainConfig>& resumed_config) {
  const LrChoice lr = resolve_lr(cfg_, resumed_config, world_.size());
  say("%s\n", lr.description.c_str());
  lr_schedule_ = cosine_scheduler(lr.value, cfg_.min_lr, cfg_.epochs, steps_per_epoch_, cfg_.warmup_epochs,
                                  cfg_.warmup_lr, cfg_.warmup_steps);
}

// Every rank's drop-path generator is recorded ("drop_gens", in rank order, with "world_size";
// "drop_gen" is rank 0's, as a one-process checkpoint has it). Resumed with the same world size,
// each rank takes its own back: bitwise the run that was not stopped. With another world size
// the data shards and the batches' composition change anyway: each rank starts its generator
// from its seed at rank 0's position, and rank 0 says so.
void TrainingRun::resume_drop_generator(const std::string& path, const ResumeState& state, const json& raw) {
  const int saved_world = raw.value("world_size", 1);
  if (saved_world == world_.size()) {
    if (raw.contains("drop_gens")) {
      const json& mine = raw.at("drop_gens").at(static_cast<size_t>(world_.rank()));
      drop_gen_->set_state(mine.at("seed").get<uint64_t>(), mine.at("offset").get<uint64_t>());
    } else {
      drop_gen_->set_state(state.drop_seed, state.drop_offset);  // one process, or an older file
    }
    return;
  }
  drop_gen_->set_state(drop_path_seed(cfg_.seed, world_.rank()), state.drop_offset);
  if (world_.is_root())
    std::fprintf(stderr,
                 "warning: %s was trained by %d rank%s, this run has %d: the total batch, the data shards and the "
                 "drop-path draws change from here on (the weights, the optimiser state and the position carry over)\n",
                 path.c_str(), saved_world, saved_world == 1 ? "" : "s", world_.size());
}

Checkpoint TrainingRun::snapshot(int64_t epoch, int64_t batch, std::optional<double> acc1,
                                 std::optional<uint64_t> drop_offset) const {
  // Collective: every rank's generator state (each rank has drawn as many as the others, but
  // from its own seed).
  const json mine = {{"seed", drop_gen_->seed()}, {"offset", drop_offset.value_or(drop_gen_->offset())}};
  const std::vector<std::string> all = world_.allgather(mine.dump());
  Checkpoint ck;
  if (!world_.is_root()) return ck;  // rank 0 writes the checkpoints
  for (auto& [name, t] : model_->state_dict()) ck.tensors.emplace_back("model." + name, t);
  for (auto& nt : opt_->state_dict()) ck.tensors.push_back(nt);
  if (ema_)
    for (auto& nt : ema_->state_dict()) ck.tensors.push_back(nt);
  ck.step = step_;
  json state = {{"epoch", epoch}, {"batch", batch}, {"step", step_}, {"best_acc1", best_acc1_},
                {"drop_gen", {{"seed", drop_gen_->seed()}, {"offset", drop_offset.value_or(drop_gen_->offset())}}},
                {"nonfinite_skipped", nonfinite_.skipped}, {"nonfinite_streak", nonfinite_.streak},
                {"data_seed", cfg_.seed}, {"resume_key", resume_key(cfg_)},
                {"config", json::parse(cfg_.to_json())}};
  if (acc1) state["acc1"] = *acc1;
  if (world_.size() > 1) {
    state["world_size"] = world_.size();
    json gens = json::array();
    for (const std::string& g : all) gens.push_back(json::parse(g));
    state["drop_gens"] = gens;
  }
  ck.state_json = state.dump();
  return ck;
}

void TrainingRun::stop_with_recovery(int64_t epoch, int64_t batch, const std::string& why,
                                     std::optional<uint64_t> drop_offset) {
  std::string where;
  if (!cfg_.output_dir.empty() && cfg_.save_ckpt) {
    where = checkpoint_path(cfg_.output_dir, "recovery");
    const Checkpoint ck = snapshot(epoch, batch, std::nullopt, drop_offset);  // every rank
    if (world_.is_root()) save_checkpoint(where, ck);
    world_.barrier();  // no rank returns before the checkpoint is on disk
  }
  say("%sstopped %s at step %lld%s%s\n", tty_ ? "\r\033[K" : "", why.c_str(),
              static_cast<long long>(step_), where.empty() ? "" : ": recovery checkpoint ", where.c_str());
  flush();
}

bool TrainingRun::stop_requested(int64_t epoch, int64_t batch, bool started) {
  int sig = stop_signal().load();
  if (world_.size() > 1) {
    // The ranks stop together: a signal seen by any (mpirun forwards SIGTERM to all, each at
    // its own moment) stops every rank at this same point.
    std::array<int64_t, 1> any{sig};
    world_.allreduce_max(any);
    sig = static_cast<int>(any[0]);
  }
  if (sig == 0) return false;
  settle_pending();  // the checkpoint's counters include the last step
  result_.interrupted = true;
  if (started) {
    stop_with_recovery(epoch, batch, "by signal " + std::to_string(sig));
  } else {  // nothing trained yet: whatever was resumed from is still on disk
    say("stopped by signal %d before training began\n", sig);
    flush();
  }
  return true;
}

void TrainingRun::log_step(int64_t epoch, int64_t batch_index) {
  const bool log_now = step_ % cfg_.log_every == 0 || batch_index + 1 == steps_per_epoch_ * cfg_.update_freq;
  if (log_now) settle_pending();  // the line shows this step's numbers: read them now
  const double norm = last_norm_;
  if (tty_ && !log_now) {  // a live bar: [=====>    ] done/total, loss, time left in the epoch
    const int64_t done = batch_index + 1, width = 30, filled = width * done / batches_;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_epoch_).count();
    const int64_t first = epoch == start_epoch_ ? start_batch_ : 0;
    const double left = elapsed / static_cast<double>(done - first) * static_cast<double>(batches_ - done);
    std::string bar(static_cast<size_t>(filled), '=');
    if (filled < width) bar += '>' + std::string(static_cast<size_t>(width - filled - 1), ' ');
    // The loss of the last step read back (one step behind: the bar never waits for the GPU).
    const double loss = result_.losses.empty() ? std::numeric_limits<double>::quiet_NaN() : result_.losses.back();
    say("\r\033[Kepoch %lld [%s] %lld/%lld loss %.4f eta %d:%02d", static_cast<long long>(epoch),
                bar.c_str(), static_cast<long long>(done), static_cast<long long>(batches_), loss,
                static_cast<int>(left) / 60, static_cast<int>(left) % 60);
    flush();
  }
  if (!log_now) return;
  const auto now = std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(now - t_log_).count();
  // The mean over the steps that were not skipped (NaN if there was none).
  const double mean_loss = finite_steps_since_log_ > 0
                               ? loss_since_log_ / static_cast<double>(finite_steps_since_log_)
                               : std::numeric_limits<double>::quiet_NaN();
  const double ips = static_cast<double>(images_since_log_) / secs;
  const double ms = 1000.0 * secs / static_cast<double>(steps_since_log_);
  json record = {{"type", "train"}, {"epoch", epoch}, {"step", step_}, {"loss", mean_loss},
                 {"lr", current_lr_}, {"grad_norm", norm}, {"images_per_s", ips},
                 {"ms_per_step", ms}, {"mem_mb", resident_mb()}};
  if (nonfinite_.skipped > 0) record["nonfinite_skipped"] = nonfinite_.skipped;
  std::string gpu_mem;  // on a GPU: the most device memory in tensors since the last line
  if (device_.is_cuda()) {
    const double peak_mb = static_cast<double>(cuda::memory_stats(device_).peak_allocated_bytes) / (1 << 20);
    cuda::reset_peak_memory_stats(device_);
    gpu_mem = " gpu_mem " + fixed(peak_mb, 0) + " MB";
    record["gpu_mem_mb"] = peak_mb;
  }
  say("%sepoch %lld step %lld/%lld loss %s lr %s grad_norm %s img/s %s ms/step %s mem %s MB%s\n",
              tty_ ? "\r\033[K" : "", static_cast<long long>(epoch),
              static_cast<long long>(step_ - epoch * steps_per_epoch_), static_cast<long long>(steps_per_epoch_),
              fixed(mean_loss, 4).c_str(), sci(current_lr_).c_str(), fixed(norm, 3).c_str(), fixed(ips, 1).c_str(),
              fixed(ms, 1).c_str(), fixed(resident_mb(), 0).c_str(), gpu_mem.c_str());
  flush();
  metrics_->write(record);
  t_log_ = now;
  images_since_log_ = steps_since_log_ = finite_steps_since_log_ = 0;
  loss_since_log_ = 0;
}

bool TrainingRun::train_epoch(int64_t epoch, int64_t first_batch) {
  DataLoader& loader = *train_set_.loader;
  loader.start_epoch(epoch, first_batch);
  model_->zero_grad();  // as engine.py: nothing carries over from an earlier epoch
  t_log_ = t_epoch_ = std::chrono::steady_clock::now();
  images_since_log_ = steps_since_log_ = finite_steps_since_log_ = 0;
  loss_since_log_ = 0;
  Batch b;
  while (loader.next(b)) {
    // Batches past the last whole group of update_freq make no optimiser step: skipped, as
    // in engine.py (their gradients would leak into the next epoch's first step).
    if (b.index >= steps_per_epoch_ * cfg_.update_freq) break;
    // ---- one micro-batch: forward, backward (gradients accumulate over update_freq) ----
    const int64_t micro = b.index % cfg_.update_freq;
    if (micro == 0) {
      current_lr_ = lr_schedule_[static_cast<size_t>(std::min(step_, total_steps_ - 1))];
      step_loss_ = Tensor();
    }
    const MicroBatch in = device_batch(b, micro);
    if (!captured_) forward_backward(in, micro == cfg_.update_freq - 1);  // captured: with the step
    images_since_log_ += b.labels.numel() * world_.size();
    if (micro != cfg_.update_freq - 1) continue;

    // ---- the optimiser step, applied or skipped on the device ----
    Tensor status;
    if (captured_) {
      status = run_captured_step();
    } else {
      average_over_ranks();
      const StepStatus st = clip_grad_norm_status(model_->parameters(), cfg_.clip_grad, step_loss_);
      settle_pending();  // the step before: its tail has run while this one's backward was queued
      opt_->step(current_lr_, cfg_.weight_decay, &st);
      if (ema_) ema_->update(model_->parameters(), &st);
      model_->zero_grad();
      status = st.values;
    }
    ++step_;
    ++steps_since_log_;
    pending_ = PendingStep{epoch, b.index + 1, step_, drop_gen_->offset(), Readback(status)};
    if (!gemm_paths_reported_) report_gemm_paths();
    log_step(epoch, b.index);

    if (stop_requested(epoch, b.index + 1, /*started=*/true)) return false;
    if (cfg_.max_steps > 0 && step_ >= cfg_.max_steps) {
      settle_pending();
      stop_with_recovery(epoch, b.index + 1, "by --max_steps");
      return false;
    }
  }
  settle_pending();
  return true;
}

MicroBatch TrainingRun::device_batch(const Batch& b, int64_t micro) {
  auto on_device = [&](const Tensor& t) { return t.defined() ? t.to(device_) : Tensor(); };
  if (!captured_) return MicroBatch{batch_images(b, device_), b.labels.to(device_), on_device(b.targets), Tensor()};
  // Captured: the step reads its inputs from the same buffers every time. The first step
  // (uncaptured, the warm-up) makes them, outside any graph's pool; later ones write into them
  // (the images finished straight into theirs, the rest copied from the host).
  const int64_t B = b.labels.numel();
  const bool draws = model_->drop_path_blocks() > 0;
  const Tensor drop_scales = draws ? model_->draw_drop_scales(B, *drop_gen_, activations_) : Tensor();
  MicroBatch& in = captured_->inputs[static_cast<size_t>(micro)];
  if (!in.images.defined()) {
    in = MicroBatch{batch_images(b, device_), b.labels.to(device_), on_device(b.targets), on_device(drop_scales)};
    return in;
  }
  auto check_same = [](const Tensor& dst, const Shape& shape, const char* what) {
    CNX_CHECK(shape == dst.shape(), "--cuda_graphs: the captured step's ", what, " are ", dst.str(),
              " but this batch's are ", shape.str(), " (the shapes must not change; use --cuda_graphs false)");
  };
  check_same(in.images, batch_image_shape(b), "images");
  check_same(in.labels, b.labels.shape(), "labels");
  if (in.targets.defined()) check_same(in.targets, b.targets.shape(), "soft targets");
  batch_images(b, device_, in.images);
  in.labels.copy_from(b.labels);
  if (in.targets.defined()) in.targets.copy_from(b.targets);
  if (draws) in.drop_scales.copy_from(drop_scales);  // its shape follows the labels'
  return in;
}

void TrainingRun::forward_backward(const MicroBatch& in, bool last) {
  Tensor logits = model_->forward(in.images, /*training=*/true, *drop_gen_, activations_, &opt_->bf16_copies(),
                                  in.drop_scales.defined() ? &in.drop_scales : nullptr);
  // Mixup/CutMix: soft targets (smoothing folded in), as main.py's SoftTargetCrossEntropy.
  Tensor loss = in.targets.defined() ? soft_cross_entropy(logits, in.targets)
                                     : cross_entropy(logits, in.labels, cfg_.smoothing);
  if (captured_ && captured_->poison.defined()) {
    loss = mul(loss, captured_->poison);  // 1, or NaN on a poisoned step (set before the step)
  } else if (poisoned_step()) {
    loss = mul(loss, Tensor::full({}, std::numeric_limits<double>::quiet_NaN(), DType::f32, device_));
  }
  // The loss stays on the device: a non-finite one makes non-finite gradients, and the step
  // is skipped on the device (clip_grad_norm_status).
  const Tensor scaled = cfg_.update_freq > 1 ? mul(loss, inv_update_freq_) : loss;
  if (reducer_ && last) {
    scaled.backward(reducer_->hook());  // each finished bucket starts its averaging at once
  } else {
    scaled.backward();
  }
  NoGradGuard no_grad;
  step_loss_ = step_loss_.defined() ? add(step_loss_, scaled.detach()) : scaled.detach();
}

void TrainingRun::average_over_ranks() {
  if (!reducer_) return;
  reducer_->finish();
  // The logged loss is the mean over the ranks, and a non-finite loss on one rank skips the
  // step on every rank (its gradients, averaged, are non-finite everywhere too).
  reducer_->average(step_loss_);
}

Tensor TrainingRun::finish_step_on_device() {
  average_over_ranks();
  const StepStatus st = clip_grad_norm_status(model_->parameters(), cfg_.clip_grad, step_loss_);
  opt_->launch_step(&st);
  if (ema_) ema_->update(model_->parameters(), &st);
  model_->zero_grad();
  step_loss_ = Tensor();
  return st.values;
}

Tensor TrainingRun::captured_step_body() {
  step_loss_ = Tensor();
  for (size_t m = 0; m < captured_->inputs.size(); ++m)
    forward_backward(captured_->inputs[m], m + 1 == captured_->inputs.size());
  return finish_step_on_device();
}

Tensor TrainingRun::run_captured_step() {
  CapturedStep& c = *captured_;
  if (c.poison.defined()) {
    c.poison.copy_from(Tensor::full({}, poisoned_step() ? std::numeric_limits<double>::quiet_NaN() : 1.0));
  }
  // AdamW's scalars for this step depend on whether the step before was skipped (its counts
  // are taken back): read it first. (The micro-batches' inputs are already queued.)
  settle_pending();
  opt_->prepare_step(current_lr_, cfg_.weight_decay);
  if (!c.graph.empty()) {  // every step after the second: one launch
    c.graph.replay();
    ++result_.graph_replays;
    return c.status;
  }
  // The first step runs uncaptured, so that cuBLAS's handles and workspaces, the GEMM plans and
  // the cache's blocks are made outside any capture (and every step after a failed capture).
  if (!c.warmed_up || c.failed) {
    c.warmed_up = true;
    return captured_step_body();
  }
  // The second step is captured, then replayed. The warm-up step's blocks, cached now, would
  // sit beside the graph's own pool unused: give them back first (this waits for the device).
  cuda::empty_cache(device_);
  Tensor status;
  try {
    c.graph = cuda::Graph::capture(device_, [&] {
      status = captured_step_body();
      if (cfg_.fail_capture_for_testing) (void)status.to(Device::cpu());  // a sync: not capturable
    });
  } catch (const Error& e) {
    // Nothing of the step ran: only its host side did, partly. Drop what it left (gradients
    // made in the graph's memory, the loss, AdamW's prepared step) and run the step, and every
    // later one, uncaptured.
    say("cuda graphs: %s\ncuda graphs: the run goes on uncaptured (bitwise the same; "
                "--cuda_graphs false skips the attempt)\n", e.what());
    flush();
    model_->zero_grad();
    step_loss_ = Tensor();
    opt_->uncount_step();
    opt_->prepare_step(current_lr_, cfg_.weight_decay);
    c.failed = true;
    return captured_step_body();
  }
  c.status = status;
  c.graph.replay();
  ++result_.graph_replays;
  say("cuda graphs: the training step is captured (%lld micro-batch%s, the clip, AdamW%s) and "
              "replayed\n", static_cast<long long>(cfg_.update_freq), cfg_.update_freq > 1 ? "es" : "",
              ema_ ? ", the EMA" : "");
  flush();
  return c.status;
}

void TrainingRun::report_gemm_paths() {
  gemm_paths_reported_ = true;
  if (!device_.is_cuda()) return;
  const std::vector<cuda::GemmPathRecord> records = cuda::gemm_paths();  // known at enqueue time
  std::map<std::string, int64_t> by_path;
  std::vector<cuda::GemmPathRecord> slow;
  for (const cuda::GemmPathRecord& r : records) {
    ++by_path[r.path];
    if (!r.why.empty()) slow.push_back(r);
  }
  std::string line;
  for (const auto& [path, n] : by_path) line += (line.empty() ? "" : ", ") + std::to_string(n) + " " + path;
  say("gemm paths (first step, %zu distinct GEMMs): %s\n%s", records.size(), line.c_str(),
              cuda::format_gemm_paths(slow).c_str());
  flush();
}

void TrainingRun::settle_pending() {
  if (!pending_) return;
  const PendingStep p = std::move(*pending_);
  pending_.reset();
  // [0] gradient norm, [1] clip coefficient, [2] skipped, [3] loss (train/optim/step_status.h)
  const std::vector<float> v = p.status.wait().to_vector<float>();
  const double norm = v[0], loss = v[3];
  const bool skipped = v[2] != 0.0f;
  last_norm_ = norm;
  result_.losses.push_back(loss);
  if (!skipped) {
    nonfinite_.streak = 0;
    loss_since_log_ += loss;
    ++finite_steps_since_log_;
    return;
  }
  // Skipped on the device: the weights, the AdamW moments and the EMA did not change; the
  // step counts that AdamW::step advanced on the host are taken back.
  opt_->uncount_step();
  ++nonfinite_.skipped;
  ++nonfinite_.streak;
  say("%sepoch %lld step %lld: %s: optimiser step skipped (%lld in a row, %lld in all)\n",
              tty_ ? "\r\033[K" : "", static_cast<long long>(p.epoch), static_cast<long long>(p.step),
              std::isfinite(loss) ? ("gradient norm " + fixed(norm, 3)).c_str() : "non-finite loss",
              static_cast<long long>(nonfinite_.streak), static_cast<long long>(nonfinite_.skipped));
  metrics_->write({{"type", "skip"}, {"epoch", p.epoch}, {"step", p.step}, {"loss", loss},
                   {"grad_norm", norm}, {"streak", nonfinite_.streak}});
  if (nonfinite_.streak > cfg_.skip_nonfinite) {
    // The skipped steps changed no weight: the recovery checkpoint holds those of the last good
    // step (and save_checkpoint would refuse anything non-finite). It continues after the
    // skipped step, whatever of the next step has been enqueued since (nothing of it applied).
    CNX_CHECK(step_ == p.step, "settle_pending: step ", step_, " but the pending step is ", p.step);
    stop_with_recovery(p.epoch, p.batch_end,
                       "after " + std::to_string(nonfinite_.streak) + " non-finite steps in a row",
                       p.drop_offset);
    fail("training diverged: ", nonfinite_.streak, " optimiser steps in a row with a non-finite loss or "
         "gradient (--skip_nonfinite ", cfg_.skip_nonfinite, "), the last at epoch ", p.epoch, " step ", p.step,
         "; the weights are those of step ", p.step - nonfinite_.streak, " (try a lower --lr)");
  }
}

void TrainingRun::check_ranks_in_step(int64_t epoch) {
  if (world_.size() == 1) return;
  result_.weights_digest = weights_digest(model_->parameters());
  const std::vector<std::string> all = world_.allgather(std::to_string(result_.weights_digest));
  for (int r = 1; r < world_.size(); ++r)
    CNX_CHECK(all[static_cast<size_t>(r)] == all[0], "after epoch ", epoch, " the weights of rank ", r,
              " differ from rank 0's (FNV-1a ", all[static_cast<size_t>(r)], " vs ", all[0],
              "): the ranks are out of step (a different build, flags or data on one of them?)");
}

bool TrainingRun::end_epoch(int64_t epoch) {
  check_ranks_in_step(epoch);
  // A signal during evaluation stops it at the next batch; the recovery checkpoint continues at
  // the end of this epoch's batches, so the resumed run evaluates this epoch.
  const int64_t end_batch = steps_per_epoch_ * cfg_.update_freq;
  const EvalResult ev = evaluate_loaded(*model_, *test_set_.loader, activations_, &world_);
  if (ev.interrupted) return !stop_requested(epoch, end_batch, true);
  json record = {{"type", "eval"}, {"epoch", epoch}, {"step", step_}, {"acc1", ev.acc1},
                 {"acc5", ev.acc5}, {"loss", ev.loss}};
  say("epoch %lld test: Acc@1 %.2f Acc@5 %.2f loss %.4f", static_cast<long long>(epoch), ev.acc1,
              ev.acc5, ev.loss);
  if (ema_ && cfg_.model_ema_eval) {
    if (!ema_model_) {
      Generator g(0);
      ema_model_ = std::make_unique<ConvNeXt>(model_->config(), g);
      ema_model_->to(device_);
    }
    ema_->copy_to(ema_model_->parameters());
    ema_model_->copy_buffers_from(*model_);  // BatchNorm statistics: the live model's
    const EvalResult ee = evaluate_loaded(*ema_model_, *test_set_.loader, activations_, &world_);
    if (ee.interrupted) {
      say("\n");
      return !stop_requested(epoch, end_batch, true);
    }
    say(" | EMA Acc@1 %.2f Acc@5 %.2f loss %.4f", ee.acc1, ee.acc5, ee.loss);
    record["ema_acc1"] = ee.acc1;
    record["ema_acc5"] = ee.acc5;
    record["ema_loss"] = ee.loss;
  }
  say("\n");
  metrics_->write(record);
  result_.last_acc1 = ev.acc1;
  result_.last_acc5 = ev.acc5;
  result_.last_loss = ev.loss;
  result_.epochs_done = epoch + 1;
  // A non-finite evaluation (a NaN or infinite logit: loss NaN) never becomes best.
  const bool best = std::isfinite(ev.loss) && ev.acc1 > best_acc1_;
  if (best) best_acc1_ = ev.acc1;
  result_.best_acc1 = best_acc1_;

  if (!cfg_.output_dir.empty() && cfg_.save_ckpt) {
    const Checkpoint ck = snapshot(epoch + 1, 0, ev.acc1);  // every rank; rank 0 writes
    if (!world_.is_root()) {
      world_.barrier();  // no rank goes on before the checkpoints are on disk
      return true;
    }
    // best first: killed between the two writes, the resumed run (from the older numbered
    // checkpoint) redoes this epoch and finds best already holding it, never an older one.
    if (best) save_checkpoint(checkpoint_path(cfg_.output_dir, "best"), ck);
    if ((epoch + 1) % cfg_.save_ckpt_freq == 0 || epoch + 1 == cfg_.epochs) {
      save_checkpoint(checkpoint_path(cfg_.output_dir, std::to_string(epoch)), ck);
      prune_checkpoints(cfg_.output_dir, static_cast<int>(cfg_.save_ckpt_num));
    }
    std::error_code ec;  // a finished epoch supersedes a recovery checkpoint
    fs::remove(checkpoint_path(cfg_.output_dir, "recovery"), ec);
    world_.barrier();
  }
  return true;
}

TrainResult TrainingRun::run() {
  cfg_.validate();
  device_ = rank_device();
  activations_ = cfg_.activations(device_);  // bf16 under --use_amp
  tty_ = cfg_.progress_bar && ::isatty(STDOUT_FILENO);
  result_.world_size = world_.size();
  // Rank 0 alone writes in the output folder (the others' RunDir and MetricsLog have none).
  const std::string own_dir = world_.is_root() ? cfg_.output_dir : std::string();
  // The folder first: a second run on it is refused before it loads anything.
  run_dir_ = std::make_unique<RunDir>(own_dir);
  open_data();
  if (stop_requested(0, 0, false)) return result_;
  build_model();
  result_.image_height = train_set_.loader->image_height();
  result_.image_width = train_set_.loader->image_width();
  result_.num_parameters = model_->num_parameters();
  result_.macs_per_image = model_->macs(result_.image_height, result_.image_width);
  if (stop_requested(0, 0, false)) return result_;

  std::string resume_path = cfg_.resume;
  if (resume_path.empty() && cfg_.auto_resume && !cfg_.output_dir.empty())
    resume_path = find_resume_checkpoint(cfg_.output_dir);
  if (world_.size() > 1) resume_path = world_.allgather(resume_path)[0];  // rank 0's choice for all
  std::optional<TrainConfig> resumed_config;
  if (!resume_path.empty()) {
    resumed_config = resume(resume_path);
  }
  plan_lr(resumed_config);
  result_.best_acc1 = best_acc1_;
  if (!own_dir.empty()) {
    std::ofstream config_file(fs::path(cfg_.output_dir) / "config.json");
    config_file << cfg_.to_json() << '\n';
    CNX_CHECK(config_file.good(), cfg_.output_dir, "/config.json: cannot write it");
  }
  metrics_ = std::make_unique<MetricsLog>(own_dir, step_, start_epoch_);
  inv_update_freq_ = Tensor::full({}, 1.0 / static_cast<double>(cfg_.update_freq), DType::f32, device_);
  if (cfg_.use_cuda_graphs(device_, model_->has_batch_norm(), world_.size())) {
    captured_ = std::make_unique<CapturedStep>();
    captured_->inputs.resize(static_cast<size_t>(cfg_.update_freq));
    if (!cfg_.poison_steps_for_testing.empty()) captured_->poison = Tensor::ones({}, DType::f32, device_);
  }
  if (stop_requested(0, 0, false)) return result_;

  for (int64_t epoch = start_epoch_; epoch < cfg_.epochs; ++epoch) {
    const bool go_on = train_epoch(epoch, epoch == start_epoch_ ? start_batch_ : 0) && end_epoch(epoch);
    result_.steps = step_;
    result_.nonfinite_skipped = nonfinite_.skipped;
    if (!go_on) return result_;
  }
  result_.steps = step_;
  say("done: %lld epochs, best test Acc@1 %.2f\n", static_cast<long long>(result_.epochs_done),
              result_.best_acc1);
  return result_;
}

}  // namespace

TrainResult train(const TrainConfig& cfg, dist::Communicator& world) { return TrainingRun(cfg, world).run(); }
TrainResult train(const TrainConfig& cfg) { return train(cfg, dist::Communicator::world()); }

}  // namespace cnx
