#include "train/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <regex>

#include "models/safetensors.h"

namespace cnx {

namespace fs = std::filesystem;

namespace {
const std::regex kNumbered("checkpoint-([0-9]+)\\.safetensors");

// The step recorded in a checkpoint's metadata, or -1 if it is not a readable checkpoint.
int64_t recorded_step(const std::string& path) {
  try {
    const auto md = read_safetensors_metadata(path);
    auto format = md.find("format"), step = md.find("step");
    if (format == md.end() || format->second != kCheckpointFormat || step == md.end()) return -1;
    return std::stoll(step->second);
  } catch (const std::exception&) {
    return -1;  // unreadable or half-written files are not resumed from
  }
}
}  // namespace

void save_checkpoint(const std::string& path, const Checkpoint& c) {
  write_safetensors(path, c.tensors,
                    {{"format", kCheckpointFormat},
                     {"step", std::to_string(c.step)},
                     {"state", c.state_json}});
}

Checkpoint load_checkpoint(const std::string& path) {
  Safetensors file = read_safetensors(path);
  auto format = file.metadata.find("format");
  CNX_CHECK(format != file.metadata.end() && format->second == kCheckpointFormat, path,
            ": not a convnext training checkpoint (no \"format\": \"", kCheckpointFormat,
            "\" in its metadata); for plain weights use --finetune or --weights");
  auto step = file.metadata.find("step");
  auto state = file.metadata.find("state");
  CNX_CHECK(step != file.metadata.end() && state != file.metadata.end(), path,
            ": checkpoint metadata lacks \"step\" or \"state\"");
  Checkpoint c;
  c.tensors = std::move(file.tensors);
  c.state_json = state->second;
  try {
    c.step = std::stoll(step->second);
  } catch (const std::exception&) {
    fail(path, ": checkpoint step '", step->second, "' is not a number");
  }
  return c;
}

std::string checkpoint_path(const std::string& dir, const std::string& tag) {
  return (fs::path(dir) / ("checkpoint-" + tag + ".safetensors")).string();
}

std::string find_resume_checkpoint(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "";
  std::string best_path;
  int64_t best_step = -1;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (!std::regex_match(name, kNumbered) && name != "checkpoint-recovery.safetensors") continue;
    const int64_t step = recorded_step(entry.path().string());
    if (step > best_step) {
      best_step = step;
      best_path = entry.path().string();
    }
  }
  return best_path;
}

void prune_checkpoints(const std::string& dir, int keep) {
  if (keep <= 0) return;
  std::vector<std::pair<int64_t, fs::path>> numbered;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, m, kNumbered)) numbered.emplace_back(std::stoll(m[1]), entry.path());
  }
  std::sort(numbered.begin(), numbered.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = static_cast<size_t>(keep); i < numbered.size(); ++i) fs::remove(numbered[i].second, ec);
}

}  // namespace cnx
