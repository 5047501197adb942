// The cost model of one ConvNeXt training step, read off the emulated CUDA device.
//
// Runs real training steps through the library's public API, as train/trainer.cpp's train_epoch
// does (uint8 batch in pinned memory -> finish_batch on the device, forward with training=true and
// drop path, cross-entropy with label smoothing, backward, clip_grad_norm_status, AdamW step, EMA
// update, zero_grad, the status read back), on the emulated device, under its launch trace
// (kernels/cuda/emulator/emulator.h: start_trace). Every queued piece of device work is recorded
// in order with the bytes it reads and writes (kernels: the tensor blocks they touch; GEMMs: their
// operands' extents; copies and fills: their sizes) and the GEMMs' FLOPs (2mnk). Each item gets a
// lower-bound time, max(bytes / memory bandwidth, FLOPs / tensor throughput), on assumed figures
// for an H200 (not measured: spec numbers, options below); the step's lower bound is their sum,
// since one stream runs them one after the other.
//
// A batch of 128 at 224x224 cannot be emulated on a CPU in reasonable time, so the step is traced
// at batch b and b + 1 (b = --batch) and each launch's bytes and FLOPs are extrapolated linearly in
// the batch size: cost(B) = cost(b) + (B - b) (cost(b + 1) - cost(b)). This needs the same launch
// sequence at both sizes (checked: same count, kinds, kernel names, GEMM types and epilogues). The
// sequence does depend on the batch through size thresholds: the column-sum reductions of the
// LayerNorm and layer-scale backward go two-pass above 2048 rows (B x H x W of a stage), the
// linear layer's fallback column sums above 256 rows (CNX_LINEAR_BGRADB=0). Batch 3 and 4 put
// stages 1 and 2 past those thresholds at 224x224, as at 128 (stage 3 crosses at batch 11, stage 4
// at 42: the few launches that then appear are reductions of a few MB); batch 1 and 2 do not, and
// with CNX_LINEAR_BGRADB=0 are not even one sequence. Hence the default --batch 3. --check_batch
// traces a third size and compares it with the extrapolation: launch by launch when the sequences
// match, the totals (and the launches that differ) when a threshold lies between.
//
// Granularity: the emulator sees a kernel's accesses as pages touched; with every allocation on
// pages of its own (set_page_aligned_allocations) it counts the bytes of each tensor block the
// kernel touched, exactly for the caching allocator's small blocks (up to 1 MiB, each its own
// allocation), to a page at the edges of the large ones (which share 2 MiB segments). Traffic is
// compulsory traffic: each byte once per launch, as if caches never missed within a launch and
// never hit across launches. Kernels' own arithmetic (the depthwise convolution's 98 FLOPs per
// output, LayerNorm, GELU) is not counted: the emulator does not count arithmetic, and those
// kernels are memory-bound on an H200.
//
//   ./build-emu/cost_model --dtype both --extrapolate_to 128 --json cost.json
//   ./build-emu/cost_model --image_size 64 --batch 1 --check_batch 3   # the linearity check
//   CNX_LINEAR_BGRADB=0 ./build-emu/cost_model ...                 # a fusion switched off
//   (every switch: kernels/fusion.h; the output's "fusions:" line says which were on)
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/cuda/emulator/emulator.h"
#include "kernels/fusion.h"
#include "models/convnext.h"
#include "tensor/cuda_context.h"
#include "tensor/pinned_memory.h"
#include "tensor/readback.h"
#include "train/data/loader.h"
#include "train/optim/adamw.h"
#include "train/optim/ema.h"
#include "train/optim/step_status.h"

extern char** environ;

namespace cnx {
namespace {

using emu::TraceKind;
using emu::TraceRecord;

// ---- the assumed device -----------------------------------------------------------------------

// Assumed H200 figures (spec-sheet-like, not measured; override with the options). Which peak a
// GEMM gets is read from its types: bf16 inputs run on the bf16 tensor cores, fp32 inputs on the
// TF32 tensor cores only when the library rounded them to TF32 (tensor/cuda_context.h,
// allow_tf32(), off unless CNX_ALLOW_TF32=1), else on the fp32 SIMT units.
struct DeviceSpec {
  double hbm_tbps = 4.3;       // memory bandwidth, TB/s
  double bf16_tflops = 790;    // dense bf16 tensor-core throughput
  double tf32_tflops = 395;    // dense TF32 tensor-core throughput
  double fp32_tflops = 67;     // fp32 SIMT (FMA) throughput

  double peak_flops(const std::string& gemm_types) const {
    if (gemm_types.rfind("bf16", 0) == 0) return bf16_tflops * 1e12;
    if (gemm_types.find("tf32") != std::string::npos) return tf32_tflops * 1e12;
    return fp32_tflops * 1e12;
  }
};

// ---- one item's cost, and the extrapolation ----------------------------------------------------

struct Cost {
  double read = 0, written = 0, flops = 0;  // bytes, bytes, FLOPs (double: extrapolated values)
  double bytes() const { return read + written; }
};

Cost cost_of(const TraceRecord& r) {
  return {static_cast<double>(r.bytes_read), static_cast<double>(r.bytes_written), static_cast<double>(r.flops)};
}

// cost(B) = cost(b) + (B - b) (cost(b + 1) - cost(b)).
Cost extrapolate(const Cost& at_b, const Cost& at_b1, double steps) {
  return {at_b.read + steps * (at_b1.read - at_b.read), at_b.written + steps * (at_b1.written - at_b.written),
          at_b.flops + steps * (at_b1.flops - at_b.flops)};
}

// The lower bound of one item: memory time or arithmetic time, whichever is longer.
double lower_bound_s(const Cost& c, const std::string& gemm_types, const DeviceSpec& spec) {
  const double memory = c.bytes() / (spec.hbm_tbps * 1e12);
  const double math = c.flops > 0 ? c.flops / spec.peak_flops(gemm_types) : 0.0;
  return std::max(memory, math);
}

// ---- names -------------------------------------------------------------------------------------

std::string kind_name(TraceKind k) {
  switch (k) {
    case TraceKind::kKernel: return "kernel";
    case TraceKind::kGemm: return "gemm";
    case TraceKind::kCopy: return "copy";
    case TraceKind::kMemset: return "memset";
  }
  return "?";
}

// A kernel's name without the namespaces every kernel has, for the table.
std::string short_name(std::string name) {
  for (const std::string cut : {"cnx::cuda::detail::", "cnx::cuda::", "cnx::", "{anonymous}::", "(anonymous namespace)::"}) {
    for (size_t at = name.find(cut); at != std::string::npos; at = name.find(cut)) name.erase(at, cut.size());
  }
  return name;
}

// What the table groups by: the kernel (template arguments included), or a GEMM's function,
// types and epilogue, or a copy's direction.
std::string group_key(const TraceRecord& r) {
  if (r.kind == TraceKind::kGemm) return r.name + " " + r.types + " " + r.epilogue;
  return short_name(r.name);
}

// The same launch at two batch sizes: the same kind and kernel (a GEMM: function, types,
// epilogue); grid sizes and GEMM shapes change with the batch.
bool same_launch(const TraceRecord& a, const TraceRecord& b) {
  return a.kind == b.kind && a.name == b.name && a.types == b.types && a.epilogue == b.epilogue;
}

// ---- one traced training step --------------------------------------------------------------------

struct StepOptions {
  std::string model = "convnext_tiny";
  int64_t image_size = 224;
  double drop_path = 0.1;
  double smoothing = 0.1;
  double clip_grad = 0.0;  // the trainer's default: the norm is computed, nothing clipped
  bool ema = true;
  int warmup = 1;
};

struct StepTrace {
  int64_t batch = 0;
  std::vector<TraceRecord> records;
  emu::HostSyncCounts syncs;
  double wall_s = 0;
};

// The model, its optimiser and EMA, as TrainingRun::build_model makes them, for one dtype.
class Trainer {
 public:
  Trainer(const StepOptions& o, DType activations) : o_(o), activations_(activations) {
    Generator init(0);
    ConvNeXtConfig cfg = convnext_config(o.model);
    cfg.drop_path_rate = o.drop_path;
    model_ = std::make_unique<ConvNeXt>(cfg, init);
    model_->to(device_);
    opt_ = std::make_unique<AdamW>(model_->parameters());
    // Mixed precision: AdamW keeps the GEMM weights' bf16 copies, which the forward reads.
    if (activations == DType::bf16) opt_->keep_bf16_copies(model_->bf16_gemm_weights());
    if (o.ema) ema_ = std::make_unique<ModelEma>(model_->parameters(), 0.9999);
  }

  // One step at `batch`; traced (with traffic) when `traced`.
  StepTrace step(int64_t batch, bool traced) {
    // The loader's part, done by its worker threads in a training run: a uint8 batch in a pinned
    // block, and the labels on the host.
    const int64_t S = o_.image_size;
    if (!pool_ || pool_->block_bytes() < batch * S * S * 3)
      pool_ = HostBufferPool::create(batch * S * S * 3, /*pinned=*/true, 2);
    Batch b;
    b.bytes = std::make_shared<ByteBatch>();
    ByteBatch& bb = *b.bytes;
    bb.buffer = pool_->acquire();
    bb.B = batch;
    bb.H = bb.W = S;
    bb.C = 3;
    bb.norm = Normalization{{0.485f, 0.456f, 0.406f}, {0.229f, 0.224f, 0.225f}};
    uint8_t* pixels = bb.buffer.as<uint8_t>();
    for (int64_t i = 0; i < batch * S * S * 3; ++i) pixels[i] = static_cast<uint8_t>((i * 2654435761u) >> 24);
    std::vector<int64_t> y(static_cast<size_t>(batch));
    for (int64_t i = 0; i < batch; ++i) y[static_cast<size_t>(i)] = (i * 7919) % model_->config().num_classes;
    b.labels = Tensor::from_data<int64_t>({batch}, y);

    StepTrace t;
    t.batch = batch;
    if (traced && !emu::start_trace(/*measure_traffic=*/true)) {
      std::fprintf(stderr, "cost_model: the emulator cannot measure traffic in this build (AddressSanitizer?)\n");
      std::exit(1);
    }
    emu::reset_host_sync_counts();
    const auto t0 = std::chrono::steady_clock::now();
    // ---- train_epoch's micro-batch (update_freq 1) ----
    Tensor logits = model_->forward(batch_images(b, device_), /*training=*/true, drop_gen_, activations_,
                                    &opt_->bf16_copies());
    Tensor loss = cross_entropy(logits, b.labels.to(device_), o_.smoothing);
    loss.backward();
    Tensor step_loss;
    {
      NoGradGuard no_grad;
      step_loss = loss.detach();
    }
    // ---- its optimiser step, decided on the device ----
    const StepStatus status = clip_grad_norm_status(model_->parameters(), o_.clip_grad, step_loss);
    opt_->step(4e-3, 0.05, &status);
    if (ema_) ema_->update(model_->parameters(), &status);
    model_->zero_grad();
    // settle_pending: the host reads the status (one step later in the trainer; the same work).
    const Readback back(status.values);
    (void)back.wait();
    t.syncs = emu::host_sync_counts();
    if (traced) t.records = emu::stop_trace();
    cuda::synchronize(device_);
    t.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return t;
  }

 private:
  StepOptions o_;
  DType activations_;
  Device device_ = Device::cuda(0);
  Generator drop_gen_{1};
  std::unique_ptr<ConvNeXt> model_;
  std::unique_ptr<AdamW> opt_;
  std::unique_ptr<ModelEma> ema_;
  std::shared_ptr<HostBufferPool> pool_;
};

// ---- the report ------------------------------------------------------------------------------------

struct Item {  // one launch of the step at the target batch
  const TraceRecord* record;  // as traced at batch b (its grid, GEMM shape)
  Cost cost;
  double lower_bound_s;
};

struct Group {
  std::string key;
  TraceKind kind;
  int64_t count = 0;
  Cost cost;
  double lower_bound_s = 0;
};

struct Totals {
  Cost cost;
  double lower_bound_s = 0;
  int64_t launches = 0;
  int64_t by_kind[4] = {0, 0, 0, 0};  // by TraceKind
};

std::string human_bytes(double b) {
  char s[32];
  if (b >= 1e9) std::snprintf(s, sizeof s, "%.2f GB", b / 1e9);
  else if (b >= 1e6) std::snprintf(s, sizeof s, "%.2f MB", b / 1e6);
  else if (b >= 1e3) std::snprintf(s, sizeof s, "%.1f kB", b / 1e3);
  else std::snprintf(s, sizeof s, "%.0f B", b);
  return s;
}

std::string fit(const std::string& s, size_t width) {
  return s.size() <= width ? s : s.substr(0, width - 3) + "...";
}

void print_groups(const std::vector<Group>& groups, const Totals& total, size_t top) {
  std::printf("  %-70s %6s %11s %11s %10s %10s %6s\n", "kernel / GEMM / copy (grouped)", "count", "read", "written",
              "GFLOP", "bound us", "share");
  for (size_t i = 0; i < groups.size() && i < top; ++i) {
    const Group& g = groups[i];
    std::printf("  %-70s %6" PRId64 " %11s %11s %10.2f %10.1f %5.1f%%\n", fit(g.key, 70).c_str(), g.count,
                human_bytes(g.cost.read).c_str(), human_bytes(g.cost.written).c_str(), g.cost.flops / 1e9,
                g.lower_bound_s * 1e6, 100.0 * g.lower_bound_s / total.lower_bound_s);
  }
  if (groups.size() > top) {
    Group rest;
    for (size_t i = top; i < groups.size(); ++i) {
      rest.count += groups[i].count;
      rest.cost.read += groups[i].cost.read;
      rest.cost.written += groups[i].cost.written;
      rest.cost.flops += groups[i].cost.flops;
      rest.lower_bound_s += groups[i].lower_bound_s;
    }
    std::printf("  %-70s %6" PRId64 " %11s %11s %10.2f %10.1f %5.1f%%\n",
                ("(the other " + std::to_string(groups.size() - top) + " groups)").c_str(), rest.count,
                human_bytes(rest.cost.read).c_str(), human_bytes(rest.cost.written).c_str(), rest.cost.flops / 1e9,
                rest.lower_bound_s * 1e6, 100.0 * rest.lower_bound_s / total.lower_bound_s);
  }
}

struct Report {
  DType dtype;
  int64_t target_batch;
  std::vector<Item> items;
  std::vector<Group> groups;  // by lower-bound time, largest first
  Totals total;
  nlohmann::json json;
};

Report build_report(DType dtype, const StepTrace& at_b, const StepTrace* at_b1, int64_t target, const DeviceSpec& spec) {
  Report rep;
  rep.dtype = dtype;
  rep.target_batch = target;
  const double steps = at_b1 ? static_cast<double>(target - at_b.batch) : 0.0;
  std::map<std::string, size_t> group_index;
  for (size_t i = 0; i < at_b.records.size(); ++i) {
    const TraceRecord& r = at_b.records[i];
    const Cost c = at_b1 ? extrapolate(cost_of(r), cost_of(at_b1->records[i]), steps) : cost_of(r);
    const double lb = lower_bound_s(c, r.types, spec);
    rep.items.push_back({&r, c, lb});
    const std::string key = group_key(r);
    auto [it, fresh] = group_index.emplace(key, rep.groups.size());
    if (fresh) rep.groups.push_back(Group{key, r.kind, 0, Cost{}, 0.0});
    Group& g = rep.groups[it->second];
    ++g.count;
    g.cost.read += c.read;
    g.cost.written += c.written;
    g.cost.flops += c.flops;
    g.lower_bound_s += lb;
    rep.total.cost.read += c.read;
    rep.total.cost.written += c.written;
    rep.total.cost.flops += c.flops;
    rep.total.lower_bound_s += lb;
    ++rep.total.launches;
    ++rep.total.by_kind[static_cast<int>(r.kind)];
  }
  std::stable_sort(rep.groups.begin(), rep.groups.end(),
                   [](const Group& a, const Group& b) { return a.lower_bound_s > b.lower_bound_s; });
  return rep;
}

nlohmann::json syncs_json(const emu::HostSyncCounts& s) {
  return {{"stream_syncs", s.stream_syncs}, {"device_syncs", s.device_syncs}, {"event_syncs", s.event_syncs},
          {"blocking_copies", s.blocking_copies}, {"frees", s.frees}, {"queries", s.queries},
          {"total_blocking", s.total_blocking()}};
}

// The first launch at which two traces differ (their common length when one is a prefix); -1 when
// they are the same sequence.
int64_t first_difference(const StepTrace& a, const StepTrace& b) {
  const size_t n = std::min(a.records.size(), b.records.size());
  for (size_t i = 0; i < n; ++i)
    if (!same_launch(a.records[i], b.records[i])) return static_cast<int64_t>(i);
  return a.records.size() == b.records.size() ? -1 : static_cast<int64_t>(n);
}

// The launches of `t` per group key, for listing what two sequences do not share.
std::map<std::string, int64_t> launch_counts(const StepTrace& t) {
  std::map<std::string, int64_t> counts;
  for (const TraceRecord& r : t.records) ++counts[group_key(r)];
  return counts;
}

// Fails (exit 1) unless the two traces are the same launch sequence; names the first difference.
void check_same_sequence(const StepTrace& a, const StepTrace& b) {
  const size_t n = std::min(a.records.size(), b.records.size());
  for (size_t i = 0; i < n; ++i) {
    if (!same_launch(a.records[i], b.records[i])) {
      std::fprintf(stderr, "cost_model: the launch sequences at batch %" PRId64 " and %" PRId64
                   " differ at launch %zu: %s vs %s; no linear extrapolation\n",
                   a.batch, b.batch, i, group_key(a.records[i]).c_str(), group_key(b.records[i]).c_str());
      std::exit(1);
    }
  }
  if (a.records.size() != b.records.size()) {
    std::fprintf(stderr, "cost_model: %zu launches at batch %" PRId64 ", %zu at batch %" PRId64 "\n",
                 a.records.size(), a.batch, b.records.size(), b.batch);
    std::exit(1);
  }
}

}  // namespace
}  // namespace cnx

int main(int argc, char** argv) {
  using namespace cnx;
  CLI::App app{"The cost model of one ConvNeXt training step, from the emulated device's launch trace"};
  StepOptions o;
  int64_t batch = 3, extrapolate_to = 128, check_batch = 0;
  std::string dtype = "both", json_path;
  size_t top = 25;
  bool list = false;
  DeviceSpec spec;
  app.add_option("--model", o.model, "ConvNeXt variant")->capture_default_str();
  app.add_option("--batch", batch, "trace at this batch and the next (the extrapolation's two points)")
      ->capture_default_str()->check(CLI::Range(int64_t{1}, int64_t{64}));
  app.add_option("--image_size", o.image_size, "square input side")->capture_default_str()
      ->check(CLI::Range(int64_t{32}, int64_t{1024}));
  app.add_option("--dtype", dtype, "activations: f32, bf16 (--use_amp) or both")->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16", "both"}));
  app.add_option("--extrapolate_to", extrapolate_to, "the batch to report (0: only the traced batch)")
      ->capture_default_str()->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app.add_option("--check_batch", check_batch, "also trace this batch and compare it with the extrapolation")
      ->check(CLI::Range(int64_t{0}, int64_t{64}));
  app.add_option("--drop_path", o.drop_path, "drop path rate")->capture_default_str();
  app.add_option("--clip_grad", o.clip_grad, "gradient clipping norm (0: none, the trainer's default)")
      ->capture_default_str();
  app.add_option("--warmup", o.warmup, "untraced steps before the traced ones (caches, lazily made state)")
      ->capture_default_str()->check(CLI::Range(0, 10));
  app.add_option("--top", top, "groups in the table")->capture_default_str();
  app.add_flag("--list", list, "also print every launch in order");
  app.add_option("--json", json_path, "write the whole model (every launch) to this file");
  app.add_option("--hbm_tbps", spec.hbm_tbps, "assumed memory bandwidth, TB/s")->capture_default_str();
  app.add_option("--bf16_tflops", spec.bf16_tflops, "assumed bf16 tensor throughput")->capture_default_str();
  app.add_option("--tf32_tflops", spec.tf32_tflops, "assumed TF32 tensor throughput")->capture_default_str();
  app.add_option("--fp32_tflops", spec.fp32_tflops, "assumed fp32 SIMT throughput")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  if (!emu::trace_traffic_available()) {
    std::fprintf(stderr, "cost_model: this emulator build cannot measure traffic (AddressSanitizer build)\n");
    return 1;
  }
  // Every allocation on pages of its own: a kernel's traffic is then counted in its tensors' bytes
  // (the caching allocator's blocks: 512-byte multiples), not in whole pages, for every tensor of
  // up to 1 MiB (each its own block); larger ones share 2 MiB segments, where a partly used edge
  // page still counts whole (under 1% of such a tensor).
  emu::set_page_aligned_allocations(true);
  std::vector<std::string> switches;  // the CNX_* environment: fusion switches and the like
  for (char** e = environ; *e; ++e)
    if (std::string(*e).rfind("CNX_", 0) == 0) switches.emplace_back(*e);
  std::sort(switches.begin(), switches.end());
  std::string env_line;
  for (const auto& s : switches) env_line += (env_line.empty() ? "" : " ") + s;

  std::printf("cost model of one %s training step, %" PRId64 "x%" PRId64 ", on the emulated CUDA device\n",
              o.model.c_str(), o.image_size, o.image_size);
  std::printf("step: finish_batch, forward (training, drop path %g), cross-entropy (smoothing %g), backward,\n"
              "      clip_grad_norm_status (max %g), AdamW, %szero_grad, status read back\n",
              o.drop_path, o.smoothing, o.clip_grad, o.ema ? "EMA update, " : "");
  std::printf("environment: %s\n", env_line.empty() ? "(no CNX_* variables)" : env_line.c_str());
  nlohmann::json fusions = nlohmann::json::object();  // kernels/fusion.h, as this run has them
  std::string fusion_line;
  for (int f = 0; f < kFusionCount; ++f) {
    const bool on = fusion_enabled(static_cast<Fusion>(f));
    fusions[fusion_env_name(static_cast<Fusion>(f))] = on;
    fusion_line += std::string(fusion_line.empty() ? "" : " ") + fusion_env_name(static_cast<Fusion>(f)) +
                   (on ? "=on" : "=off");
  }
  std::printf("fusions: %s\n", fusion_line.c_str());
  std::printf("assumed H200 figures (not measurements): %.1f TB/s memory, %.0f TFLOP/s bf16, %.0f TFLOP/s TF32, "
              "%.0f TFLOP/s fp32; TF32 %s\n",
              spec.hbm_tbps, spec.bf16_tflops, spec.tf32_tflops, spec.fp32_tflops,
              cuda::allow_tf32() ? "allowed (CNX_ALLOW_TF32)" : "off (the library's default): fp32 GEMMs at the fp32 figure");

  nlohmann::json out = {{"model", o.model}, {"image_size", o.image_size}, {"environment", switches},
                        {"fusions", fusions},
                        {"assumed_device", {{"hbm_tbps", spec.hbm_tbps}, {"bf16_tflops", spec.bf16_tflops},
                                            {"tf32_tflops", spec.tf32_tflops}, {"fp32_tflops", spec.fp32_tflops}}},
                        {"traced_batches", {batch, batch + 1}}, {"extrapolate_to", extrapolate_to},
                        {"runs", nlohmann::json::array()}};
  std::vector<DType> dtypes;
  if (dtype != "bf16") dtypes.push_back(DType::f32);
  if (dtype != "f32") dtypes.push_back(DType::bf16);

  for (const DType dt : dtypes) {
    const char* dname = dt == DType::bf16 ? "bf16" : "f32";
    Trainer trainer(o, dt);
    for (int i = 0; i < o.warmup; ++i) (void)trainer.step(batch, /*traced=*/false);
    const StepTrace t0 = trainer.step(batch, /*traced=*/true);
    std::fprintf(stderr, "cost_model: %s batch %" PRId64 ": %zu launches traced in %.1f s\n", dname, batch,
                 t0.records.size(), t0.wall_s);
    const bool extrapolating = extrapolate_to > 0 && extrapolate_to != batch;
    StepTrace t1;
    if (extrapolating) {
      t1 = trainer.step(batch + 1, /*traced=*/true);
      std::fprintf(stderr, "cost_model: %s batch %" PRId64 ": %zu launches traced in %.1f s\n", dname, batch + 1,
                   t1.records.size(), t1.wall_s);
      check_same_sequence(t0, t1);
    }
    const int64_t target = extrapolating ? extrapolate_to : batch;
    const Report rep = build_report(dt, t0, extrapolating ? &t1 : nullptr, target, spec);
    const double images_per_s = static_cast<double>(target) / rep.total.lower_bound_s;

    std::printf("\n== %s activations, batch %" PRId64 " %s ==\n", dname, target,
                extrapolating ? ("(extrapolated from batches " + std::to_string(batch) + " and " +
                                 std::to_string(batch + 1) + ")").c_str()
                              : "(traced)");
    std::printf("launches per step: %" PRId64 " (%" PRId64 " kernels, %" PRId64 " GEMMs, %" PRId64 " copies, %" PRId64
                " memsets); the same sequence at both traced batches: %s\n",
                rep.total.launches, rep.total.by_kind[static_cast<int>(TraceKind::kKernel)], rep.total.by_kind[static_cast<int>(TraceKind::kGemm)],
                rep.total.by_kind[static_cast<int>(TraceKind::kCopy)], rep.total.by_kind[static_cast<int>(TraceKind::kMemset)],
                extrapolating ? "yes" : "(one batch traced)");
    const emu::HostSyncCounts& s = t0.syncs;
    std::printf("host waits per step (batch %" PRId64 "): %" PRIu64 " (stream syncs %" PRIu64 ", device syncs %" PRIu64
                ", event syncs %" PRIu64 ", blocking copies %" PRIu64 ", frees %" PRIu64 "); queries %" PRIu64 "\n",
                batch, s.total_blocking(), s.stream_syncs, s.device_syncs, s.event_syncs, s.blocking_copies, s.frees,
                s.queries);
    print_groups(rep.groups, rep.total, top);
    const double mem_s = rep.total.cost.bytes() / (spec.hbm_tbps * 1e12);
    std::printf("  total: read %s, written %s (%s moved), %.1f GFLOP in GEMMs\n",
                human_bytes(rep.total.cost.read).c_str(), human_bytes(rep.total.cost.written).c_str(),
                human_bytes(rep.total.cost.bytes()).c_str(), rep.total.cost.flops / 1e9);
    std::printf("  bytes per trained image: %s\n", human_bytes(rep.total.cost.bytes() / static_cast<double>(target)).c_str());
    std::printf("  lower bound of the step: %.2f ms (sum over launches of max(memory, math)); memory alone %.2f ms\n",
                rep.total.lower_bound_s * 1e3, mem_s * 1e3);
    std::printf("  roofline: %.0f images/s at most\n", images_per_s);
    if (list) {
      std::printf("  every launch, in order (batch %" PRId64 "):\n", target);
      for (size_t i = 0; i < rep.items.size(); ++i) {
        const Item& it = rep.items[i];
        const TraceRecord& r = *it.record;
        char shape[64];
        if (r.kind == TraceKind::kGemm)
          std::snprintf(shape, sizeof shape, "m%" PRId64 " n%" PRId64 " k%" PRId64 " @b%" PRId64, r.m, r.n, r.k, batch);
        else if (r.kind == TraceKind::kKernel)
          std::snprintf(shape, sizeof shape, "<%u,%u,%u>x<%u,%u,%u> @b%" PRId64, r.grid.x, r.grid.y, r.grid.z,
                        r.block.x, r.block.y, r.block.z, batch);
        else
          shape[0] = '\0';
        std::printf("  %5zu %-6s %-60s %-26s %11s %11s %9.3f %9.2f\n", i, kind_name(r.kind).c_str(),
                    fit(group_key(r), 60).c_str(), shape, human_bytes(it.cost.read).c_str(),
                    human_bytes(it.cost.written).c_str(), it.cost.flops / 1e9, it.lower_bound_s * 1e6);
      }
    }

    nlohmann::json run = {{"activations", dname}, {"batch", target}, {"extrapolated", extrapolating},
                          {"host_syncs_per_step", syncs_json(t0.syncs)},
                          {"totals", {{"launches", rep.total.launches}, {"bytes_read", rep.total.cost.read},
                                      {"bytes_written", rep.total.cost.written}, {"gemm_flops", rep.total.cost.flops},
                                      {"bytes_per_image", rep.total.cost.bytes() / static_cast<double>(target)},
                                      {"lower_bound_ms", rep.total.lower_bound_s * 1e3},
                                      {"memory_only_ms", mem_s * 1e3}, {"roofline_images_per_s", images_per_s}}},
                          {"groups", nlohmann::json::array()}, {"launches", nlohmann::json::array()}};
    for (const Group& g : rep.groups)
      run["groups"].push_back({{"name", g.key}, {"kind", kind_name(g.kind)}, {"count", g.count},
                               {"bytes_read", g.cost.read}, {"bytes_written", g.cost.written},
                               {"flops", g.cost.flops}, {"lower_bound_us", g.lower_bound_s * 1e6}});
    for (size_t i = 0; i < rep.items.size(); ++i) {
      const Item& it = rep.items[i];
      const TraceRecord& r = *it.record;
      nlohmann::json l = {{"kind", kind_name(r.kind)}, {"name", r.name}, {"bytes_read", it.cost.read},
                          {"bytes_written", it.cost.written}, {"flops", it.cost.flops},
                          {"lower_bound_us", it.lower_bound_s * 1e6},
                          {"traced", nlohmann::json::array()}};
      if (r.kind == TraceKind::kKernel)
        l["launch"] = {{"grid", {r.grid.x, r.grid.y, r.grid.z}}, {"block", {r.block.x, r.block.y, r.block.z}},
                       {"dynamic_smem", r.dynamic_smem}};
      if (r.kind == TraceKind::kGemm) l["gemm"] = {{"types", r.types}, {"epilogue", r.epilogue}};
      for (const StepTrace* t : std::vector<const StepTrace*>{&t0, extrapolating ? &t1 : nullptr}) {
        if (!t) continue;
        const TraceRecord& tr = t->records[i];
        nlohmann::json at = {{"batch", t->batch}, {"bytes_read", tr.bytes_read}, {"bytes_written", tr.bytes_written},
                             {"page_bytes_read", tr.page_bytes_read}, {"page_bytes_written", tr.page_bytes_written},
                             {"flops", tr.flops}};
        if (tr.kind == TraceKind::kGemm) at["mnk"] = {tr.m, tr.n, tr.k};
        if (tr.kind == TraceKind::kKernel) at["grid"] = {tr.grid.x, tr.grid.y, tr.grid.z};
        l["traced"].push_back(at);
      }
      run["launches"].push_back(l);
    }

    if (check_batch > 0) {
      // The linearity check: trace another batch and compare it with the extrapolation to it.
      const StepTrace tc = trainer.step(check_batch, /*traced=*/true);
      std::fprintf(stderr, "cost_model: %s batch %" PRId64 ": %zu launches traced in %.1f s\n", dname, check_batch,
                   tc.records.size(), tc.wall_s);
      if (!extrapolating) {
        std::fprintf(stderr, "cost_model: --check_batch needs an extrapolation (--extrapolate_to)\n");
        return 1;
      }
      const Report predicted = build_report(dt, t0, &t1, check_batch, spec);
      const Report measured = build_report(dt, tc, nullptr, check_batch, spec);
      const auto rel = [](double p, double m) { return m != 0 ? 100.0 * (p - m) / m : 0.0; };
      std::printf("  linearity check at batch %" PRId64 ": predicted %s read + %s written, %.3f GFLOP, %.3f ms;\n"
                  "    measured %s + %s, %.3f GFLOP, %.3f ms (bytes %+.3f%%, GFLOP %+.4f%%, bound %+.3f%%)\n",
                  check_batch, human_bytes(predicted.total.cost.read).c_str(),
                  human_bytes(predicted.total.cost.written).c_str(), predicted.total.cost.flops / 1e9,
                  predicted.total.lower_bound_s * 1e3, human_bytes(measured.total.cost.read).c_str(),
                  human_bytes(measured.total.cost.written).c_str(), measured.total.cost.flops / 1e9,
                  measured.total.lower_bound_s * 1e3, rel(predicted.total.cost.bytes(), measured.total.cost.bytes()),
                  rel(predicted.total.cost.flops, measured.total.cost.flops),
                  rel(predicted.total.lower_bound_s, measured.total.lower_bound_s));
      double worst = 0;
      const int64_t diff = first_difference(t0, tc);
      if (diff < 0) {
        // The worst launch among those that move at least 64 kB: below that a launch is noise
        // next to the step, and its page edges dominate it.
        size_t worst_at = 0;
        for (size_t i = 0; i < predicted.items.size(); ++i) {
          const double p = predicted.items[i].cost.bytes(), m = measured.items[i].cost.bytes();
          if (m < 64e3) continue;
          if (std::abs(p - m) / m > worst) {
            worst = std::abs(p - m) / m;
            worst_at = i;
          }
        }
        std::printf("    the same launch sequence; worst launch of those over 64 kB: #%zu %s, %+.2f%% of its bytes "
                    "(%s predicted, %s measured)\n",
                    worst_at, fit(group_key(tc.records[worst_at]), 60).c_str(),
                    rel(predicted.items[worst_at].cost.bytes(), measured.items[worst_at].cost.bytes()),
                    human_bytes(predicted.items[worst_at].cost.bytes()).c_str(),
                    human_bytes(measured.items[worst_at].cost.bytes()).c_str());
      } else {
        // A size threshold switched a launch (a reduction going two-pass above some row count):
        // only the totals compare; say which launches the sequences do not share.
        std::printf("    the launch sequence differs from launch %" PRId64 " on (%zu launches at batch %" PRId64
                    ", %zu at %" PRId64 "); launches per kernel that differ (batch %" PRId64 " - batch %" PRId64 "):\n",
                    diff, t0.records.size(), t0.batch, tc.records.size(), tc.batch, tc.batch, t0.batch);
        const auto a = launch_counts(t0), b = launch_counts(tc);
        std::map<std::string, int64_t> delta;
        for (const auto& [k, n] : b) delta[k] += n;
        for (const auto& [k, n] : a) delta[k] -= n;
        for (const auto& [k, n] : delta)
          if (n != 0) std::printf("      %+" PRId64 " %s\n", n, k.c_str());
      }
      run["linearity_check"] = {{"batch", check_batch},
                                {"predicted", {{"bytes", predicted.total.cost.bytes()},
                                               {"flops", predicted.total.cost.flops},
                                               {"lower_bound_ms", predicted.total.lower_bound_s * 1e3}}},
                                {"measured", {{"bytes", measured.total.cost.bytes()},
                                              {"flops", measured.total.cost.flops},
                                              {"lower_bound_ms", measured.total.lower_bound_s * 1e3}}},
                                {"worst_launch_relative_error", worst}};
    }
    out["runs"].push_back(run);
  }
  if (!json_path.empty()) {
    std::ofstream f(json_path);
    f << out.dump(1) << '\n';
    if (!f) {
      std::fprintf(stderr, "cost_model: cannot write %s\n", json_path.c_str());
      return 1;
    }
  }
  return 0;
}
