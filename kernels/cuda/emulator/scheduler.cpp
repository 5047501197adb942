// The emulated streaming multiprocessor: runs a kernel's blocks one after the other, and the
// threads of a block as cooperative fibers (Boost.Context) that switch only where CUDA threads
// synchronise: __syncthreads(), warp shuffles, and exit.
//
// A fiber is a worker: it takes the next thread that has not started and runs it; when that
// thread returns, the same fiber takes the next one. A kernel without barriers therefore runs
// on one fiber per block; a thread that waits at a barrier keeps its fiber, and the scheduler
// starts another fiber for the threads behind it. Between two synchronisation points a thread
// runs without interruption, so the order in which threads (and blocks) run is the only thing a
// schedule changes: in order, reversed, or a seeded random permutation. A kernel whose result
// depends on it has a race (CNX_EMU_RACECHECK, runtime.cpp).
#include <boost/context/fiber.hpp>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

#include "kernels/cuda/emulator/internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

// The built-in variables of device_prelude.h.
thread_local constinit uint3 threadIdx{};
thread_local constinit uint3 blockIdx{};
thread_local constinit uint3 blockDim{};
thread_local constinit uint3 gridDim{};

namespace cnx::emu {

namespace ctx = boost::context;

namespace {

// ---- fiber stacks ----------------------------------------------------------------------------
// Fixed-size stacks with a PROT_NONE guard page below, kept in a per-host-thread pool (a block
// of 1024 threads needs up to 1024 of them, every block again). AddressSanitizer's instrumented
// frames are several times larger, hence the bigger size there.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kStackBytes = size_t(512) << 10;
#else
constexpr size_t kStackBytes = size_t(128) << 10;
#endif

struct StackPool {
  std::vector<ctx::stack_context> free;
  ~StackPool() {
    for (auto& s : free) munmap(static_cast<char*>(s.sp) - s.size - page(), s.size + page());
  }
  static size_t page() {
    static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return p;
  }
  ctx::stack_context take() {
    if (!free.empty()) {
      ctx::stack_context s = free.back();
      free.pop_back();
      return s;
    }
    const size_t total = kStackBytes + page();
    void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw std::bad_alloc();
    mprotect(base, page(), PROT_NONE);  // guard: a stack overflow faults instead of corrupting
    ctx::stack_context s;
    s.size = kStackBytes;
    s.sp = static_cast<char*>(base) + total;
    return s;
  }
};
thread_local StackPool t_stacks;

thread_local ctx::stack_context t_last_stack;  // the stack of the fiber made last

// The StackAllocator concept of Boost.Context, over the pool.
struct PooledStack {
  ctx::stack_context allocate() { return t_last_stack = t_stacks.take(); }
  void deallocate(ctx::stack_context& s) noexcept { t_stacks.free.push_back(s); }
};

// ---- AddressSanitizer's fiber annotations --------------------------------------------------
// Every switch between stacks is announced (start: which stack we go to) and confirmed (finish:
// on arrival), so that ASan knows which stack is current. Empty without ASan.
struct StackBounds {
  const void* bottom = nullptr;
  size_t size = 0;
};
thread_local StackBounds t_scheduler_stack;  // learnt by the first fiber that runs

inline void asan_start_switch(void** fake_stack, StackBounds to) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack, to.bottom, to.size);
#else
  (void)fake_stack, (void)to;
#endif
}
inline void asan_finish_switch(void* fake_stack, StackBounds* from = nullptr) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, from ? &from->bottom : nullptr, from ? &from->size : nullptr);
#else
  (void)fake_stack, (void)from;
#endif
}

// Thrown inside a fiber that its block abandons (another thread failed): unwinds the thread's
// stack back to the worker loop, which then ends, so the fiber finishes normally.
struct Abandon {};

// ---- threads and the block -------------------------------------------------------------------

enum class State { kUnstarted, kRunning, kReady, kAtBarrier, kAtShuffle, kExited };

struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
};

struct Fiber;

struct Thread {
  uint3 idx{};
  int linear = 0;  // x + y Dx + z Dx Dy: the lane is linear % 32, the warp linear / 32
  State state = State::kUnstarted;
  Fiber* fiber = nullptr;
  std::source_location where;  // of the barrier or shuffle it waits at
  // A shuffle in progress.
  unsigned mask = 0;
  ShuffleMode mode = ShuffleMode::kIdx;
  int lane_arg = 0, width = 32;
  uint64_t value = 0, result = 0;
  std::vector<PendingCopy> copies;  // cp.async copies not yet waited for
};

struct Fiber {
  StackBounds stack;
  ctx::fiber self;   // resumes the fiber (held by the scheduler while the fiber is suspended)
  ctx::fiber back;   // resumes the scheduler (held by the fiber while it runs)
  Thread* thread = nullptr;  // the thread it runs now; nullptr once it has no more to run
  bool finished = false;
};

// `v` (thread or block indices, in order) put in the order `schedule` runs them.
template <class T> void schedule_order(std::vector<T>& v, Schedule schedule, std::mt19937_64& rng) {
  if (schedule == Schedule::kReverse) std::reverse(v.begin(), v.end());
  if (schedule == Schedule::kRandom) std::shuffle(v.begin(), v.end(), rng);
}

class BlockRun;
thread_local BlockRun* t_block = nullptr;   // the block this host thread is running
thread_local Fiber* t_fiber = nullptr;      // the fiber running now (nullptr: the scheduler)

std::string where_str(const std::source_location& w) {
  std::string file = w.file_name();
  const size_t slash = file.find("kernels/");
  if (slash != std::string::npos) file = file.substr(slash);
  return file + ":" + std::to_string(w.line());
}

std::string dim_str(uint3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

class BlockRun {
 public:
  BlockRun(const Launch& launch, uint3 block_idx, const ScheduleChoice& schedule, uint64_t block_seed)
      : launch_(launch), block_idx_(block_idx), schedule_(schedule), rng_(block_seed) {
    const dim3 b = launch.block;
    const int n = static_cast<int>(b.x * b.y * b.z);
    threads_.resize(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      Thread& t = threads_[static_cast<size_t>(i)];
      t.linear = i;
      t.idx = make_uint3(static_cast<unsigned>(i) % b.x, (static_cast<unsigned>(i) / b.x) % b.y,
                         static_cast<unsigned>(i) / (b.x * b.y));
    }
    start_order_.resize(static_cast<size_t>(n));
    std::iota(start_order_.begin(), start_order_.end(), 0);
    order(start_order_);
    if (launch.smem_bytes > 0) {
      // Exactly the launch's size (AddressSanitizer catches one byte past it), filled with
      // 0xFF (NaN in every float type) so reading what no thread wrote shows.
      shared_.reset(new char[launch.smem_bytes]);
      std::memset(shared_.get(), 0xFF, launch.smem_bytes);
    }
  }

  void run();

  // ---- called from the fibers --------------------------------------------------------------
  void* shared() const { return shared_.get(); }
  Thread& current() { return *t_fiber->thread; }
  void barrier(std::source_location where);
  uint64_t shuffle(unsigned mask, uint64_t value, int lane_arg, int width, ShuffleMode mode,
                   std::source_location where);
  [[noreturn]] void fail(cudaError_t code, const std::string& message);
  void worker(Fiber* f);

 private:
  void order(std::vector<int>& v) { schedule_order(v, schedule_.schedule, rng_); }
  void suspend();  // from a fiber: back to the scheduler until released
  void check_barrier();
  void check_shuffle(int warp);
  void complete_shuffle(int warp, int leader);
  void release(std::vector<int> ids);
  std::string describe_stuck();
  std::string where_in_kernel(const Thread* t) const {
    std::string s = "kernel " + launch_.kernel->name + " block " + dim_str(block_idx_);
    if (t) s += " thread " + dim_str(t->idx);
    return s;
  }
  void enter(Fiber* f) {
    t_fiber = f;
    if (f->thread) threadIdx = f->thread->idx;
  }

  const Launch& launch_;
  uint3 block_idx_;
  ScheduleChoice schedule_;
  std::mt19937_64 rng_;
  std::vector<Thread> threads_;
  std::vector<int> start_order_;
  size_t next_start_ = 0;
  std::vector<int> ready_;  // released, not yet resumed (front first)
  size_t ready_pos_ = 0;
  int at_barrier_ = 0, exited_ = 0;
  std::vector<std::unique_ptr<Fiber>> fibers_;
  std::unique_ptr<char[]> shared_;
  bool failed_ = false, abandoning_ = false;
  DeviceFault fault_{};
};

void BlockRun::worker(Fiber* f) {
  try {
    while (next_start_ < start_order_.size()) {
      Thread& t = threads_[static_cast<size_t>(start_order_[next_start_++])];
      t.state = State::kRunning;
      t.fiber = f;
      f->thread = &t;
      threadIdx = t.idx;
      launch_.body();
      // Copies still in flight complete (on the GPU they land even if nobody waits).
      for (const PendingCopy& c : t.copies) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
      t.copies.clear();
      t.state = State::kExited;
      ++exited_;
      if (at_barrier_ > 0) {
        const auto waiting = std::find_if(threads_.begin(), threads_.end(), [](const Thread& o) {
          return o.state == State::kAtBarrier;
        });
        fail(cudaErrorLaunchFailure, "barrier divergence: thread " + dim_str(t.idx) +
                                         " exited while " + std::to_string(at_barrier_) +
                                         " threads wait at __syncthreads() (" +
                                         where_str(waiting->where) + ")");
      }
      // A warp waiting for this lane in a shuffle can no longer complete.
      check_shuffle(t.linear / 32);
    }
  } catch (const DeviceFault& e) {
    if (!failed_) {
      failed_ = true;
      fault_ = e;
    }
  } catch (const Abandon&) {
  }
  f->thread = nullptr;
  f->finished = true;
}

void BlockRun::suspend() {
  Fiber* f = t_fiber;
  void* fake_stack = nullptr;
  asan_start_switch(&fake_stack, t_scheduler_stack);
  f->back = std::move(f->back).resume();
  asan_finish_switch(fake_stack, &t_scheduler_stack);
  // Resumed by the scheduler (which set t_fiber and threadIdx), to go on or to give up.
  if (abandoning_) throw Abandon{};
}

void BlockRun::barrier(std::source_location where) {
  Thread& t = current();
  t.state = State::kAtBarrier;
  t.where = where;
  ++at_barrier_;
  if (exited_ > 0)
    fail(cudaErrorLaunchFailure, "barrier divergence: " + std::to_string(exited_) +
                                     " threads of the block have exited, so the __syncthreads() at " +
                                     where_str(where) + " can never complete");
  check_barrier();
  suspend();
}

// All threads at a barrier: they must all be at the same __syncthreads() (one in conditional
// code that not every thread reaches is undefined behaviour in CUDA).
void BlockRun::check_barrier() {
  if (at_barrier_ != static_cast<int>(threads_.size())) return;
  std::map<std::string, int> sites;
  for (const Thread& t : threads_) ++sites[where_str(t.where)];
  if (sites.size() > 1) {
    std::string s = "barrier divergence: the threads of the block wait at different __syncthreads():";
    for (const auto& [site, n] : sites) s += " " + site + " (" + std::to_string(n) + " threads)";
    fail(cudaErrorLaunchFailure, s);
  }
  at_barrier_ = 0;
  std::vector<int> ids(threads_.size());
  std::iota(ids.begin(), ids.end(), 0);
  release(std::move(ids));
}

uint64_t BlockRun::shuffle(unsigned mask, uint64_t value, int lane_arg, int width, ShuffleMode mode,
                           std::source_location where) {
  Thread& t = current();
  const int lane = t.linear % 32;
  if (!(mask >> lane & 1u))
    fail(cudaErrorLaunchFailure, "warp shuffle at " + where_str(where) + ": the calling lane " +
                                     std::to_string(lane) + " is not in its mask");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(cudaErrorLaunchFailure, "warp shuffle at " + where_str(where) + ": width " +
                                     std::to_string(width) + " is not a power of two <= 32");
  t.state = State::kAtShuffle;
  t.where = where;
  t.mask = mask;
  t.mode = mode;
  t.lane_arg = lane_arg;
  t.width = width;
  t.value = value;
  check_shuffle(t.linear / 32);
  suspend();
  return t.result;
}

// Completes every group of warp `warp`'s lanes that wait in a shuffle and whose mask's lanes
// have all arrived (a warp may hold several groups with disjoint masks).
void BlockRun::check_shuffle(int warp) {
  const int first = warp * 32;
  const int lanes = std::min<int>(32, static_cast<int>(threads_.size()) - first);
  unsigned tried = 0;  // masks of lanes already looked at
  for (int l = 0; l < lanes; ++l) {
    const Thread& t = threads_[static_cast<size_t>(first + l)];
    if (t.state != State::kAtShuffle || (tried >> l & 1u)) continue;
    tried |= t.mask;
    complete_shuffle(warp, first + l);
  }
}

// The group of `leader`'s mask: an error if a lane of it cannot come, nothing if one is not
// there yet, else every lane's result and release.
void BlockRun::complete_shuffle(int warp, int leader) {
  const int first = warp * 32;
  const int lanes = std::min<int>(32, static_cast<int>(threads_.size()) - first);
  const Thread& lead = threads_[static_cast<size_t>(leader)];
  const unsigned mask = lead.mask;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (l >= lanes)
      fail(cudaErrorLaunchFailure, "warp shuffle at " + where_str(lead.where) + ": mask 0x" +
                                       [&] { std::ostringstream o; o << std::hex << mask; return o.str(); }() +
                                       " names lane " + std::to_string(l) + ", which does not exist (the block has " +
                                       std::to_string(threads_.size()) + " threads)");
    const Thread& o = threads_[static_cast<size_t>(first + l)];
    if (o.state == State::kExited)
      fail(cudaErrorLaunchFailure, "warp shuffle at " + where_str(lead.where) + ": lane " +
                                       std::to_string(l) + " of warp " + std::to_string(warp) +
                                       " is named in the mask but has exited");
    if (o.state != State::kAtShuffle) return;  // not there yet
    if (o.mask != mask || o.mode != lead.mode)
      fail(cudaErrorLaunchFailure, "warp shuffle: lanes of warp " + std::to_string(warp) +
                                       " meet with different masks or kinds (" + where_str(lead.where) +
                                       " and " + where_str(o.where) + ")");
  }
  // Everyone is here: compute every lane's result (CUDA Programming Guide, Warp Shuffle Functions).
  std::vector<int> ids;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Thread& t = threads_[static_cast<size_t>(first + l)];
    const int w = t.width, group = l & ~(w - 1);
    int src = l;
    switch (t.mode) {
      case ShuffleMode::kIdx: src = group + (t.lane_arg & (w - 1)); break;
      case ShuffleMode::kUp: src = (l - group) - t.lane_arg >= 0 ? l - t.lane_arg : l; break;
      case ShuffleMode::kDown: src = (l - group) + t.lane_arg < w ? l + t.lane_arg : l; break;
      case ShuffleMode::kXor: src = (l ^ t.lane_arg) <= (group | (w - 1)) ? (l ^ t.lane_arg) : l; break;
    }
    // A lane outside the mask does not take part: the value read from it is undefined (all
    // bits set here, a NaN as a float, so that using it shows).
    const bool defined = src >= 0 && src < 32 && (mask >> src & 1u);
    t.result = defined ? threads_[static_cast<size_t>(first + src)].value : ~uint64_t(0);
    ids.push_back(first + l);
  }
  release(std::move(ids));
}

void BlockRun::release(std::vector<int> ids) {
  order(ids);
  for (int id : ids) {
    threads_[static_cast<size_t>(id)].state = State::kReady;
    ready_.push_back(id);
  }
}

[[noreturn]] void BlockRun::fail(cudaError_t code, const std::string& message) {
  const Thread* t = t_fiber ? t_fiber->thread : nullptr;
  throw DeviceFault{code, message + " [in " + where_in_kernel(t) + "]"};
}

std::string BlockRun::describe_stuck() {
  std::map<std::string, int> waiting;
  for (const Thread& t : threads_) {
    if (t.state == State::kAtBarrier) ++waiting["__syncthreads() at " + where_str(t.where)];
    if (t.state == State::kAtShuffle) ++waiting["a warp shuffle at " + where_str(t.where)];
  }
  std::string s = "deadlock: no thread can run;";
  for (const auto& [what, n] : waiting) s += " " + std::to_string(n) + " wait in " + what + ";";
  s += " " + std::to_string(exited_) + " have exited";
  return s;
}

void BlockRun::run() {
  t_block = this;
  blockIdx = block_idx_;
  auto switch_to = [this](Fiber* f) {
    enter(f);
    void* fake_stack = nullptr;
    asan_start_switch(&fake_stack, f->stack);
    f->self = std::move(f->self).resume();
    asan_finish_switch(fake_stack);
    t_fiber = nullptr;
  };
  while (!failed_) {
    if (ready_pos_ < ready_.size()) {
      Thread& t = threads_[static_cast<size_t>(ready_[ready_pos_++])];
      t.state = State::kRunning;
      switch_to(t.fiber);
    } else if (next_start_ < start_order_.size()) {
      fibers_.push_back(std::make_unique<Fiber>());
      Fiber* f = fibers_.back().get();
      f->self = ctx::fiber(std::allocator_arg, PooledStack(), [this, f](ctx::fiber&& back) {
        asan_finish_switch(nullptr, &t_scheduler_stack);
        f->back = std::move(back);
        worker(f);
        asan_start_switch(nullptr, t_scheduler_stack);  // nullptr: this fiber's stack dies
        return std::move(f->back);
      });
      f->stack = {static_cast<char*>(t_last_stack.sp) - t_last_stack.size, t_last_stack.size};
      switch_to(f);
    } else {
      break;
    }
  }
  if (!failed_ && exited_ != static_cast<int>(threads_.size())) {
    failed_ = true;
    fault_ = DeviceFault{cudaErrorLaunchFailure, describe_stuck() + " [in " + where_in_kernel(nullptr) + "]"};
  }
  // The suspended fibers of a failed block unwind their threads and finish.
  abandoning_ = true;
  for (auto& f : fibers_)
    if (!f->finished) switch_to(f.get());
  fibers_.clear();
  t_block = nullptr;
  if (failed_) throw fault_;
}

}  // namespace

// ---- the device built-ins' entry points ---------------------------------------------------------

void* dynamic_shared_memory() { return t_block ? t_block->shared() : nullptr; }

void syncthreads(std::source_location where) {
  if (!t_block || !t_fiber) fail_outside_kernel("__syncthreads");
  t_block->barrier(where);
}

uint64_t shuffle(unsigned mask, uint64_t value, int lane_arg, int width, ShuffleMode mode,
                 std::source_location where) {
  if (!t_block || !t_fiber) fail_outside_kernel("a warp shuffle");
  return t_block->shuffle(mask, value, lane_arg, width, mode, where);
}

void cp_async(void* shared_dst, const void* global_src, int bytes, std::source_location where) {
  if (!t_block || !t_fiber) fail_outside_kernel("cp.async");
  const auto misaligned = [bytes](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) != 0;
  };
  if (misaligned(shared_dst) || misaligned(global_src))
    t_block->fail(cudaErrorMisalignedAddress,
                  "cp.async of " + std::to_string(bytes) + " bytes at " + where_str(where) +
                      " with a misaligned address (shared " +
                      std::to_string(reinterpret_cast<uintptr_t>(shared_dst) % 16) + ", global " +
                      std::to_string(reinterpret_cast<uintptr_t>(global_src) % 16) + " mod 16)");
  t_block->current().copies.push_back({shared_dst, global_src, bytes});
}

void cp_async_wait_all() {
  if (!t_block || !t_fiber) fail_outside_kernel("cp.async.wait_group");
  Thread& t = t_block->current();
  for (const PendingCopy& c : t.copies) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
  t.copies.clear();
}

void device_error(cudaError_t code, const std::string& message) {
  if (!t_block || !t_fiber) throw DeviceFault{code, message};
  t_block->fail(code, message);
}

void run_kernel(const Launch& launch, const ScheduleChoice& schedule) {
  blockDim = make_uint3(launch.block.x, launch.block.y, launch.block.z);
  gridDim = make_uint3(launch.grid.x, launch.grid.y, launch.grid.z);
  const uint64_t blocks = uint64_t(launch.grid.x) * launch.grid.y * launch.grid.z;
  std::vector<uint64_t> block_order(blocks);
  std::iota(block_order.begin(), block_order.end(), uint64_t(0));
  std::mt19937_64 rng(schedule.seed);
  schedule_order(block_order, schedule.schedule, rng);
  for (uint64_t b : block_order) {
    const uint3 idx = make_uint3(static_cast<unsigned>(b % launch.grid.x),
                                 static_cast<unsigned>(b / launch.grid.x % launch.grid.y),
                                 static_cast<unsigned>(b / (uint64_t(launch.grid.x) * launch.grid.y)));
    BlockRun block(launch, idx, schedule, schedule.seed ^ (b * 0x9E3779B97F4A7C15ull));
    block.run();
  }
}

}  // namespace cnx::emu
