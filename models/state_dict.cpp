#include "models/state_dict.h"

#include <algorithm>

namespace cnx {

StateDictMatcher::StateDictMatcher(const NamedTensors& tensors, const std::string& prefix) {
  for (const auto& [name, t] : tensors) {
    if (!name.starts_with(prefix)) continue;
    if (!given_.emplace(name, &t).second) duplicate_.push_back(name);
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

void StateDictMatcher::finish(const std::string& head) const {
  std::vector<std::string> unexpected;
  for (const auto& [name, t] : given_)
    if (!looked_up_.count(name)) unexpected.push_back(name);
  if (problems_.empty() && unexpected.empty() && duplicate_.empty()) return;

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
  msg.pop_back();  // the last ';'
  throw Error(msg);
}

}  // namespace cnx
