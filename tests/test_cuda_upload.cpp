// The host/device plumbing of a training step without stalls: Readback (a small device result
// read on the host one step late, waiting for nothing queued after it) and upload_async (input
// batches copied on a copy stream of their own, into a ring of staging slots).
#include <gtest/gtest.h>

#include <vector>

#include "cuda_testing.h"
#include "tensor/readback.h"
#include "tensor/tensor.h"
#include "testing.h"

#if CNX_TEST_CUDA
#include "tensor/cuda_context.h"
#include "tensor/pinned_memory.h"
#include "tensor/upload.h"
#endif

namespace cnx {
namespace {

TEST(Readback, CpuTensorsAreCopiedAtOnce) {
  Tensor t = Tensor::from_data<float>(Shape{3}, std::vector<float>{1.5f, -2.0f, 7.25f});
  const Readback r(t);
  t.fill_(0.0);  // the readback holds a copy, not a view
  EXPECT_TRUE(r.ready());
  EXPECT_EQ(r.wait().to_vector<float>(), (std::vector<float>{1.5f, -2.0f, 7.25f}));
  test::expect_error([] { Readback(Tensor::zeros(Shape{Readback::kMaxBytes / 4 + 1})); },
                     {"Readback", "more than the 4096"});
  test::expect_error([] { Readback().wait(); }, {"Readback::wait", "nothing was read back"});
}

TEST(CudaReadback, DeviceValueIsTheOneAtTheTimeOfTheCall) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Device dev = Device::cuda(0);
  Tensor t = Tensor::from_data<float>(Shape{2}, std::vector<float>{3.0f, 4.0f}).to(dev);
  std::vector<Readback> reads;
  for (int k = 0; k < 6; ++k) {  // more readbacks in flight than the pool has slots at first
    reads.emplace_back(t);
    t.fill_(static_cast<double>(10 * (k + 1)));  // later work on the same stream
  }
  EXPECT_EQ(reads[0].wait().to_vector<float>(), (std::vector<float>{3.0f, 4.0f}));
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
  // The emulated device runs queued work only when the host waits for it: waiting for the first
  // readback left the fills after it queued (a Tensor::to would have drained the stream).
  // Without the caching allocator (CNX_CUDA_NO_CACHING=1) a free is a cudaFree, which drains.
  if (!cuda::caching_disabled())
    EXPECT_FALSE(reads[1].ready() && reads[5].ready() && cudaStreamQuery(cuda::device_stream(dev)) == cudaSuccess);
#endif
  for (int k = 1; k < 6; ++k)
    EXPECT_EQ(reads[static_cast<size_t>(k)].wait().to_vector<float>(),
              (std::vector<float>(2, static_cast<float>(10 * k))))
        << "readback " << k;
  EXPECT_EQ(reads[5].wait().to_vector<float>(), reads[5].wait().to_vector<float>());  // again
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaUpload, BatchesInFlightNeverOverwriteOneAnother) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Device dev = Device::cuda(0);
  constexpr int64_t kBytes = 10000, kRounds = 7;
  auto pool = HostBufferPool::create(kBytes, /*pinned=*/true, 3);
  std::vector<Tensor> got;
  for (int64_t r = 0; r < kRounds; ++r) {
    HostBuffer buf = pool->acquire();
    auto* p = buf.as<uint8_t>();
    for (int64_t k = 0; k < kBytes; ++k) p[k] = static_cast<uint8_t>(k * 31 + r * 7);
    // Odd rounds upload fewer bytes: a slot keeps its (larger) buffer.
    const int64_t n = r % 2 ? kBytes - 999 : kBytes;
    StagedUpload up = upload_async(buf, n, dev);
    // The reader: a copy on the compute stream, as the finish kernel reads the slot.
    Tensor t = Tensor::empty(Shape{n}, DType::u8, dev);
    {
      cuda::DeviceGuard guard(dev);
      CNX_CUDA_CHECK(cudaMemcpyAsync(t.raw_data(), up.data<uint8_t>(), static_cast<size_t>(n),
                                     cudaMemcpyDeviceToDevice, cuda::device_stream(dev)));
    }
    up.release();
    got.push_back(t);
    // Run the copy stream as far ahead of the compute stream as it may go: a copy into a slot
    // whose previous batch the compute stream has not read yet would land now.
    CNX_CUDA_CHECK(cudaStreamSynchronize(upload_stream(dev)));
  }
  for (int64_t r = 0; r < kRounds; ++r) {
    const auto v = got[static_cast<size_t>(r)].to_vector<uint8_t>();
    for (int64_t k = 0; k < static_cast<int64_t>(v.size()); k += 97)
      ASSERT_EQ(v[static_cast<size_t>(k)], static_cast<uint8_t>(k * 31 + r * 7)) << "round " << r << " byte " << k;
  }
  EXPECT_LE(pool->stats().blocks, 3);
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaUpload, ALargerBatchGrowsTheSlotAndHeldSlotsAreRefused) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  const Device dev = Device::cuda(0);
  auto small = HostBufferPool::create(64, /*pinned=*/true, 2);
  auto large = HostBufferPool::create(1 << 16, /*pinned=*/true, 2);
  HostBuffer a = small->acquire(), b = large->acquire();
  for (int k = 0; k < 64; ++k) a.as<uint8_t>()[k] = static_cast<uint8_t>(k);
  for (int k = 0; k < (1 << 16); ++k) b.as<uint8_t>()[k] = static_cast<uint8_t>(k / 256);
  StagedUpload u1 = upload_async(a, 64, dev);
  StagedUpload u2 = upload_async(b, 1 << 16, dev);
  test::expect_error([&] { (void)upload_async(a, 64, dev); }, {"upload_async", "both staging slots are held"});
  Tensor t1 = Tensor::empty(Shape{64}, DType::u8, dev), t2 = Tensor::empty(Shape{1 << 16}, DType::u8, dev);
  {
    cuda::DeviceGuard guard(dev);
    CNX_CUDA_CHECK(cudaMemcpyAsync(t1.raw_data(), u1.data<uint8_t>(), 64, cudaMemcpyDeviceToDevice, cuda::device_stream(dev)));
    CNX_CUDA_CHECK(cudaMemcpyAsync(t2.raw_data(), u2.data<uint8_t>(), 1 << 16, cudaMemcpyDeviceToDevice, cuda::device_stream(dev)));
  }
  u1.release();
  u2.release();
  EXPECT_EQ(t1.to_vector<uint8_t>()[63], 63);
  EXPECT_EQ(t2.to_vector<uint8_t>()[65535], 255);
  test::expect_error([&] { (void)upload_async(a, 65, dev); }, {"upload_async", "65 bytes asked of a host buffer of 64"});
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

}  // namespace
}  // namespace cnx
