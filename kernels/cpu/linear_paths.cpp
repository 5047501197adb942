// The record of which path each CUDA GEMM took (cnx::cuda::gemm_paths, kernels/linear.h), and the
// switch that turns cuBLASLt off. Device-independent bookkeeping, so it lives with the CPU
// sources and is compiled in every build: the trainer may print the list whatever the build,
// and a build without CUDA simply has no records. kernels/cuda/linear.cu adds the records.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <tuple>

#include "kernels/linear.h"

namespace cnx::cuda {

namespace {

bool same_gemm(const GemmPathRecord& a, const GemmPathRecord& b) {
  return std::tie(a.pass, a.M, a.K, a.N, a.dtype, a.path) ==
         std::tie(b.pass, b.M, b.K, b.N, b.dtype, b.path);
}

// A handful of records per model (three passes per distinct layer shape): a vector searched
// linearly keeps the first-use order at no cost worth a map.
std::mutex g_mutex;
std::vector<GemmPathRecord>& records() {
  static auto* r = new std::vector<GemmPathRecord>();  // never destroyed (static order)
  return *r;
}

std::string format_one(const GemmPathRecord& r) {
  std::ostringstream s;
  s << "  " << gemm_pass_name(r.pass);
  for (size_t pad = std::strlen(gemm_pass_name(r.pass)); pad < 8; ++pad) s << ' ';
  s << " M=" << r.M << " K=" << r.K << " N=" << r.N << ' ' << dtype_name(r.dtype) << ": " << r.path;
  if (!r.why.empty()) s << " (" << r.why << ')';
  s << '\n';
  return s.str();
}

// CNX_LOG_GEMM=1: read at each new record (a few per run), so a test may set it at run time.
bool log_gemm() {
  const char* v = std::getenv("CNX_LOG_GEMM");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

std::atomic<bool>& lt_flag() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("CNX_LINEAR_CUBLASLT");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }()};
  return on;
}

}  // namespace

const char* gemm_pass_name(GemmPass pass) {
  switch (pass) {
    case GemmPass::forward: return "forward";
    case GemmPass::dinput: return "dinput";
    case GemmPass::dweight: return "dweight";
  }
  return "?";
}

bool note_gemm_path(const GemmPathRecord& r) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (const GemmPathRecord& seen : records())
      if (same_gemm(seen, r)) return false;
    records().push_back(r);
  }
  if (log_gemm()) std::fprintf(stderr, "cnx gemm:%s", format_one(r).c_str() + 1);  // one space
  return true;
}

std::vector<GemmPathRecord> gemm_paths() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return records();
}

void clear_gemm_paths() {
  std::lock_guard<std::mutex> lock(g_mutex);
  records().clear();
}

std::string format_gemm_paths(const std::vector<GemmPathRecord>& list) {
  std::string out;
  for (const GemmPathRecord& r : list) out += format_one(r);
  return out;
}

bool cublaslt_enabled() { return lt_flag().load(); }
void set_cublaslt_enabled(bool on) { lt_flag().store(on); }

}  // namespace cnx::cuda
