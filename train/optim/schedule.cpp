#include "train/optim/schedule.h"

#include <charconv>
#include <cmath>
#include <numbers>

#include "tensor/error.h"

namespace cnx {

std::vector<double> linspace(double start, double stop, int64_t num) {
  CNX_CHECK(num >= 0, "linspace: num must be >= 0, got ", num);
  // numpy (1.24) function_base.linspace with scalar start and stop:
  //   div = num - 1; delta = stop - start; y = arange(0, num) (float64)
  //   if div > 0: step = delta / div; y = (y / div) * delta if step == 0 else y * step
  //   else: y = y * delta
  //   y += start; if num > 1: y[-1] = stop
  std::vector<double> y(static_cast<size_t>(num));
  const int64_t div = num - 1;
  const double delta = stop - start;
  for (int64_t i = 0; i < num; ++i) {
    const double x = static_cast<double>(i);
    double v;
    if (div > 0) {
      const double step = delta / static_cast<double>(div);
      v = step == 0 ? (x / static_cast<double>(div)) * delta : x * step;
    } else {
      v = x * delta;
    }
    y[static_cast<size_t>(i)] = v + start;
  }
  if (num > 1) y.back() = stop;
  return y;
}

std::vector<double> cosine_scheduler(double base_value, double final_value, int64_t epochs,
                                     int64_t niter_per_ep, int64_t warmup_epochs,
                                     double start_warmup_value, int64_t warmup_steps) {
  CNX_CHECK(epochs >= 0 && niter_per_ep >= 0 && warmup_epochs >= 0,
            "cosine_scheduler: epochs (", epochs, "), iterations per epoch (", niter_per_ep,
            ") and warmup epochs (", warmup_epochs, ") must be >= 0");
  const int64_t total = epochs * niter_per_ep;
  const int64_t warmup_iters = warmup_steps > 0 ? warmup_steps : warmup_epochs * niter_per_ep;
  CNX_CHECK(warmup_iters <= total, "cosine_scheduler: ", warmup_iters,
            " warmup iterations do not fit in ", total, " iterations (", epochs, " epochs of ",
            niter_per_ep, ")");
  std::vector<double> schedule = linspace(start_warmup_value, base_value, warmup_iters);
  const int64_t n = total - warmup_iters;
  schedule.reserve(static_cast<size_t>(total));
  for (int64_t i = 0; i < n; ++i) {
    // final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / (len(iters))))
    const double c = std::cos(std::numbers::pi * static_cast<double>(i) / static_cast<double>(n));
    schedule.push_back(final_value + 0.5 * (base_value - final_value) * (1 + c));
  }
  return schedule;
}

namespace {
// Shortest round-trip scientific notation: 0.004 -> "4e-03", 0.000125 -> "1.25e-04".
std::string sci(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  return std::string(buf, r.ptr);
}
}  // namespace

ScaledValue scale_lr_linear(double value, int64_t total_batch_size, int64_t reference_batch_size,
                            const std::string& what) {
  CNX_CHECK(std::isfinite(value) && value >= 0, "lr scaling: ", what,
            " must be finite and >= 0, got ", value);
  CNX_CHECK(total_batch_size > 0 && reference_batch_size > 0, "lr scaling: batch sizes must be > 0, got ",
            total_batch_size, " and reference ", reference_batch_size);
  const double scaled =
      value * static_cast<double>(total_batch_size) / static_cast<double>(reference_batch_size);
  return {scaled, what + " " + sci(value) + " for batch " + std::to_string(reference_batch_size) +
                      " -> " + sci(scaled) + " for batch " + std::to_string(total_batch_size) +
                      " (linear scaling)"};
}

}  // namespace cnx
