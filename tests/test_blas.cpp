// The fast f32 CPU path of linear (OpenBLAS: kernels/cpu/linear_blas.cpp, the cnx::blas section
// of kernels/linear.h) against the reference loops (cnx::cpu), through autograd's linear:
// - the same results within f32 rounding, over many shapes (every M, K, N in {0, 1, 3, 7, 64,
//   130, 385}, 0 and 1 included), with and without bias, x of rank 2 and 4, and every subset of
//   requested gradients (only those are computed, and each equals the one computed with all);
// - bitwise the same results with 1, 2 and 5 OpenMP threads and from run to run;
// - blas::set_cpu_reference / ScopedCpuReference and CNX_CPU_REFERENCE=1 really give the loops.
// In a build without OpenBLAS every test skips, saying so.
#include <gtest/gtest.h>
#include <omp.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "kernels/linear.h"
#include "tests/testing.h"

using namespace cnx;
using namespace cnx::test;

#define SKIP_WITHOUT_BLAS() \
  if (!blas::available()) GTEST_SKIP() << blas::describe()

namespace {

// ---- running linear through autograd ---------------------------------------------------------

// x (..., K), w (N, K), b (N) or undefined, r of the output's shape: the weights of the loss.
struct Inputs {
  Tensor x, w, b, r;
};

// M rows of x as a rank-2 (M, K) or a rank-4 (a, b, c, K) shape with a*b*c = M.
Shape x_shape(int64_t M, int64_t K, int rank) {
  if (rank == 2) return Shape{M, K};
  switch (M) {
    case 0: return Shape{2, 0, 3, K};
    case 64: return Shape{2, 4, 8, K};
    case 130: return Shape{2, 5, 13, K};
    case 385: return Shape{5, 7, 11, K};
    default: return Shape{1, M, 1, K};  // 1, 3, 7: prime
  }
}

Inputs make_inputs(const Shape& xs, int64_t N, bool with_bias, uint64_t seed) {
  const int64_t K = xs[-1];
  Inputs in;
  in.x = randn(xs, seed, DType::f32);
  in.w = randn({N, K}, seed + 1, DType::f32, 0.5);
  if (with_bias) in.b = randn({N}, seed + 2, DType::f32);
  std::vector<int64_t> ys = xs.vec();
  ys.back() = N;
  in.r = randn(Shape(ys), seed + 3, DType::f32);
  return in;
}

// The output and the gradients of L = sum(linear(x, w, b) * r) (so dout = r); a gradient is
// computed only for the inputs whose bit is set in `wanted` (1: x, 2: w, 4: b) and is empty
// (with its `has_` false) for the others.
struct Result {
  std::vector<float> y, dx, dw, db;
  bool has_dx = false, has_dw = false, has_db = false;
};

Result run_linear(const Inputs& in, unsigned wanted = 7) {
  Tensor x = in.x.clone().set_requires_grad((wanted & 1) != 0);
  Tensor w = in.w.clone().set_requires_grad((wanted & 2) != 0);
  Tensor b = in.b.defined() ? in.b.clone().set_requires_grad((wanted & 4) != 0) : Tensor();
  Tensor y = linear(x, w, b);
  Result res;
  res.y = y.to_vector<float>();
  if (y.requires_grad()) sum(mul(y, in.r)).backward();
  auto take = [](const Tensor& t, std::vector<float>& v, bool& has) {
    has = t.defined() && t.grad().defined();
    if (has) v = t.grad().to_vector<float>();
  };
  take(x, res.dx, res.has_dx);
  take(w, res.dw, res.has_dw);
  take(b, res.db, res.has_db);
  return res;
}

std::vector<double> as_doubles(const std::vector<float>& v) { return {v.begin(), v.end()}; }

std::vector<double> abs_values(const Tensor& t) {
  std::vector<double> v = values(t);
  for (double& e : v) e = std::abs(e);
  return v;
}

// Rows of x when K may be 0 (then x.numel() says nothing).
int64_t rows_of(const Shape& xs) {
  int64_t M = 1;
  for (int i = 0; i + 1 < xs.rank(); ++i) M *= xs[i];
  return M;
}

// The scale of the rounding error of every result (expect_close_mag): the sum of the absolute
// values of its terms, computed as the same products of the inputs' absolute values, in double.
struct Mags {
  std::vector<double> y, dx, dw, db;
};

Mags mags(const Inputs& in) {
  const int64_t K = in.x.dim(-1), N = in.w.dim(0), M = rows_of(in.x.shape());
  const std::vector<double> x = abs_values(in.x), w = abs_values(in.w), r = abs_values(in.r);
  const std::vector<double> b = in.b.defined() ? abs_values(in.b) : std::vector<double>{};
  Mags m;
  m.y.resize(static_cast<size_t>(M * N));
  m.dx.resize(static_cast<size_t>(M * K));
  m.dw.resize(static_cast<size_t>(N * K));
  m.db.resize(static_cast<size_t>(N));
  cpu::linear_forward<double>(m.y.data(), x.data(), w.data(), b.empty() ? nullptr : b.data(), M,
                              K, N);
  cpu::linear_backward<double>(m.dx.data(), m.dw.data(), m.db.data(), r.data(), x.data(),
                               w.data(), M, K, N);
  return m;
}

// Every TEST here sets what it needs and puts the switch back as it found it.
struct Path {
  explicit Path(bool reference) : guard(reference) {}
  blas::ScopedCpuReference guard;
};

}  // namespace

// =============================================================================================
// BLAS path vs the reference loops
// =============================================================================================

// Tolerance: fwd_tol(f32) = 1e-5 of the sum of |terms| (tests/testing.h). Both paths round
// each of at most 385 products and sums to f32 in different orders; the loops' SIMD reduction
// and OpenBLAS's register blocking both keep the chains far shorter than 385, and the error of
// random-signed terms grows like the square root of the chain. dbias: the loops sum in f32, the
// BLAS path in double.
TEST(Blas, MatchesReferenceLoopsOverShapesBiasRanksAndRequestedGradients) {
  SKIP_WITHOUT_BLAS();
  const double tol = fwd_tol(DType::f32);
  const std::array<int64_t, 7> sizes = {0, 1, 3, 7, 64, 130, 385};
  uint64_t seed = 100;
  int cases = 0;
  for (int64_t M : sizes)
    for (int64_t K : sizes)
      for (int64_t N : sizes)
        for (bool with_bias : {false, true}) {
          // Each (M, K, N) with both ranks of x: rank 4 with the bias, rank 2 without.
          const Shape xs = x_shape(M, K, with_bias ? 4 : 2);
          ASSERT_EQ(rows_of(xs), M);
          const Inputs in = make_inputs(xs, N, with_bias, seed += 4);
          const std::string what = "linear f32 x" + xs.str() + " N " + std::to_string(N) +
                                   (with_bias ? " bias" : " no bias");
          Result ref;
          {
            Path loops(true);
            ref = run_linear(in);
          }
          const Mags mag = mags(in);
          Path fast(false);
          const Result all = run_linear(in);
          expect_close_mag(what + " out", as_doubles(all.y), as_doubles(ref.y), mag.y, tol);
          ASSERT_TRUE(all.has_dx && all.has_dw && (all.has_db == with_bias)) << what;
          expect_close_mag(what + " dx", as_doubles(all.dx), as_doubles(ref.dx), mag.dx, tol);
          expect_close_mag(what + " dw", as_doubles(all.dw), as_doubles(ref.dw), mag.dw, tol);
          if (with_bias) {
            expect_close_mag(what + " db", as_doubles(all.db), as_doubles(ref.db), mag.db, tol);
          }
          // Every other subset of requested gradients: exactly those, bitwise equal to the ones
          // computed with all (each gradient is its own product), the output unchanged.
          for (unsigned wanted = 0; wanted < 7; ++wanted) {
            const std::string sub = what + " wanted " + std::to_string(wanted);
            const Result r = run_linear(in, wanted);
            EXPECT_EQ(r.y, all.y) << sub;
            EXPECT_EQ(r.has_dx, (wanted & 1) != 0) << sub;
            EXPECT_EQ(r.has_dw, (wanted & 2) != 0) << sub;
            EXPECT_EQ(r.has_db, with_bias && (wanted & 4) != 0) << sub;
            if (r.has_dx) {
              EXPECT_EQ(r.dx, all.dx) << sub;
            }
            if (r.has_dw) {
              EXPECT_EQ(r.dw, all.dw) << sub;
            }
            if (r.has_db) {
              EXPECT_EQ(r.db, all.db) << sub;
            }
          }
          if (::testing::Test::HasFailure()) return;  // one failing shape is report enough
          ++cases;
        }
  EXPECT_EQ(cases, 7 * 7 * 7 * 2);
}

// Shapes of the training at their real size: a pointwise conv of a block (C -> 4C, 4C -> C)
// over 2 x 28 x 28 pixels, and a head; many tiles, several dbias blocks.
TEST(Blas, MatchesReferenceLoopsOnConvNeXtShapes) {
  SKIP_WITHOUT_BLAS();
  struct Case {
    Shape xs;
    int64_t N;
  };
  const Case cases[] = {{{2, 28, 28, 32}, 128}, {{2, 28, 28, 128}, 32}, {{2, 7, 7, 256}, 1024},
                        {{64, 256}, 10}};
  uint64_t seed = 7;
  for (const Case& c : cases) {
    const Inputs in = make_inputs(c.xs, c.N, true, seed += 4);
    const std::string what = "linear f32 x" + c.xs.str() + " N " + std::to_string(c.N);
    Result ref;
    {
      Path loops(true);
      ref = run_linear(in);
    }
    Path fast(false);
    const Result got = run_linear(in);
    const Mags mag = mags(in);
    // Up to 1568 terms (dweight and dbias sum over the rows): the error of such a sum, like
    // that of the 1024-term ones, stays well within 1e-5 of sum|terms| for random signs.
    expect_close_mag(what + " out", as_doubles(got.y), as_doubles(ref.y), mag.y, 1e-5);
    expect_close_mag(what + " dx", as_doubles(got.dx), as_doubles(ref.dx), mag.dx, 1e-5);
    expect_close_mag(what + " dw", as_doubles(got.dw), as_doubles(ref.dw), mag.dw, 1e-5);
    expect_close_mag(what + " db", as_doubles(got.db), as_doubles(ref.db), mag.db, 1e-5);
  }
}

// =============================================================================================
// Determinism
// =============================================================================================

TEST(Blas, SameBitsWithOneTwoAndFiveThreadsAndFromRunToRun) {
  SKIP_WITHOUT_BLAS();
  Path fast(false);
  const int saved = omp_get_max_threads();
  // 2100 rows: three blocks of dbias partial sums; products big enough for many tiles.
  for (const auto& [xs, N] : {std::pair<Shape, int64_t>{{3, 700, 96}, 384},
                              std::pair<Shape, int64_t>{{2100, 384}, 96},
                              std::pair<Shape, int64_t>{{7, 300, 130}, 385}}) {
    const Inputs in = make_inputs(xs, N, true, 42);
    const std::string what = "linear f32 x" + xs.str() + " N " + std::to_string(N);
    omp_set_num_threads(1);
    const Result one = run_linear(in);
    const Result again = run_linear(in);
    omp_set_num_threads(2);
    const Result two = run_linear(in);
    omp_set_num_threads(5);
    const Result five = run_linear(in);
    omp_set_num_threads(saved);
    for (const Result* r : {&again, &two, &five}) {
      const std::string run = r == &again ? " (1 thread, again)"
                              : r == &two ? " (2 threads)"
                                          : " (5 threads)";
      EXPECT_EQ(r->y, one.y) << what << run << ": out";
      EXPECT_EQ(r->dx, one.dx) << what << run << ": dx";
      EXPECT_EQ(r->dw, one.dw) << what << run << ": dw";
      EXPECT_EQ(r->db, one.db) << what << run << ": db";
    }
  }
  EXPECT_EQ(omp_get_max_threads(), saved);  // the BLAS set-up leaves the thread count alone
}

// =============================================================================================
// The switch
// =============================================================================================

// linear's output and gradients against direct calls of the cnx::cpu and cnx::blas kernels.
void expect_path(const Inputs& in, bool reference, const std::string& what) {
  const int64_t K = in.x.dim(-1), N = in.w.dim(0), M = in.x.numel() / K;
  std::vector<float> y(static_cast<size_t>(M * N)), dx(static_cast<size_t>(M * K)),
      dw(static_cast<size_t>(N * K)), db(static_cast<size_t>(N));
  const float *x = in.x.data<float>(), *w = in.w.data<float>(), *b = in.b.data<float>(),
              *r = in.r.data<float>();
  if (reference) {
    cpu::linear_forward<float>(y.data(), x, w, b, M, K, N);
    cpu::linear_backward<float>(dx.data(), dw.data(), db.data(), r, x, w, M, K, N);
  } else {
    blas::linear_forward(y.data(), x, w, b, M, K, N);
    blas::linear_backward(dx.data(), dw.data(), db.data(), r, x, w, M, K, N);
  }
  const Result got = run_linear(in);
  EXPECT_EQ(got.y, y) << what << ": out";
  EXPECT_EQ(got.dx, dx) << what << ": dx";
  EXPECT_EQ(got.dw, dw) << what << ": dw";
  EXPECT_EQ(got.db, db) << what << ": db";
}

TEST(Blas, SwitchForcesTheReferenceLoops) {
  SKIP_WITHOUT_BLAS();
  const bool initially = blas::cpu_reference();
  const Inputs in = make_inputs({2, 130, 385}, 64, true, 5);
  {
    blas::ScopedCpuReference loops(true);
    EXPECT_TRUE(blas::cpu_reference());
    EXPECT_FALSE(blas::enabled());
    expect_path(in, true, "set_cpu_reference(true)");
    {
      blas::ScopedCpuReference fast(false);
      EXPECT_TRUE(blas::enabled());
      expect_path(in, false, "set_cpu_reference(false)");
    }
    EXPECT_TRUE(blas::cpu_reference()) << "ScopedCpuReference must restore the setting";
  }
  EXPECT_EQ(blas::cpu_reference(), initially) << "ScopedCpuReference must restore the setting";

  // The two paths really differ (other summation orders): some of 8320 outputs of 385-term
  // dot products differ in their last bits, or the switch would prove nothing.
  Result loops, fast;
  {
    Path p(true);
    loops = run_linear(in);
  }
  {
    Path p(false);
    fast = run_linear(in);
  }
  EXPECT_NE(loops.y, fast.y);
  EXPECT_NE(loops.dw, fast.dw);
}

// In a child process (see the next test): the flag follows CNX_CPU_REFERENCE and linear takes
// the path it says. Run directly, it checks the environment this binary was started with.
TEST(Blas, FlagFollowsEnvironment) {
  SKIP_WITHOUT_BLAS();
  const char* env = std::getenv("CNX_CPU_REFERENCE");
  const bool want = env != nullptr && *env != '\0' && std::string(env) != "0";
  EXPECT_EQ(blas::cpu_reference(), want) << "CNX_CPU_REFERENCE=" << (env ? env : "(unset)");
  expect_path(make_inputs({3, 5, 130}, 77, true, 9), want,
              std::string("CNX_CPU_REFERENCE=") + (env ? env : "(unset)"));
}

TEST(Blas, EnvironmentVariableForcesTheReferenceLoops) {
  SKIP_WITHOUT_BLAS();
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  for (const char* value : {"1", "0", ""}) {
    const std::string cmd = std::string("env CNX_CPU_REFERENCE='") + value + "' '" + self +
                            "' --gtest_filter=Blas.FlagFollowsEnvironment 2>&1";
    FILE* pipe = popen(cmd.c_str(), "r");
    ASSERT_NE(pipe, nullptr) << cmd;
    std::string output;
    std::array<char, 4096> buf{};
    while (fgets(buf.data(), static_cast<int>(buf.size()), pipe)) output += buf.data();
    const int status = pclose(pipe);
    EXPECT_EQ(status, 0) << cmd << "\n" << output;
    EXPECT_NE(output.find("[  PASSED  ] 1 test"), std::string::npos) << cmd << "\n" << output;
  }
}

TEST(Blas, DescribesTheLibrary) {
  SKIP_WITHOUT_BLAS();
  EXPECT_NE(blas::describe().find("OpenBLAS"), std::string::npos) << blas::describe();
  std::printf("BLAS: %s\n", blas::describe().c_str());
}
