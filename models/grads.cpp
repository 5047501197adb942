#include "models/grads.h"

#include "autograd/ops.h"

namespace cnx {

GradsResult compute_grads(ConvNeXt& model, const Tensor& images_nchw, const Tensor& labels,
                          Device device) {
  const ConvNeXtConfig& cfg = model.config();
  CNX_CHECK(images_nchw.dtype() == DType::f32 && images_nchw.rank() == 4, "images ",
            images_nchw.str(), " must be float32 (N, C, H, W)");
  CNX_CHECK(images_nchw.dim(1) == cfg.in_chans, "images ", images_nchw.str(), " have ",
            images_nchw.dim(1), " channels; the model expects ", cfg.in_chans);
  CNX_CHECK(labels.dtype() == DType::i64 && labels.rank() == 1 &&
                labels.dim(0) == images_nchw.dim(0),
            "labels ", labels.str(), " must be int64 (N) with N = ", images_nchw.dim(0),
            ", the batch of images");
  for (int64_t v : labels.to_vector<int64_t>())
    CNX_CHECK(v >= 0 && v < cfg.num_classes, "label ", v, " is outside [0, ", cfg.num_classes,
              ")");

  model.check_input_size(images_nchw.dim(2), images_nchw.dim(3));  // before the model moves

  CNX_CHECK(cfg.drop_path_rate == 0, "grads: the model must have drop_path_rate 0, got ",
            cfg.drop_path_rate);

  model.to(device);  // a no-op when it is there already
  model.zero_grad();
  Generator no_drop(0);  // drop path 0: nothing is drawn
  const Tensor x = nchw_to_nhwc(images_nchw).to(device);  // (N, H, W, C)
  Tensor logits = model.forward(x, /*training=*/true, no_drop);
  Tensor loss = cross_entropy(logits, labels.to(device));
  loss.backward();
  return {logits.detach().to(Device::cpu()), loss.detach().to(Device::cpu()), model.gradients()};
}

}  // namespace cnx
