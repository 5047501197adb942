// The roadmap's golden cases (tests/test_roadmap.cpp, tools/make_roadmap_golden.py) on the CUDA
// device: the ResNet stem and max pool, dense and grouped convs (conv2d), BatchNorm in training
// and eval with its running statistics on the device, ReLU, and the ConvNeXt blocks, against
// PyTorch with the CPU's tolerances (fp32, TF32 off). On the emulated device where no GPU is.
#include <gtest/gtest.h>

#include "tensor/cuda_context.h"
#include "tests/cuda_testing.h"
#include "tests/golden.h"

namespace {

using namespace cnx;

class CudaRoadmapGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaRoadmapGolden, ForwardBackwardBuffersAndEvalMatchPyTorch) {
#if CNX_TEST_CUDA
  CNX_SKIP_WITHOUT_DEVICE();
  cuda::set_allow_tf32(false);
  test::expect_roadmap_case_matches(test::load_roadmap_golden(GetParam()), Device::cuda(0),
                                    GetParam() + " (cuda)");
#else
  CNX_SKIP_BUILT_WITHOUT_CUDA();
#endif
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaRoadmapGolden, ::testing::ValuesIn(test::roadmap_golden_cases()));

}  // namespace
