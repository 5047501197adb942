#include "tests/testing.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include <zlib.h>

#include "autograd/function.h"
#include "models/safetensors.h"

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

std::vector<float> normal_floats(int64_t n, uint64_t seed, double std) {
  Generator g(seed);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(std * g.normal());
  return v;
}

void expect_same_file_tensors(const std::string& a_path, const std::string& b_path) {
  const Safetensors a = read_safetensors(a_path), b = read_safetensors(b_path);
  ASSERT_EQ(a.tensors.size(), b.tensors.size()) << a_path << " vs " << b_path;
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    EXPECT_EQ(a.tensors[i].first, b.tensors[i].first);
    EXPECT_EQ(values(a.tensors[i].second), values(b.tensors[i].second)) << a.tensors[i].first;
  }
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

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
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

// ---- data ------------------------------------------------------------------------------------

std::vector<double> randv(int64_t n, Generator& gen, double std, double mean) {
  std::vector<double> v(static_cast<size_t>(n));
  for (double& x : v) x = static_cast<double>(static_cast<float>(mean + gen.normal() * std));
  return v;
}

Tensor make(const Shape& shape, const std::vector<double>& v, DType dtype) {
  return from_doubles(shape, v).to(dtype);  // to() of the same dtype is the tensor itself
}

Tensor leaf(const Shape& shape, Generator& gen, double std, double mean) {
  return from_doubles(shape, randv(shape.numel(), gen, std, mean)).set_requires_grad(true);
}

Tensor randn(const Shape& shape, uint64_t seed, DType dtype, double std) {
  Generator gen(seed);
  return Tensor::randn(shape, gen, dtype, Device::cpu(), 0.0, std);
}

Tensor leaf(const Shape& shape, uint64_t seed, double std) {
  Tensor t = randn(shape, seed, DType::f64, std);
  t.set_requires_grad(true);
  return t;
}

// ---- names in failure messages ---------------------------------------------------------------

std::string dname(DType d) { return dtype_name(d); }

std::string tag(const std::string& what, DType dt) { return what + " " + dtype_name(dt); }

std::string tag(const std::string& what, const Shape& s, DType dt) {
  return what + " " + dtype_name(dt) + s.str();
}

// ---- checks ----------------------------------------------------------------------------------

void expect_close_mag(const std::string& what, const std::vector<double>& got,
                      const std::vector<double>& want, const std::vector<double>& mag,
                      double tol) {
  ASSERT_EQ(got.size(), want.size()) << what << ": sizes differ";
  ASSERT_EQ(mag.size(), want.size()) << what << ": mag size";
  int64_t bad = 0;
  std::string report;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - want[i]);
    const double rel = err / std::max(mag[i], 1e-300);
    if (!(rel <= tol)) {
      if (bad < 8)
        report += "\n  [" + std::to_string(i) + "] got " + std::to_string(got[i]) + " want " +
                  std::to_string(want[i]) + " (|err| " + std::to_string(err) + ")";
      ++bad;
    }
    if (!(rel <= worst)) worst = rel;
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size()
                    << " values out of tolerance (" << tol << " x scale)" << report
                    << "\n  worst |error| / scale " << worst;
}

double fwd_tol(DType d) { return d == DType::f32 ? 1e-5 : 1e-12; }

void check_f32_backward_matches_f64(const std::string& what, const Op3& op, const Shape& xs,
                                    const Shape& ws, const Shape& bs, uint64_t seed,
                                    bool check_grad_shapes) {
  Generator gen(seed);
  const std::vector<double> x = randv(xs.numel(), gen), w = randv(ws.numel(), gen),
                            b = randv(bs.numel(), gen);
  std::vector<std::vector<double>> grads[2];
  std::vector<double> r;
  for (int i = 0; i < 2; ++i) {
    const DType dt = i == 0 ? DType::f64 : DType::f32;
    Tensor xt = make(xs, x, dt).set_requires_grad(true);
    Tensor wt = make(ws, w, dt).set_requires_grad(true);
    Tensor bt = make(bs, b, dt).set_requires_grad(true);
    Tensor y = op(xt, wt, bt);
    if (r.empty()) {
      Generator rg(seed + 1);
      r = randv(y.numel(), rg);
    }
    sum(mul(y, make(y.shape(), r, dt))).backward();
    for (const Tensor* t : {&xt, &wt, &bt}) {
      ASSERT_TRUE(t->grad().defined()) << what << " " << dname(dt) << ": no gradient";
      EXPECT_EQ(t->grad().dtype(), dt) << what;
      if (check_grad_shapes) {
        EXPECT_EQ(t->grad().shape(), t->shape()) << what;
      }
      grads[i].push_back(values(t->grad()));
    }
  }
  const char* names[] = {"dx", "dweight", "dbias"};
  for (int j = 0; j < 3; ++j) {
    double mx = 0;
    for (double g : grads[0][static_cast<size_t>(j)]) mx = std::max(mx, std::abs(g));
    expect_close(what + " f32 vs f64 " + names[j], grads[1][static_cast<size_t>(j)],
                 grads[0][static_cast<size_t>(j)], 1e-5 * mx, 1e-5);
  }
}

void check_only_requested_gradients(const std::string& what,
                                    const std::function<Tensor(const std::vector<Tensor>&)>& f,
                                    const Shape& xs, const Shape& ws, const Shape& bs,
                                    uint64_t seed) {
  Generator gen(seed);
  const std::vector<double> xv = randv(xs.numel(), gen), wv = randv(ws.numel(), gen),
                            bv = randv(bs.numel(), gen);
  std::vector<double> rv;
  auto run = [&](bool gx, bool gw, bool gb) {
    std::vector<Tensor> t = {from_doubles(xs, xv), from_doubles(ws, wv), from_doubles(bs, bv)};
    t[0].set_requires_grad(gx);
    t[1].set_requires_grad(gw);
    t[2].set_requires_grad(gb);
    Tensor y = f(t);
    if (rv.empty()) rv = randv(y.numel(), gen);
    EXPECT_EQ(y.requires_grad(), gx || gw || gb) << what;
    if (y.requires_grad()) sum(mul(y, from_doubles(y.shape(), rv))).backward();
    return t;
  };
  const std::vector<Tensor> all = run(true, true, true);
  for (int mask = 0; mask < 8; ++mask) {
    const bool req[3] = {(mask & 1) != 0, (mask & 2) != 0, (mask & 4) != 0};
    const std::vector<Tensor> t = run(req[0], req[1], req[2]);
    for (size_t i = 0; i < 3; ++i) {
      if (!req[i]) {
        EXPECT_FALSE(t[i].grad().defined())
            << what << " mask " << mask << ": input " << i << " got a .grad it did not ask for";
      } else {
        ASSERT_TRUE(t[i].grad().defined()) << what << " mask " << mask << " input " << i;
        expect_close(what + " mask " + std::to_string(mask) + " input " + std::to_string(i),
                     values(t[i].grad()), values(all[i].grad()), 0, 1e-15);
      }
    }
  }
}

std::vector<uint8_t> random_bytes(int64_t n, uint64_t seed) {
  Generator gen(seed);
  std::vector<uint8_t> b(static_cast<size_t>(n));
  for (uint8_t& v : b) v = static_cast<uint8_t>(gen.next_u32() & 0xff);
  return b;
}

// ---- dataset files -----------------------------------------------------------------------------

namespace {

void write_gz(const std::string& path, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  gzclose(f);
}

void be32(std::vector<uint8_t>& v, uint32_t x) {
  for (int s = 24; s >= 0; s -= 8) v.push_back(static_cast<uint8_t>(x >> s));
}

}  // namespace

void write_quadrant_split(const std::string& dir, const std::string& prefix, int n, uint64_t seed) {
  std::vector<uint8_t> images, labels;
  be32(images, 0x803); be32(images, n); be32(images, 28); be32(images, 28);
  be32(labels, 0x801); be32(labels, n);
  Generator g(seed);
  for (int i = 0; i < n; ++i) {
    const int k = i % 4;
    labels.push_back(static_cast<uint8_t>(k));
    const int y0 = 3 + (k / 2) * 14 + static_cast<int>(g.uniform() * 3);
    const int x0 = 3 + (k % 2) * 14 + static_cast<int>(g.uniform() * 3);
    for (int y = 0; y < 28; ++y)
      for (int x = 0; x < 28; ++x) {
        const bool on = y >= y0 && y < y0 + 8 && x >= x0 && x < x0 + 8;
        images.push_back(static_cast<uint8_t>(on ? 200 + g.uniform() * 55 : g.uniform() * 60));
      }
  }
  write_gz(dir + "/" + prefix + "-images-idx3-ubyte.gz", images);
  write_gz(dir + "/" + prefix + "-labels-idx1-ubyte.gz", labels);
}

}  // namespace cnx::test
