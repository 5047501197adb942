// The PyTorch golden fixtures (tests/data/golden/<case>/, made by tools/make_golden.py): the
// model they describe, its weights and batch, and the check of a forward/backward pass against
// them. Shared by the CPU parity test (test_model.cpp) and the GPU one (test_cuda_backend.cpp).
#pragma once

#include <string>
#include <vector>

#include "models/convnext.h"
#include "models/grads.h"
#include "models/safetensors.h"

namespace cnx::test {

// The cases the fixtures hold.
inline const std::vector<std::string> kGoldenCases{"hierarchical_72", "hierarchical_37x45_gray",
                                                "isotropic_40"};

// tests/data/golden/<case>/<file>.
std::string golden_path(const std::string& golden_case, const std::string& file);

struct GoldenCase {
  std::string name;
  ConvNeXtConfig config;  // from the expected file's metadata
  Safetensors weights;    // official names and layouts
  Safetensors batch;      // "images" (N, C, H, W), "labels" (N)
  Safetensors expected;   // "logits", "loss", "grad.<name>" for every parameter
};
GoldenCase load_golden(const std::string& golden_case);

// EXPECTs r to match the case: logits within 1e-4 of the largest |logit|, the loss within 1e-4
// relative, every parameter gradient within 1e-3 of its largest element (none all-zero), and
// every golden gradient compared. `what` prefixes the messages.
void expect_matches_golden(const GoldenCase& g, const GradsResult& r, const std::string& what);

// The roadmap's fixtures (tests/data/roadmap/<case>/, made by tools/make_roadmap_golden.py):
// every case folder, sorted; one loaded (its config from the metadata's JSON).
std::vector<std::string> roadmap_golden_cases();
GoldenCase load_roadmap_golden(const std::string& name);
// Builds the case's model, loads its weights (parameters and BatchNorm buffers), runs one
// training-mode forward/backward on `device` and EXPECTs: expect_matches_golden, every buffer
// after the update (1e-5), and the eval-mode logits with the updated statistics (1e-4 of the
// largest). `what` prefixes the messages.
void expect_roadmap_case_matches(const GoldenCase& g, Device device, const std::string& what);

}  // namespace cnx::test
