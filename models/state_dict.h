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

  // Throws cnx::Error "<head> missing (n): a, b; unexpected (n): ...; ...; duplicate (n): ..."
  // (at most 8 names a category) if any problem was noted or any considered name was never
  // looked up ("unexpected").
  void finish(const std::string& head) const;

 private:
  std::map<std::string, const Tensor*> given_;
  std::set<std::string> looked_up_;
  std::vector<std::pair<std::string, std::vector<std::string>>> problems_;  // in order noted
  std::vector<std::string> duplicate_;
};

}  // namespace cnx
