#!/usr/bin/env python3
"""Data-parallel runs (2 CPU ranks under mpiexec) that are stopped, killed or hung.

    python3 tests/dist/dist_signals_test.py <path to convnext> <path to mpiexec> [--only NAME]

stop_and_resume  A 2-rank run on a tiny generated ImageFolder (JPEG decoding, RandAugment,
                 Random Erasing, Mixup/CutMix, drop path, EMA, update_freq 2: every per-rank
                 random state a checkpoint must carry) is stopped twice and resumed each time:
                 once by SIGUSR1 to mpiexec (which forwards it to every rank), once by SIGTERM
                 to every rank (what Slurm's scancel does). Each stop leaves one recovery
                 checkpoint, written by rank 0 after both ranks agreed on the step; the resumed
                 run must end with bitwise the tensors of an uninterrupted 2-rank run.
killed_rank      SIGKILL to rank 1 mid-run: mpiexec must exit non-zero within 60 s.
hung_rank        SIGSTOP to rank 1 mid-run (a rank that hangs without dying) with
                 --dist_timeout 5: rank 0's watchdog ends it, mpiexec must exit non-zero within
                 60 s, and rank 0 must say why.
failing_rank     Rank 0 alone fails (its first checkpoint cannot be written: a folder holds its
                 name) while rank 1 waits for it: the job must end within 60 s, non-zero, with
                 rank 0's one-line error.

Python's standard library only. The ranks are found as the convnext children of this test's
own mpiexec (their OMPI_COMM_WORLD_RANK), so tests running beside it are never touched.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


# The safetensors reader of the one-process kill test (tests/kill_resume_test.py).
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kill_resume_test import tensors  # noqa: E402


def ranks_of(mpiexec_pid):
    """{rank: pid} of the convnext processes whose parent is mpiexec_pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid != mpiexec_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if b"OMPI_COMM_WORLD_RANK" in env:
                found[int(env[b"OMPI_COMM_WORLD_RANK"])] = int(entry)
        except (OSError, ValueError):
            continue
    return found


def train_lines(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if '"type":"train"' in line)


class Runner:
    def __init__(self, convnext, mpiexec, root):
        self.convnext, self.mpiexec, self.root = convnext, mpiexec, root
        # CNX_TEST_PAUSE_BEFORE_RENAME_MS holds every checkpoint save (one an epoch) for a moment
        # (the arithmetic is unchanged): a run of a few milliseconds a step lasts long enough
        # to be signalled before it ends.
        self.env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
                        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
                        CNX_TEST_PAUSE_BEFORE_RENAME_MS="200")
        self.data = os.path.join(root, "data")
        subprocess.run([convnext, "make-folder", "--out", self.data, "--train_per_class", "32",
                        "--val_per_class", "8", "--height", "40", "--width", "40"],
                       check=True, stdout=subprocess.DEVNULL)

    def command(self, out_dir, epochs, extra=()):
        return [self.mpiexec, "-np", "2", "--oversubscribe", self.convnext, "train",
                "--data_set", "image_folder", "--data_path", self.data, "--input_size", "32",
                "--depths", "1,1", "--dims", "8,16", "--batch_size", "4", "--update_freq", "2",
                "--epochs", str(epochs), "--warmup_epochs", "1", "--lr", "2e-3",
                "--model_ema", "true", "--drop_path", "0.1", "--num_workers", "1",
                "--log_every", "1", "--progress_bar", "false", "--output_dir", out_dir, *extra]

    def start(self, out_dir, epochs, extra=()):
        log = open(os.path.join(self.root, os.path.basename(out_dir) + ".log"), "ab")
        return subprocess.Popen(self.command(out_dir, epochs, extra), env=self.env, stdout=log,
                                stderr=subprocess.STDOUT), log

    def run(self, out_dir, epochs, extra=()):
        p, log = self.start(out_dir, epochs, extra)
        rc = p.wait(timeout=600)
        log.close()
        return rc

    def log_text(self, out_dir):
        with open(os.path.join(self.root, os.path.basename(out_dir) + ".log"), errors="replace") as f:
            return f.read()

    def wait_for_steps(self, p, out_dir, steps, deadline_s=120):
        t0 = time.time()
        while train_lines(out_dir) < steps:
            if p.poll() is not None:
                raise AssertionError(f"the run ended (status {p.returncode}) before step {steps}:\n"
                                     + self.log_text(out_dir)[-3000:])
            if time.time() - t0 > deadline_s:
                raise AssertionError(f"no step {steps} within {deadline_s} s")
            time.sleep(0.05)


def stop_and_resume(r):
    epochs = 10  # 64 images / (4 x 2 x 2 ranks) = 4 steps an epoch: 40 steps, >= 2 s of saves
    whole = os.path.join(r.root, "whole")
    assert r.run(whole, epochs) == 0, r.log_text(whole)[-3000:]
    parts = os.path.join(r.root, "parts")
    stops = [("SIGUSR1 to mpiexec", 5), ("SIGTERM to every rank", 17)]
    for how, at_step in stops:
        p, log = r.start(parts, epochs, ["--auto_resume", "true"])
        r.wait_for_steps(p, parts, at_step)
        if how.endswith("mpiexec"):
            p.send_signal(signal.SIGUSR1)
        else:
            for pid in ranks_of(p.pid).values():
                os.kill(pid, signal.SIGTERM)
        rc = p.wait(timeout=120)
        log.close()
        text = r.log_text(parts)
        assert rc != 0, f"{how}: mpiexec exited 0 (did the run end before the signal?)"
        recovery = os.path.join(parts, "checkpoint-recovery.safetensors")
        assert os.path.exists(recovery), f"{how}: no recovery checkpoint\n" + text[-3000:]
        assert "stopped by signal" in text, text[-3000:]
        print(f"stop_and_resume: {how} at step >= {at_step}: status {rc}, recovery checkpoint written")
    assert r.run(parts, epochs, ["--auto_resume", "true"]) == 0, r.log_text(parts)[-3000:]
    for tag in (str(epochs - 1), "best"):
        a = tensors(os.path.join(whole, f"checkpoint-{tag}.safetensors"))
        b = tensors(os.path.join(parts, f"checkpoint-{tag}.safetensors"))
        assert a.keys() == b.keys(), f"checkpoint-{tag}: tensor names differ"
        diff = [k for k in a if a[k] != b[k]]
        assert not diff, f"checkpoint-{tag}: {len(diff)} tensors differ, e.g. {diff[:3]}"
    with open(os.path.join(parts, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"type":"train"' in line]
    assert steps == list(range(1, 4 * epochs + 1)), f"metrics.jsonl steps: {steps}"
    print(f"stop_and_resume: stopped twice, resumed: checkpoint-{epochs - 1} and checkpoint-best bitwise "
          f"those of the uninterrupted run ({len(a)} tensors), every step logged once")


def ends_the_job(r, name, sig, extra, expect_in_log):
    out = os.path.join(r.root, name)
    p, log = r.start(out, 1000, extra)
    r.wait_for_steps(p, out, 3)
    ranks = ranks_of(p.pid)
    assert set(ranks) == {0, 1}, f"ranks found: {ranks}"
    t0 = time.time()
    os.kill(ranks[1], sig)
    try:
        rc = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        for pid in ranks.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        raise AssertionError(f"{name}: mpiexec still running 60 s after the rank was signalled")
    finally:
        log.close()
    took = time.time() - t0
    text = r.log_text(out)
    assert rc != 0, f"{name}: mpiexec exited 0"
    if expect_in_log:
        assert expect_in_log in text, f"{name}: '{expect_in_log}' not in the output:\n" + text[-3000:]
    print(f"{name}: mpiexec exited with status {rc} {took:.1f} s after rank 1 got signal {sig}")


def failing_rank(r):
    out = os.path.join(r.root, "failing_rank")
    os.makedirs(os.path.join(out, "checkpoint-0.safetensors"))  # the rename onto it fails
    t0 = time.time()
    p, log = r.start(out, 3)
    try:
        rc = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("failing_rank: mpiexec still running after 60 s")
    finally:
        log.close()
    took = time.time() - t0
    text = r.log_text(out)
    assert rc != 0, "failing_rank: mpiexec exited 0"
    assert "rank 0: convnext train:" in text and "(ending every rank)" in text, text[-3000:]
    print(f"failing_rank: mpiexec exited with status {rc}, {took:.1f} s after the start (rank 0 failed "
          f"at the end of epoch 0)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("convnext")
    ap.add_argument("mpiexec")
    ap.add_argument("--only", choices=["stop_and_resume", "killed_rank", "hung_rank", "failing_rank"])
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="cnx_dist_signals_")
    try:
        r = Runner(args.convnext, args.mpiexec, root)
        if args.only in (None, "stop_and_resume"):
            stop_and_resume(r)
        if args.only in (None, "killed_rank"):
            ends_the_job(r, "killed_rank", signal.SIGKILL, [], None)
        if args.only in (None, "hung_rank"):
            ends_the_job(r, "hung_rank", signal.SIGSTOP, ["--dist_timeout", "5"], "has waited")
        if args.only in (None, "failing_rank"):
            failing_rank(r)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
