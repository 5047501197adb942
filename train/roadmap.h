// The paper's roadmap as an experiment: train a list of its steps (models/convnext.h,
// roadmap_00_resnet50 ... roadmap_11_convnext_tiny) one after the other with one recipe and
// one seed, each in its own folder, and report them side by side.
//
//   <output_dir>/roadmap.json        the recipe and the steps asked for (a restart must match)
//   <output_dir>/<step>/             the step's training run: checkpoints, metrics.jsonl, ...
//   <output_dir>/<step>/result.json  written once the step has trained every epoch
//   <output_dir>/roadmap.csv, roadmap.md, roadmap.png   the table and the chart (after each step)
//
// Resumable: a killed roadmap started again with the same command skips the finished steps
// (their result.json) and continues the step it was in from that step's newest checkpoint
// (the trainer's auto-resume, bitwise). The wall time of a step adds the runs that ended
// normally or by a signal; a run killed outright (SIGKILL) loses its share.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "train/trainer.h"

namespace cnx {

struct RoadmapStepResult {
  std::string step, change;      // the step's name and its one-line description
  int64_t parameters = 0;        // as trained (after --width_mult, --depth_mult)
  double gflops = 0;             // multiply-adds per image at the trained size, 1e9
  int64_t image_size = 0;        // the trained image side
  double gflops_224 = 0;         // the full-size model at 224 x 224, 1000 classes (the paper's)
  std::optional<double> paper_top1;  // ImageNet-1K, from the paper (seeds 000 and 001)
  double top1 = 0, top5 = 0;     // test accuracy after the last epoch
  double best_top1 = 0;
  double images_per_s = 0;       // training throughput, mean over the log lines
  double wall_s = 0;             // training and evaluation time
  int64_t epochs = 0;
};

struct RoadmapOptions {
  TrainConfig recipe;              // every step's recipe; its model and output_dir are set per step
  std::vector<std::string> steps;  // in order; empty: every step
  std::string output_dir;
};

struct RoadmapResult {
  std::vector<RoadmapStepResult> rows;  // the finished steps, in the order asked
  bool interrupted = false;             // a step stopped before its end (a signal, --max_steps)
};

// "all" (or "") -> every step in order; otherwise a comma-separated list of step names (an
// unknown one throws, listing the known ones; a repeated one throws).
std::vector<std::string> parse_roadmap_steps(const std::string& text);

// Runs (or continues) the roadmap. Throws cnx::Error for a bad recipe, an output_dir holding a
// roadmap with another recipe, or a failed step (the steps before it stay finished).
RoadmapResult run_roadmap(const RoadmapOptions& options);

// roadmap.csv, roadmap.md and roadmap.png in `dir` for these rows (each written atomically).
// `recipe_line` describes the recipe in the markdown's first lines.
void write_roadmap_reports(const std::string& dir, const std::vector<RoadmapStepResult>& rows,
                           const std::string& recipe_line);

}  // namespace cnx
