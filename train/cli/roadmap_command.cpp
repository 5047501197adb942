// convnext roadmap: the paper's roadmap from ResNet-50 to ConvNeXt-T trained step by step with
// one recipe (train/roadmap.h). Every flag of `convnext train` but --model/--depths/--dims sets
// the recipe; --steps picks the steps; --output_dir is required.
//
//   convnext roadmap --output_dir runs/roadmap --width_mult 0.25 --depth_mult 0.34 --epochs 2
//   convnext roadmap --steps roadmap_00_resnet50,roadmap_11_convnext_tiny --output_dir runs/two
#include <cstdio>
#include <memory>
#include <string>

#include "train/cli/commands.h"
#include "train/roadmap.h"
#include "train/trainer.h"

namespace cnx {

namespace {

struct RoadmapFlags {
  TrainConfig recipe;
  std::string seed_text = "0";
  std::string steps = "all";
};

int run_roadmap_command(RoadmapFlags& f) {
  CNX_CHECK(f.recipe.resume.empty(),
            "--resume: a roadmap resumes by itself (run the same command again)");
  RoadmapOptions o;
  o.recipe = f.recipe;
  o.recipe.seed = parse_seed(f.seed_text);
  o.steps = parse_roadmap_steps(f.steps);
  o.output_dir = f.recipe.output_dir;
  install_stop_handlers();
  const RoadmapResult r = run_roadmap(o);
  if (r.interrupted) {
    const int sig = stop_signal().load();
    std::printf("roadmap: stopped %s; run the same command again to continue\n",
                sig ? "by a signal" : "before the end of a step (--max_steps)");
    return sig ? 128 + sig : 0;
  }
  std::printf("roadmap: %zu steps done; %s/roadmap.md, roadmap.csv, roadmap.png\n", r.rows.size(),
              o.output_dir.c_str());
  return 0;
}

}  // namespace

Command roadmap_command(CLI::App& app) {
  auto f = std::make_shared<RoadmapFlags>();
  CLI::App* sub = app.add_subcommand(
      "roadmap", "Train the paper's roadmap (ResNet-50 -> ConvNeXt-T) step by step with one "
                 "recipe; resumable; writes roadmap.csv, roadmap.md, roadmap.png");
  sub->add_option("--steps", f->steps,
                  "all, or a comma-separated list of steps (convnext models lists them)")
      ->capture_default_str();
  add_recipe_flags(sub, f->recipe, f->seed_text);
  return {sub, [f] { return run_roadmap_command(*f); }};
}

}  // namespace cnx
