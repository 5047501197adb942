// The autograd tape.
//
// Every differentiable op is a Function subclass with two halves side by side:
//   static Tensor apply(inputs...)   the forward: validates, runs the kernel, and, when any
//                                    input requires grad and grad mode is on, records itself
//                                    as the output's grad_fn, saving the least it needs;
//   backward(grad_out)               dL/d(output) -> dL/d(input_i) for each input, returning an
//                                    undefined Tensor for inputs nobody needs (skip the work).
// Each Function has one output. Its edges point at what produced each input: another
// Function (an intermediate) or the input's TensorImpl itself (a leaf that requires grad).
// The engine (engine.cpp) walks these edges in reverse topological order, sums the gradients
// of a tensor used twice (the residual), accumulates (+=) into the leaves' .grad, and frees
// every node's saved tensors once it has run.
#pragma once

#include <initializer_list>
#include <functional>
#include <memory>
#include <vector>

#include "tensor/tensor.h"

namespace cnx {

// ---- grad mode -------------------------------------------------------------------------------
// Thread-local switch: when off, ops record nothing (evaluation, the optimiser, the engine).
bool grad_enabled();

class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

// ---- the graph -------------------------------------------------------------------------------
class Function;

struct Edge {
  std::shared_ptr<Function> fn;      // the producer of this input, if it is an op's output
  std::shared_ptr<TensorImpl> leaf;  // or the input itself, a leaf that requires grad
  bool defined() const { return fn != nullptr || leaf != nullptr; }
};

class Function : public std::enable_shared_from_this<Function> {
 public:
  // Iterative: dropping a long unreleased graph must not recurse once per node.
  virtual ~Function();
  virtual const char* name() const = 0;
  // grad_out has the output's shape; returns one gradient per input (undefined where
  // !needs_input_grad(i)).
  virtual std::vector<Tensor> backward(const Tensor& grad_out) = 0;

  bool needs_input_grad(size_t i) const { return i < edges_.size() && edges_[i].defined(); }
  const std::vector<Edge>& edges() const { return edges_; }
  const Shape& input_shape(size_t i) const { return input_shapes_[i]; }
  bool released() const { return released_; }

  // Drops the saved tensors and the edges, so the graph behind this node can be freed.
  void release();

 protected:
  // Frees what forward saved; each Function resets its saved Tensors here.
  virtual void release_saved() = 0;

 private:
  friend Tensor& record(std::shared_ptr<Function>, Tensor&, std::initializer_list<Tensor>);
  std::vector<Edge> edges_;
  std::vector<Shape> input_shapes_;
  bool released_ = false;
};

// True when grad mode is on and at least one defined input requires grad.
bool wants_grad(std::initializer_list<Tensor> inputs);

// Makes `fn` the grad_fn of `out` (which then requires grad) and points its edges at
// `inputs` (undefined inputs, such as an absent bias, get undefined edges). Returns out.
Tensor& record(std::shared_ptr<Function> fn, Tensor& out, std::initializer_list<Tensor> inputs);

// Runs reverse-mode autodiff from a one-element tensor (what Tensor::backward calls).
void run_backward(const Tensor& root);
// on_grad_ready(leaf): called once per leaf, after its last gradient contribution.
void run_backward(const Tensor& root, const std::function<void(TensorImpl* leaf)>& on_grad_ready);

}  // namespace cnx
