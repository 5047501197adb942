#include "models/state_dict.h"

#include <algorithm>
#include <set>

namespace cnx {

StateDictMatcher::StateDictMatcher(const NamedTensors& tensors, const std::string& prefix) {
  for (const auto& [name, t] : tensors) {
    if (!name.starts_with(prefix)) continue;
    if (given_.emplace(name, &t).second) order_.push_back(name);
    else duplicate_.push_back(name);
  }
}

const Tensor* StateDictMatcher::find(const std::string& name) {
  looked_up_.insert(name);
  auto it = given_.find(name);
  if (it == given_.end()) {
    note("missing", name);
    return nullptr;
  }
  return it->second;
}

const Tensor* StateDictMatcher::floating(const std::string& name, const Shape& shape,
                                         const char* dtype_category) {
  const Tensor* t = find(name);
  if (!t) return nullptr;
  if (t->shape() != shape) {
    note("wrong shape", name + " " + t->shape().str() + " (expected " + shape.str() + ")");
    return nullptr;
  }
  if (!is_floating(t->dtype())) {
    note(dtype_category, name + " " + dtype_name(t->dtype()));
    return nullptr;
  }
  return t;
}

void StateDictMatcher::note(const std::string& category, const std::string& text) {
  auto it = std::find_if(problems_.begin(), problems_.end(),
                         [&](const auto& p) { return p.first == category; });
  if (it == problems_.end()) it = problems_.insert(problems_.end(), {category, {}});
  it->second.push_back(text);
}

std::vector<std::string> StateDictMatcher::missing() const {
  for (const auto& [category, names] : problems_)
    if (category == "missing") return names;
  return {};
}

std::vector<std::string> StateDictMatcher::unexpected() const {
  std::vector<std::string> out;
  for (const std::string& name : order_)
    if (!looked_up_.count(name)) out.push_back(name);
  return out;
}

bool StateDictMatcher::ok() const {
  return problems_.empty() && duplicate_.empty() && unexpected().empty();
}

void StateDictMatcher::finish(const std::string& head, const std::string& hint) const {
  if (ok()) return;
  const std::vector<std::string> unexpected = this->unexpected();

  std::string msg = head;
  auto list = [&](const std::string& what, const std::vector<std::string>& names) {
    if (names.empty()) return;
    msg += ' ';
    msg += what;
    msg += " (" + std::to_string(names.size()) + "): ";
    const size_t shown = std::min<size_t>(names.size(), 8);
    for (size_t i = 0; i < shown; ++i) msg += (i ? ", " : "") + names[i];
    if (names.size() > shown) msg += ", ... (" + std::to_string(names.size() - shown) + " more)";
    msg += ";";
  };
  // missing first, unexpected next, then the other kinds in the order they were first seen.
  for (const auto& [category, names] : problems_)
    if (category == "missing") list(category, names);
  list("unexpected", unexpected);
  for (const auto& [category, names] : problems_)
    if (category != "missing") list(category, names);
  list("duplicate", duplicate_);
  if (hint.empty()) msg.pop_back();  // the last ';'
  else msg += " " + hint;
  throw Error(msg);
}

// ---- names from elsewhere --------------------------------------------------------------------

namespace {
// "stages.<digits>.<rest>" -> rest, else "".
std::string after_stage_index(const std::string& name) {
  const std::string head = "stages.";
  if (!name.starts_with(head)) return "";
  size_t i = head.size();
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i;
  if (i == head.size() || i >= name.size() || name[i] != '.') return "";
  return name.substr(i + 1);
}

// "a, b, c" from the first 3 names.
std::string examples(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size() && i < 3; ++i) s += (i ? ", " : "") + names[i];
  return s;
}

constexpr const char* kConvertCommand =
    "python3 tools/convert_checkpoint.py INPUT OUTPUT.safetensors";
}  // namespace

bool is_timm_convnext_name(const std::string& name) {
  // timm (0.6 and later): stem.{0: conv, 1: norm}, stages.i.downsample.{0,1},
  // stages.i.blocks.j.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}, head.{norm, fc}; norm_pre with
  // head_norm_first. The official isotropic stem is stem.weight / stem.bias.
  for (const char* prefix : {"stem.0.", "stem.1.", "head.fc.", "head.norm.", "norm_pre."})
    if (name.starts_with(prefix)) return true;
  const std::string rest = after_stage_index(name);
  return rest.starts_with("blocks.") || rest.starts_with("downsample.");
}

std::string foreign_naming_hint(const std::vector<std::string>& unexpected,
                                const std::set<std::string>& expected, size_t missing) {
  // A wrapper: the first component of the name is extra, what follows is an official or a
  // timm name. All wrapped names must share the first wrapper found.
  std::string wrapper;
  std::vector<std::string> wrapped, timm;
  bool wrapped_timm = false;
  for (const std::string& name : unexpected) {
    if (is_timm_convnext_name(name)) {
      timm.push_back(name);
      continue;
    }
    const size_t dot = name.find('.');
    if (dot == std::string::npos) continue;
    // Not a component of the names themselves: "stem.norm.bias" is a misnamed parameter, not
    // "norm.bias" wrapped in "stem.".
    const std::string first = name.substr(0, dot);
    if (first == "stem" || first == "stages" || first == "downsample_layers" || first == "blocks" ||
        first == "norm" || first == "head" || first == "norm_pre")
      continue;
    const std::string inner = name.substr(dot + 1);
    const bool inner_timm = is_timm_convnext_name(inner);
    if (!expected.count(inner) && !inner_timm) continue;
    if (wrapper.empty()) wrapper = name.substr(0, dot + 1);
    if (!name.starts_with(wrapper)) continue;
    wrapped.push_back(name);
    wrapped_timm = wrapped_timm || inner_timm;
  }
  const std::string counts = "; " + std::to_string(missing) + " of the model's names missing)";
  if (!wrapped.empty())
    return "the names have an extra '" + wrapper + "' prefix" +
           (wrapped_timm ? " over timm's names" : "") + " (" + std::to_string(wrapped.size()) +
           " of " + std::to_string(unexpected.size()) + " unexpected names, e.g. " +
           examples(wrapped) + counts +
           ": a training checkpoint's state dict, not a weights file; convert it to a weights "
           "file with the official names: " + kConvertCommand;
  if (!timm.empty())
    return std::string("these are timm's parameter names, not the official ones the model reads (") +
           std::to_string(timm.size()) + " of " + std::to_string(unexpected.size()) +
           " unexpected names, e.g. " + examples(timm) + counts +
           ": convert the file to the official names: " + kConvertCommand;
  return "";
}

}  // namespace cnx
