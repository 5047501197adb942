// The fusion switches (kernels/fusion.h): one atomic flag per fusion, initialised from the
// environment the first time any is asked for.
#include "kernels/fusion.h"

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace cnx {

namespace {
constexpr std::array<const char*, kFusionCount> kNames = {
    "CNX_LINEAR_BIAS", "CNX_LINEAR_BGRADB", "CNX_FUSE_DWCONV_LN", "CNX_FUSE_SCALED_RESIDUAL",
    "CNX_BF16_WEIGHT_COPIES"};

struct Flags {
  std::array<std::atomic<bool>, kFusionCount> on;
  Flags() {
    for (size_t i = 0; i < on.size(); ++i) {
      const char* v = std::getenv(kNames[i]);
      on[i].store(v == nullptr || std::strcmp(v, "0") != 0);
    }
  }
};

std::array<std::atomic<bool>, kFusionCount>& flags() {
  static Flags f;
  return f.on;
}
}  // namespace

const char* fusion_env_name(Fusion f) { return kNames.at(static_cast<size_t>(f)); }
bool fusion_enabled(Fusion f) { return flags().at(static_cast<size_t>(f)).load(); }
void set_fusion_enabled(Fusion f, bool on) { flags().at(static_cast<size_t>(f)).store(on); }

}  // namespace cnx
