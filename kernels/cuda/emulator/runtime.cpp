// The emulated CUDA runtime: the cudart functions the project calls, implemented on the CPU
// with the semantics of a real device (README.md in this folder).
//
//  - One device, with an H200's limits (internal.h). Its memory is an arena of reserved address
//    space, PROT_NONE except while the device works (a queued item runs) or a runtime call
//    touches it: a host dereference of a device pointer faults as it does for real. New
//    allocations are filled with 0xFF bytes (NaN in every float type).
//  - Streams are queues. Work runs when the host waits for it (cudaStreamSynchronize,
//    cudaEventSynchronize, cudaDeviceSynchronize, a copy to pageable host memory, cudaFree) and
//    only then, so a host read of pinned memory before synchronising sees stale data.
//    cudaEventQuery / cudaStreamQuery let the device advance by one item per call, so a host that
//    polls makes progress and also sees "not ready".
//  - Stream capture: a capturing stream records what is queued on it into a graph instead of
//    running it (push); cudaGraphLaunch queues copies of the recorded items. Calls CUDA forbids
//    in a capture are refused and invalidate it (README.md: capture across streams is not modelled).
//  - Errors: a bad launch configuration or argument is reported by the call (and by
//    cudaGetLastError), as for real; a fault inside device work (emulator.h, DeviceFault) becomes
//    the sticky error that every later call returns, and cudaGetErrorString gives its details.
//  - CNX_EMU_SCHEDULE=inorder|reverse|random[:seed] orders threads and blocks;
//    CNX_EMU_RACECHECK=1 runs every kernel twice (in order, then reversed) from the same memory
//    and requires bitwise the same device memory after both; CNX_EMU_COVERAGE_DIR=dir writes the
//    kernels this process registered and launched to dir/<pid>.txt at exit.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kernels/cuda/emulator/internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define CNX_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define CNX_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define CNX_EMU_POISON(p, n) ((void)(p), (void)(n))
#define CNX_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

// One queued piece of device work: what it is called in error messages, the work, and what a
// running trace records of it (made only while a trace is on; nullptr for bookkeeping items).
struct QueuedWork {
  std::string what;
  std::function<void()> work;
  std::unique_ptr<cnx::emu::TraceRecord> note;
  // False for bookkeeping (an event record, a wait): it runs without opening device memory.
  bool touches_memory = true;
};

// One item of a captured graph: a QueuedWork as it was captured, queued again (a copy) at each
// cudaGraphLaunch. `note` is what a running trace records of each replay.
struct GraphNode {
  std::string what;
  std::function<void()> work;
  std::optional<cnx::emu::TraceRecord> note;
  bool touches_memory = true;
};

// The opaque handle types of the runtime API, defined here.
struct CUgraph_st {
  std::vector<GraphNode> nodes;  // in capture order (a capture on one stream is a chain)
};
struct CUgraphExec_st {
  std::vector<GraphNode> nodes;  // the graph's, copied at instantiation
  uint64_t launches = 0;
};
// A stream capture in progress (cudaStreamBeginCapture .. cudaStreamEndCapture).
struct StreamCapture {
  std::unique_ptr<CUgraph_st> graph;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  std::thread::id thread;  // the thread that began it (thread-local mode)
  uint64_t id = 0;
  bool invalidated = false;
  std::string why;  // what invalidated it
};
struct CUstream_st {
  std::deque<QueuedWork> queue;
  uint64_t enqueued = 0, executed = 0;  // items so far
  bool blocking = true;  // synchronises with the legacy default stream (not cudaStreamNonBlocking)
  bool destroyed = false;
  std::optional<StreamCapture> capture;  // set while the stream captures
};
struct CUevent_st {
  uint64_t capture_id = 0;  // the capture it was last recorded in (0: an ordinary record)
  uint64_t recorded = 0;   // records so far
  uint64_t completed = 0;  // the newest record the device has passed
  cudaStream_t stream = nullptr;
  std::chrono::steady_clock::time_point when{};
  bool timing = true;
};

namespace cnx::emu {

namespace {

// ---- configuration from the environment ----------------------------------------------------------

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

// "inorder", "reverse", "random" or "random:<seed>"; false for anything else.
bool parse_schedule(const std::string& spec, ScheduleChoice& s) {
  s = ScheduleChoice{};
  if (spec.empty() || spec == "inorder") return true;
  if (spec == "reverse") {
    s.schedule = Schedule::kReverse;
    return true;
  }
  if (spec == "random" || spec.rfind("random:", 0) == 0) {
    s.schedule = Schedule::kRandom;
    if (spec.size() > 7) s.seed = std::strtoull(spec.c_str() + 7, nullptr, 10);
    return true;
  }
  return false;
}

ScheduleChoice schedule_from_env() {
  const char* v = std::getenv("CNX_EMU_SCHEDULE");
  ScheduleChoice s;
  if (!parse_schedule(v ? v : "", s)) {
    std::fprintf(stderr, "cnx emulator: CNX_EMU_SCHEDULE=%s: expected inorder, reverse or random[:seed]\n", v);
    std::exit(2);
  }
  return s;
}

size_t arena_bytes_from_env() {
  const char* v = std::getenv("CNX_EMU_MEMORY_GB");
  const size_t gb = v && *v ? std::strtoull(v, nullptr, 10) : 16;
  return std::max<size_t>(gb, 1) << 30;
}

// ---- the device-memory arena ----------------------------------------------------------------------

constexpr size_t kAlign = 256;  // cudaMalloc's alignment
constexpr size_t kGap = 256;    // unused bytes after each allocation (poisoned under ASan)

// A live allocation: its start and the size cudaMalloc was asked for.
struct Allocation {
  char* ptr;
  size_t bytes;
};

class Arena {
 public:
  Arena() : capacity_(arena_bytes_from_env()) {
    void* p = mmap(nullptr, capacity_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "cnx emulator: cannot reserve %zu bytes of address space for device memory\n", capacity_);
      std::abort();
    }
    base_ = static_cast<char*>(p);
    free_[0] = capacity_;
  }

  size_t capacity() const { return capacity_; }
  size_t used() const { return used_; }
  char* base() const { return base_; }
  size_t mapped() const { return mapped_; }  // [base, base + mapped) is what the window opens
  // From now on, every allocation starts on a page of its own (set_page_aligned_allocations).
  void set_page_aligned(bool on) { page_aligned_ = on; }

  // The bytes of live allocations inside [from, to) (byte offsets): what a touched page holds.
  size_t allocated_bytes_in(size_t from, size_t to) const {
    size_t sum = 0;
    auto it = live_.upper_bound(from);
    if (it != live_.begin()) --it;
    for (; it != live_.end() && it->first < to; ++it) {
      const size_t a = std::max(from, it->first), b = std::min(to, it->first + it->second.bytes);
      if (b > a) sum += b - a;
    }
    return sum;
  }

  // For the traffic measurement (TrafficWatch): a window that opens no page. It counts as open
  // (a nested open() changes nothing), and the pages keep their protection, PROT_NONE when no
  // window was open; the watch opens pages one by one as they are touched and closes them again.
  bool is_open() const { return open_ > 0; }
  void open_watched() { ++open_; }
  void close_watched() { --open_; }
  // Sets the protection of the whole window, or of [from, to) (byte offsets).
  void protect_window(int prot) {
    if (mapped_ > 0) protect(0, mapped_, prot);
  }
  void protect_range(size_t from, size_t to, int prot) { protect(from, to, prot); }

  // Fills [p, p + n) (inside the window) with `byte`, opening only its pages when the window is
  // closed: opening the whole window costs time in proportion to all the memory in use.
  void fill(void* p, int byte, size_t n) {
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (open_ > 0) {
      std::memset(p, byte, n);
      return;
    }
    const size_t from = offset(p) / page * page, to = round_up(offset(p) + n, page);
    protect(from, to, PROT_READ | PROT_WRITE);
    std::memset(p, byte, n);
    protect(from, to, PROT_NONE);
  }
  bool contains(const void* p) const {
    const char* c = static_cast<const char*>(p);
    return c >= base_ && c < base_ + capacity_;
  }

  // nullptr when no free range is large enough.
  void* allocate(size_t bytes) {
    const size_t align = page_aligned_ ? page_size() : kAlign;
    const size_t slot = round_up(round_up(std::max<size_t>(bytes, 1), kAlign) + kGap, align);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      const size_t start = it->first, len = it->second;
      const size_t off = round_up(start, align), lead = off - start;  // lead: 0 unless page-aligned
      if (len < lead + slot) continue;
      free_.erase(it);
      if (lead > 0) free_[start] = lead;
      if (len > lead + slot) free_[off + slot] = len - lead - slot;
      live_[off] = {bytes, slot};
      used_ += bytes;
      grow_to(off + slot);
      char* p = base_ + off;
      CNX_EMU_UNPOISON(p, bytes);
      CNX_EMU_POISON(p + bytes, slot - bytes);
      return p;
    }
    return nullptr;
  }

  // False when p is not the start of a live allocation.
  bool release(void* p) {
    const auto it = live_.find(offset(p));
    if (!contains(p) || it == live_.end()) return false;
    size_t off = it->first, len = it->second.slot;
    used_ -= it->second.bytes;
    live_.erase(it);
    CNX_EMU_POISON(base_ + off, len);  // use after free
    // Merge with the free neighbours.
    auto next = free_.lower_bound(off);
    if (next != free_.end() && next->first == off + len) {
      len += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == off) {
        off = prev->first;
        len += prev->second;
        free_.erase(prev);
      }
    }
    free_[off] = len;
    return true;
  }

  bool holds(const void* p, size_t bytes) const {
    if (!contains(p)) return false;
    const size_t off = offset(p);
    auto it = live_.upper_bound(off);
    if (it == live_.begin()) return false;
    --it;
    return off >= it->first && off + bytes <= it->first + it->second.bytes;
  }

  std::vector<Allocation> allocations() const {
    std::vector<Allocation> out;
    for (const auto& [off, a] : live_) out.push_back({base_ + off, a.bytes});
    return out;
  }

  // The device-access window: while open (nested opens count), the used part of the arena is
  // readable and writable.
  void open() {
    if (open_++ == 0 && mapped_ > 0) protect(0, mapped_, PROT_READ | PROT_WRITE);
  }
  void close() {
    if (--open_ == 0 && mapped_ > 0) protect(0, mapped_, PROT_NONE);
  }

 private:
  struct Live {
    size_t bytes, slot;
  };
  static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }
  static size_t page_size() {
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return page;
  }
  size_t offset(const void* p) const { return static_cast<size_t>(static_cast<const char*>(p) - base_); }
  void protect(size_t from, size_t to, int prot) {
    if (mprotect(base_ + from, to - from, prot) != 0) {
      std::perror("cnx emulator: mprotect of device memory");
      std::abort();
    }
  }
  // Pages up to `end` become part of the window (and accessible now if it is open).
  void grow_to(size_t end) {
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t want = round_up(end, page);
    if (want <= mapped_) return;
    if (open_ > 0) protect(mapped_, want, PROT_READ | PROT_WRITE);
    mapped_ = want;
  }

  char* base_ = nullptr;
  size_t capacity_;
  size_t mapped_ = 0;  // [0, mapped_) is what the window opens
  size_t used_ = 0;
  int open_ = 0;
  bool page_aligned_ = false;
  std::map<size_t, size_t> free_;  // offset -> length
  std::map<size_t, Live> live_;    // offset -> sizes
};

// ---- the device ---------------------------------------------------------------------------------

struct KernelAttributes {
  size_t max_dynamic_shared = kDefaultSharedPerBlock;
};

struct Device {
  std::recursive_mutex mutex;  // every runtime call and all device work
  Arena arena;
  CUstream_st legacy_stream;   // stream 0
  std::vector<std::unique_ptr<CUstream_st>> streams;
  // Events by handle; a pending record holds a reference too, so a destroyed event whose record
  // is still queued lives until the record runs (cudaEventDestroy's documented behaviour).
  std::map<CUevent_st*, std::shared_ptr<CUevent_st>> events;
  std::map<char*, size_t> pinned;  // cudaHostAlloc'ed blocks
  std::unordered_map<const void*, KernelAttributes> kernel_attributes;
  cudaError_t sticky = cudaSuccess;
  std::string sticky_message;
  ScheduleChoice schedule = schedule_from_env();
  bool racecheck = env_flag("CNX_EMU_RACECHECK");
  HostSyncCounts syncs;
  // The launch trace (start_trace .. stop_trace).
  bool tracing = false;
  bool measure_traffic = false;
  std::vector<TraceRecord> records;
  // Stream capture: the streams capturing now, the next capture id, the graphs and executable
  // graphs the program holds.
  int captures = 0;
  uint64_t next_capture_id = 1;
  std::map<CUgraph_st*, std::unique_ptr<CUgraph_st>> graphs;
  std::map<CUgraphExec_st*, std::unique_ptr<CUgraphExec_st>> graph_execs;
  uint64_t graph_launches = 0;
};

Device* g_device = nullptr;  // for the signal handler

// ---- the traffic measurement of a traced item ------------------------------------------------------
// While a traced item runs, the whole arena is PROT_NONE and the SIGSEGV handler (on_segv) notes
// each page the item touches: a read fault marks the page read and makes it readable, a write
// fault marks it written and makes it writable, so each page faults at most twice and the item
// then runs at full speed on it. x86-64 tells a write fault from a read one (the page-fault error
// code's bit 1, in the signal context); elsewhere every first touch is taken for a read, and a
// page written without being read counts as both.
// The handler may only touch memory that exists before it runs: the page table is sized, and the
// list of touched pages reserved, when the item starts.
struct Traffic {
  enum : uint8_t { kRead = 1, kWritten = 2 };
  volatile sig_atomic_t active = 0;
  char* base = nullptr;  // watched: [base, base + bytes)
  size_t bytes = 0;
  size_t page = 0;
  std::vector<uint8_t> state;     // per page: kRead | kWritten
  std::vector<uint32_t> touched;  // the pages with a state, to count and clear them at the end
};
Traffic g_traffic;

bool is_write_fault([[maybe_unused]] const void* context) {
#if defined(__x86_64__)
  return (static_cast<const ucontext_t*>(context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
  return false;  // decided by the page's state instead (note_touch)
#endif
}

// The SIGSEGV handler's part: true when the fault was a first touch of a watched page (noted, the
// page opened; the access then repeats and succeeds).
bool note_touch(const void* address, const void* context) {
  Traffic& t = g_traffic;
  const char* c = static_cast<const char*>(address);
  if (!t.active || c < t.base || c >= t.base + t.bytes) return false;
  const size_t index = static_cast<size_t>(c - t.base) / t.page;
  uint8_t& s = t.state[index];
  const bool is_write = is_write_fault(context) || s == Traffic::kRead;
  if (s & Traffic::kWritten) return false;  // writable already: not a fault of ours
  if (!is_write && s != 0) return false;
  if (s == 0) t.touched.push_back(static_cast<uint32_t>(index));  // reserved: never reallocates
  s |= is_write ? Traffic::kWritten : Traffic::kRead;
  if (mprotect(t.base + index * t.page, t.page, is_write ? PROT_READ | PROT_WRITE : PROT_READ) != 0) {
    static const char msg[] = "cnx emulator: the launch trace cannot change a page's protection "
                              "(too many memory mappings? see vm.max_map_count)\n";
    [[maybe_unused]] const ssize_t n = write(STDERR_FILENO, msg, sizeof msg - 1);
    std::abort();
  }
  return true;
}

// SIGSEGV on the arena: a page a traced item touches first (note_touch), else say why before the
// process dies as it would have (the handler restores the default action and returns, so the
// faulting access repeats and kills the process). AddressSanitizer builds keep ASan's own
// handler, which prints the stack (and have no traffic measurement).
void on_segv(int sig, siginfo_t* info, void* context) {
  if (note_touch(info->si_addr, context)) return;
  if (g_device && g_device->arena.contains(info->si_addr)) {
    static const char msg[] =
        "cnx emulator: segmentation fault on device memory: host code dereferenced a device "
        "pointer (only kernels and cuda* calls may touch device memory; copy it to the host)\n";
    [[maybe_unused]] const ssize_t n = write(STDERR_FILENO, msg, sizeof msg - 1);
  }
  signal(sig, SIG_DFL);
}

Device& device() {
  // Never destroyed: tensors held by static objects free their memory after main returns.
  static Device* d = [] {
    g_device = new Device();
#if !defined(__SANITIZE_ADDRESS__)
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, nullptr);
#endif
    return g_device;
  }();
  return *d;
}

class DeviceAccess {
 public:
  DeviceAccess() { device().arena.open(); }
  ~DeviceAccess() { device().arena.close(); }
  DeviceAccess(const DeviceAccess&) = delete;
  DeviceAccess& operator=(const DeviceAccess&) = delete;
};

// Measures the pages one traced item touches. Replaces the device-access window for that item:
// mprotect of the whole arena costs tens of milliseconds per GB, too much for every launch of a
// training step, so the item runs in a closed window (everything PROT_NONE), the pages it touches
// are opened one by one (note_touch), and at the end exactly those are closed again. Only when
// the item runs nested in an open window (an item queued behind an implicit wait) is the whole
// window closed first and reopened after. Does nothing for an untraced item, without
// measure_traffic, or inside another measurement.
class TrafficWatch {
 public:
  TrafficWatch(Device& dev, TraceRecord* record) : dev_(dev), record_(record) {
    if (!record_ || !dev.measure_traffic || g_traffic.active) {
      record_ = nullptr;
      return;
    }
    Traffic& t = g_traffic;
    t.base = dev.arena.base();
    t.bytes = dev.arena.mapped();
    t.page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    t.state.resize(t.bytes / t.page, 0);  // cleared by the previous item's finish
    t.touched.reserve(t.state.size());
    nested_ = dev.arena.is_open();
    dev.arena.open_watched();
    if (nested_) dev.arena.protect_window(PROT_NONE);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    t.active = 1;
  }
  ~TrafficWatch() { finish(); }
  TrafficWatch(const TrafficWatch&) = delete;
  TrafficWatch& operator=(const TrafficWatch&) = delete;

  // Whether this watch stands in for the device-access window (the item needs no other).
  bool watching() const { return record_ != nullptr; }

  // Ends the measurement, closes what it opened, and writes the page figures into the record.
  void finish() {
    if (!record_) return;
    Traffic& t = g_traffic;
    t.active = 0;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    uint64_t read = 0, written = 0, read_bytes = 0, written_bytes = 0;
    for (const uint32_t p : t.touched) {
      const uint64_t held = dev_.arena.allocated_bytes_in(p * t.page, (p + size_t{1}) * t.page);
      if (t.state[p] & Traffic::kRead) {
        ++read;
        read_bytes += held;
      }
      if (t.state[p] & Traffic::kWritten) {
        ++written;
        written_bytes += held;
      }
      t.state[p] = 0;
    }
    if (nested_) {
      dev_.arena.protect_window(PROT_READ | PROT_WRITE);
    } else {
      // Close the touched pages again, one mprotect per run of consecutive pages.
      std::sort(t.touched.begin(), t.touched.end());
      for (size_t i = 0; i < t.touched.size();) {
        size_t j = i + 1;
        while (j < t.touched.size() && t.touched[j] == t.touched[j - 1] + 1) ++j;
        dev_.arena.protect_range(t.touched[i] * t.page, (t.touched[j - 1] + size_t{1}) * t.page, PROT_NONE);
        i = j;
      }
    }
    dev_.arena.close_watched();
    t.touched.clear();
    record_->page_bytes_read = read * t.page;
    record_->page_bytes_written = written * t.page;
    if (record_->kind == TraceKind::kKernel) {  // the only figure a kernel has
      record_->bytes_read = read_bytes;
      record_->bytes_written = written_bytes;
    }
    record_ = nullptr;
  }

 private:
  Device& dev_;
  TraceRecord* record_;
  bool nested_ = false;  // ran inside an open window
};

thread_local cudaError_t t_last_error = cudaSuccess;
thread_local cudaError_t t_detail_code = cudaSuccess;  // the last failed call's error ...
thread_local std::string t_last_detail;                 // ... and what went wrong

// Every entry point: takes the device lock; a sticky error fails everything.
#define CNX_EMU_ENTER()                                         \
  Device& dev = device();                                       \
  std::lock_guard<std::recursive_mutex> lock_(dev.mutex);       \
  if (dev.sticky != cudaSuccess) return dev.sticky

cudaError_t error(cudaError_t code, const std::string& detail) {
  t_last_error = code;
  t_detail_code = code;
  t_last_detail = detail;
  std::fprintf(stderr, "cnx emulator: %s\n", detail.c_str());
  return code;
}

std::vector<CUstream_st*> all_streams(Device& dev) {
  std::vector<CUstream_st*> out{&dev.legacy_stream};
  for (auto& s : dev.streams) out.push_back(s.get());
  return out;
}

// Every stream forgets its queued work (counted as done, so no implicit wait waits for it).
void drop_queued_work(Device& dev) {
  for (CUstream_st* s : all_streams(dev)) {
    s->queue.clear();
    s->executed = s->enqueued;
  }
}

void set_sticky(Device& dev, cudaError_t code, const std::string& message) {
  dev.sticky = code;
  dev.sticky_message = message;
  std::fprintf(stderr, "cnx emulator: device error: %s\n", message.c_str());
  drop_queued_work(dev);  // the context is lost, as on a GPU: nothing queued will run
}

CUstream_st* stream_of(cudaStream_t s) {
  return s ? s : &device().legacy_stream;
}

// Runs the oldest item of `s`; false when it is empty.
bool step(Device& dev, CUstream_st* s) {
  if (s->queue.empty() || dev.sticky != cudaSuccess) return false;
  QueuedWork item = std::move(s->queue.front());
  s->queue.pop_front();
  try {
    TrafficWatch watch(dev, dev.tracing ? item.note.get() : nullptr);
    std::optional<DeviceAccess> access;
    if (!watch.watching() && item.touches_memory) access.emplace();
    item.work();
    watch.finish();
    ++s->executed;
  } catch (const DeviceFault& f) {
    set_sticky(dev, f.code, f.message);
    return false;
  } catch (const std::exception& e) {
    set_sticky(dev, cudaErrorLaunchFailure, item.what + ": " + e.what());
    return false;
  }
  if (dev.tracing && item.note) dev.records.push_back(std::move(*item.note));
  return true;
}

// A drain opens the device-access window once for all its items: opening it costs time in
// proportion to the device memory in use (mprotect), which per item would dominate a training
// step. Not under a traffic measurement, whose items must start with the window closed.
class DrainWindow {
 public:
  explicit DrainWindow(const Device& dev) {
    if (!(dev.tracing && dev.measure_traffic)) access_.emplace();
  }

 private:
  std::optional<DeviceAccess> access_;
};

void drain(Device& dev, CUstream_st* s) {
  if (s->queue.empty()) return;
  const DrainWindow window(dev);
  while (step(dev, s)) {
  }
}

void drain_all(Device& dev) {
  const DrainWindow window(dev);
  for (CUstream_st* s : all_streams(dev)) drain(dev, s);
}

// Queues an item on `s`, after the implicit waits of the legacy default stream: work on it
// waits for the work already queued on every blocking stream, and work on a blocking stream
// waits for the work already queued on it (CUDA Runtime API, "stream synchronization behavior").
void push_raw(CUstream_st* s, std::string what, std::function<void()> work,
              std::unique_ptr<TraceRecord> note = nullptr, bool touches_memory = true) {
  s->queue.push_back(QueuedWork{std::move(what), std::move(work), std::move(note), touches_memory});
  ++s->enqueued;
}
void wait_for(Device& dev, CUstream_st* s, CUstream_st* other) {
  if (other == s || other->executed == other->enqueued) return;
  const uint64_t target = other->enqueued;
  push_raw(s, "implicit wait (legacy default stream semantics)", [&dev, other, target] {
    const DrainWindow window(dev);
    while (other->executed < target && step(dev, other)) {
    }
  }, nullptr, /*touches_memory=*/false);
}
// `note`: what a running trace records of the item (nullptr: nothing; see trace_note).
// `touches_memory`: false for bookkeeping (an event record, a wait), which runs without opening
// device memory. On a capturing stream the item is recorded into the capture's graph instead
// (nothing runs; no implicit waits: a graph launch adds those of the stream it is launched on),
// and dropped when the capture was invalidated (the caller reports that).
void push(Device& dev, CUstream_st* s, std::string what, std::function<void()> work,
          std::unique_ptr<TraceRecord> note = nullptr, bool touches_memory = true) {
  if (s->capture) {
    if (s->capture->invalidated) return;
    std::optional<TraceRecord> kept;
    if (note) kept = std::move(*note);
    s->capture->graph->nodes.push_back(GraphNode{std::move(what), std::move(work), std::move(kept), touches_memory});
    return;
  }
  if (!dev.tracing) note = nullptr;  // made for a capture elsewhere (trace_note)
  if (s == &dev.legacy_stream) {
    for (auto& b : dev.streams)
      if (b->blocking && !b->destroyed) wait_for(dev, s, b.get());
  } else if (s->blocking) {
    wait_for(dev, s, &dev.legacy_stream);
  }
  push_raw(s, std::move(what), std::move(work), std::move(note), touches_memory);
}

// A record for an item about to be queued, or nullptr when no trace is on (the ordinary run pays
// one test). start_trace drains the queues first and stop_trace drains them before it ends, so
// every item that runs during a trace was queued during it and carries its note.
std::unique_ptr<TraceRecord> trace_note(const Device& dev, TraceKind kind, std::string name,
                                        uint64_t bytes_read = 0, uint64_t bytes_written = 0) {
  // A capture keeps the note for the trace of its replays.
  if (!dev.tracing && dev.captures == 0) return nullptr;
  auto note = std::make_unique<TraceRecord>();
  note->kind = kind;
  note->name = std::move(name);
  note->bytes_read = bytes_read;
  note->bytes_written = bytes_written;
  return note;
}

// cudaSuccess for the legacy stream (nullptr) and a stream that was created and not destroyed.
cudaError_t check_stream(Device& dev, cudaStream_t s, const std::string& call) {
  if (!s) return cudaSuccess;
  for (auto& own : dev.streams)
    if (own.get() == s && !own->destroyed) return cudaSuccess;
  return error(cudaErrorInvalidResourceHandle, call + ": not a live stream");
}

bool is_pinned(const Device& dev, const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  auto it = dev.pinned.upper_bound(const_cast<char*>(c));
  if (it == dev.pinned.begin()) return false;
  --it;
  return c >= it->first && c + bytes <= it->first + it->second;
}

// ---- stream capture ------------------------------------------------------------------------------
// What the CUDA Programming Guide ("Stream capture", "Prohibited and unhandled operations",
// "Invalidation") says: synchronising with or querying a capturing stream, and the potentially
// unsafe calls (cudaMalloc, cudaMemcpy, ...) in the global and thread-local modes, fail with
// cudaErrorStreamCaptureUnsupported and invalidate the capture; work queued into an invalidated
// capture fails with cudaErrorStreamCaptureInvalidated, and so does cudaStreamEndCapture.

void invalidate(StreamCapture& c, const std::string& why) {
  if (c.invalidated) return;
  c.invalidated = true;
  c.why = why;
}

// A call that is illegal while `s` captures (a synchronisation or query of it, a copy with
// pageable memory on it): refused, and the capture is invalidated.
cudaError_t refuse_in_capture(CUstream_st* s, const std::string& call) {
  invalidate(*s->capture, call);
  return error(cudaErrorStreamCaptureUnsupported,
               call + ": not permitted on a capturing stream (the capture is now invalidated)");
}

// Work about to be queued on `s`: refused when its capture was invalidated.
cudaError_t capture_gate(CUstream_st* s, const std::string& call) {
  if (s->capture && s->capture->invalidated)
    return error(cudaErrorStreamCaptureInvalidated,
                 call + ": the stream's capture was invalidated by " + s->capture->why);
  return cudaSuccess;
}

// A potentially unsafe call (cudaMalloc, cudaFree, cudaMemcpy, cudaMemset, cudaHostAlloc,
// cudaFreeHost) while a capture in global mode, or one in thread-local mode begun by this thread,
// is in progress: refused, and those captures are invalidated. Relaxed captures allow it.
// `any_mode`: a call that synchronises with every stream (cudaDeviceSynchronize), refused
// whatever the mode.
cudaError_t refuse_unsafe(Device& dev, const std::string& call, bool any_mode = false) {
  if (dev.captures == 0) return cudaSuccess;
  bool refused = false;
  for (CUstream_st* s : all_streams(dev)) {
    if (!s->capture) continue;
    StreamCapture& c = *s->capture;
    if (any_mode || c.mode == cudaStreamCaptureModeGlobal ||
        (c.mode == cudaStreamCaptureModeThreadLocal && c.thread == std::this_thread::get_id())) {
      invalidate(c, call);
      refused = true;
    }
  }
  if (!refused) return cudaSuccess;
  return error(cudaErrorStreamCaptureUnsupported,
               call + ": not permitted while a stream captures" +
                   (any_mode ? "" : " in global or thread-local mode") + " (the capture is now invalidated)");
}

// The capturing stream whose capture has this id, or nullptr.
CUstream_st* capture_with_id(Device& dev, uint64_t id) {
  for (CUstream_st* s : all_streams(dev))
    if (s->capture && s->capture->id == id) return s;
  return nullptr;
}

// An event last recorded inside a capture: it has no completion to wait for or query
// (cudaErrorCapturedEvent); a capture still in progress is invalidated.
cudaError_t refuse_captured_event(Device& dev, cudaEvent_t event, const std::string& call) {
  if (CUstream_st* s = capture_with_id(dev, event->capture_id)) invalidate(*s->capture, call);
  return error(cudaErrorCapturedEvent, call + ": the event was last recorded in a stream capture");
}

// ---- the race check --------------------------------------------------------------------------------

struct Snapshot {
  std::vector<Allocation> allocations;
  std::vector<std::vector<char>> bytes;
};
// Of the allocations that `written` may reach (every live one when it is opaque).
Snapshot take_snapshot(const WrittenMemory& written) {
  Snapshot s;
  for (const Allocation& a : device().arena.allocations()) {
    const bool reached = written.opaque || std::any_of(written.pointers.begin(), written.pointers.end(),
                                                       [&](const void* p) {
                                                         const char* c = static_cast<const char*>(p);
                                                         return c >= a.ptr && c < a.ptr + a.bytes;
                                                       });
    if (reached) s.allocations.push_back(a);
  }
  for (const Allocation& a : s.allocations) s.bytes.emplace_back(a.ptr, a.ptr + a.bytes);
  return s;
}
void restore(const Snapshot& s) {
  for (size_t i = 0; i < s.allocations.size(); ++i)
    std::memcpy(s.allocations[i].ptr, s.bytes[i].data(), s.allocations[i].bytes);
}

// Runs the launch in order, then reversed from the same memory; both must leave the same bytes
// in every allocation the kernel may write.
void run_racechecked(const Launch& launch) {
  const Snapshot before = take_snapshot(launch.written);
  run_kernel(launch, ScheduleChoice{Schedule::kInOrder, 0});
  const Snapshot first = take_snapshot(launch.written);
  restore(before);
  run_kernel(launch, ScheduleChoice{Schedule::kReverse, 0});
  for (size_t i = 0; i < first.allocations.size(); ++i) {
    const Allocation& a = first.allocations[i];
    if (std::memcmp(a.ptr, first.bytes[i].data(), a.bytes) == 0) continue;
    size_t k = 0;
    while (a.ptr[k] == first.bytes[i][k]) ++k;
    char msg[160];
    std::snprintf(msg, sizeof msg,
                  "racecheck: the result depends on the order of threads and blocks: byte %zu of "
                  "the %zu-byte allocation at %p differs between the in-order and the reversed run",
                  k, a.bytes, static_cast<void*>(a.ptr));
    throw DeviceFault{cudaErrorLaunchFailure, std::string(msg) + " [in kernel " + launch.kernel->name + "]"};
  }
}

// ---- kernels: registry and coverage -----------------------------------------------------------

struct Registry {
  std::mutex mutex;
  std::vector<std::unique_ptr<KernelInfo>> kernels;
  std::map<const KernelInfo*, uint64_t> launched;
};
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

void count_launch(const KernelInfo* kernel) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  ++r.launched[kernel];
}

// The largest dynamic shared memory `kernel` may use (48 KB unless cudaFuncSetAttribute raised it).
size_t max_dynamic_shared(const Device& dev, const void* kernel) {
  const auto it = dev.kernel_attributes.find(kernel);
  return it == dev.kernel_attributes.end() ? kDefaultSharedPerBlock : it->second.max_dynamic_shared;
}

// "... [with auto kKernel = NAME]" or "... [with auto kKernel = NAME; ...]" -> NAME
std::string kernel_name(const char* pretty) {
  std::string s(pretty);
  const std::string key = "kKernel = ";
  const size_t at = s.find(key);
  if (at == std::string::npos) return s;
  s = s.substr(at + key.size());
  // The name ends at the ']' or ';' that closes the "with" clause (not one inside <...>).
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '<' || c == '(' || c == '[') ++depth;
    if (c == '>' || c == ')') --depth;
    if (c == ']' && depth-- == 0) return s.substr(0, i);
    if (c == ';' && depth == 0) return s.substr(0, i);
  }
  return s;
}

void write_coverage() {
  const char* dir = std::getenv("CNX_EMU_COVERAGE_DIR");
  if (!dir || !*dir) return;
  std::ofstream out(std::string(dir) + "/" + std::to_string(getpid()) + ".txt");
  for (const auto& [name, launches] : kernel_launch_counts()) out << launches << '\t' << name << '\n';
}

}  // namespace

// ---- internal.h / emulator.h -------------------------------------------------------------------

void fail_outside_kernel(const char* what) {
  std::fprintf(stderr, "cnx emulator: %s called outside a kernel\n", what);
  std::abort();
}

const KernelInfo* register_kernel(const char* pretty_function, const void* address) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (r.kernels.empty()) std::atexit(write_coverage);
  r.kernels.push_back(std::make_unique<KernelInfo>(KernelInfo{kernel_name(pretty_function), address}));
  return r.kernels.back().get();
}

bool is_device_range(const void* p, size_t bytes) {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  return dev.arena.holds(p, bytes);
}

void enqueue(cudaStream_t stream, std::string what, std::function<void()> work) {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  if (dev.sticky != cudaSuccess) return;
  push(dev, stream_of(stream), std::move(what), std::move(work));
}

void enqueue(cudaStream_t stream, std::string what, std::function<void()> work, GemmTraceInfo gemm) {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  if (dev.sticky != cudaSuccess) return;
  auto note = trace_note(dev, TraceKind::kGemm, what, gemm.bytes_read, gemm.bytes_written);
  if (note) {
    note->m = gemm.m;
    note->n = gemm.n;
    note->k = gemm.k;
    note->types = std::move(gemm.types);
    note->epilogue = std::move(gemm.epilogue);
    note->flops = 2 * static_cast<uint64_t>(gemm.m) * static_cast<uint64_t>(gemm.n) * static_cast<uint64_t>(gemm.k);
  }
  push(dev, stream_of(stream), std::move(what), std::move(work), std::move(note));
}

cudaError_t run_in_stream_order(cudaStream_t stream, std::string what, std::function<void()> work) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_stream(dev, stream, "run_in_stream_order (" + what + ")")) return e;
  CUstream_st* s = stream_of(stream);
  if (s->capture) {
    if (cudaError_t e = capture_gate(s, what)) return e;
    invalidate(*s->capture, what);
    return error(cudaErrorStreamCaptureUnsupported,
                 what + ": not emulated on a capturing stream (the capture is now invalidated)");
  }
  ++dev.syncs.collectives;
  push(dev, s, std::move(what), std::move(work));
  drain(dev, s);
  return dev.sticky;
}

HostSyncCounts host_sync_counts() {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  return dev.syncs;
}

void reset_host_sync_counts() {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  dev.syncs = HostSyncCounts{};
}

void set_page_aligned_allocations(bool on) {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  dev.arena.set_page_aligned(on);
}

bool trace_traffic_available() {
#if defined(__SANITIZE_ADDRESS__)
  return false;
#else
  return true;
#endif
}

bool start_trace(bool measure_traffic) {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  if (dev.tracing || (measure_traffic && !trace_traffic_available())) return false;
  drain_all(dev);  // earlier work is not part of the trace
  dev.records.clear();
  dev.measure_traffic = measure_traffic;
  dev.tracing = true;
  return true;
}

std::vector<TraceRecord> stop_trace() {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  if (!dev.tracing) return {};
  drain_all(dev);
  dev.tracing = false;
  dev.measure_traffic = false;
  return std::move(dev.records);
}

void launch_kernel(const KernelInfo* kernel, dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t stream, std::function<void()> body, WrittenMemory written) {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  if (dev.sticky != cudaSuccess) {
    t_last_error = dev.sticky;
    return;
  }
  const auto bad = [&](const std::string& why) {
    error(cudaErrorInvalidConfiguration, "launch of " + kernel->name + ": " + why);
  };
  const unsigned gd[3] = {grid.x, grid.y, grid.z}, bd[3] = {block.x, block.y, block.z};
  for (int i = 0; i < 3; ++i) {
    if (gd[i] == 0 || bd[i] == 0) return bad("a grid or block dimension is 0");
    if (gd[i] > kMaxGridDim[i])
      return bad("grid dimension " + std::to_string(i) + " is " + std::to_string(gd[i]) +
                 " (at most " + std::to_string(kMaxGridDim[i]) + ")");
    if (bd[i] > kMaxBlockDim[i])
      return bad("block dimension " + std::to_string(i) + " is " + std::to_string(bd[i]) +
                 " (at most " + std::to_string(kMaxBlockDim[i]) + ")");
  }
  if (uint64_t(block.x) * block.y * block.z > kMaxThreadsPerBlock)
    return bad(std::to_string(uint64_t(block.x) * block.y * block.z) + " threads per block (at most 1024)");
  const size_t smem_limit = max_dynamic_shared(dev, kernel->address);
  if (smem_bytes > smem_limit)
    return bad(std::to_string(smem_bytes) + " bytes of dynamic shared memory, more than the " +
               std::to_string(smem_limit) + " allowed" +
               (smem_limit == kDefaultSharedPerBlock
                    ? " without cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)"
                    : " by its cudaFuncSetAttribute"));
  if (check_stream(dev, stream, "launch of " + kernel->name) != cudaSuccess) return;
  if (capture_gate(stream_of(stream), "launch of " + kernel->name) != cudaSuccess) return;
  count_launch(kernel);
  auto launch = std::make_shared<Launch>(Launch{kernel, grid, block, smem_bytes, std::move(body), std::move(written)});
  auto note = trace_note(dev, TraceKind::kKernel, kernel->name);
  if (note) {
    note->grid = grid;
    note->block = block;
    note->dynamic_smem = smem_bytes;
  }
  push(dev, stream_of(stream), "kernel " + kernel->name, [launch] {
    Device& d = device();
    // Under a traffic measurement the race check's snapshots and second run would count as the
    // kernel's traffic: a traced kernel runs once.
    if (d.racecheck && !g_traffic.active)
      run_racechecked(*launch);
    else
      run_kernel(*launch, d.schedule);
  }, std::move(note));
}

bool set_schedule_for_testing(const std::string& spec) {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  return parse_schedule(spec, dev.schedule);
}

void set_racecheck_for_testing(bool on) {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  dev.racecheck = on;
}

void reset_after_fault_for_testing() {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  dev.sticky = cudaSuccess;
  dev.sticky_message.clear();
  drop_queued_work(dev);
  for (CUstream_st* s : all_streams(dev)) s->capture.reset();
  dev.captures = 0;
  t_last_error = cudaSuccess;
}

std::vector<std::pair<std::string, uint64_t>> kernel_launch_counts() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  std::vector<std::pair<std::string, uint64_t>> out;
  for (const auto& k : r.kernels) {
    const auto it = r.launched.find(k.get());
    out.emplace_back(k->name, it == r.launched.end() ? 0 : it->second);
  }
  return out;
}

}  // namespace cnx::emu

// =====================================================================================================
// The CUDA runtime API (cuda_runtime_api.h), as far as the project uses it.
// =====================================================================================================

using namespace cnx::emu;

namespace {

cudaError_t check_device_range(const void* p, size_t n, const char* call, const char* what) {
  if (n == 0 || device().arena.holds(p, n)) return cudaSuccess;
  char msg[256];
  std::snprintf(msg, sizeof msg, "%s: %s [%p, +%zu bytes) is not inside one device allocation", call,
                what, p, n);
  return error(cudaErrorInvalidValue, msg);
}

cudaError_t check_host_range(const void* p, size_t n, const char* call, const char* what) {
  if (n == 0 || (p != nullptr && !device().arena.contains(p))) return cudaSuccess;
  char msg[256];
  std::snprintf(msg, sizeof msg, "%s: %s %p is not host memory", call, what, p);
  return error(cudaErrorInvalidValue, msg);
}

const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorCapturedEvent: return "cudaErrorCapturedEvent";
    case cudaErrorStreamCaptureWrongThread: return "cudaErrorStreamCaptureWrongThread";
    default: return "cudaErrorUnknown";
  }
}

const char* error_text(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorIllegalState: return "the resource is not in a valid state to perform the requested operation";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorCapturedEvent: return "operation not permitted on an event last recorded in a capturing stream";
    case cudaErrorStreamCaptureWrongThread: return "attempt to terminate a thread-local capture sequence from another thread";
    default: return "unknown error";
  }
}

cudaError_t check_event(cudaEvent_t e) {
  if (device().events.count(e)) return cudaSuccess;
  return error(cudaErrorInvalidResourceHandle, "not a live event");
}

// cudaMemcpyAsync's work, under the device lock; `blocked`: the call waited for the copy (to
// pageable memory), which the caller counts as a host synchronisation.
cudaError_t copy_async(Device& dev, void* dst, const void* src, size_t n, cudaMemcpyKind kind,
                       cudaStream_t stream, bool& blocked) {
  if (cudaError_t e = check_stream(dev, stream, "cudaMemcpyAsync")) return e;
  CUstream_st* s = stream_of(stream);
  if (cudaError_t e = capture_gate(s, "cudaMemcpyAsync")) return e;
  if (n == 0) return cudaSuccess;
  switch (kind) {
    case cudaMemcpyHostToDevice: {
      if (cudaError_t e = check_device_range(dst, n, "cudaMemcpyAsync HtoD", "destination")) return e;
      if (cudaError_t e = check_host_range(src, n, "cudaMemcpyAsync HtoD", "source")) return e;
      if (s->capture && !is_pinned(dev, src, n)) return refuse_in_capture(s, "cudaMemcpyAsync HtoD from pageable memory");
      if (is_pinned(dev, src, n)) {
        // A DMA from page-locked memory: reads the source when it runs.
        push(dev, s, "cudaMemcpyAsync HtoD", [=] { std::memcpy(dst, src, n); },
             trace_note(dev, TraceKind::kCopy, "cudaMemcpyAsync HtoD", 0, n));
      } else {
        // Pageable: the driver stages the source before returning.
        auto staged = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                          static_cast<const char*>(src) + n);
        push(dev, s, "cudaMemcpyAsync HtoD", [=] { std::memcpy(dst, staged->data(), n); },
             trace_note(dev, TraceKind::kCopy, "cudaMemcpyAsync HtoD", 0, n));
      }
      return cudaSuccess;
    }
    case cudaMemcpyDeviceToHost: {
      if (cudaError_t e = check_device_range(src, n, "cudaMemcpyAsync DtoH", "source")) return e;
      if (cudaError_t e = check_host_range(dst, n, "cudaMemcpyAsync DtoH", "destination")) return e;
      if (s->capture && !is_pinned(dev, dst, n)) return refuse_in_capture(s, "cudaMemcpyAsync DtoH to pageable memory");
      push(dev, s, "cudaMemcpyAsync DtoH", [=] { std::memcpy(dst, src, n); },
           trace_note(dev, TraceKind::kCopy, "cudaMemcpyAsync DtoH", n, 0));
      // To pageable memory the call returns only once the copy is done.
      if (!is_pinned(dev, dst, n)) {
        blocked = true;
        drain(dev, s);
      }
      return dev.sticky;
    }
    case cudaMemcpyDeviceToDevice: {
      if (cudaError_t e = check_device_range(src, n, "cudaMemcpyAsync DtoD", "source")) return e;
      if (cudaError_t e = check_device_range(dst, n, "cudaMemcpyAsync DtoD", "destination")) return e;
      push(dev, s, "cudaMemcpyAsync DtoD", [=] { std::memmove(dst, src, n); },
           trace_note(dev, TraceKind::kCopy, "cudaMemcpyAsync DtoD", n, n));
      return cudaSuccess;
    }
    default:
      return error(cudaErrorInvalidValue, "cudaMemcpyAsync: only HtoD, DtoH and DtoD copies are emulated");
  }
}

}  // namespace

extern "C" {

// ---- errors ----------------------------------------------------------------------------------------

cudaError_t cudaGetLastError(void) {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  if (dev.sticky != cudaSuccess) return dev.sticky;
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) {
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  return dev.sticky != cudaSuccess ? dev.sticky : t_last_error;
}

// The standard text, followed by the emulator's details when this thread's last failed call
// (or the device's sticky error) was of this kind.
const char* cudaGetErrorString(cudaError_t e) {
  thread_local std::string text;
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  text = error_text(e);
  if (e != cudaSuccess && e == dev.sticky) text += " (emulated device: " + dev.sticky_message + ")";
  else if (e != cudaSuccess && e == t_detail_code) text += " (emulated device: " + t_last_detail + ")";
  return text.c_str();
}

const char* cudaGetErrorName(cudaError_t e) { return error_name(e); }

// ---- the device --------------------------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int d) {
  if (d != 0) return error(cudaErrorInvalidDevice, "cudaSetDevice(" + std::to_string(d) + "): one device (0)");
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return error(cudaErrorInvalidDevice, "cudaGetDeviceProperties: one device (0)");
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "cnx emulated CUDA device (sm_90, H200 limits)");
  p->totalGlobalMem = device().arena.capacity();
  p->sharedMemPerBlock = kDefaultSharedPerBlock;
  p->sharedMemPerBlockOptin = kMaxSharedPerBlockOptin;
  p->sharedMemPerMultiprocessor = 228 * 1024;
  p->regsPerBlock = 65536;
  p->regsPerMultiprocessor = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = kMaxThreadsPerBlock;
  for (int i = 0; i < 3; ++i) {
    p->maxThreadsDim[i] = static_cast<int>(kMaxBlockDim[i]);
    p->maxGridSize[i] = static_cast<int>(kMaxGridDim[i]);
  }
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = kMultiprocessors;
  p->maxThreadsPerMultiProcessor = kMaxThreadsPerMultiprocessor;
  p->maxBlocksPerMultiProcessor = kMaxBlocksPerMultiprocessor;
  p->l2CacheSize = 60 << 20;
  p->memoryBusWidth = 6144;
  p->unifiedAddressing = 1;
  p->concurrentKernels = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int d) {
  if (d != 0) return error(cudaErrorInvalidDevice, "cudaDeviceGetAttribute: one device (0)");
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = kMultiprocessors; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(kDefaultSharedPerBlock); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(kMaxSharedPerBlockOptin); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = kMaxThreadsPerMultiprocessor; return cudaSuccess;
    case cudaDevAttrL2CacheSize: *value = 60 << 20; return cudaSuccess;
    default:
      return error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute " + std::to_string(int(attr)) +
                                              " is not emulated");
  }
}

cudaError_t cudaDeviceSynchronize(void) {
  CNX_EMU_ENTER();
  if (cudaError_t e = refuse_unsafe(dev, "cudaDeviceSynchronize", /*any_mode=*/true)) return e;
  ++dev.syncs.device_syncs;
  drain_all(dev);
  return dev.sticky;
}

cudaError_t cudaMemGetInfo(size_t* free, size_t* total) {
  CNX_EMU_ENTER();
  *total = dev.arena.capacity();
  *free = dev.arena.capacity() - dev.arena.used();
  return cudaSuccess;
}

// ---- kernels -------------------------------------------------------------------------------------------

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  CNX_EMU_ENTER();
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kMaxSharedPerBlockOptin)
      return error(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(value) +
                                              " bytes of dynamic shared memory exceed the 232448 of sm_90");
    dev.kernel_attributes[func].max_dynamic_shared = static_cast<size_t>(value);
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return error(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute " + std::to_string(int(attr)) + " is not emulated");
}

// Threads per SM and blocks per SM bound the answer (registers are not modelled).
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*,
                                                                   int block_size,
                                                                   size_t dynamic_smem, unsigned) {
  if (block_size <= 0 || block_size > kMaxThreadsPerBlock)
    return error(cudaErrorInvalidValue, "cudaOccupancyMaxActiveBlocksPerMultiprocessor: bad block size");
  int b = std::min(kMaxBlocksPerMultiprocessor, kMaxThreadsPerMultiprocessor / block_size);
  if (dynamic_smem > 0) b = std::min<int>(b, static_cast<int>((228 * 1024) / (dynamic_smem + 1024)));
  *blocks = b;
  return cudaSuccess;
}

// ---- memory ------------------------------------------------------------------------------------------

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  CNX_EMU_ENTER();
  *ptr = nullptr;
  if (cudaError_t e = refuse_unsafe(dev, "cudaMalloc")) return e;
  if (bytes == 0) return cudaSuccess;
  void* p = dev.arena.allocate(bytes);
  if (!p) {
    t_last_error = t_detail_code = cudaErrorMemoryAllocation;
    t_last_detail = "cudaMalloc of " + std::to_string(bytes) + " bytes: the emulated device is full";
    return cudaErrorMemoryAllocation;
  }
  dev.arena.fill(p, 0xFF, bytes);  // NaN: a kernel that reads what nobody wrote shows it
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  CNX_EMU_ENTER();
  if (!ptr) return cudaSuccess;
  if (cudaError_t e = refuse_unsafe(dev, "cudaFree")) return e;
  ++dev.syncs.frees;
  drain_all(dev);  // cudaFree synchronises the device
  if (dev.sticky != cudaSuccess) return dev.sticky;
  char msg[96];
  std::snprintf(msg, sizeof msg, "cudaFree(%p): not an allocation of cudaMalloc", ptr);
  if (!dev.arena.release(ptr)) return error(cudaErrorInvalidValue, msg);
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned int) {
  CNX_EMU_ENTER();
  if (cudaError_t e = refuse_unsafe(dev, "cudaHostAlloc")) return e;
  void* p = nullptr;
  if (posix_memalign(&p, 4096, std::max<size_t>(bytes, 1)) != 0) return error(cudaErrorMemoryAllocation, "cudaHostAlloc");
  dev.pinned[static_cast<char*>(p)] = bytes;
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** ptr, size_t bytes) { return cudaHostAlloc(ptr, bytes, 0); }

cudaError_t cudaFreeHost(void* ptr) {
  CNX_EMU_ENTER();
  if (!ptr) return cudaSuccess;
  if (cudaError_t e = refuse_unsafe(dev, "cudaFreeHost")) return e;
  ++dev.syncs.frees;
  drain_all(dev);  // work still queued may read or write it
  const auto it = dev.pinned.find(static_cast<char*>(ptr));
  if (it == dev.pinned.end()) return error(cudaErrorInvalidValue, "cudaFreeHost: not from cudaHostAlloc");
  dev.pinned.erase(it);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* ptr) {
  CNX_EMU_ENTER();
  std::memset(attr, 0, sizeof *attr);
  attr->device = 0;
  if (dev.arena.holds(ptr, 1)) {
    attr->type = cudaMemoryTypeDevice;
    attr->devicePointer = const_cast<void*>(ptr);
  } else if (is_pinned(dev, ptr, 1)) {
    attr->type = cudaMemoryTypeHost;
    attr->hostPointer = const_cast<void*>(ptr);
    attr->devicePointer = const_cast<void*>(ptr);
  } else {
    attr->type = cudaMemoryTypeUnregistered;
    attr->device = -2;
  }
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t stream) {
  CNX_EMU_ENTER();
  bool blocked = false;
  const cudaError_t e = copy_async(dev, dst, src, n, kind, stream, blocked);
  if (blocked) ++dev.syncs.blocking_copies;
  return e;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  CNX_EMU_ENTER();
  if (cudaError_t e = refuse_unsafe(dev, "cudaMemcpy")) return e;
  ++dev.syncs.blocking_copies;  // once, whether or not copy_async waited too
  drain_all(dev);
  bool blocked = false;
  if (cudaError_t e = copy_async(dev, dst, src, n, kind, nullptr, blocked)) return e;
  drain_all(dev);
  return dev.sticky;
}

cudaError_t cudaMemcpyPeerAsync(void* dst, int dst_device, const void* src, int src_device, size_t n,
                                cudaStream_t stream) {
  if (dst_device != 0 || src_device != 0) return error(cudaErrorInvalidDevice, "cudaMemcpyPeerAsync: one device (0)");
  return cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream);
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t n, cudaStream_t stream) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_stream(dev, stream, __func__)) return e;
  if (cudaError_t e = capture_gate(stream_of(stream), "cudaMemsetAsync")) return e;
  if (cudaError_t e = check_device_range(dst, n, "cudaMemsetAsync", "destination")) return e;
  if (n == 0) return cudaSuccess;
  push(dev, stream_of(stream), "cudaMemsetAsync", [=] { std::memset(dst, value, n); },
       trace_note(dev, TraceKind::kMemset, "cudaMemsetAsync", 0, n));
  return cudaSuccess;
}

cudaError_t cudaMemset(void* dst, int value, size_t n) {
  CNX_EMU_ENTER();
  if (cudaError_t e = refuse_unsafe(dev, "cudaMemset")) return e;
  ++dev.syncs.blocking_copies;
  if (cudaError_t e = cudaMemsetAsync(dst, value, n, nullptr)) return e;
  drain_all(dev);
  return dev.sticky;
}

// ---- streams --------------------------------------------------------------------------------------------

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  CNX_EMU_ENTER();
  dev.streams.push_back(std::make_unique<CUstream_st>());
  dev.streams.back()->blocking = !(flags & cudaStreamNonBlocking);
  *stream = dev.streams.back().get();
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  CNX_EMU_ENTER();
  if (!stream) return error(cudaErrorInvalidResourceHandle, "cudaStreamDestroy: the default stream");
  if (cudaError_t e = check_stream(dev, stream, __func__)) return e;
  if (stream->capture) return refuse_in_capture(stream, "cudaStreamDestroy");
  drain(dev, stream);  // work already queued still completes
  stream->destroyed = true;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_stream(dev, stream, __func__)) return e;
  if (stream_of(stream)->capture) return refuse_in_capture(stream_of(stream), "cudaStreamSynchronize");
  ++dev.syncs.stream_syncs;
  drain(dev, stream_of(stream));
  return dev.sticky;
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_stream(dev, stream, __func__)) return e;
  if (stream_of(stream)->capture) return refuse_in_capture(stream_of(stream), "cudaStreamQuery");
  ++dev.syncs.queries;
  CUstream_st* s = stream_of(stream);
  step(dev, s);
  if (dev.sticky != cudaSuccess) return dev.sticky;
  return s->queue.empty() ? cudaSuccess : cudaErrorNotReady;
}

// ---- events ---------------------------------------------------------------------------------------------

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  CNX_EMU_ENTER();
  auto e = std::make_shared<CUevent_st>();
  e->timing = !(flags & cudaEventDisableTiming);
  dev.events[e.get()] = e;
  *event = e.get();
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, 0); }

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_event(event)) return e;
  dev.events.erase(event);
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_event(event)) return e;
  if (cudaError_t e = check_stream(dev, stream, __func__)) return e;
  if (CUstream_st* s = stream_of(stream); s->capture) {
    // Inside a capture a record marks a point of the capture (no graph node, nothing runs);
    // only a wait on the same capturing stream may use it (README: cross-stream capture).
    if (cudaError_t e = capture_gate(s, __func__)) return e;
    event->capture_id = s->capture->id;
    return cudaSuccess;
  }
  event->capture_id = 0;
  const uint64_t generation = ++event->recorded;
  event->stream = stream_of(stream);
  std::shared_ptr<CUevent_st> keep = dev.events[event];
  push(dev, stream_of(stream), "cudaEventRecord", [keep, generation] {
    keep->completed = std::max(keep->completed, generation);
    keep->when = std::chrono::steady_clock::now();
  }, nullptr, /*touches_memory=*/false);
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_event(event)) return e;
  if (event->capture_id) return refuse_captured_event(dev, event, __func__);
  ++dev.syncs.queries;
  if (event->completed == event->recorded) return cudaSuccess;
  step(dev, event->stream);  // the device advances by one item per poll
  if (dev.sticky != cudaSuccess) return dev.sticky;
  return event->completed == event->recorded ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_event(event)) return e;
  if (event->capture_id) return refuse_captured_event(dev, event, __func__);
  ++dev.syncs.event_syncs;
  const DrainWindow window(dev);
  while (event->completed != event->recorded && step(dev, event->stream)) {
  }
  return dev.sticky;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_event(start)) return e;
  if (cudaError_t e = check_event(end)) return e;
  if (start->capture_id) return refuse_captured_event(dev, start, __func__);
  if (end->capture_id) return refuse_captured_event(dev, end, __func__);
  if (!start->timing || !end->timing) return error(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event without timing");
  if (start->completed != start->recorded || end->completed != end->recorded || !start->recorded || !end->recorded)
    return cudaErrorNotReady;
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_event(event)) return e;
  if (cudaError_t e = check_stream(dev, stream, __func__)) return e;
  CUstream_st* waiter = stream_of(stream);
  if (cudaError_t e = capture_gate(waiter, __func__)) return e;
  if (event->capture_id) {
    // A record inside a capture: waiting on it from the same capturing stream orders nothing new
    // (a capture on one stream is a chain); from another stream it would fork the capture onto
    // that stream, which the emulator does not model (README.md).
    if (waiter->capture && waiter->capture->id == event->capture_id) return cudaSuccess;
    if (CUstream_st* s = capture_with_id(dev, event->capture_id)) invalidate(*s->capture, __func__);
    if (waiter->capture) invalidate(*waiter->capture, __func__);
    return error(cudaErrorStreamCaptureUnsupported,
                 "cudaStreamWaitEvent: the event was recorded in a stream capture; capture across streams "
                 "(fork and join through events) is not emulated");
  }
  const uint64_t generation = event->recorded;
  CUstream_st* other = event->stream;
  if (generation == 0 || !other) return cudaSuccess;  // nothing recorded: no wait
  if (waiter->capture) {
    invalidate(*waiter->capture, __func__);
    return error(cudaErrorStreamCaptureUnsupported,
                 "cudaStreamWaitEvent: a capturing stream waiting on an event recorded outside the capture "
                 "is not emulated (the capture is now invalidated)");
  }
  std::shared_ptr<CUevent_st> keep = dev.events[event];
  push(dev, waiter, "cudaStreamWaitEvent", [keep, generation, other] {
    Device& d = device();
    const DrainWindow window(d);
    while (keep->completed < generation && step(d, other)) {
    }
  }, nullptr, /*touches_memory=*/false);
  return cudaSuccess;
}

// ---- stream capture and graphs -------------------------------------------------------------------

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_stream(dev, stream, __func__)) return e;
  if (!stream) return error(cudaErrorStreamCaptureUnsupported, "cudaStreamBeginCapture: the legacy default stream cannot capture");
  if (mode != cudaStreamCaptureModeGlobal && mode != cudaStreamCaptureModeThreadLocal &&
      mode != cudaStreamCaptureModeRelaxed)
    return error(cudaErrorInvalidValue, "cudaStreamBeginCapture: not a capture mode");
  if (stream->capture) return error(cudaErrorIllegalState, "cudaStreamBeginCapture: the stream is already capturing");
  StreamCapture c;
  c.graph = std::make_unique<CUgraph_st>();
  c.mode = mode;
  c.thread = std::this_thread::get_id();
  c.id = dev.next_capture_id++;
  stream->capture = std::move(c);
  ++dev.captures;
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_stream(dev, stream, __func__)) return e;
  *graph = nullptr;
  if (!stream || !stream->capture) return error(cudaErrorIllegalState, "cudaStreamEndCapture: the stream is not capturing");
  if (stream->capture->mode != cudaStreamCaptureModeRelaxed && stream->capture->thread != std::this_thread::get_id())
    return error(cudaErrorStreamCaptureWrongThread, "cudaStreamEndCapture: not the thread that began the capture");
  StreamCapture c = std::move(*stream->capture);
  stream->capture.reset();
  --dev.captures;
  if (c.invalidated)
    return error(cudaErrorStreamCaptureInvalidated, "cudaStreamEndCapture: the capture was invalidated by " + c.why);
  CUgraph_st* g = c.graph.get();
  dev.graphs[g] = std::move(c.graph);
  *graph = g;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  CNX_EMU_ENTER();
  if (cudaError_t e = check_stream(dev, stream, __func__)) return e;
  const CUstream_st* s = stream_of(stream);
  *status = !s->capture                ? cudaStreamCaptureStatusNone
            : s->capture->invalidated ? cudaStreamCaptureStatusInvalidated
                                      : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

// The status, the capture's id and graph; no dependency set (node handles are not emulated):
// *dependencies_out and *edgeData_out are nullptr and *numDependencies_out 0.
cudaError_t cudaStreamGetCaptureInfo(cudaStream_t stream, cudaStreamCaptureStatus* status, unsigned long long* id,
                                     cudaGraph_t* graph, const cudaGraphNode_t** dependencies,
                                     const cudaGraphEdgeData** edge_data, size_t* num_dependencies) {
  if (cudaError_t e = cudaStreamIsCapturing(stream, status)) return e;
  Device& dev = device();
  std::lock_guard<std::recursive_mutex> lock(dev.mutex);
  const CUstream_st* s = stream_of(stream);
  if (id && s->capture) *id = s->capture->id;
  if (graph) *graph = s->capture ? s->capture->graph.get() : nullptr;
  if (dependencies) *dependencies = nullptr;
  if (edge_data) *edge_data = nullptr;
  if (num_dependencies) *num_dependencies = 0;
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags) {
  CNX_EMU_ENTER();
  *exec = nullptr;
  if (!dev.graphs.count(graph)) return error(cudaErrorInvalidValue, "cudaGraphInstantiate: not a live graph");
  if (flags != 0) return error(cudaErrorInvalidValue, "cudaGraphInstantiate: only flags 0 are emulated");
  auto e = std::make_unique<CUgraphExec_st>();
  e->nodes = graph->nodes;  // an executable graph is a snapshot: later changes to the graph do not reach it
  *exec = e.get();
  dev.graph_execs[e.get()] = std::move(e);
  return cudaSuccess;
}

// Queues a copy of every node on `stream`, in capture order, after the stream's earlier work (and
// the implicit waits of the legacy default stream, as any work queued there). Kernels replay the
// parameters they were captured with. On a capturing stream the nodes join that capture.
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  CNX_EMU_ENTER();
  if (!dev.graph_execs.count(exec)) return error(cudaErrorInvalidResourceHandle, "cudaGraphLaunch: not a live executable graph");
  if (cudaError_t e = check_stream(dev, stream, __func__)) return e;
  CUstream_st* s = stream_of(stream);
  if (cudaError_t e = capture_gate(s, __func__)) return e;
  for (const GraphNode& node : exec->nodes) {
    std::unique_ptr<TraceRecord> note;
    if (node.note && (dev.tracing || dev.captures > 0)) note = std::make_unique<TraceRecord>(*node.note);
    push(dev, s, node.what, node.work, std::move(note), node.touches_memory);
  }
  ++exec->launches;
  ++dev.graph_launches;
  return cudaSuccess;
}

// Launches already queued keep their own copies of the nodes and still run.
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  CNX_EMU_ENTER();
  if (!dev.graph_execs.erase(exec)) return error(cudaErrorInvalidValue, "cudaGraphExecDestroy: not a live executable graph");
  return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  CNX_EMU_ENTER();
  if (!dev.graphs.erase(graph)) return error(cudaErrorInvalidValue, "cudaGraphDestroy: not a live graph");
  return cudaSuccess;
}

}  // extern "C"
