#include "train/roadmap.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "models/convnext.h"
#include "tensor/error.h"
#include "train/plot_png.h"

namespace cnx {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kRoadmapFormat = "cnx-roadmap-1";

// ---- files -------------------------------------------------------------------------------------

// Every file is written atomically (path + ".tmp", then renamed): a kill leaves the old file or
// the new one, never half of one.
void write_atomic(const fs::path& path, const std::string& text) {
  plot::write_file_atomically(path.string(), text);
}

json read_json(const fs::path& path) {
  std::ifstream in(path);
  CNX_CHECK(in.good(), path.string(), ": cannot read it");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail(path.string(), ": not valid JSON (", e.what(), ")");
  }
}

// The recipe: the training configuration without what differs from step to step or does not
// change the result (the model, the folders, the logging).
json recipe_json(const TrainConfig& c) {
  json j = json::parse(c.to_json());
  for (const char* key : {"model", "depths", "dims", "output_dir", "resume", "auto_resume",
                          "num_workers", "log_every", "progress_bar", "save_ckpt",
                          "save_ckpt_freq", "save_ckpt_num"})
    j.erase(key);
  return j;
}

// ---- one step --------------------------------------------------------------------------------

// What the step is, before it trains: its change, the paper's figure, its full-size cost.
RoadmapStepResult describe(const std::string& step) {
  const ConvNeXtConfig full = convnext_config(step);
  RoadmapStepResult r;
  r.step = step;
  r.change = full.description;
  r.paper_top1 = full.paper_top1;
  r.gflops_224 = static_cast<double>(ConvNeXt(full, ConvNeXt::ShapesOnly{}).macs(224, 224)) / 1e9;
  return r;
}

// The throughput (mean images/s of the log lines) and the last and best test accuracies, from
// the step's metrics.jsonl (which a resumed run continues).
void read_metrics(const fs::path& dir, RoadmapStepResult& r) {
  std::ifstream in(dir / "metrics.jsonl");
  CNX_CHECK(in.good(), (dir / "metrics.jsonl").string(), ": cannot read it");
  double ips_sum = 0;
  int64_t ips_n = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    json rec;
    try {
      rec = json::parse(line);
    } catch (const json::exception&) {
      continue;  // a line cut by a kill
    }
    const std::string type = rec.value("type", "");
    if (type == "train" && rec.contains("images_per_s") && rec["images_per_s"].is_number()) {
      ips_sum += rec["images_per_s"].get<double>();
      ++ips_n;
    } else if (type == "eval") {
      r.top1 = rec.value("acc1", 0.0);
      r.top5 = rec.value("acc5", 0.0);
      r.best_top1 = std::max(r.best_top1, r.top1);
      r.epochs = rec.value("epoch", int64_t{-1}) + 1;
    }
  }
  r.images_per_s = ips_n > 0 ? ips_sum / static_cast<double>(ips_n) : 0.0;
}

json to_json(const RoadmapStepResult& r) {
  json j = {{"step", r.step},           {"change", r.change},         {"parameters", r.parameters},
            {"gflops", r.gflops},       {"image_size", r.image_size}, {"gflops_224", r.gflops_224},
            {"top1", r.top1},           {"top5", r.top5},             {"best_top1", r.best_top1},
            {"images_per_s", r.images_per_s}, {"wall_s", r.wall_s},   {"epochs", r.epochs}};
  j["paper_top1"] = r.paper_top1 ? json(*r.paper_top1) : json(nullptr);
  return j;
}

RoadmapStepResult from_json(const json& j, const fs::path& path) {
  try {
    RoadmapStepResult r;
    r.step = j.at("step").get<std::string>();
    r.change = j.at("change").get<std::string>();
    r.parameters = j.at("parameters").get<int64_t>();
    r.gflops = j.at("gflops").get<double>();
    r.image_size = j.at("image_size").get<int64_t>();
    r.gflops_224 = j.at("gflops_224").get<double>();
    r.top1 = j.at("top1").get<double>();
    r.top5 = j.at("top5").get<double>();
    r.best_top1 = j.at("best_top1").get<double>();
    r.images_per_s = j.at("images_per_s").get<double>();
    r.wall_s = j.at("wall_s").get<double>();
    r.epochs = j.at("epochs").get<int64_t>();
    if (!j.at("paper_top1").is_null()) r.paper_top1 = j.at("paper_top1").get<double>();
    return r;
  } catch (const json::exception& e) {
    fail(path.string(), ": not a step result (", e.what(), "); delete it to train the step again");
  }
}

// Seconds this step has trained so far (over the runs that ended normally or by a signal).
double elapsed_before(const fs::path& dir) {
  const fs::path p = dir / "roadmap_time.json";
  if (!fs::exists(p)) return 0;
  return read_json(p).value("seconds", 0.0);
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string significant(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g", digits, v);
  return buf;
}

std::string duration(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(s / 60),
                static_cast<long long>(s % 60));
  return buf;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

// Trains one step (or continues it) and returns its result; nullopt if a signal stopped it.
std::optional<RoadmapStepResult> train_step(const RoadmapOptions& o, const std::string& step,
                                            size_t index, size_t count) {
  const fs::path dir = fs::path(o.output_dir) / step;
  RoadmapStepResult r = describe(step);
  TrainConfig cfg = o.recipe;
  cfg.model = step;
  cfg.output_dir = dir.string();
  cfg.resume.clear();
  cfg.auto_resume = true;
  std::printf("roadmap [%zu/%zu] %s: %s\n", index + 1, count, step.c_str(), r.change.c_str());
  std::fflush(stdout);

  const auto t0 = std::chrono::steady_clock::now();
  const TrainResult t = train(cfg);
  const double seconds =
      elapsed_before(dir) + std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  write_atomic(dir / "roadmap_time.json", json({{"seconds", seconds}}).dump() + "\n");
  if (t.interrupted) return std::nullopt;
  // The last epoch's evaluation is in metrics.jsonl unless --max_steps stopped the step before
  // (a run resumed after its last epoch trains nothing and reports no epochs of its own).
  if (!fs::exists(dir / "metrics.jsonl")) return std::nullopt;
  read_metrics(dir, r);
  if (r.epochs != cfg.epochs) return std::nullopt;

  r.parameters = t.num_parameters;
  r.image_size = t.image_height;
  r.gflops = static_cast<double>(t.macs_per_image) / 1e9;
  r.wall_s = seconds;
  return r;
}

}  // namespace

std::vector<std::string> parse_roadmap_steps(const std::string& text) {
  if (text.empty() || text == "all") return roadmap_step_names();
  std::vector<std::string> steps;
  std::set<std::string> seen;
  std::stringstream list(text);
  for (std::string name; std::getline(list, name, ',');) {
    const auto& known = roadmap_step_names();
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      std::string all;
      for (const std::string& k : known) all += (all.empty() ? "" : ", ") + k;
      fail("--steps: unknown step '", name, "' (known: ", all, ", or all)");
    }
    CNX_CHECK(seen.insert(name).second, "--steps: ", name, " is given twice");
    steps.push_back(name);
  }
  CNX_CHECK(!steps.empty(), "--steps: no step given");
  return steps;
}

void write_roadmap_reports(const std::string& dir, const std::vector<RoadmapStepResult>& rows,
                           const std::string& recipe_line) {
  std::string csv =
      "step,change,parameters,gflops,image_size,gflops_224,paper_top1,top1,top5,best_top1,"
      "images_per_s,wall_s,epochs\n";
  for (const RoadmapStepResult& r : rows)
    csv += r.step + "," + csv_field(r.change) + "," + std::to_string(r.parameters) + "," +
           significant(r.gflops, 6) + "," + std::to_string(r.image_size) + "," + fixed(r.gflops_224, 3) +
           "," + (r.paper_top1 ? fixed(*r.paper_top1, 1) : "") + "," + fixed(r.top1, 2) + "," +
           fixed(r.top5, 2) + "," + fixed(r.best_top1, 2) + "," + fixed(r.images_per_s, 1) + "," +
           fixed(r.wall_s, 1) + "," + std::to_string(r.epochs) + "\n";
  write_atomic(fs::path(dir) / "roadmap.csv", csv);

  std::string md = "# The roadmap from ResNet-50 to ConvNeXt-T, measured\n\n" + recipe_line + "\n\n";
  md += "| step | change | parameters | GFLOPs | GFLOPs at 224 (full size) | top-1 | top-5 | "
        "paper top-1 (ImageNet-1K) | images/s | wall time |\n";
  md += "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  for (const RoadmapStepResult& r : rows)
    md += "| " + r.step + " | " + r.change + " | " + std::to_string(r.parameters) + " | " +
          significant(r.gflops, 4) + " (" + std::to_string(r.image_size) + "px) | " +
          fixed(r.gflops_224, 2) + " | " + fixed(r.top1, 2) + " | " + fixed(r.top5, 2) + " | " +
          (r.paper_top1 ? fixed(*r.paper_top1, 1) : "-") + " | " + fixed(r.images_per_s, 1) +
          " | " + duration(r.wall_s) + " |\n";
  write_atomic(fs::path(dir) / "roadmap.md", md);

  plot::BarChart chart;
  chart.title = "ResNet-50 to ConvNeXt-T: our top-1 beside the paper's";
  for (const RoadmapStepResult& r : rows) chart.rows.push_back({r.step, r.top1, r.paper_top1});
  if (!chart.rows.empty()) plot::write_bar_chart_png((fs::path(dir) / "roadmap.png").string(), chart);
}

RoadmapResult run_roadmap(const RoadmapOptions& o) {
  CNX_CHECK(!o.output_dir.empty(), "roadmap: --output_dir is required (each step trains in a "
                                   "folder of it)");
  const std::vector<std::string> steps = o.steps.empty() ? roadmap_step_names() : o.steps;
  {
    TrainConfig check = o.recipe;  // the recipe as every step will see it
    check.model = steps.front();
    check.validate();
  }
  fs::create_directories(o.output_dir);
  const fs::path state = fs::path(o.output_dir) / "roadmap.json";
  const json recipe = recipe_json(o.recipe);
  if (fs::exists(state)) {
    const json saved = read_json(state);
    CNX_CHECK(saved.value("format", "") == kRoadmapFormat, state.string(),
              ": not a roadmap state file (format ", saved.value("format", "none"), ")");
    const json& was = saved.at("recipe");
    for (const auto& [key, value] : recipe.items())
      CNX_CHECK(was.contains(key) && was.at(key) == value, "roadmap: ", o.output_dir,
                " holds a roadmap trained with ", key, " ", was.value(key, json()).dump(),
                ", this command has ", value.dump(), ": use the same recipe or another --output_dir");
  }
  write_atomic(state, json({{"format", kRoadmapFormat}, {"recipe", recipe}, {"steps", steps}}).dump(2) + "\n");

  const std::string recipe_line =
      "Recipe (every step): " + o.recipe.data_set + ", " + std::to_string(o.recipe.epochs) +
      " epochs, batch " + std::to_string(o.recipe.batch_size * o.recipe.update_freq) +
      ", seed " + std::to_string(o.recipe.seed) + ", widths x" + fixed(o.recipe.width_mult, 3) +
      ", depths x" + fixed(o.recipe.depth_mult, 3) + "; `convnext roadmap` (train/roadmap.h).";

  RoadmapResult result;
  for (size_t i = 0; i < steps.size(); ++i) {
    const fs::path done = fs::path(o.output_dir) / steps[i] / "result.json";
    if (fs::exists(done)) {
      result.rows.push_back(from_json(read_json(done), done));
      std::printf("roadmap [%zu/%zu] %s: finished before (top-1 %.2f), skipped\n", i + 1,
                  steps.size(), steps[i].c_str(), result.rows.back().top1);
      continue;
    }
    std::optional<RoadmapStepResult> r = train_step(o, steps[i], i, steps.size());
    if (!r) {
      result.interrupted = true;
      if (!result.rows.empty()) write_roadmap_reports(o.output_dir, result.rows, recipe_line);
      return result;
    }
    write_atomic(done, to_json(*r).dump(2) + "\n");
    result.rows.push_back(*r);
    write_roadmap_reports(o.output_dir, result.rows, recipe_line);
    std::printf("roadmap [%zu/%zu] %s: top-1 %.2f (paper, ImageNet-1K: %s), %.1f images/s, %s\n",
                i + 1, steps.size(), r->step.c_str(), r->top1,
                r->paper_top1 ? fixed(*r->paper_top1, 1).c_str() : "-", r->images_per_s,
                duration(r->wall_s).c_str());
    std::fflush(stdout);
  }
  return result;
}

}  // namespace cnx
