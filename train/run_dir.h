// The --output_dir of a training run: one run at a time, and its metrics.jsonl.
//
// RunDir takes an exclusive flock(2) on <dir>/train.lock for the life of the run and writes its
// PID there. The kernel drops the lock when the process ends, however it ends (SIGKILL
// included), so a stale lock file never blocks the next run; a second run on the same folder
// while the first lives is refused with one line naming the first's PID (two runs would
// interleave their checkpoints). Holding the lock, it removes what a killed save left behind.
//
// MetricsLog appends one JSON object per line to <dir>/metrics.jsonl. On resume it first drops
// the records past the resumed position (a run killed after its last checkpoint logged steps
// that the resumed run logs again), so every step and epoch appears once. A failed write is
// reported on stderr once, and training goes on (the checkpoints are what must not be lost).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace cnx {

class RunDir {
 public:
  // "" = no output folder: nothing is created or locked. Otherwise creates the folder, takes
  // the lock (cnx::Error if another live process holds it) and removes stale temporaries.
  explicit RunDir(const std::string& dir);
  ~RunDir();
  RunDir(const RunDir&) = delete;
  RunDir& operator=(const RunDir&) = delete;

  const std::string& path() const { return dir_; }
  static std::string lock_path(const std::string& dir);  // <dir>/train.lock

 private:
  std::string dir_;
  int lock_fd_ = -1;
};

class MetricsLog {
 public:
  // dir "" writes nothing. Keeps the "train" records with step <= resumed_step and the "eval"
  // records of epochs < resumed_epoch (a fresh run: 0 and 0, an empty log).
  MetricsLog(const std::string& dir, int64_t resumed_step, int64_t resumed_epoch);
  void write(const nlohmann::json& record);

 private:
  std::string path_;
  std::ofstream file_;
  bool reported_ = false;
};

}  // namespace cnx
