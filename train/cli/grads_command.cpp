// convnext grads: one forward/backward pass of a ConvNeXt on a given batch, written out for
// comparison with PyTorch (see the README). The contract, which outside tools script:
//
//   convnext grads (--model NAME | --depths a,b,c,d --dims a,b,c,d) [--in_chans C]
//                  [--num_classes K] [--layer_scale_init_value V] --weights W.safetensors
//                  --batch B.safetensors --out O.safetensors [--device cpu|cuda]
//
// W: every parameter, official names and shapes (or a `convnext train` checkpoint: its model.*
// weights); with --layer_scale_init_value 0, no .gamma tensors (weights trained without layer
// scale; the value itself is overwritten by W's). B: `images` float32 [N, C, H, W], H and W at
// least the model's downsampling (32 for four stages, 16 isotropic), and `labels` int64 [N].
// O: float32 `logits` [N, K], `loss` [] and `grad.<name>` per parameter.
#include <cerrno>
#include <cstdlib>
#include <optional>

#include "models/convnext.h"
#include "models/grads.h"
#include "models/safetensors.h"
#include "train/cli/commands.h"
#include "train/trainer.h"

namespace cnx {

std::vector<int64_t> parse_int_list(const std::string& flag, const std::string& text) {
  std::vector<int64_t> out;
  size_t start = 0;
  while (true) {
    const size_t comma = text.find(',', start);
    const std::string item = text.substr(start, comma == std::string::npos ? comma : comma - start);
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    CNX_CHECK(!item.empty() && *end == '\0' && errno == 0 && v > 0, flag,
              ": expected comma-separated positive integers, got '", text, "'");
    out.push_back(v);
    if (comma == std::string::npos) return out;
    start = comma + 1;
  }
}

void add_model_flags(CLI::App* sub, std::string& model, std::string& depths, std::string& dims) {
  auto* m = sub->add_option("--model", model, "A named model, e.g. convnext_tiny");
  auto* d = sub->add_option("--depths", depths, "Blocks per stage, e.g. 3,3,9,3");
  auto* w = sub->add_option("--dims", dims, "Width per stage, e.g. 96,192,384,768");
  m->excludes(d)->excludes(w);
  d->needs(w);
  w->needs(d);
}

namespace {

struct GradsOptions {
  std::string model, depths, dims, weights, batch, out, device = "cpu";
  int64_t in_chans = 3, num_classes = 1000;
  std::optional<double> layer_scale_init_value;  // default: the model's
};

int run_grads(const GradsOptions& o) {
  // Everything is read and checked before anything is written.
  ConvNeXtConfig cfg;
  if (!o.model.empty()) {
    cfg = convnext_config(o.model);
  } else {
    cfg.depths = parse_int_list("--depths", o.depths);
    cfg.dims = parse_int_list("--dims", o.dims);
  }
  cfg.in_chans = o.in_chans;
  cfg.num_classes = o.num_classes;
  if (o.layer_scale_init_value) cfg.layer_scale_init_value = *o.layer_scale_init_value;
  cfg.drop_path_rate = 0;
  cfg.validate();  // before the files are read: a bad size is named without reading them
  const Device device = Device::parse(o.device);
  CNX_CHECK(!device.is_cuda() || device.index < cuda_device_count(), "--device ", o.device,
            ": no such CUDA device (", cuda_device_count(), " visible; built with CUDA: ",
            cuda_built() ? "yes" : "no", ")");

  Generator init(0);  // every value is overwritten by the weights file
  ConvNeXt model(cfg, init);
  model.load_state_dict(load_weights(o.weights));

  const Safetensors batch = read_safetensors(o.batch);
  const Tensor images = batch.find("images"), labels = batch.find("labels");
  CNX_CHECK(images.defined(), o.batch, ": no tensor named 'images'");
  CNX_CHECK(labels.defined(), o.batch, ": no tensor named 'labels'");

  GradsResult r = compute_grads(model, images, labels, device);
  NamedTensors out{{"logits", r.logits}, {"loss", r.loss}};
  for (auto& [name, g] : r.grads) out.emplace_back("grad." + name, g);
  write_safetensors(o.out, out, {{"model", cfg.name}});
  return 0;
}

}  // namespace

Command grads_command(CLI::App& app) {
  auto opts = std::make_shared<GradsOptions>();
  CLI::App* sub = app.add_subcommand(
      "grads", "One forward/backward pass (training mode, drop path 0, mean cross-entropy); "
               "writes logits, loss and every parameter gradient, for parity with PyTorch");
  add_model_flags(sub, opts->model, opts->depths, opts->dims);
  sub->add_option("--in_chans", opts->in_chans, "Input channels")->capture_default_str();
  sub->add_option("--num_classes", opts->num_classes, "Classes")->capture_default_str();
  sub->add_option("--layer_scale_init_value", opts->layer_scale_init_value,
                  "0: a model without layer scale (no .gamma weights); default: the model's "
                  "(1e-6, isotropic 0)");
  sub->add_option("--weights", opts->weights, "Weights, official names (.safetensors)")->required();
  sub->add_option("--batch", opts->batch, "images f32 [N,C,H,W] and labels i64 [N] (.safetensors)")
      ->required();
  sub->add_option("--out", opts->out, "Output .safetensors")->required();
  sub->add_option("--device", opts->device, "cpu or cuda")->capture_default_str();
  return {sub, [opts] {
            CNX_CHECK(!opts->model.empty() || !opts->depths.empty(),
                      "give --model NAME, or --depths and --dims");
            return run_grads(*opts);
          }};
}

}  // namespace cnx
