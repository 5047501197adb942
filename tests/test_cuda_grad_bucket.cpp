// The gradient buckets' pack and unpack kernels (kernels/grad_bucket.h) against plain host loops:
// pack must copy every gradient bit for bit to its place in the flat buffer, unpack must write
// exactly round(flat * scale) (the CPU ranks' `src[j] * inv`, train/dist/grad_reducer.cpp).
//
// How each test could fail: a lost tail (n % 4 != 0), a slot at an offset that is not a multiple
// of 4 taking the float4 path, a chunk of a long slot skipped or written twice, the slots of a
// second table (more than 96 per launch) missed, an FMA or a division where one multiply was
// meant, an in-place unpack that reads what it already wrote.
//
// Every test skips, saying why, when the library was built without CUDA or no device is visible.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "tests/cuda_testing.h"
#include "tests/testing.h"

#if CNX_TEST_CUDA
#include "kernels/grad_bucket.h"
#include "tensor/cuda_context.h"
#endif

using namespace cnx;

namespace {

#if CNX_TEST_CUDA
const Device kGpu = Device::cuda(0);

std::vector<uint32_t> bits(const std::vector<float>& v) {
  std::vector<uint32_t> out(v.size());
  std::memcpy(out.data(), v.data(), v.size() * sizeof(float));
  return out;
}

// `count` gradients with sizes cycling through every case (1, n % 4 != 0, one chunk of 4096,
// one more, several chunks), packed one after the other into one flat buffer: their offsets are
// mostly not multiples of 4.
struct Bucket {
  std::vector<Tensor> grads;     // device
  std::vector<std::vector<float>> values;  // host copies
  std::vector<int64_t> offsets;
  int64_t numel = 0;
};

Bucket make_bucket(size_t count, uint64_t seed) {
  const int64_t cycle[] = {5, 1, 4096, 384, 4097, 3, 9000, 96, 17};
  Bucket b;
  for (size_t i = 0; i < count; ++i) {
    const int64_t n = cycle[i % std::size(cycle)];
    b.values.push_back(test::normal_floats(n, seed + i));
    b.grads.push_back(Tensor::from_data<float>(Shape{n}, b.values.back()).to(kGpu));
    b.offsets.push_back(b.numel);
    b.numel += n;
  }
  return b;
}

std::vector<cuda::BucketSlot> slots_of(Bucket& b, Tensor& flat) {
  std::vector<cuda::BucketSlot> slots;
  for (size_t i = 0; i < b.grads.size(); ++i)
    slots.push_back({b.grads[i].data<float>(), flat.data<float>() + b.offsets[i], b.grads[i].numel()});
  return slots;
}
#endif

TEST(CudaGradBucket, PackCopiesEveryGradientToItsOffsetBitwise) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  for (size_t count : {size_t{1}, size_t{9}, size_t{200}}) {  // 200: three launches of 96 slots
    SCOPED_TRACE("gradients: " + std::to_string(count));
    Bucket b = make_bucket(count, 100 + count);
    Tensor flat = Tensor::full({b.numel + 1}, -7.0, DType::f32, kGpu);  // one guard element after
    const std::vector<cuda::BucketSlot> slots = slots_of(b, flat);
    cuda::bucket_pack(slots.data(), static_cast<int64_t>(slots.size()), cuda::device_stream(kGpu));
    std::vector<float> want;
    for (const auto& v : b.values) want.insert(want.end(), v.begin(), v.end());
    want.push_back(-7.0f);
    EXPECT_EQ(bits(flat.to_vector<float>()), bits(want));
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaGradBucket, UnpackWritesFlatTimesScaleRoundedOnce) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  // 1/3 is not a power of two: a division, or a multiply fused with something, would differ.
  for (float scale : {0.5f, 1.0f / 3.0f, 1.0f / 7.0f}) {
    SCOPED_TRACE("scale " + std::to_string(scale));
    Bucket b = make_bucket(200, 7);
    const std::vector<float> flat_values = test::normal_floats(b.numel, 99, 3.0);
    Tensor flat = Tensor::from_data<float>(Shape{b.numel}, flat_values).to(kGpu);
    const std::vector<cuda::BucketSlot> slots = slots_of(b, flat);
    cuda::bucket_unpack(slots.data(), static_cast<int64_t>(slots.size()), scale, cuda::device_stream(kGpu));
    for (size_t i = 0; i < b.grads.size(); ++i) {
      std::vector<float> want(static_cast<size_t>(b.grads[i].numel()));
      for (size_t j = 0; j < want.size(); ++j) want[j] = flat_values[static_cast<size_t>(b.offsets[i]) + j] * scale;
      ASSERT_EQ(bits(b.grads[i].to_vector<float>()), bits(want)) << "gradient " << i;
    }
    EXPECT_EQ(bits(flat.to_vector<float>()), bits(flat_values)) << "unpack changed the flat buffer";
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

TEST(CudaGradBucket, UnpackInPlaceScalesATensor) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{4100}}) {
    const std::vector<float> v = test::normal_floats(n, 5);
    Tensor t = Tensor::from_data<float>(Shape{n}, v).to(kGpu);
    const cuda::BucketSlot slot{t.data<float>(), t.data<float>(), n};
    cuda::bucket_unpack(&slot, 1, 0.25f, cuda::device_stream(kGpu));
    std::vector<float> want(v.size());
    for (size_t j = 0; j < v.size(); ++j) want[j] = v[j] * 0.25f;  // exact: a power of two
    EXPECT_EQ(bits(t.to_vector<float>()), bits(want)) << "n = " << n;
  }
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

}  // namespace
