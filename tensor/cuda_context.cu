// Per-device CUDA state (see cuda_context.h): the stream, the cuBLAS/cuBLASLt handles and the
// workspace, created lazily and kept for the life of the process.
#include "tensor/cuda_context.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "tensor/cuda_memory.h"

namespace cnx::cuda {

namespace {

// ---- RAII handles: move-only; destructors log and never throw -------------------------------

class Stream {
 public:
  Stream() { CNX_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() {
    if (!s_) return;
    const cudaError_t e = cudaStreamDestroy(s_);
    if (e != cudaSuccess) std::fprintf(stderr, "cnx: cudaStreamDestroy failed: %s\n", cudaGetErrorString(e));
  }
  Stream(Stream&& o) noexcept : s_(o.s_) { o.s_ = nullptr; }
  Stream& operator=(Stream&&) = delete;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

class LtHandle {
 public:
  LtHandle() { CNX_CUBLAS_CHECK(cublasLtCreate(&h_)); }
  ~LtHandle() {
    if (!h_) return;
    const cublasStatus_t s = cublasLtDestroy(h_);
    if (s != CUBLAS_STATUS_SUCCESS)
      std::fprintf(stderr, "cnx: cublasLtDestroy failed: %s\n", cublasGetStatusString(s));
  }
  LtHandle(LtHandle&& o) noexcept : h_(o.h_) { o.h_ = nullptr; }
  LtHandle& operator=(LtHandle&&) = delete;
  LtHandle(const LtHandle&) = delete;
  LtHandle& operator=(const LtHandle&) = delete;
  cublasLtHandle_t get() const { return h_; }

 private:
  cublasLtHandle_t h_ = nullptr;
};

class BlasHandle {
 public:
  BlasHandle() { CNX_CUBLAS_CHECK(cublasCreate(&h_)); }
  ~BlasHandle() {
    if (!h_) return;
    const cublasStatus_t s = cublasDestroy(h_);
    if (s != CUBLAS_STATUS_SUCCESS)
      std::fprintf(stderr, "cnx: cublasDestroy failed: %s\n", cublasGetStatusString(s));
  }
  BlasHandle(BlasHandle&& o) noexcept : h_(o.h_) { o.h_ = nullptr; }
  BlasHandle& operator=(BlasHandle&&) = delete;
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;
  cublasHandle_t get() const { return h_; }

 private:
  cublasHandle_t h_ = nullptr;
};

// Device memory straight from cudaMalloc (not the caching allocator: the workspace lives as long
// as the process and should not count as tensor memory).
class DeviceMemory {
 public:
  explicit DeviceMemory(size_t bytes) { CNX_CUDA_CHECK(cudaMalloc(&p_, bytes)); }
  ~DeviceMemory() {
    if (!p_) return;
    const cudaError_t e = cudaFree(p_);
    if (e != cudaSuccess)
      std::fprintf(stderr, "cnx: cudaFree of a workspace failed: %s\n", cudaGetErrorString(e));
  }
  DeviceMemory(DeviceMemory&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  DeviceMemory& operator=(DeviceMemory&&) = delete;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  void* get() const { return p_; }

 private:
  void* p_ = nullptr;
};

// Everything one device has. Members are created on first use (under g_mutex) and destroyed
// in reverse order: the handles before the stream and workspace they use.
struct DeviceContext {
  std::unique_ptr<Stream> stream;
  std::unique_ptr<DeviceMemory> workspace;
  std::unique_ptr<LtHandle> lt;
  std::unique_ptr<BlasHandle> blas;
};

std::mutex g_mutex;

// Deliberately never destroyed: tensors held by static objects may be freed after main returns,
// and destroying streams and handles while the CUDA runtime shuts down is itself unsafe. The
// driver releases everything when the process exits.
std::vector<std::unique_ptr<DeviceContext>>& contexts() {
  static auto* table = new std::vector<std::unique_ptr<DeviceContext>>();
  return *table;
}

// The context of `device`, with its stream created; call with g_mutex held.
DeviceContext& context_locked(int device) {
  const int count = cuda_device_count();
  CNX_CHECK(device >= 0 && device < count, "cuda:", device, ": no such CUDA device (", count,
            " visible)");
  auto& table = contexts();
  if (table.size() <= static_cast<size_t>(device)) table.resize(static_cast<size_t>(device) + 1);
  auto& ctx = table[static_cast<size_t>(device)];
  if (!ctx) ctx = std::make_unique<DeviceContext>();
  if (!ctx->stream) {
    DeviceGuard guard(Device::cuda(device));
    ctx->stream = std::make_unique<Stream>();
  }
  return *ctx;
}

// The context of the current device with its cuBLAS state created.
DeviceContext& blas_context() {
  const int device = current_device();
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceContext& ctx = context_locked(device);
  if (!ctx.lt) {
    // Build all three before publishing any, so a failure leaves nothing half-made.
    auto workspace = std::make_unique<DeviceMemory>(kCublasWorkspaceBytes);
    auto lt = std::make_unique<LtHandle>();
    auto blas = std::make_unique<BlasHandle>();
    // cublasSetStream resets the workspace to the default pool: set the stream first.
    CNX_CUBLAS_CHECK(cublasSetStream(blas->get(), ctx.stream->get()));
    CNX_CUBLAS_CHECK(cublasSetWorkspace(blas->get(), workspace->get(), kCublasWorkspaceBytes));
    ctx.workspace = std::move(workspace);
    ctx.blas = std::move(blas);
    ctx.lt = std::move(lt);
  }
  return ctx;
}

std::atomic<bool>& tf32_flag() {
  static std::atomic<bool> flag{[] {
    const char* v = std::getenv("CNX_ALLOW_TF32");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }()};
  return flag;
}

}  // namespace

// ---- devices and streams -----------------------------------------------------------------------

int current_device() {
  int d = 0;
  CNX_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

cudaStream_t current_stream() { return device_stream(Device::cuda(current_device())); }

cudaStream_t device_stream(Device device) {
  CNX_CHECK(device.is_cuda(), "device_stream: ", device.str(), " is not a CUDA device");
  std::lock_guard<std::mutex> lock(g_mutex);
  return context_locked(device.index).stream->get();
}

void synchronize(Device device) {
  const cudaStream_t s = device_stream(device);
  DeviceGuard guard(device);
  CNX_CUDA_CHECK(cudaStreamSynchronize(s));
}

DeviceGuard::DeviceGuard(Device device) {
  if (!device.is_cuda()) return;
  int current = 0;
  CNX_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device.index) {
    CNX_CUDA_CHECK(cudaSetDevice(device.index));
    previous_ = current;
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ < 0) return;
  const cudaError_t e = cudaSetDevice(previous_);
  if (e != cudaSuccess)
    std::fprintf(stderr, "cnx: restoring CUDA device %d failed: %s\n", previous_, cudaGetErrorString(e));
}

// ---- TF32 --------------------------------------------------------------------------------------

bool allow_tf32() { return tf32_flag().load(); }
void set_allow_tf32(bool on) { tf32_flag().store(on); }

// ---- cuBLAS ------------------------------------------------------------------------------------

cublasLtHandle_t cublaslt_handle() { return blas_context().lt->get(); }

cublasHandle_t cublas_handle() {
  cublasHandle_t h = blas_context().blas->get();
  CNX_CUBLAS_CHECK(cublasSetMathMode(h, allow_tf32() ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  return h;
}

void* cublas_workspace() { return blas_context().workspace->get(); }

}  // namespace cnx::cuda
