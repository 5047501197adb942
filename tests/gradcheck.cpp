#include "tests/gradcheck.h"

#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

#include "autograd/function.h"

namespace cnx::test {

void expect_close(const std::string& what, const std::vector<double>& got,
                  const std::vector<double>& want, double atol, double rtol) {
  ASSERT_EQ(got.size(), want.size()) << what << ": sizes differ";
  std::ostringstream report;
  int64_t bad = 0, worst_i = -1;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - want[i]);
    const bool ok = err <= atol + rtol * std::abs(want[i]) && !std::isnan(got[i]);
    if (!ok) {
      if (bad < 8) report << "\n  [" << i << "] got " << got[i] << " want " << want[i];
      ++bad;
    }
    if (err > worst || std::isnan(err)) { worst = err; worst_i = static_cast<int64_t>(i); }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size()
                    << " values out of tolerance (atol " << atol << ", rtol " << rtol << ")"
                    << report.str() << "\n  worst |error| " << worst << " at [" << worst_i << "]";
}

std::vector<double> values(const Tensor& t) { return t.to(Device::cpu()).to(DType::f64).to_vector<double>(); }

Tensor from_doubles(const Shape& shape, const std::vector<double>& v) {
  return Tensor::from_data<double>(shape, v);
}

namespace {
// L = sum(f(inputs) * R), evaluated without recording.
double projected_loss(const std::function<Tensor(const std::vector<Tensor>&)>& f,
                      const std::vector<Tensor>& inputs, const std::vector<double>& R) {
  NoGradGuard no_grad;
  const std::vector<double> y = values(f(inputs));
  double L = 0;
  for (size_t i = 0; i < y.size(); ++i) L += y[i] * R[i];
  return L;
}
}  // namespace

void expect_gradients_match(const std::string& what,
                            const std::function<Tensor(const std::vector<Tensor>&)>& f,
                            const std::vector<Tensor>& inputs, const GradcheckOptions& opt) {
  for (const Tensor& x : inputs)
    ASSERT_TRUE(!x.defined() || x.dtype() == DType::f64) << what << ": gradcheck needs f64 inputs";
  std::vector<Tensor> xs = inputs;
  for (Tensor& x : xs)
    if (x.defined()) x.set_grad({});

  // Analytic: backward of sum(y * R).
  Tensor y = f(xs);
  Generator gen(opt.seed);
  const Tensor R = Tensor::randn(y.shape(), gen, DType::f64);
  const std::vector<double> r = R.to_vector<double>();
  Tensor L = sum(mul(y, R));
  L.backward();

  // Numeric: central differences, one element at a time.
  for (size_t i = 0; i < xs.size(); ++i) {
    Tensor& x = xs[i];
    if (!x.defined() || !x.requires_grad()) continue;
    ASSERT_TRUE(x.grad().defined()) << what << ": input " << i << " got no gradient";
    const std::vector<double> analytic = values(x.grad());
    std::vector<double> numeric(static_cast<size_t>(x.numel()));
    double* p = x.data<double>();
    for (int64_t j = 0; j < x.numel(); ++j) {
      const double saved = p[j];
      p[j] = saved + opt.eps;
      const double up = projected_loss(f, xs, r);
      p[j] = saved - opt.eps;
      const double down = projected_loss(f, xs, r);
      p[j] = saved;
      numeric[static_cast<size_t>(j)] = (up - down) / (2 * opt.eps);
    }
    expect_close(what + ": d/d(input " + std::to_string(i) + ")", analytic, numeric, opt.atol,
                 opt.rtol);
    x.set_grad({});
  }
}

void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& part : parts)
      EXPECT_NE(msg.find(part), std::string::npos)
          << "error message lacks '" << part << "': " << msg;
    return;
  }
  ADD_FAILURE() << "expected a cnx::Error mentioning '" << (parts.empty() ? "" : parts[0]) << "'";
}

}  // namespace cnx::test
