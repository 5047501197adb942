// Fast CPU path: the f32 linear layer through OpenBLAS's cblas_sgemm (see the cnx::blas section
// of kernels/linear.h). The loops in linear.cpp stay the reference that the tests compare with.
//
//   forward   out (M, N)     = in (M, K)      weight^T (K, N)   + bias    reduction over K
//   din       din (M, K)     = dout (M, N)    weight (N, K)                reduction over N
//   dweight   dweight (N, K) = dout^T (N, M)  in (M, K)                    reduction over M
//   dbias     dbias (N)      = sum over m of dout[m, :]                    reduction over M
//
// Determinism: bitwise the same results run to run and for any number of OpenMP threads.
// - OpenBLAS itself runs single-threaded (set once): its own threads would split a product in a
//   way that depends on how many there are.
// - Each product's output is cut into tiles whose sizes depend only on (rows, cols, depth),
//   never on the thread count; each tile is one sgemm over the whole reduction dimension. The
//   OpenMP threads share out the tiles, but whichever thread computes a tile makes the same call
//   with the same arguments on the same data, and so writes the same bits.
// - dbias: partial column sums over fixed blocks of rows, in double, then the blocks' partials
//   added in block order.
// Bitwise equality with the loops is not a goal: the summation order differs (tests compare
// them within f32 rounding, tests/test_blas.cpp).
// bf16 (mixed precision): the same f32 products on widened operands, rounded once (at the end).
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <initializer_list>
#include <string_view>
#include <vector>

#include "kernels/cpu/bf16_emulation.h"
#include "kernels/linear.h"

#if CNX_HAVE_BLAS
#include <cblas.h>
#include <omp.h>

#include <mutex>
#endif

namespace cnx::blas {

// ================================ the switch ================================
namespace {

bool reference_from_environment() {
  const char* v = std::getenv("CNX_CPU_REFERENCE");
  return v != nullptr && *v != '\0' && std::string_view(v) != "0";
}

std::atomic<bool>& reference_flag() {
  static std::atomic<bool> flag{reference_from_environment()};  // read once, at the first use
  return flag;
}

}  // namespace

bool cpu_reference() { return reference_flag().load(std::memory_order_relaxed); }
void set_cpu_reference(bool on) { reference_flag().store(on, std::memory_order_relaxed); }
bool enabled() { return available() && !cpu_reference(); }

#if !CNX_HAVE_BLAS
// ================================ no BLAS in this build ================================
bool available() { return false; }
std::string describe() {
  return "no BLAS in this build (OpenBLAS not found, or CNX_ENABLE_BLAS=OFF): f32 takes the "
         "reference loops";
}
void linear_forward(float* out, const float* in, const float* weight, const float* bias,
                    int64_t M, int64_t K, int64_t N) {
  cpu::linear_forward<float>(out, in, weight, bias, M, K, N);
}
void linear_backward(float* din, float* dweight, float* dbias, const float* dout,
                     const float* in, const float* weight, int64_t M, int64_t K, int64_t N) {
  cpu::linear_backward<float>(din, dweight, dbias, dout, in, weight, M, K, N);
}

#else
// ================================ OpenBLAS ================================
bool available() { return true; }

std::string describe() {
  std::string s = openblas_get_config();
  return s + " (" + openblas_get_corename() + ")";
}

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Once per process, before the first product. Called outside any parallel region.
void make_openblas_single_threaded() {
  static std::once_flag once;
  std::call_once(once, [] {
    // OpenBLAS built for OpenMP (Debian's libopenblas0-openmp) implements this with
    // omp_set_num_threads, which would also shrink every later parallel region of ours to one
    // thread: put the caller's setting back.
    const int omp_threads = omp_get_max_threads();
    openblas_set_num_threads(1);
    omp_set_num_threads(omp_threads);
  });
}

// cblas takes int sizes (Debian's OpenBLAS has 32-bit integers).
bool fits_int(std::initializer_list<int64_t> sizes) {
  return std::all_of(sizes.begin(), sizes.end(), [](int64_t v) { return v <= INT_MAX; });
}

// C (rows, cols), leading dimension ldc, = op(A) (rows, depth) op(B) (depth, cols), row-major.
// op(A) = A (rows, depth) for NoTrans, A^T with A stored (depth, rows) for Trans; likewise B.
struct Gemm {
  CBLAS_TRANSPOSE ta;
  const float* a;
  int64_t lda;
  CBLAS_TRANSPOSE tb;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  int64_t rows, cols, depth;
};

struct Tile {
  int64_t rows, cols;
};

// The tile size for a product: a function of its sizes only, so that every thread count cuts
// it the same way. Starting from the whole output, halve the longer side while there are fewer
// than kTargetTiles tiles, the side is at least 2 * kMinSide, and the halves keep at least
// kMinWork multiply-adds: enough tiles to keep a few cores busy, each big enough that the
// sgemm call's fixed cost (packing, the call) stays small. Tuned on 2 cores (8 tiles of at
// least 64 rows/columns beat 16 and 64 tiles, and 32-wide tiles, by up to 30% on the ConvNeXt
// shapes); more tiles would feed more cores. Changing these may change the last bits of the
// results, never their independence from the thread count.
Tile tile_for(int64_t rows, int64_t cols, int64_t depth) {
  constexpr int64_t kTargetTiles = 8, kMinSide = 64, kMinWork = int64_t{1} << 20;
  Tile t{rows, cols};
  while (ceil_div(rows, t.rows) * ceil_div(cols, t.cols) < kTargetTiles) {
    int64_t& side = t.rows >= t.cols ? t.rows : t.cols;
    const int64_t other = t.rows >= t.cols ? t.cols : t.rows;
    const int64_t half = ceil_div(ceil_div(side, 2), 16) * 16;  // a multiple of 16 floats
    if (side < 2 * kMinSide || half >= side || half * other * depth < kMinWork) break;
    side = half;
  }
  return t;
}

// Runs g tile by tile over the OpenMP threads; after each tile's sgemm, epilogue(r0, c0, tr, tc)
// may finish that tile while it is in cache. rows, cols, depth >= 1.
template <class Epilogue>
void run_tiled(const Gemm& g, Epilogue&& epilogue) {
  const Tile t = tile_for(g.rows, g.cols, g.depth);
  const int64_t n_rows = ceil_div(g.rows, t.rows), n_cols = ceil_div(g.cols, t.cols);
  const int64_t tiles = n_rows * n_cols;
#pragma omp parallel for schedule(dynamic, 1) if (tiles > 1)
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t r0 = (i / n_cols) * t.rows, c0 = (i % n_cols) * t.cols;
    const int64_t tr = std::min(t.rows, g.rows - r0), tc = std::min(t.cols, g.cols - c0);
    const float* a = g.ta == CblasNoTrans ? g.a + r0 * g.lda : g.a + r0;
    const float* b = g.tb == CblasNoTrans ? g.b + c0 : g.b + c0 * g.ldb;
    cblas_sgemm(CblasRowMajor, g.ta, g.tb, static_cast<int>(tr), static_cast<int>(tc),
                static_cast<int>(g.depth), 1.0f, a, static_cast<int>(g.lda), b,
                static_cast<int>(g.ldb), 0.0f, g.c + r0 * g.ldc + c0, static_cast<int>(g.ldc));
    epilogue(r0, c0, tr, tc);
  }
}

void run_tiled(const Gemm& g) {
  run_tiled(g, [](int64_t, int64_t, int64_t, int64_t) {});
}

void fill_zero(float* p, int64_t n) { std::fill(p, p + n, 0.0f); }

// dbias[n] = sum_m dout[m, n]: partial sums in double over fixed blocks of kRows rows (one
// thread each, rows in order), then the blocks in order.
void column_sums(float* dbias, const float* dout, int64_t M, int64_t N) {
  constexpr int64_t kRows = 1024;
  const int64_t blocks = ceil_div(M, kRows);
  std::vector<double> partial(static_cast<size_t>(blocks * N), 0.0);
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    double* acc = partial.data() + blk * N;
    const int64_t m1 = std::min(M, (blk + 1) * kRows);
    for (int64_t m = blk * kRows; m < m1; ++m) {
      const float* row = dout + m * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) acc[n] += row[n];
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    double acc = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) acc += partial[static_cast<size_t>(blk * N + n)];
    dbias[n] = static_cast<float>(acc);
  }
}

}  // namespace

// ================================ forward ================================
void linear_forward(float* out, const float* in, const float* weight, const float* bias,
                    int64_t M, int64_t K, int64_t N) {
  if (!fits_int({M, K, N})) return cpu::linear_forward<float>(out, in, weight, bias, M, K, N);
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: out = bias (cblas rejects a zero leading dimension)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) out[m * N + n] = bias ? bias[n] : 0.0f;
    return;
  }
  make_openblas_single_threaded();
  const Gemm g{CblasNoTrans, in, K, CblasTrans, weight, K, out, N, M, N, K};
  if (!bias) return run_tiled(g);
  // The bias is added after the product, as the loops do, while the tile is in cache.
  run_tiled(g, [&](int64_t r0, int64_t c0, int64_t tr, int64_t tc) {
    for (int64_t m = r0; m < r0 + tr; ++m) {
      float* o = out + m * N + c0;
      const float* b = bias + c0;
#pragma omp simd
      for (int64_t n = 0; n < tc; ++n) o[n] += b[n];
    }
  });
}

// ================================ backward ================================
void linear_backward(float* din, float* dweight, float* dbias, const float* dout,
                     const float* in, const float* weight, int64_t M, int64_t K, int64_t N) {
  if (!fits_int({M, K, N}))
    return cpu::linear_backward<float>(din, dweight, dbias, dout, in, weight, M, K, N);
  make_openblas_single_threaded();
  if (din && M > 0 && K > 0) {  // din (M, K) = dout (M, N) weight (N, K)
    if (N == 0) fill_zero(din, M * K);
    else run_tiled(Gemm{CblasNoTrans, dout, N, CblasNoTrans, weight, K, din, K, M, K, N});
  }
  if (dweight && N > 0 && K > 0) {  // dweight (N, K) = dout^T (N, M) in (M, K)
    if (M == 0) fill_zero(dweight, N * K);
    else run_tiled(Gemm{CblasTrans, dout, N, CblasNoTrans, in, K, dweight, K, N, K, M});
  }
  if (dbias && N > 0) column_sums(dbias, dout, M, N);
}

#endif  // CNX_HAVE_BLAS

// ================================ bf16 ================================
// The f32 products above between a widening of the bf16 operands (and a rounding of the fp32
// bias to bf16) and one rounding of the bf16 results (kernels/cpu/bf16_emulation.h), as
// cpu::linear_forward<bf16> does around the loops.
void linear_forward(bf16* out, const bf16* in, const bf16* weight, const float* bias, int64_t M,
                    int64_t K, int64_t N) {
  const cpu::Widened x(in, M * K), w(weight, N * K);
  const cpu::RoundedToBf16 b(bias, N);
  cpu::Narrowed y(out, M * N);
  linear_forward(y.data(), x.data(), w.data(), b.data(), M, K, N);
  y.store();
}

void linear_backward(bf16* din, float* dweight, float* dbias, const bf16* dout, const bf16* in,
                     const bf16* weight, int64_t M, int64_t K, int64_t N) {
  const cpu::Widened dy(dout, M * N), x(dweight ? in : nullptr, M * K),
      w(din ? weight : nullptr, N * K);
  cpu::Narrowed dx(din, M * K);
  linear_backward(dx.data(), dweight, dbias, dy.data(), x.data(), w.data(), M, K, N);
  dx.store();
}

}  // namespace cnx::blas
