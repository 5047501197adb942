// The CUDA relu and max_pool2d (kernels/cuda/relu.cu, kernels/cuda/maxpool.cu) against the CPU
// references (kernels/cpu/relu.cpp, kernels/cpu/maxpool.cpp), f32 and bf16.
//
// Neither op rounds anything but max pooling's gradient sums, which both devices add in the same
// order (kernels/maxpool.h), so every result must be BITWISE the CPU's: outputs (NaN payloads
// included), argmax indices, gradients. Inputs mix normal values, ties (small integers: many
// equal maxima per window, so the first-maximum rule matters) and specials (0, -0, +-inf, NaN).
// Device buffers (DevBuf) start as a NaN sentinel (an output never written fails the
// comparison), carry sentinel guards after the data and, with an offset, before it (an
// out-of-bounds write changes a guard); an offset of one element also moves the data off 16-byte
// alignment, so the vector paths must fall back to the scalar ones. Shapes: a sweep of small odd
// sizes over every kernel 1..3, stride 1..3 and legal padding, C from 1 to 64 (both vector
// widths and the scalar path), ResNet's stem pool (2 x 112 x 112 x 64, k 3 s 2 p 1) and a shape
// whose grid-stride loops take several turns; relu over lengths around the 4- and 8-element
// packs and one long enough to loop. Also: in-place relu, a null argmax (inference), run-to-run
// determinism of the gather, empty sizes.
//
// Launches go to stream nullptr between two cudaDeviceSynchronize calls (device_sync), as in
// tests/test_cuda_dwconv.cpp. Every test skips, saying why, when the library was built without
// CUDA or no device is visible; this file compiles either way.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "autograd/function.h"
#include "autograd/ops.h"
#include "kernels/maxpool.h"
#include "kernels/relu.h"
#include "tensor/device.h"
#include "tensor/tensor.h"
#include "tests/testing.h"

#include "tests/cuda_testing.h"

#if CNX_TEST_CUDA
namespace {

using namespace cnx;

const Device kDev = Device::cuda(0);
constexpr int64_t kGuard = 8;  // sentinel elements after every device buffer

void device_sync() { CNX_CUDA_CHECK(cudaDeviceSynchronize()); }

// Returns the caching allocator's blocks to the device at the end of a test with large buffers:
// the emulated device opens all allocated memory for every piece of queued work, so a large
// cached pool would slow every later test of the same process (ctest runs each alone anyway).
struct ReleaseCacheAtEnd {
  ~ReleaseCacheAtEnd() {
    device_sync();
    cuda::empty_cache(kDev);
  }
};

// ---- element types -----------------------------------------------------------------------------
// The raw bits of an element, for bitwise comparisons and readable failure messages.
uint32_t bits_of(float v) { return std::bit_cast<uint32_t>(v); }
uint32_t bits_of(bf16 v) { return v.bits; }
uint32_t bits_of(int32_t v) { return static_cast<uint32_t>(v); }
double value_of(float v) { return v; }
double value_of(bf16 v) { return static_cast<float>(v); }
double value_of(int32_t v) { return v; }

// Sentinels: a NaN with a payload no kernel produces, and an impossible argmax.
template <class T> T sentinel();
template <> float sentinel<float>() { return std::bit_cast<float>(0x7fc0deadu); }
template <> bf16 sentinel<bf16>() {
  bf16 b;
  b.bits = 0x7fd5;
  return b;
}
template <> int32_t sentinel<int32_t>() { return -777; }

const char* type_name(float) { return "f32"; }
const char* type_name(bf16) { return "bf16"; }

// ---- device buffers with guards ----------------------------------------------------------------
template <class T> class DevBuf {
 public:
  explicit DevBuf(const std::vector<T>& v, int64_t offset = 0)
      : off_(offset), n_(static_cast<int64_t>(v.size())) {
    std::vector<T> h(static_cast<size_t>(off_ + n_ + kGuard), sentinel<T>());
    std::copy(v.begin(), v.end(), h.begin() + off_);
    t_ = Tensor::from_data<T>(Shape{off_ + n_ + kGuard}, h, kDev);
    device_sync();  // the upload runs on the library's stream; the kernels on the legacy one
  }
  static DevBuf out(int64_t n, int64_t offset = 0) {
    return DevBuf(std::vector<T>(static_cast<size_t>(n), sentinel<T>()), offset);
  }
  T* p() { return t_.data<T>() + off_; }
  std::vector<T> all() const { return t_.to(Device::cpu()).template to_vector<T>(); }
  // The n data elements, after EXPECTing the guards before and after them intact (one copy
  // back from the device for both).
  std::vector<T> checked(const std::string& what) const {
    const std::vector<T> a = all();
    int64_t changed = 0;
    for (int64_t i = 0; i < off_; ++i) changed += bits_of(a[i]) != bits_of(sentinel<T>());
    for (int64_t i = off_ + n_; i < off_ + n_ + kGuard; ++i)
      changed += bits_of(a[i]) != bits_of(sentinel<T>());
    EXPECT_EQ(changed, 0) << what << ": " << changed << " guard elements were written";
    return std::vector<T>(a.begin() + off_, a.begin() + off_ + n_);
  }

 private:
  int64_t off_ = 0, n_ = 0;
  Tensor t_;
};

// EXPECTs got and want bitwise equal; prints the first mismatches.
template <class T>
void expect_bitwise(const std::string& what, const std::vector<T>& got,
                    const std::vector<T>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (bits_of(got[i]) != bits_of(want[i]) && bad++ < 5)
      ADD_FAILURE() << what << ": element " << i << " is " << value_of(got[i]) << " (bits 0x"
                    << std::hex << bits_of(got[i]) << "), want " << std::dec << value_of(want[i])
                    << " (bits 0x" << std::hex << bits_of(want[i]) << std::dec << ")";
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " elements differ";
}

// ---- data --------------------------------------------------------------------------------------
enum class Kind { normal, ties, specials };
const char* kind_name(Kind k) {
  return k == Kind::normal ? "normal" : k == Kind::ties ? "ties" : "specials";
}

// n values of T: normal; small integers in [-2, 2] (ties everywhere); or normal with one in 8
// replaced by 0, -0, +inf, -inf or NaN.
template <class T> std::vector<T> make_values(int64_t n, Kind kind, uint64_t seed) {
  Generator gen(seed);
  std::vector<T> v(static_cast<size_t>(n));
  const float specials[] = {0.0f, -0.0f, std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  for (T& e : v) {
    float f = static_cast<float>(gen.normal());
    if (kind == Kind::ties) f = static_cast<float>(static_cast<int>(gen.next_u32() % 5) - 2);
    if (kind == Kind::specials && gen.next_u32() % 8 == 0) f = specials[gen.next_u32() % 5];
    e = T(f);
  }
  return v;
}

// ================================ relu ================================
template <class T> void check_relu(int64_t n, int64_t off, Kind kind, uint64_t seed) {
  std::ostringstream os;
  os << "relu " << type_name(T{}) << " n=" << n << " offset " << off << " " << kind_name(kind);
  const std::string what = os.str();
  SCOPED_TRACE(what);
  const std::vector<T> x = make_values<T>(n, kind, seed), dy = make_values<T>(n, kind, seed + 1);
  std::vector<T> y(x.size()), dx(x.size());
  cpu::relu_forward<T>(y.data(), x.data(), n);
  cpu::relu_backward<T>(dx.data(), dy.data(), y.data(), n);

  DevBuf<T> dx_in(x, off), ddy(dy, off), out = DevBuf<T>::out(n, off), din = DevBuf<T>::out(n, off);
  cuda::relu_forward<T>(out.p(), dx_in.p(), n, nullptr);
  cuda::relu_backward<T>(din.p(), ddy.p(), out.p(), n, nullptr);
  device_sync();
  expect_bitwise(what + " forward", out.checked(what + " forward"), y);
  expect_bitwise(what + " backward", din.checked(what + " backward"), dx);

  // In place: out = in, din = dout.
  cuda::relu_forward<T>(dx_in.p(), dx_in.p(), n, nullptr);
  cuda::relu_backward<T>(ddy.p(), ddy.p(), dx_in.p(), n, nullptr);
  device_sync();
  expect_bitwise(what + " forward in place", dx_in.checked(what + " in place"), y);
  expect_bitwise(what + " backward in place", ddy.checked(what + " in place"), dx);
}

// ================================ max_pool2d ================================
struct Pool {
  int64_t N, H, W, C, k, s, p;
  int64_t Ho() const { return maxpool2d_out_size(H, k, s, p); }
  int64_t Wo() const { return maxpool2d_out_size(W, k, s, p); }
  int64_t in_numel() const { return N * H * W * C; }
  int64_t out_numel() const { return N * Ho() * Wo() * C; }
  std::string str() const {
    std::ostringstream os;
    os << "x (" << N << ", " << H << ", " << W << ", " << C << ") k" << k << " s" << s << " p"
       << p;
    return os.str();
  }
};

// Device results of one forward + backward.
template <class T> struct DevicePool {
  std::vector<T> out, din;
  std::vector<int32_t> argmax;
};

// Runs the CUDA forward (argmax saved) and backward (with the device's argmax) with every
// buffer `off` elements past its allocation's start; checks the guards.
template <class T>
DevicePool<T> run_device_pool(const Pool& q, const std::vector<T>& x, const std::vector<T>& dy,
                              int64_t off, const std::string& what) {
  DevBuf<T> in(x, off), dout(dy, off), out = DevBuf<T>::out(q.out_numel(), off);
  DevBuf<T> din = DevBuf<T>::out(q.in_numel(), off);
  DevBuf<int32_t> argmax = DevBuf<int32_t>::out(q.out_numel(), off);
  cuda::maxpool2d_forward<T>(out.p(), argmax.p(), in.p(), q.N, q.H, q.W, q.C, q.k, q.s, q.p,
                             nullptr);
  cuda::maxpool2d_backward<T>(din.p(), dout.p(), argmax.p(), q.N, q.H, q.W, q.C, q.k, q.s, q.p,
                              nullptr);
  device_sync();
  return {out.checked(what + " out"), din.checked(what + " din"),
          argmax.checked(what + " argmax")};
}

template <class T> void check_pool(const Pool& q, int64_t off, Kind kind, uint64_t seed) {
  std::ostringstream os;
  os << "max_pool2d " << type_name(T{}) << " " << q.str() << " offset " << off << " "
     << kind_name(kind);
  const std::string what = os.str();
  SCOPED_TRACE(what);
  const std::vector<T> x = make_values<T>(q.in_numel(), kind, seed);
  const std::vector<T> dy = make_values<T>(q.out_numel(), Kind::normal, seed + 1);
  std::vector<T> y(static_cast<size_t>(q.out_numel())), dx(static_cast<size_t>(q.in_numel()));
  std::vector<int32_t> a(y.size());
  cpu::maxpool2d_forward<T>(y.data(), a.data(), x.data(), q.N, q.H, q.W, q.C, q.k, q.s, q.p);
  cpu::maxpool2d_backward<T>(dx.data(), dy.data(), a.data(), q.N, q.H, q.W, q.C, q.k, q.s, q.p);

  const DevicePool<T> d = run_device_pool(q, x, dy, off, what);
  expect_bitwise(what + " out", d.out, y);
  expect_bitwise(what + " argmax", d.argmax, a);
  expect_bitwise(what + " din", d.din, dx);
}

// Small odd shapes: every kernel 1..3 x H in {1, 2, 5, 7} x W in {1, 2, 5, 8}, with stride,
// legal padding, C, N rotated so that each value meets many others; shapes whose output would be
// empty (H + 2p < k) are left out (the op rejects them).
std::vector<Pool> sweep() {
  const int64_t sizes_h[] = {1, 2, 5, 7}, sizes_w[] = {1, 2, 5, 8};
  const int64_t channels[] = {1, 3, 4, 8, 12, 16, 24, 5};
  std::vector<Pool> v;
  int r = 0;
  for (int64_t k = 1; k <= 3; ++k)
    for (int64_t H : sizes_h)
      for (int64_t W : sizes_w) {
        ++r;
        const int64_t s = 1 + r % 3, p = (r / 3) % (k / 2 + 1);
        if (H + 2 * p < k || W + 2 * p < k) continue;
        v.push_back({r % 2 ? 3 : 1, H, W, channels[r % 8], k, s, p});
      }
  return v;
}

}  // namespace
#endif  // CNX_TEST_CUDA

// ================================ relu ================================
TEST(CudaPoolRelu, ReluMatchesCpuBitwise) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 10;
  // Around the 4-float and 8-bf16 packs, aligned and not (offsets 1 and 3 elements).
  for (int64_t n : {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 257, 1000, 4099})
    for (int64_t off : {0, 1, 3}) {
      const Kind kind = static_cast<Kind>(seed % 3);
      check_relu<float>(n, off, kind, seed++);
      check_relu<bf16>(n, off, kind, seed++);
    }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// More elements than one wave of threads covers (132 SMs x 2048 threads on the emulated
// device): the grid-stride loops take several turns, in the pack and the scalar paths.
TEST(CudaPoolRelu, ReluLoopsOverLongArrays) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const ReleaseCacheAtEnd release;
  const int64_t n = (int64_t{1} << 21) + 5;
  check_relu<float>(n, 0, Kind::specials, 50);
  check_relu<bf16>(n, 0, Kind::specials, 51);
  check_relu<float>(n, 1, Kind::normal, 52);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ max_pool2d ================================
TEST(CudaPoolRelu, MaxPoolMatchesCpuBitwiseOnSmallShapes) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  uint64_t seed = 100;
  int i = 0;
  for (const Pool& q : sweep()) {
    const Kind kind = static_cast<Kind>(i % 3);
    const int64_t off = (i / 3) % 2;
    check_pool<float>(q, off, kind, seed);
    check_pool<bf16>(q, off, kind, seed + 2);
    seed += 4;
    ++i;
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ResNet-50's stem pool on a batch of 2 (C 64: the vector paths), its misaligned and odd-channel
// variants (scalar paths), each with ties and specials.
TEST(CudaPoolRelu, MaxPoolMatchesCpuBitwiseOnTheResNetStem) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const ReleaseCacheAtEnd release;
  const Pool stem{2, 112, 112, 64, 3, 2, 1};
  check_pool<float>(stem, 0, Kind::specials, 200);
  check_pool<bf16>(stem, 0, Kind::ties, 201);
  check_pool<float>(stem, 1, Kind::ties, 202);
  check_pool<bf16>({2, 56, 56, 20, 3, 2, 1}, 0, Kind::specials, 203);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// More units than one wave of threads (see above): the UnitWalk decompositions advance.
TEST(CudaPoolRelu, MaxPoolLoopsOverLargeShapes) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const ReleaseCacheAtEnd release;
  check_pool<float>({3, 57, 59, 31, 2, 1, 1}, 0, Kind::ties, 300);   // scalar: 321k, 313k units
  check_pool<float>({2, 99, 101, 64, 3, 1, 1}, 0, Kind::normal, 301);  // f32x4: 320k units
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// A null argmax (inference) gives the same output and writes nothing else.
TEST(CudaPoolRelu, MaxPoolWithoutArgmax) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  for (int64_t off : {0, 1}) {
    const Pool q{2, 9, 11, 16, 3, 2, 1};
    const std::vector<float> x = make_values<float>(q.in_numel(), Kind::ties, 400 + off);
    std::vector<float> y(static_cast<size_t>(q.out_numel()));
    cpu::maxpool2d_forward<float>(y.data(), nullptr, x.data(), q.N, q.H, q.W, q.C, q.k, q.s, q.p);
    DevBuf<float> in(x, off), out = DevBuf<float>::out(q.out_numel(), off);
    cuda::maxpool2d_forward<float>(out.p(), nullptr, in.p(), q.N, q.H, q.W, q.C, q.k, q.s, q.p,
                                   nullptr);
    device_sync();
    expect_bitwise("no argmax", out.checked("no argmax"), y);
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// The gather has no atomics: three runs give bitwise the same din (the race check of the
// emulated device also runs every launch in two thread orders).
TEST(CudaPoolRelu, MaxPoolBackwardIsDeterministic) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Pool q{2, 28, 28, 24, 3, 1, 1};  // overlapping windows: up to 9 gradients per input
  const std::vector<float> x = make_values<float>(q.in_numel(), Kind::ties, 500);
  const std::vector<float> dy = make_values<float>(q.out_numel(), Kind::normal, 501);
  const DevicePool<float> first = run_device_pool(q, x, dy, 0, "run 0");
  for (int run = 1; run < 3; ++run) {
    const DevicePool<float> again = run_device_pool(q, x, dy, 0, "run " + std::to_string(run));
    expect_bitwise("din, run " + std::to_string(run), again.din, first.din);
    expect_bitwise("out, run " + std::to_string(run), again.out, first.out);
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ through autograd ================================
// relu and max_pool2d on CUDA tensors (autograd/ops: dispatch, the int32 argmax tensor on the
// device) against the same ops on CPU tensors, f32 and bf16: outputs and the gradients of each
// recorded Function, bitwise.
TEST(CudaPoolRelu, AutogradOpsMatchCpuBitwise) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    Generator gen(600);
    const Tensor x_host = Tensor::randn(Shape{2, 13, 11, 8}, gen).to(dt);
    const Tensor r_host = Tensor::randn(Shape{2, 7, 6, 8}, gen).to(dt);
    auto run = [&](Device dev) {
      Tensor x = x_host.to(dev);
      x.set_requires_grad(true);
      const Tensor h = relu(x);
      const Tensor y = max_pool2d(h, 3, 2, 1);
      EXPECT_EQ(y.shape(), (Shape{2, 7, 6, 8}));
      EXPECT_EQ(y.dtype(), dt);
      const Tensor dh = y.grad_fn()->backward(r_host.to(dev))[0];
      const Tensor dx = h.grad_fn()->backward(dh)[0];
      EXPECT_EQ(dx.shape(), x.shape());
      auto bytes = [](const Tensor& t) {
        const Tensor c = t.to(Device::cpu());
        const auto* b = static_cast<const uint8_t*>(c.raw_data());
        return std::vector<uint8_t>(b, b + c.nbytes());
      };
      return std::make_pair(bytes(y), std::make_pair(bytes(dh), bytes(dx)));
    };
    const auto cpu_result = run(Device::cpu());
    const auto dev_result = run(kDev);
    EXPECT_TRUE(cpu_result.first == dev_result.first) << "max_pool2d(relu(x)) differs";
    EXPECT_TRUE(cpu_result.second.first == dev_result.second.first) << "max_pool2d's dx differs";
    EXPECT_TRUE(cpu_result.second.second == dev_result.second.second) << "relu's dx differs";
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

// ================================ empty sizes ================================
TEST(CudaPoolRelu, EmptySizesLaunchNothing) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  cuda::relu_forward<float>(nullptr, nullptr, 0, nullptr);
  cuda::relu_backward<bf16>(nullptr, nullptr, nullptr, 0, nullptr);
  cuda::maxpool2d_forward<float>(nullptr, nullptr, nullptr, 0, 5, 5, 8, 3, 2, 1, nullptr);
  cuda::maxpool2d_forward<bf16>(nullptr, nullptr, nullptr, 2, 5, 5, 0, 3, 2, 1, nullptr);
  cuda::maxpool2d_backward<float>(nullptr, nullptr, nullptr, 0, 5, 5, 8, 3, 2, 1, nullptr);
  cuda::maxpool2d_backward<bf16>(nullptr, nullptr, nullptr, 2, 5, 5, 0, 3, 2, 1, nullptr);
  device_sync();
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}
