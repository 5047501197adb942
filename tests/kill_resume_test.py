#!/usr/bin/env python3
"""Kill-at-random: a training run killed with SIGKILL again and again, resumed each time, ends
with bitwise the tensors of an uninterrupted run (issue 13, item 11).

    python3 tests/kill_resume_test.py <path to convnext> [--kills N] [--seed S]

A tiny model on a tiny generated ImageFolder (make-folder: JPEG decoding, RandAugment, Random
Erasing, Mixup/CutMix: every random state a checkpoint must carry), 10 epochs with EMA and
update_freq 2. Both runs set CNX_TEST_PAUSE_BEFORE_RENAME_MS, which holds every checkpoint save
for a moment between writing its temporary and renaming it into place (the arithmetic is
unchanged), so that some kills land inside a save: every other kill waits for a
checkpoint-*.tmp to appear and kills then; the others kill after a random delay. The resumed
runs then must agree with the uninterrupted one on every tensor of the last numbered and the
best checkpoint, and metrics.jsonl must hold every step once. Python's standard library only.
"""
import argparse
import glob
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time


def tensors(path):
    """name -> (dtype, shape, raw bytes) of a safetensors file (format: 8-byte header size,
    JSON header, buffer)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        buf = f.read()
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], buf[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("convnext")
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"seed {args.seed} (rerun with --seed {args.seed})")
    root = tempfile.mkdtemp(prefix="cnx_kill_")
    env = dict(os.environ, CNX_TEST_PAUSE_BEFORE_RENAME_MS="150")
    try:
        data = os.path.join(root, "data")
        subprocess.run([args.convnext, "make-folder", "--out", data, "--train_per_class", "16",
                        "--val_per_class", "8", "--height", "40", "--width", "40"],
                       check=True, stdout=subprocess.DEVNULL)
        train = [args.convnext, "train", "--data_set", "image_folder", "--data_path", data,
                 "--input_size", "32", "--depths", "1,1", "--dims", "8,16", "--batch_size", "4",
                 "--update_freq", "2", "--epochs", "10", "--warmup_epochs", "1", "--lr", "2e-3",
                 "--model_ema", "true", "--drop_path", "0.1", "--num_workers", "2",
                 "--log_every", "1", "--progress_bar", "false", "--save_ckpt_num", "2"]

        whole = os.path.join(root, "whole")
        t0 = time.monotonic()
        subprocess.run(train + ["--output_dir", whole], check=True, env=env, stdout=subprocess.DEVNULL)
        duration = time.monotonic() - t0
        print(f"uninterrupted run: {duration:.2f} s")

        parts = os.path.join(root, "parts")
        kills = in_save = 0
        log = open(os.path.join(root, "parts.log"), "w")
        while True:
            p = subprocess.Popen(train + ["--output_dir", parts], env=env, stdout=log, stderr=log)
            if kills < args.kills:
                deadline = time.monotonic() + duration * 1.5
                if kills % 2 == 0:  # kill inside a save: wait for a temporary to appear
                    while p.poll() is None and time.monotonic() < deadline:
                        if glob.glob(os.path.join(parts, "checkpoint-*.tmp")):
                            time.sleep(rng.uniform(0, 0.1))  # somewhere in the held save
                            break
                        time.sleep(0.002)
                else:
                    time.sleep(rng.uniform(0.05, 0.6 * duration))
                if p.poll() is None:
                    tmp_present = bool(glob.glob(os.path.join(parts, "checkpoint-*.tmp")))
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    kills += 1
                    in_save += tmp_present
                    print(f"kill {kills}{' (inside a save)' if tmp_present else ''}")
                    continue
            rc = p.wait()
            if rc != 0:
                sys.exit(f"FAIL: a resumed run exited with {rc}; log: {log.name}")
            break
        print(f"{kills} kills, {in_save} inside a save")
        if in_save == 0:
            sys.exit("FAIL: no kill landed inside a save")

        for name in ("checkpoint-9.safetensors", "checkpoint-best.safetensors"):
            a, b = tensors(os.path.join(whole, name)), tensors(os.path.join(parts, name))
            if a.keys() != b.keys():
                sys.exit(f"FAIL: {name}: tensor names differ")
            bad = [k for k in a if a[k] != b[k]]
            if bad:
                sys.exit(f"FAIL: {name}: {len(bad)} of {len(a)} tensors differ, e.g. {bad[0]}")
            print(f"{name}: {len(a)} tensors bitwise equal")
        if glob.glob(os.path.join(parts, "*.tmp")):
            sys.exit("FAIL: a temporary was left behind")
        steps = [json.loads(l)["step"] for l in open(os.path.join(parts, "metrics.jsonl"))
                 if '"type":"train"' in l]
        want = [json.loads(l)["step"] for l in open(os.path.join(whole, "metrics.jsonl"))
                if '"type":"train"' in l]
        if steps != want:
            sys.exit(f"FAIL: metrics.jsonl steps {steps} != {want}")
        print("metrics.jsonl: every step once")
        print("PASS")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
