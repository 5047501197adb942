// Strict matching of named tensors for every load_state_dict (the model, the EMA, AdamW): each
// expected name is looked up once, and every problem (missing, unexpected, wrong shape, wrong
// dtype, duplicate, or a category of the caller's) is collected, so that one error lists them
// all and the caller can change nothing unless everything fits.
//
//   StateDictMatcher m(tensors, "ema.");          // only names with this prefix are considered
//   for (const Parameter& p : params) found.push_back(m.floating("ema." + p.name, p.official_shape));
//   m.finish("ModelEma.load_state_dict: the EMA state does not fit the parameters:");  // throws
#pragma once

#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "models/convnext.h"

namespace cnx {

class StateDictMatcher {
 public:
  // Considers the tensors whose names start with `prefix` (all of them for ""); a name given
  // twice is a problem ("duplicate").
  explicit StateDictMatcher(const NamedTensors& tensors, const std::string& prefix = "");

  // The tensor called `name`, or nullptr (noted as "missing").
  const Tensor* find(const std::string& name);
  // find(), then the official `shape` ("wrong shape") and a floating dtype (else noted under
  // `dtype_category`); nullptr unless all hold.
  const Tensor* floating(const std::string& name, const Shape& shape,
                         const char* dtype_category = "not floating point");
  // Notes a problem of the caller's own kind, e.g. ("negative step", "adamw.step = -1").
  void note(const std::string& category, const std::string& text);

  // True when nothing was noted and every considered name was looked up (finish() would not
  // throw).
  bool ok() const;
  // The names noted "missing" (in the order looked up), and the considered names never looked
  // up (in the order of the tensors).
  std::vector<std::string> missing() const;
  std::vector<std::string> unexpected() const;

  // Throws cnx::Error "<head> missing (n): a, b; unexpected (n): ...; ...; duplicate (n): ..."
  // (at most 8 names a category), then "; <hint>" if a hint is given, if any problem was noted
  // or any considered name was never looked up ("unexpected").
  void finish(const std::string& head, const std::string& hint = "") const;

 private:
  std::map<std::string, const Tensor*> given_;
  std::vector<std::string> order_;  // the names of given_ in the order of the tensors
  std::set<std::string> looked_up_;
  std::vector<std::pair<std::string, std::vector<std::string>>> problems_;  // in order noted
  std::vector<std::string> duplicate_;
};

// What the names of a state dict that does not fit say about where it came from, for the one
// error line; "" when they say nothing recognisable. `unexpected`: the names the model does
// not have; `expected`: the model's own (official) names; `missing`: how many of those the
// file lacks. Recognised, each with the command that fixes it:
//   - timm's names (stem.0.weight, stages.0.blocks.0.conv_dw.weight, head.fc.weight, ...);
//   - the official names, or timm's, under a wrapper prefix (model.*, module.*, state_dict.*:
//     a training checkpoint's or a DistributedDataParallel state dict flattened into names).
// Both are converted by tools/convert_checkpoint.py; the hint shows its command and at most 3
// of the names.
std::string foreign_naming_hint(const std::vector<std::string>& unexpected,
                                const std::set<std::string>& expected, size_t missing);

// True for a name in timm's ConvNeXt naming that the official naming never uses.
bool is_timm_convnext_name(const std::string& name);

}  // namespace cnx
