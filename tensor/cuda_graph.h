// CUDA graphs for the tensor library: capture once everything some code enqueues on a device's
// stream, then replay it with one launch. A training step is hundreds of small launches; replayed
// as a graph, the host's cost of enqueuing them is paid once, at capture.
//
//   Tensor x = Tensor::zeros({N, C}, DType::f32, dev);     // inputs: allocated BEFORE capture
//   Tensor y;                                              // an output, made by the capture
//   cuda::Graph g = cuda::Graph::capture(dev, [&] { y = gelu(linear(x, w, b)); });
//   for (...) {
//     x.copy_from(next_batch);   // new contents, same address: outside the capture
//     g.replay();                // y = gelu(x W^T + b) for the new x (asynchronous)
//     use(y);                    // ordered after the replay on the same stream
//   }
//
// What a graph is: the kernels, copies and fills `body` enqueued, with the arguments they had,
// pointers included. A replay reads and writes exactly the memory the capture used, so
//  - inputs must be tensors that exist before capture and are refilled in place (copy_from,
//    outside the capture); outputs are tensors the capture made (or existing ones it wrote);
//  - the graph does not own the tensors it reads or writes that existed before the capture:
//    keep them alive while the Graph lives (dropping one inside `body` is fine, see Memory);
//  - whatever the host did inside `body` (shape checks, choosing a kernel, reading a Generator,
//    a scalar computed on the host) happens once, at capture; replays repeat the GPU work only;
//  - nothing is read back to the host during a capture (a copy to the host synchronises, which
//    a capture forbids: capture() then fails, see below).
//
// Memory: the memory the capture allocates comes from a pool private to this graph
// (cuda::GraphMemory, tensor/cuda_memory.h), in both modes of cuda_malloc (caching, and
// CNX_CUDA_NO_CACHING=1). The addresses the graph bakes in therefore stay valid and are given to
// nobody else while the Graph lives: tensors made and dropped inside `body` (temporaries) keep
// their memory, and memory freed during the capture is held back, until the Graph is destroyed.
// A tensor made during the capture that outlives it (an output such as y above) is the graph's
// output buffer: each replay overwrites it, and it stays the pool's while the Graph lives. Once
// the Graph is destroyed it is an ordinary tensor, and its memory returns to the ordinary cache
// when the tensor is freed. A pool starts empty, so a capture that allocates calls cudaMalloc
// for the pool's segments (the relaxed capture mode used here permits that; the default global
// mode would not). Running `body` once eagerly before capturing it is still good practice: it
// creates the cuBLAS handles and workspace, and an error shows up as an ordinary error.
//
// Errors: when `body` throws, or the capture fails (a call CUDA forbids during capture, such as a
// synchronisation, invalidated it; ending it or instantiating the graph failed), capture() ends
// the capture, releases the pool, clears CUDA's last error (the stream is usable again, and
// eager work on the device goes on as before) and throws one cnx::Error that says the capture
// failed and why. With CNX_CUDA_SYNC=1 (tensor/cuda_check.h) every launch synchronises, so every
// capture of a kernel fails that way: the debug switch and graphs do not mix.
//
// Streams and threads: the library enqueues all work of a device on one stream
// (tensor/cuda_context.h); that stream is the one captured and the one replays are launched on.
// One capture at a time per device. The relaxed mode does not stop other threads from calling
// the CUDA runtime during a capture, but whatever they enqueue on the device's stream joins the
// capture, and their allocations on the device come from the capturing pool.
//
// Declared without CUDA headers (a CPU-only build compiles it; there capture() and replay() throw
// a cnx::Error saying the CUDA backend was not built).
#pragma once

#include <functional>
#include <utility>

#include "tensor/cuda_memory.h"
#include "tensor/device.h"

// The CUDA runtime's executable-graph handle (the same typedef as driver_types.h; repeating a
// typedef of the same type is allowed), declared as kernels/stream.h declares cudaStream_t.
struct CUgraphExec_st;
typedef struct CUgraphExec_st* cudaGraphExec_t;

namespace cnx::cuda {

class Graph {
 public:
  Graph() = default;  // empty: replay() throws
  // Captures everything `body` enqueues on `device`'s stream (relaxed capture mode) and
  // instantiates it. `body` runs on the host, once, with `device` current; its GPU work does NOT
  // execute: call replay() to run it (also right after capture). Throws cnx::Error when `device`
  // is not a CUDA device, its stream is already capturing, or the capture fails (see above).
  static Graph capture(Device device, const std::function<void()>& body);

  // Enqueues the captured work on the device's stream: one cudaGraphLaunch, asynchronous (as any
  // launch: later work on the stream, including a copy to the host, is ordered after it).
  void replay() const;

  bool empty() const { return exec_ == nullptr; }
  Device device() const { return device_; }

  // Destroys the executable graph (a replay already enqueued still runs), then releases the
  // memory pool. Logs, never throws. Move-only.
  ~Graph() { destroy(); }
  Graph(Graph&& o) noexcept
      : device_(o.device_), exec_(std::exchange(o.exec_, nullptr)), memory_(std::move(o.memory_)) {}
  Graph& operator=(Graph&& o) noexcept {
    if (this != &o) {
      destroy();
      device_ = o.device_;
      exec_ = std::exchange(o.exec_, nullptr);
      memory_ = std::move(o.memory_);
    }
    return *this;
  }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

 private:
  void destroy() noexcept;  // the executable graph, then the pool; leaves the Graph empty

  Device device_ = Device::cuda(0);
  // The captured graph is not kept: its executable graph is a snapshot of it, and the only
  // handle a replay needs (PyTorch's CUDAGraph drops it after instantiation too).
  cudaGraphExec_t exec_ = nullptr;
  GraphMemory memory_;  // what the capture allocated and held back (tensor/cuda_memory.h)
};

// True while `device`'s library stream is capturing (also when the capture was invalidated and
// has not ended yet). For code that must behave differently inside a capture, e.g. skip a read
// back to the host.
bool is_capturing(Device device);

}  // namespace cnx::cuda
