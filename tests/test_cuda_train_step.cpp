// The training step on a CUDA device runs without the host waiting for the device: the loss
// stays on the device, the clip and the skip decision are made there, and the host reads a
// step's outcome one step late (train/trainer.cpp, PendingStep). Counted on the emulated device,
// whose runtime counts every call that makes the host wait (kernels/cuda/emulator/emulator.h).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "cuda_testing.h"
#include "testing.h"
#include "train/trainer.h"

#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
#include "kernels/cuda/emulator/emulator.h"
#endif

namespace cnx {
namespace {

namespace fs = std::filesystem;

#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
// The host waits of one training run of `train_images` images (batch 8: train_images / 8
// optimiser steps in one epoch), its evaluation included.
// cuda_graphs: "false" (every kernel launched by the host) or "true" (the step captured once and
// replayed). Each run starts from an empty cache, so the two see the allocator in the same state.
emu::HostSyncCounts waits_of_run(const fs::path& root, int train_images, const std::string& cuda_graphs,
                                 TrainResult& result) {
  const fs::path data = root / ("data" + std::to_string(train_images));
  fs::create_directories(data);
  test::write_quadrant_split(data.string(), "train", train_images, 1);
  test::write_quadrant_split(data.string(), "t10k", 16, 2);
  TrainConfig c;
  c.device = "cuda";
  c.depths = {1, 1};
  c.dims = {8, 16};
  c.data_path = data.string();
  c.batch_size = 8;
  c.epochs = 1;
  c.lr = 1e-3;
  c.warmup_epochs = 0;
  c.num_workers = 1;
  c.log_every = 1000;  // one line, at the end of the epoch
  c.progress_bar = false;
  c.drop_path = 0.1;
  c.clip_grad = 1.0;
  c.model_ema = true;
  c.cuda_graphs = cuda_graphs;
  cuda::empty_cache();
  emu::reset_host_sync_counts();
  result = train(c);
  return emu::host_sync_counts();
}
#endif

TEST(CudaTrainStep, TheHostWaitsAtMostOncePerStepAndOnlyForTheStepBefore) {
#if defined(CNX_CUDA_EMULATOR) && CNX_CUDA_EMULATOR
  CNX_SKIP_WITHOUT_DEVICE();
  if (cuda::caching_disabled())
    GTEST_SKIP() << "CNX_CUDA_NO_CACHING=1: every free is a cudaFree, which synchronises by definition";
  const fs::path root = fs::temp_directory_path() / ("cnx_train_step_waits_" + std::to_string(::getpid()));
  fs::remove_all(root);
  // Two runs that differ only in their number of steps (4 and 12): the difference in waits is
  // what the 8 extra steps cost, whatever the start, the evaluation and the end cost.
  for (const std::string graphs : {"false", "true"}) {
    SCOPED_TRACE("--cuda_graphs " + graphs);
    TrainResult short_run, long_run;
    const emu::HostSyncCounts a = waits_of_run(root, 32, graphs, short_run);
    const emu::HostSyncCounts b = waits_of_run(root, 96, graphs, long_run);
    // Captured: every step after the second is one replay.
    EXPECT_EQ(long_run.graph_replays, graphs == "true" ? 11 : 0);
    ASSERT_EQ(short_run.steps, 4);
    ASSERT_EQ(long_run.steps, 12);
    for (double loss : long_run.losses) EXPECT_TRUE(std::isfinite(loss));
    const auto extra = [&](uint64_t emu::HostSyncCounts::*field) {
      return static_cast<int64_t>(b.*field) - static_cast<int64_t>(a.*field);
    };
    SCOPED_TRACE("short run: " + std::to_string(a.total_blocking()) + " waits, long run: " +
                 std::to_string(b.total_blocking()));
    // No copy to pageable memory (a loss.item(), a norm read), no stream or device synchronisation,
    // no cudaFree inside a step...
    EXPECT_EQ(extra(&emu::HostSyncCounts::blocking_copies), 0);
    EXPECT_EQ(extra(&emu::HostSyncCounts::stream_syncs), 0);
    EXPECT_EQ(extra(&emu::HostSyncCounts::device_syncs), 0);
    // ... only the wait for the step before's status (an event behind that step's last kernel),
    // at most one per step. One more of each is the data loader's, not the step's, and depends
    // on timing: when the host runs ahead, the pinned batch pool (train/data/loader.h) may grow
    // by a buffer (a cudaFreeHost when the loader goes) or wait for one's copy to end (an event).
    // One free or wait per step would add 8.
    EXPECT_LE(extra(&emu::HostSyncCounts::frees), 1);
    EXPECT_LE(extra(&emu::HostSyncCounts::event_syncs), 8 + 1);
  }
  fs::remove_all(root);
#else
  GTEST_SKIP() << "counts host waits on the emulated device (CNX_CUDA_EMULATOR builds)";
#endif
}

}  // namespace
}  // namespace cnx
