// One parity step, what `convnext grads` computes: a forward and backward pass in training
// mode with drop path 0 and mean softmax cross-entropy, from images in PyTorch's layout.
// People coming from PyTorch run the same step there and compare the outputs.
#pragma once

#include "models/convnext.h"

namespace cnx {

struct GradsResult {
  Tensor logits;      // (N, num_classes) f32
  Tensor loss;        // [] f32
  NamedTensors grads;  // every parameter's gradient, official names and layouts
};

// images: f32 (N, C, H, W) with C = in_chans; labels: i64 (N) in [0, num_classes), both on the
// host. The model is moved to `device` (ConvNeXt::to) and its gradients reset first; the pass
// runs there, and the results are CPU copies, the same on every device up to float rounding.
// Throws cnx::Error on bad input (an image smaller than the model takes: naming the smallest).
GradsResult compute_grads(ConvNeXt& model, const Tensor& images_nchw, const Tensor& labels,
                          Device device = Device::cpu());

}  // namespace cnx
