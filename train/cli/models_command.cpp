// convnext models: every named model with its parameters and multiply-adds (GFLOPs as papers
// count them), and for the roadmap's steps the change each makes and the paper's ImageNet top-1.
//
//   convnext models [--input_size 224] [--num_classes 1000] [--in_chans 3]
//
// Nothing is allocated: the models are built as shapes only (ConvNeXt::ShapesOnly).
#include <cstdio>
#include <memory>
#include <string>

#include "models/convnext.h"
#include "train/cli/commands.h"

namespace cnx {

namespace {

struct ModelsOptions {
  int64_t input_size = 224, num_classes = 1000, in_chans = 3;
};

void print_row(const ConvNeXtConfig& base, const ModelsOptions& o) {
  ConvNeXtConfig c = base;
  c.num_classes = o.num_classes;
  c.in_chans = o.in_chans;
  const ConvNeXt m(c, ConvNeXt::ShapesOnly{});
  const double gmacs = static_cast<double>(m.macs(o.input_size, o.input_size)) / 1e9;
  std::string top1 = c.paper_top1 ? std::to_string(*c.paper_top1).substr(0, 4) : "";
  std::printf("%-32s %12lld %8.2f  %-5s %s\n", c.name.c_str(),
              static_cast<long long>(m.num_parameters()), gmacs, top1.c_str(),
              c.description.c_str());
}

int run_models(const ModelsOptions& o) {
  CNX_CHECK(o.input_size >= 1, "--input_size must be positive, got ", o.input_size);
  CNX_CHECK(o.num_classes >= 1, "--num_classes must be positive, got ", o.num_classes);
  CNX_CHECK(o.in_chans >= 1, "--in_chans must be positive, got ", o.in_chans);
  std::printf("%-32s %12s %8s  %-5s %s\n", "model", "parameters",
              ("GFLOPs@" + std::to_string(o.input_size)).c_str(), "top-1",
              "(roadmap: the change, and the paper's ImageNet-1K top-1)");
  for (const std::string& name : convnext_model_names()) print_row(convnext_config(name), o);
  for (const std::string& name : roadmap_step_names()) print_row(convnext_config(name), o);
  return 0;
}

}  // namespace

Command models_command(CLI::App& app) {
  auto opts = std::make_shared<ModelsOptions>();
  CLI::App* sub = app.add_subcommand(
      "models", "List the named models (the ConvNeXt family and the paper's roadmap) with "
                "parameters and GFLOPs (multiply-adds)");
  sub->add_option("--input_size", opts->input_size, "Image side for the GFLOPs")->capture_default_str();
  sub->add_option("--num_classes", opts->num_classes, "Classes of the head")->capture_default_str();
  sub->add_option("--in_chans", opts->in_chans, "Input channels")->capture_default_str();
  return {sub, [opts] { return run_models(*opts); }};
}

}  // namespace cnx
