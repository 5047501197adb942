// CUDA graph capture and replay (see cuda_graph.h). Built only with CUDA; a CPU-only build gets
// the stubs in device.cpp.
#include "tensor/cuda_graph.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <string>

#include "tensor/cuda_check.h"
#include "tensor/cuda_context.h"
#include "tensor/error.h"

namespace cnx::cuda {

namespace {

// "operation not permitted when stream is capturing (cudaErrorStreamCaptureUnsupported)"
std::string describe(cudaError_t e) {
  return std::string(cudaGetErrorString(e)) + " (" + cudaGetErrorName(e) + ")";
}

// The message of whatever `body` threw.
std::string message_of(const std::exception_ptr& thrown) {
  try {
    std::rethrow_exception(thrown);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

}  // namespace

bool is_capturing(Device device) {
  CNX_CHECK(device.is_cuda(), "cuda::is_capturing: ", device.str(), " is not a CUDA device");
  DeviceGuard guard(device);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CNX_CUDA_CHECK(cudaStreamIsCapturing(device_stream(device), &status));
  return status != cudaStreamCaptureStatusNone;
}

Graph Graph::capture(Device device, const std::function<void()>& body) {
  CNX_CHECK(device.is_cuda(), "cuda::Graph::capture: ", device.str(), " is not a CUDA device");
  CNX_CHECK(body != nullptr, "cuda::Graph::capture: no body (an empty std::function)");
  CNX_CHECK(!is_capturing(device), "cuda::Graph::capture: ", device.str(),
            "'s stream is already capturing (captures do not nest)");
  DeviceGuard guard(device);
  const cudaStream_t stream = device_stream(device);

  Graph g;
  g.device_ = device;
  g.memory_ = GraphMemory(device);
  // The pool is switched on just before the capture begins (nothing is allocated in between)
  // and off just after it ends; when `g` is destroyed on a failure below, the pool is released.
  g.memory_.begin_capture();
  if (const cudaError_t e = cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed); e != cudaSuccess) {
    g.memory_.end_capture();
    const std::string why = describe(e);
    (void)cudaGetLastError();  // reported here
    fail("cuda::Graph::capture on ", device.str(), ": cudaStreamBeginCapture failed: ", why);
  }

  // From here on, every way out ends the capture first.
  std::exception_ptr thrown;
  try {
    body();
  } catch (...) {
    thrown = std::current_exception();
  }
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
  g.memory_.end_capture();

  std::string why;  // empty: the capture succeeded
  if (thrown) why = "the body threw: " + message_of(thrown);
  if (ended != cudaSuccess)
    why += (why.empty() ? "" : "; ") + std::string("cudaStreamEndCapture: ") + describe(ended);
  if (why.empty()) {
    if (const cudaError_t e = cudaGraphInstantiate(&g.exec_, graph, 0); e != cudaSuccess) {
      g.exec_ = nullptr;
      why = "cudaGraphInstantiate: " + describe(e);
    }
  }
  // The executable graph is a snapshot of the graph, which is no longer needed.
  if (graph) {
    if (const cudaError_t e = cudaGraphDestroy(graph); e != cudaSuccess)
      std::fprintf(stderr, "cnx: cudaGraphDestroy on %s failed: %s\n", device.str().c_str(),
                   cudaGetErrorString(e));
  }
  if (!why.empty()) {
    // The failed calls' errors are reported here; clear them so that the next checked call on
    // this thread does not see them. The stream captures no more and is usable again.
    (void)cudaGetLastError();
    g.destroy();  // releases the pool: what the capture allocated is ordinary memory again
    fail("cuda::Graph::capture on ", device.str(), ": the capture failed: ", why);
  }
  return g;
}

void Graph::replay() const {
  CNX_CHECK(exec_ != nullptr, "cuda::Graph::replay: the graph is empty (default-constructed or moved from)");
  DeviceGuard guard(device_);
  const cudaStream_t stream = device_stream(device_);
  CNX_CUDA_CHECK(cudaGraphLaunch(exec_, stream));
  if (cuda_sync_after_launch()) CNX_CUDA_CHECK(cudaStreamSynchronize(stream));  // CNX_CUDA_SYNC=1
}

void Graph::destroy() noexcept {
  if (exec_) {
    // A replay already enqueued still runs: CUDA frees the executable graph after it completes.
    if (const cudaError_t e = cudaGraphExecDestroy(exec_); e != cudaSuccess)
      std::fprintf(stderr, "cnx: cudaGraphExecDestroy on %s failed: %s\n", device_.str().c_str(),
                   cudaGetErrorString(e));
    exec_ = nullptr;
  }
  memory_ = GraphMemory();  // releases the pool (see cuda_graph.h, "Memory")
}

}  // namespace cnx::cuda
