// What runtime.cpp (the CUDA runtime API, memory, streams) and scheduler.cpp (blocks, fibers,
// barriers, shuffles) share inside the emulator. Not for the rest of the project.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/emulator/emulator.h"

namespace cnx::emu {

// ---- the emulated device's limits (an H200, sm_90) ---------------------------------------------
inline constexpr int kMaxThreadsPerBlock = 1024;
inline constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
inline constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535u, 65535u};
inline constexpr size_t kDefaultSharedPerBlock = 48 * 1024;      // without the opt-in
inline constexpr size_t kMaxSharedPerBlockOptin = 227 * 1024;    // sm_90: 227 KB (232448 bytes)
inline constexpr int kMultiprocessors = 132;
inline constexpr int kMaxThreadsPerMultiprocessor = 2048;
inline constexpr int kMaxBlocksPerMultiprocessor = 32;

// ---- the order in which fibers and blocks run ------------------------------------------------
enum class Schedule { kInOrder, kReverse, kRandom };
struct ScheduleChoice {
  Schedule schedule = Schedule::kInOrder;
  uint64_t seed = 0;
};

// One launch, as queued.
struct Launch {
  const KernelInfo* kernel;
  dim3 grid, block;
  size_t smem_bytes;
  std::function<void()> body;
  WrittenMemory written;
};

// Runs every block of `launch` under `schedule`. Throws DeviceFault on a device-side error
// (barrier divergence, a bad shuffle, a misaligned cp.async, ...).
void run_kernel(const Launch& launch, const ScheduleChoice& schedule);

// A device built-in (__syncthreads, a shuffle, cp.async) called outside a kernel: a bug in the
// emulator or its caller; prints the message and aborts.
[[noreturn]] void fail_outside_kernel(const char* what);

}  // namespace cnx::emu
