// The emulated CUDA device: what the rest of the emulator (launch<>, the device built-ins of
// device_prelude.h, the cuBLAS/cuBLASLt emulation) uses of its core. Built only with
// -DCNX_CUDA_EMULATOR=ON; see README.md in this folder for what is modelled and what is not.
//
// Host side. Work (a kernel launch, a copy, a fill, a GEMM) is queued on a stream and runs when
// the host synchronises with that stream (or the device), in the order it was queued, on the
// synchronising host thread, while device memory is made accessible. Outside that window the
// device arena is PROT_NONE: a host dereference of a device pointer faults, as on a real GPU.
//
// Device side. A kernel runs block after block; the threads of a block are cooperative fibers
// that switch only at __syncthreads(), warp shuffles, and exit. threadIdx, blockIdx, blockDim
// and gridDim are per fiber (thread_local variables the scheduler sets before each switch).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace cnx::emu {

// ---- the work queue --------------------------------------------------------------------------

// Queues `work` on `stream` (nullptr: the legacy default stream). It runs when the stream is
// drained, inside the device-access window (device memory readable and writable). `what` names
// it in error messages ("cublasLtMatmul", "cudaMemcpyAsync DtoH", ...). A cnx::emu::DeviceFault
// thrown by `work` becomes the context's sticky error (as a fault in a kernel would).
void enqueue(cudaStream_t stream, std::string what, std::function<void()> work);

// Runs `work` now, on the calling host thread, in the order of `stream`: it is queued like any
// item (after the legacy default stream's implicit waits) and the stream is drained up to it, so
// everything queued on the stream before it (and, through the stream's waits on events, the work
// of other streams it depends on) runs first; what is queued after it runs later, as usual. For
// the host-driven collectives of the NCCL emulation (nccl.cpp), whose MPI calls block until every
// rank has arrived: run at the call, they meet their peers in the program order of the NCCL
// calls, whatever each rank's host synchronises later (a collective run at a later drain could
// wait for a peer that is itself blocked in a host collective). On a GPU the device would run it
// while the host goes on, so this is not counted as a host wait (HostSyncCounts::collectives).
// Refused on a capturing stream (cudaErrorStreamCaptureUnsupported; the capture is invalidated):
// a collective cannot be recorded to run at a replay here. Returns the context's sticky error
// when earlier work (or `work`, by throwing DeviceFault) failed, cudaSuccess otherwise.
cudaError_t run_in_stream_order(cudaStream_t stream, std::string what, std::function<void()> work);

// Thrown by emulated device work (a kernel, a GEMM) that hits an error the real device would
// report asynchronously: the message becomes the sticky error's text, every later runtime call
// fails with `code`.
struct DeviceFault {
  cudaError_t code;
  std::string message;
};

// ---- device memory ---------------------------------------------------------------------------

// True when [p, p + bytes) lies inside one live cudaMalloc allocation.
bool is_device_range(const void* p, size_t bytes);

// ---- kernels ---------------------------------------------------------------------------------

struct KernelInfo {
  std::string name;     // e.g. "cnx::cuda::detail::map_kernel<true, float, ...>"
  const void* address;  // the kernel function (key of cudaFuncSetAttribute)
};
// Registers a kernel instantiation (at static-initialisation time; see KernelRegistration).
const KernelInfo* register_kernel(const char* pretty_function, const void* address);

// The memory a launch may write, as far as its parameters tell: the race check compares only the
// allocations these point into, unless a parameter is a struct that may hide pointers (opaque).
struct WrittenMemory {
  std::vector<const void*> pointers;  // every pointer-to-non-const parameter
  bool opaque = false;                // a parameter of class type with state: assume anything
};

// Checks the launch configuration against the device's limits (sets cudaGetLastError's error
// and queues nothing when it fails) and queues `body` on the stream: each emulated thread of
// each block runs body() once.
void launch_kernel(const KernelInfo* kernel, dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t stream, std::function<void()> body, WrittenMemory written);

namespace detail {
template <auto kKernel> struct KernelRegistration {
  static const KernelInfo* info() {
    // __PRETTY_FUNCTION__ names kKernel; the registry cuts the kernel's name out of it.
    static const KernelInfo* const registered = register_kernel(__PRETTY_FUNCTION__,
                                                                reinterpret_cast<const void*>(kKernel));
    return registered;
  }
  // Forces registration at start-up of every instantiation that is compiled in (the coverage
  // count compares the kernels launched with the kernels that exist).
  static inline const KernelInfo* const at_startup = info();
};

template <class P> void note_param(const P& p, WrittenMemory& w) {
  if constexpr (std::is_pointer_v<P>) {
    if constexpr (!std::is_const_v<std::remove_pointer_t<P>>) w.pointers.push_back(p);
  } else if constexpr (!std::is_arithmetic_v<P> && !std::is_enum_v<P> && !std::is_empty_v<P>) {
    w.opaque = true;
  }
}

// The launch's body (the kernel called with its parameters) and the memory those parameters let
// it write. Parameters are converted to the kernel's types and copied when the launch is queued,
// as cudaLaunchKernel copies them.
template <class... Params, class... Args>
std::pair<std::function<void()>, WrittenMemory> bind_params(void (*kernel)(Params...), Args&&... args) {
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  WrittenMemory written;
  std::apply([&written](const auto&... p) { (note_param(p, written), ...); }, params);
  return {[kernel, params = std::move(params)]() { std::apply(kernel, params); }, std::move(written)};
}
}  // namespace detail

template <auto kKernel, class... Args>
void launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, Args&&... args) {
  (void)detail::KernelRegistration<kKernel>::at_startup;
  auto [body, written] = detail::bind_params(kKernel, std::forward<Args>(args)...);
  launch_kernel(detail::KernelRegistration<kKernel>::info(), grid, block, smem_bytes, stream,
                std::move(body), std::move(written));
}

// ---- inside a kernel (called by device_prelude.h's built-ins) ----------------------------------

// This block's dynamic shared memory (exactly the launch's smem_bytes, filled with 0xFF bytes
// at the start of the block); nullptr when the launch asked for none.
void* dynamic_shared_memory();

// __syncthreads(): waits until every thread of the block has arrived.
void syncthreads(std::source_location where = std::source_location::current());

enum class ShuffleMode { kIdx, kUp, kDown, kXor };
// The shuffle primitive on 8 bytes: `value` is this lane's bits; returns the source lane's.
uint64_t shuffle(unsigned mask, uint64_t value, int lane_arg, int width, ShuffleMode mode,
                 std::source_location where);

// cp.async: queues a copy of `bytes` (4, 8 or 16) from global to shared memory; it lands at
// this thread's next cp_async_wait_all().
void cp_async(void* shared_dst, const void* global_src, int bytes,
              std::source_location where = std::source_location::current());
void cp_async_wait_all();

// Reports a device-side error in the running kernel (the kernel's name, block and thread are
// added): it becomes the sticky error, the block is abandoned.
[[noreturn]] void device_error(cudaError_t code, const std::string& message);

// ---- instrumentation: host synchronisations and the launch trace -------------------------------
// What the cost model (bench/cost_model.cpp) reads off one emulated training step. Neither costs
// anything worth measuring while nobody asks: a counter increment per runtime call, one flag test
// per queued item.

// The runtime calls that made the host wait for the device, since the process started or the
// last reset_host_sync_counts(). Each call is counted once, under the first heading it fits,
// whether or not there was queued work to wait for (the host paid the round trip either way).
struct HostSyncCounts {
  uint64_t stream_syncs = 0;     // cudaStreamSynchronize
  uint64_t device_syncs = 0;     // cudaDeviceSynchronize
  uint64_t event_syncs = 0;      // cudaEventSynchronize
  // cudaMemcpy (any direction: it waits for the device before and after), cudaMemcpyAsync to
  // pageable host memory (the driver returns only when the data is there), and cudaMemset (the
  // emulator waits; the real one need not for device memory, but the project never calls it)
  uint64_t blocking_copies = 0;
  uint64_t frees = 0;            // cudaFree and cudaFreeHost of a non-null pointer: they synchronise
  uint64_t queries = 0;          // cudaStreamQuery, cudaEventQuery: a poll, not a wait; apart
  uint64_t collectives = 0;      // run_in_stream_order (NCCL collectives): not a wait; apart
  uint64_t total_blocking() const {
    return stream_syncs + device_syncs + event_syncs + blocking_copies + frees;
  }
};
HostSyncCounts host_sync_counts();
void reset_host_sync_counts();

// One piece of device work that ran while a trace was on, in the order it ran. Implicit waits,
// event records and stream-wait-event items are bookkeeping, not work: they are not recorded.
enum class TraceKind { kKernel, kGemm, kCopy, kMemset };
struct TraceRecord {
  TraceKind kind = TraceKind::kKernel;
  // kernel: the kernel's name (as kernel_launch_counts gives it); GEMM: the library function
  // ("cublasLtMatmul", "cublasGemmEx", ...); copy: "cudaMemcpyAsync HtoD|DtoH|DtoD"; "cudaMemsetAsync"
  std::string name;
  dim3 grid{1, 1, 1}, block{1, 1, 1};  // kernels
  size_t dynamic_smem = 0;             // kernels: the launch's dynamic shared memory
  int64_t m = 0, n = 0, k = 0;         // GEMMs: D (m, n) = op(A) (m, k) op(B) (k, n)
  std::string types;                   // GEMMs: "A*B->D", e.g. "bf16*bf16->f32", "+tf32" when rounded
  std::string epilogue;                // GEMMs: "DEFAULT", "BIAS" or "BGRADB"
  uint64_t flops = 0;                  // GEMMs: 2mnk (the epilogue's few adds are not counted)
  // Device-memory traffic, the figure a cost model wants. A kernel: the bytes of the live
  // allocations inside the pages it touched (0 when the trace does not measure traffic), which is
  // exact for each allocation it touches whole once allocations do not share pages
  // (set_page_aligned_allocations), and page-granular for one touched in part. A GEMM: the exact
  // extents of its operands (A, B, C when beta != 0 and a BIAS vector read; D and a BGRADB vector
  // written: what it must move at least). A copy: its size on the device side(s) (HtoD writes n,
  // DtoH reads n, DtoD both). A memset: n written.
  uint64_t bytes_read = 0, bytes_written = 0;
  // What the page-fault measurement saw for this item, whatever its kind (0 without it): pages
  // first read (and perhaps written later), and pages written, times the page size. A page read
  // and then written counts in both, one written first only as written. Page granularity
  // overcounts tensors much smaller than a page and those that share one with their neighbours.
  uint64_t page_bytes_read = 0, page_bytes_written = 0;
};

// From now on, cudaMalloc starts every allocation on a page of its own (instead of 256-byte
// alignment), so that no page holds two allocations and a traced kernel's traffic is exact per
// allocation (TraceRecord::bytes_read). Costs up to a page per allocation. Set it before the
// allocations to be measured are made (the cost model sets it first thing).
void set_page_aligned_allocations(bool on);

// Whether start_trace(true) can measure traffic in this build: it watches device memory through
// page protections and its own SIGSEGV handler, which AddressSanitizer's handler excludes, so not
// in the -DCNX_EMU_SANITIZE=ON build.
bool trace_traffic_available();
// Finishes the work already queued (not recorded), then records every item that runs until
// stop_trace(). With measure_traffic, each recorded item runs with the whole device arena
// PROT_NONE and the pages it touches are logged on first touch (read fault: the page becomes
// readable; write fault: writable), which slows it down; a traced kernel then also skips the race
// check (its snapshot and second run would be counted as traffic). False, and nothing starts,
// when a trace is already on or traffic is asked for and !trace_traffic_available().
bool start_trace(bool measure_traffic = true);
// Finishes the queued work (recorded), ends the trace and returns its records. Empty when no
// trace was on.
std::vector<TraceRecord> stop_trace();

// What the cuBLAS emulation tells the trace about a GEMM it queues (TraceRecord's fields).
struct GemmTraceInfo {
  int64_t m = 0, n = 0, k = 0;
  std::string types, epilogue;
  uint64_t bytes_read = 0, bytes_written = 0;
};
// enqueue() for a GEMM: the same, and a running trace records `gemm`.
void enqueue(cudaStream_t stream, std::string what, std::function<void()> work, GemmTraceInfo gemm);

// ---- for the emulator's own tests (tests/test_emulator.cpp) -----------------------------------

// From now on, schedule threads and blocks as CNX_EMU_SCHEDULE would ("inorder", "reverse",
// "random:<seed>"); false for a spec it does not know.
bool set_schedule_for_testing(const std::string& spec);
// From now on, race-check every launch (as CNX_EMU_RACECHECK=1) or not.
void set_racecheck_for_testing(bool on);
// Clears the sticky error and drops queued work. A real CUDA context cannot recover from a
// device fault; the emulator's tests need to, to provoke one fault after another in a process.
void reset_after_fault_for_testing();
// Every kernel instantiation registered in this process, with its launches so far.
std::vector<std::pair<std::string, uint64_t>> kernel_launch_counts();

}  // namespace cnx::emu
