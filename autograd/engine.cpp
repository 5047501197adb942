// The backward engine: reverse topological order over the Functions reachable from the root.
#include <unordered_map>
#include <unordered_set>

#include "autograd/function.h"
#include "autograd/ops.h"

namespace cnx {

// ---- grad mode -------------------------------------------------------------------------------
namespace {
thread_local bool g_grad_enabled = true;
}
bool grad_enabled() { return g_grad_enabled; }
NoGradGuard::NoGradGuard() : prev_(g_grad_enabled) { g_grad_enabled = false; }
NoGradGuard::~NoGradGuard() { g_grad_enabled = prev_; }

// ---- recording -------------------------------------------------------------------------------
bool wants_grad(std::initializer_list<Tensor> inputs) {
  if (!grad_enabled()) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

Tensor& record(std::shared_ptr<Function> fn, Tensor& out, std::initializer_list<Tensor> inputs) {
  for (const Tensor& t : inputs) {
    Edge e;
    if (t.defined() && t.requires_grad()) {
      if (t.grad_fn()) e.fn = t.grad_fn();
      else e.leaf = t.impl_ptr();
    }
    fn->edges_.push_back(std::move(e));
    fn->input_shapes_.push_back(t.defined() ? t.shape() : Shape{});
  }
  out.impl()->requires_grad = true;
  out.impl()->grad_fn = std::move(fn);
  return out;
}

Function::~Function() {
  std::vector<std::shared_ptr<Function>> pending;
  for (Edge& e : edges_)
    if (e.fn) pending.push_back(std::move(e.fn));
  while (!pending.empty()) {
    std::shared_ptr<Function> fn = std::move(pending.back());
    pending.pop_back();
    if (fn.use_count() == 1)  // the last owner: take its edges so its destructor has none
      for (Edge& e : fn->edges_)
        if (e.fn) pending.push_back(std::move(e.fn));
  }
}

void Function::release() {
  release_saved();
  edges_.clear();
  released_ = true;
}

// ---- backward --------------------------------------------------------------------------------
namespace {

// Functions reachable from `root`, each after every Function that consumes its output.
// Owning pointers: releasing a node drops its edges, which may be the last reference to the
// nodes still to run.
std::vector<std::shared_ptr<Function>> topological_order(const std::shared_ptr<Function>& root) {
  std::vector<std::shared_ptr<Function>> order;  // post-order: producers before consumers
  std::unordered_set<Function*> seen{root.get()};
  std::vector<std::pair<std::shared_ptr<Function>, size_t>> stack{{root, 0}};  // iterative DFS
  while (!stack.empty()) {
    auto& [fn, next] = stack.back();
    if (next < fn->edges().size()) {
      std::shared_ptr<Function> child = fn->edges()[next++].fn;
      if (child && seen.insert(child.get()).second) stack.emplace_back(std::move(child), 0);
    } else {
      order.push_back(std::move(fn));
      stack.pop_back();
    }
  }
  return {order.rbegin(), order.rend()};  // consumers first
}

// grads[key] += g, without writing into g (a backward may hand the same tensor to two inputs).
void accumulate(Tensor& slot, const Tensor& g) {
  if (!slot.defined()) slot = g;
  else slot = add(slot, g);
}

// True when `g` is the only handle on its memory: no other Tensor shares its TensorImpl (as
// when a backward hands grad_out through, or the same tensor to two inputs, or returns a tensor
// it saved) and no other TensorImpl shares its storage (a view, such as reshape's backward
// gives of grad_out). Memory is shared only through these two shared_ptrs (Tensor::empty makes
// every storage), so such a gradient can become a leaf's .grad as it is: nothing else reads or
// writes it, and the in-place += of later contributions (in this backward or a later one) and
// the optimiser's in-place clipping change that leaf's gradient only. The engine's own handles
// count too: grad_out, and a gradient still waiting in `grads` for its op's backward.
bool sole_owner(const Tensor& g) {
  return g.impl_ptr().use_count() == 1 && g.impl()->storage.use_count() == 1;
}

}  // namespace

void run_backward(const Tensor& root) { run_backward(root, nullptr); }

void run_backward(const Tensor& root, const std::function<void(TensorImpl* leaf)>& on_grad_ready) {
  CNX_CHECK(root.defined(), "backward: called on an undefined tensor");
  CNX_CHECK(root.numel() == 1, "backward: needs a one-element loss, got ", root.str());
  CNX_CHECK(root.requires_grad(), "backward: ", root.str(),
            " does not require grad (no input required grad, or it was computed under no-grad)");
  NoGradGuard no_grad;  // backward computations are not recorded
  const Tensor seed = Tensor::ones(root.shape(), root.dtype(), root.device());

  if (!root.grad_fn()) {  // the root is itself a leaf
    Tensor g = root.grad();
    if (g.defined()) add_(g, seed);
    else root.impl()->grad = seed;
    if (on_grad_ready) on_grad_ready(root.impl());
    return;
  }

  const std::vector<std::shared_ptr<Function>> order = topological_order(root.grad_fn());
  for (const auto& fn : order)
    CNX_CHECK(!fn->released(), "backward: the graph through '", fn->name(),
              "' was freed by an earlier backward(); run the forward again");

  // With on_grad_ready: how many gradient contributions each leaf still waits for (one per
  // edge that reaches it; a parameter used twice gets two).
  std::unordered_map<TensorImpl*, int> leaf_uses;
  if (on_grad_ready)
    for (const auto& fn : order)
      for (const Edge& e : fn->edges())
        if (!e.fn && e.leaf) ++leaf_uses[e.leaf.get()];

  std::unordered_map<Function*, Tensor> grads;  // dL/d(output of fn), summed over consumers
  grads[root.grad_fn().get()] = seed;
  for (const auto& fn : order) {
    auto it = grads.find(fn.get());
    CNX_CHECK(it != grads.end(), "backward: internal error: no gradient reached '", fn->name(), "'");
    const Tensor grad_out = std::move(it->second);
    grads.erase(it);

    std::vector<Tensor> input_grads = fn->backward(grad_out);
    CNX_CHECK(input_grads.size() == fn->edges().size(), "backward: '", fn->name(), "' returned ",
              input_grads.size(), " gradients for ", fn->edges().size(), " inputs");
    for (size_t i = 0; i < input_grads.size(); ++i) {
      const Edge& e = fn->edges()[i];
      if (!e.defined()) continue;
      Tensor& g = input_grads[i];
      CNX_CHECK(g.defined(), "backward: '", fn->name(), "' gave no gradient for input ", i);
      CNX_CHECK(g.shape() == fn->input_shape(i), "backward: '", fn->name(), "' gradient ", g.str(),
                " for input ", i, " of shape ", fn->input_shape(i).str());
      if (e.fn) {
        accumulate(grads[e.fn.get()], g);
      } else {
        Tensor& leaf_grad = e.leaf->grad;
        if (leaf_grad.defined()) add_(leaf_grad, g);     // parameters accumulate: +=
        else if (sole_owner(g)) leaf_grad = std::move(g);  // a fresh gradient: taken, not copied
        else leaf_grad = g.clone();  // shared: own a copy, or a later += would write the others
        if (on_grad_ready && --leaf_uses[e.leaf.get()] == 0) on_grad_ready(e.leaf.get());
      }
    }
    fn->release();  // saved tensors and edges go now: the graph is freed as we walk it
  }
}

void Tensor::backward() const { run_backward(*this); }
void Tensor::backward(const std::function<void(TensorImpl* leaf)>& on_grad_ready) const {
  run_backward(*this, on_grad_ready);
}

}  // namespace cnx
