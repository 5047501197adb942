#include "train/run_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

#include "tensor/error.h"
#include "train/checkpoint.h"

namespace cnx {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string RunDir::lock_path(const std::string& dir) { return (fs::path(dir) / "train.lock").string(); }

RunDir::RunDir(const std::string& dir) : dir_(dir) {
  if (dir.empty()) return;
  std::error_code ec;
  fs::create_directories(dir, ec);
  CNX_CHECK(!ec, "--output_dir ", dir, ": cannot create it: ", ec.message());
  const std::string lock = lock_path(dir);
  lock_fd_ = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  CNX_CHECK(lock_fd_ >= 0, "--output_dir ", dir, ": cannot open ", lock, ": ", std::strerror(errno));
  if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char pid[32] = {};
    const ssize_t n = ::pread(lock_fd_, pid, sizeof pid - 1, 0);
    ::close(lock_fd_);
    lock_fd_ = -1;
    CNX_CHECK(err != EWOULDBLOCK, "--output_dir ", dir, " is in use by another training run (PID ",
              n > 0 ? std::string(pid, static_cast<size_t>(n)) : std::string("unknown"),
              " holds ", lock, "); give each run its own folder");
    fail("--output_dir ", dir, ": cannot lock ", lock, ": ", std::strerror(err));
  }
  const std::string me = std::to_string(::getpid());
  if (::ftruncate(lock_fd_, 0) != 0 || ::pwrite(lock_fd_, me.data(), me.size(), 0) < 0) {
    // The lock holds without the PID; only the message of a refused second run loses it.
  }
  if (const int removed = remove_stale_temporaries(dir))
    std::printf("removed %d unfinished checkpoint temporar%s of an interrupted save in %s\n", removed,
                removed == 1 ? "y" : "ies", dir.c_str());
}

RunDir::~RunDir() {
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the lock; the file stays (harmless)
}

MetricsLog::MetricsLog(const std::string& dir, int64_t resumed_step, int64_t resumed_epoch) {
  if (dir.empty()) return;
  path_ = (fs::path(dir) / "metrics.jsonl").string();
  std::vector<std::string> kept;
  bool dropped = false;
  std::error_code ec;
  if (fs::is_regular_file(path_, ec)) {  // (a device or a FIFO is only appended to)
    std::ifstream old(path_);
    std::string line;
    while (std::getline(old, line)) {
      bool keep = false;
      try {
        const json r = json::parse(line);
        const std::string type = r.value("type", "");
        if (type == "eval") keep = r.value("epoch", int64_t{-1}) < resumed_epoch;
        else keep = r.value("step", resumed_step + 1) <= resumed_step;
      } catch (const json::exception&) {
        keep = false;  // a line cut by a kill mid-write
      }
      if (keep) kept.push_back(line);
      else dropped = true;
    }
  }
  if (dropped) {  // rewrite the kept part atomically, then append
    const std::string tmp = path_ + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      for (const std::string& l : kept) out << l << '\n';
      out.flush();
      CNX_CHECK(out.good(), path_, ": cannot rewrite it for the resumed run (", tmp, ")");
    }
    fs::rename(tmp, path_, ec);
    CNX_CHECK(!ec, path_, ": cannot replace it: ", ec.message());
  }
  file_.open(path_, std::ios::app);
  if (!file_) {
    std::fprintf(stderr, "warning: %s: cannot open for appending; metrics are not recorded\n", path_.c_str());
    reported_ = true;
  }
}

void MetricsLog::write(const json& record) {
  if (path_.empty() || !file_.is_open()) return;
  file_ << record.dump() << '\n' << std::flush;
  if (!file_.good() && !reported_) {
    std::fprintf(stderr, "warning: %s: write failed (disk full?); later metrics may be missing\n",
                 path_.c_str());
    reported_ = true;
    file_.clear();
  }
}

}  // namespace cnx
