// Test helpers shared by the tests/test_*.cpp binaries: closeness with a readable report,
// gradient checks against central finite differences in double, and the small data and
// checking helpers that several suites use.
#pragma once

#include <cstdint>
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

// n values drawn from normal(0, std) by a Generator seeded with `seed`, rounded to f32.
std::vector<float> normal_floats(int64_t n, uint64_t seed, double std = 1.0);

// EXPECTs two safetensors files (checkpoints) to hold the same tensors, in the same order,
// bitwise (as doubles; names compared too).
void expect_same_file_tensors(const std::string& a_path, const std::string& b_path);

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
// The message of the cnx::Error that `fn` throws ("" when it throws none).
std::string error_of(const std::function<void()>& fn);

// ---- data ------------------------------------------------------------------------------------

// n normal values (mean, std), rounded through float so that the f32 and the f64 runs of an op
// see exactly the same inputs and a reference needs no rounding model for them.
std::vector<double> randv(int64_t n, Generator& gen, double std = 1.0, double mean = 0.0);

// A tensor of `dtype` with the given values (converted from f64; requires_grad off).
Tensor make(const Shape& shape, const std::vector<double>& v, DType dtype);

// An f64 leaf with requires_grad for the gradient checks, values from randv(.., gen, std, mean).
Tensor leaf(const Shape& shape, Generator& gen, double std = 1.0, double mean = 0.0);

// A normal(0, std) tensor of `dtype` from a Generator of its own seeded with `seed`.
Tensor randn(const Shape& shape, uint64_t seed, DType dtype = DType::f64, double std = 1.0);

// An f64 leaf with requires_grad: randn(shape, seed, f64, std).
Tensor leaf(const Shape& shape, uint64_t seed, double std = 1.0);

// ---- names in failure messages ---------------------------------------------------------------

// The dtype's name as a std::string ("f32").
std::string dname(DType d);

// "what f32" and "what f32[2, 3]": a check's label for one dtype (and shape).
std::string tag(const std::string& what, DType dt);
std::string tag(const std::string& what, const Shape& s, DType dt);

// ---- checks ----------------------------------------------------------------------------------

// |got - want| <= tol * mag elementwise, where mag is the natural scale of the rounding error of
// each result: for a dot product, the sum of the absolute values of the terms that were added to
// make `want`, so that a result that cancels to near zero is not asked for more precision than
// its inputs carry (as a relative tolerance would). A floor of 1e-300 keeps an all-zero mag from
// passing NaN.
void expect_close_mag(const std::string& what, const std::vector<double>& got,
                      const std::vector<double>& want, const std::vector<double>& mag, double tol);

// Forward tolerances relative to the scale of expect_close_mag: f32 rounding is 6e-8 per
// operation, and these computations (sums) have at most a few hundred operations (terms) per
// result; f64 is 1e-16 per operation.
double fwd_tol(DType d);

// A three-input op (x, weight, bias), e.g. linear, layer_norm, patchify_conv, dwconv.
using Op3 = std::function<Tensor(const Tensor&, const Tensor&, const Tensor&)>;

// Gradients of L = sum(op(x, w, b) * R) with f32 inputs equal those with f64 inputs (the f32
// instantiation of the backward kernel is not covered by the finite-difference checks).
// Inputs: randv from Generator(seed) for x, w, b in turn; R: randv from Generator(seed + 1).
// Tolerance: 1e-5 of the largest gradient plus 1e-5 relative, because f32 rounding in a sum
// scales with the magnitude of the terms, which is that of the typical gradient, not of each
// (possibly cancelling) one. Every gradient must exist and have the input's dtype, and with
// check_grad_shapes also the input's shape.
void check_f32_backward_matches_f64(const std::string& what, const Op3& op, const Shape& xs,
                                    const Shape& ws, const Shape& bs, uint64_t seed,
                                    bool check_grad_shapes = true);

// Only the inputs that require grad get a .grad, equal to (rtol 1e-15) the one they get when
// every input requires grad, for each of the 8 subsets of {x, w, b}. f(inputs) must return the
// op's output for the three f64 inputs, drawn as randv from Generator(seed) for x, w, b in turn,
// then R (of the output's shape) from the same generator; the loss is sum(f(inputs) * R).
void check_only_requested_gradients(const std::string& what,
                                    const std::function<Tensor(const std::vector<Tensor>&)>& f,
                                    const Shape& xs, const Shape& ws, const Shape& bs,
                                    uint64_t seed);

// n random bytes (each the low byte of one Philox word of Generator(seed)).
std::vector<uint8_t> random_bytes(int64_t n, uint64_t seed);
// An H x W x C uint8 image of random_bytes.
inline std::vector<uint8_t> random_image(int64_t H, int64_t W, int64_t C, uint64_t seed) {
  return random_bytes(H * W * C, seed);
}

// ---- dataset files -----------------------------------------------------------------------------

// Writes <dir>/<prefix>-images-idx3-ubyte.gz and -labels-idx1-ubyte.gz (Fashion-MNIST's format):
// n images of 28x28 where class k in [0, 4) (sample i has class i % 4) is a bright 8x8 square
// in quadrant k, at a small random offset, on noise. A small model learns it in a few steps.
void write_quadrant_split(const std::string& dir, const std::string& prefix, int n, uint64_t seed);

}  // namespace cnx::test
