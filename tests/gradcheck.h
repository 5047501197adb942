// Test helpers: closeness with a readable report, and gradient checks against central finite
// differences in double.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "tensor/tensor.h"

namespace cnx::test {

// EXPECTs |got[i] - want[i]| <= atol + rtol * |want[i]| for all i (and equal sizes). On failure
// prints `what`, the first mismatches (index, got, want) and the worst error.
void expect_close(const std::string& what, const std::vector<double>& got,
                  const std::vector<double>& want, double atol, double rtol);

// Any floating tensor's elements as doubles (copied to the host).
std::vector<double> values(const Tensor& t);

// f64 tensor with the given values (requires_grad off).
Tensor from_doubles(const Shape& shape, const std::vector<double>& v);

struct GradcheckOptions {
  double eps = 1e-6;   // central-difference step
  double atol = 1e-7;  // double precision: truncation O(eps^2) plus round-off O(1e-16 |L| / eps)
  double rtol = 1e-6;
  uint64_t seed = 1234;  // for the random projection R below
};

// Gradient check of f at `inputs` (f64 tensors). Every input with requires_grad() is checked:
// the autograd gradient of L = sum(f(inputs) * R), R a fixed standard-normal tensor of f's
// output shape, must match (L(x + eps e_j) - L(x - eps e_j)) / (2 eps) for every element j.
// The inputs' .grad are reset before and after.
void expect_gradients_match(const std::string& what,
                            const std::function<Tensor(const std::vector<Tensor>&)>& f,
                            const std::vector<Tensor>& inputs, const GradcheckOptions& opt = {});

// EXPECTs that `fn` throws cnx::Error whose message contains every string in `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts);

}  // namespace cnx::test
