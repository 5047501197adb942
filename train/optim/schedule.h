// Learning-rate and weight-decay schedules of the official ConvNeXt training (utils.py
// cosine_scheduler, used by main.py for both lr and weight decay, one value per optimiser
// step), and the project's linear lr scaling rule.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cnx {

// numpy.linspace(start, stop, num) (endpoint=True), bit for bit: value i = i * step + start with
// step = (stop - start) / (num - 1), the last value exactly `stop`; num = 1 gives {start}
// (not stop), num = 0 nothing. num >= 0.
std::vector<double> linspace(double start, double stop, int64_t num);

// The official utils.cosine_scheduler, one value per iteration, epochs * niter_per_ep of them:
//   warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
//   warmup: np.linspace(start_warmup_value, base_value, warmup_iters)  (ends at base_value)
//   then for i in 0 .. n-1, n = epochs * niter_per_ep - warmup_iters:
//     final_value + 0.5 * (base_value - final_value) * (1 + cos(pi * i / n))
// computed in double in Python's order of operations, so the values equal the official ones.
// One difference where the official function fails: it builds the warmup only when
// warmup_epochs > 0, so warmup_steps > 0 with warmup_epochs = 0 trips its length assertion;
// here that case warms up over warmup_steps iterations. Throws cnx::Error for negative counts
// or a warmup longer than the schedule. Zero iterations give an empty schedule.
std::vector<double> cosine_scheduler(double base_value, double final_value, int64_t epochs,
                                     int64_t niter_per_ep, int64_t warmup_epochs = 0,
                                     double start_warmup_value = 0, int64_t warmup_steps = -1);

// The project's linear scaling rule: a learning rate given for a total batch of
// `reference_batch_size` (4096, the batch of the official recipes, whose lr 4e-3 is "with total
// batch size 4096") becomes value * total_batch_size / reference_batch_size for the real total
// batch (batch_size * update_freq * world_size, as main.py's total_batch_size). The official
// main.py itself does not rescale: it uses --lr as given.
struct ScaledValue {
  double value;
  std::string description;  // "lr 4e-03 for batch 4096 -> 1.25e-04 for batch 128 (linear scaling)"
};
// `what` names the value in the description ("lr", "min_lr", ...). value finite and >= 0, the
// batch sizes > 0; else cnx::Error.
ScaledValue scale_lr_linear(double value, int64_t total_batch_size,
                            int64_t reference_batch_size = 4096, const std::string& what = "lr");

}  // namespace cnx
