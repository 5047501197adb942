#include "train/checkpoint.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <limits>
#include <regex>
#include <string_view>

#include <nlohmann/json.hpp>

#include "models/safetensors.h"
#include "tensor/escape.h"

namespace cnx {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
const std::regex kNumbered("checkpoint-([0-9]+)\\.safetensors");

// `text`, all of it, as a decimal int64 >= 0 (std::nullopt for anything else, an overflow
// included).
std::optional<int64_t> whole_non_negative(std::string_view text) {
  int64_t v = 0;
  const auto r = std::from_chars(text.data(), text.data() + text.size(), v);
  if (r.ec != std::errc() || r.ptr != text.data() + text.size() || v < 0) return std::nullopt;
  return v;
}

// The epoch of a numbered checkpoint's name, if its number fits an int64 (a stray
// checkpoint-<20 digits> is not one of ours).
std::optional<int64_t> numbered_epoch(const std::string& name) {
  std::smatch m;
  if (!std::regex_match(name, m, kNumbered)) return std::nullopt;
  return whole_non_negative(m[1].str());
}

// The step recorded in a checkpoint's metadata, or -1 if it is not a readable checkpoint.
int64_t recorded_step(const std::string& path) {
  try {
    const auto md = read_safetensors_metadata(path);
    auto format = md.find("format"), step = md.find("step");
    if (format == md.end() || format->second != kCheckpointFormat || step == md.end()) return -1;
    return whole_non_negative(step->second).value_or(-1);
  } catch (const std::exception&) {
    return -1;  // unreadable or half-written files are not resumed from
  }
}
}  // namespace

std::optional<std::string> first_nonfinite(const NamedTensors& tensors) {
  for (const auto& [name, t] : tensors) {
    if (t.dtype() != DType::f32 && t.dtype() != DType::bf16 && t.dtype() != DType::f16 &&
        t.dtype() != DType::f64)
      continue;
    // On the host in f64 (exact for every floating type). For a CUDA tensor this is a second
    // copy to the host (write_safetensors makes its own); only at checkpoint time.
    for (double v : t.to(Device::cpu()).to(DType::f64).to_vector<double>())
      if (!std::isfinite(v)) return name;
  }
  return std::nullopt;
}

void save_checkpoint(const std::string& path, const Checkpoint& c) {
  if (const auto bad = first_nonfinite(c.tensors))
    fail("refusing to write ", path, ": ", *bad,
         " holds a NaN or an infinity (the run diverged); the files already saved are kept");
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
  const std::optional<int64_t> recorded = whole_non_negative(step->second);
  CNX_CHECK(recorded.has_value(), path, ": checkpoint field \"step\" is not an integer >= 0 ('",
            escape_for_message(step->second), "')");
  c.step = *recorded;
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
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (const auto epoch = numbered_epoch(entry.path().filename().string()))
      numbered.emplace_back(*epoch, entry.path());
  std::sort(numbered.begin(), numbered.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t i = static_cast<size_t>(keep); i < numbered.size(); ++i) fs::remove(numbered[i].second, ec);
}

int remove_stale_temporaries(const std::string& dir) {
  static const std::regex temporary("checkpoint-.*\\.safetensors\\.tmp");
  int removed = 0;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (std::regex_match(entry.path().filename().string(), temporary) &&
        fs::remove(entry.path(), ec))
      ++removed;
  return removed;
}

// ---- the state a checkpoint continues from ----------------------------------------------------

namespace {

// state[key] as an integer in [lo, hi], else one line naming the file and the field.
int64_t int_field(const json& state, const std::string& path, const char* key, int64_t lo, int64_t hi) {
  CNX_CHECK(state.contains(key), path, ": checkpoint state lacks \"", key, "\"");
  const json& v = state.at(key);
  CNX_CHECK(v.is_number_integer(), path, ": checkpoint field \"", key, "\" is not an integer (",
            escape_for_message(v.dump()), ")");
  CNX_CHECK(!(v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi)) &&
                v.get<int64_t>() >= lo && v.get<int64_t>() <= hi,
            path, ": checkpoint field \"", key, "\" is ", v.dump(), ", outside [", lo, ", ", hi, "]");
  return v.get<int64_t>();
}

uint64_t uint_field(const json& object, const std::string& path, const char* key) {
  CNX_CHECK(object.is_object() && object.contains(key) && object.at(key).is_number_integer() &&
                (object.at(key).is_number_unsigned() || object.at(key).get<int64_t>() >= 0),
            path, ": checkpoint field \"", key, "\" is missing or not an integer >= 0");
  return object.at(key).get<uint64_t>();
}

double percent_field(const json& state, const std::string& path, const char* key) {
  const json& v = state.at(key);
  CNX_CHECK(v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() >= 0 &&
                v.get<double>() <= 100,
            path, ": checkpoint field \"", key, "\" is not an accuracy in [0, 100] (",
            escape_for_message(v.dump()), ")");
  return v.get<double>();
}

}  // namespace

ResumeState parse_resume_state(const std::string& path, const std::string& state_json,
                               const ResumeBounds& run) {
  json state;
  try {
    state = json::parse(state_json);
  } catch (const json::exception& e) {
    fail(path, ": checkpoint state is not valid JSON (", e.what(), ")");
  }
  CNX_CHECK(state.is_object(), path, ": checkpoint state is not a JSON object");
  const int64_t steps_per_epoch = run.batches_per_epoch / run.update_freq;
  const int64_t last_batch = steps_per_epoch * run.update_freq;  // one past the last used batch
  ResumeState r;
  r.epoch = int_field(state, path, "epoch", 0, run.epochs);
  r.batch = int_field(state, path, "batch", 0, r.epoch == run.epochs ? 0 : last_batch);
  CNX_CHECK(r.batch % run.update_freq == 0, path, ": checkpoint field \"batch\" is ", r.batch,
            ", not a multiple of --update_freq ", run.update_freq);
  // epoch <= epochs and batch <= last_batch keep this product far from overflowing: the
  // schedule itself holds epochs * steps_per_epoch values.
  const int64_t expected = r.epoch * steps_per_epoch + r.batch / run.update_freq;
  r.step = int_field(state, path, "step", 0, std::numeric_limits<int64_t>::max());
  CNX_CHECK(r.step == expected, path, ": checkpoint field \"step\" is ", r.step, ", but epoch ",
            r.epoch, " batch ", r.batch, " of this run (", steps_per_epoch,
            " optimiser steps per epoch) is step ", expected);
  CNX_CHECK(state.contains("best_acc1"), path, ": checkpoint state lacks \"best_acc1\"");
  r.best_acc1 = percent_field(state, path, "best_acc1");
  if (state.contains("acc1")) r.acc1 = percent_field(state, path, "acc1");
  CNX_CHECK(state.contains("drop_gen"), path, ": checkpoint state lacks \"drop_gen\"");
  r.drop_seed = uint_field(state.at("drop_gen"), path, "seed");
  r.drop_offset = uint_field(state.at("drop_gen"), path, "offset");
  if (state.contains("nonfinite_skipped"))
    r.nonfinite_skipped = int_field(state, path, "nonfinite_skipped", 0, r.step);
  if (state.contains("nonfinite_streak"))
    r.nonfinite_streak = int_field(state, path, "nonfinite_streak", 0, r.nonfinite_skipped);
  CNX_CHECK(state.contains("resume_key") && state.at("resume_key").is_object(), path,
            ": checkpoint state lacks the object \"resume_key\"");
  CNX_CHECK(state.contains("config") && state.at("config").is_object(), path,
            ": checkpoint state lacks the object \"config\"");
  r.resume_key = state.at("resume_key").dump();
  r.config = state.at("config").dump();
  return r;
}

}  // namespace cnx
