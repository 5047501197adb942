#!/usr/bin/env python3
"""`convnext roadmap` end to end on a tiny generated ImageFolder (train/roadmap.h):

1. an uninterrupted roadmap of four steps (BatchNorm and LayerNorm ones, the ResNet stem and the
   patchify one, ConvNeXt-T last) writes roadmap.csv / .md / .png and a result.json per step;
2. the same roadmap killed with SIGKILL inside its second step, then run again: the first step
   is skipped ("finished before"), the second continues from its checkpoint, and every step
   ends with bitwise the checkpoint tensors and the accuracies of the uninterrupted run;
3. SIGTERM inside a step: exit status 143, "stopped by a signal", and a rerun finishes it;
4. bad input: another recipe on the same folder is refused naming the field; an unknown step
   lists the known ones; BatchNorm with a batch of one image says why; nothing is lost.

    python3 tests/roadmap_resume_test.py <path to convnext>

Python's standard library only.
"""
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kill_resume_test import tensors  # noqa: E402

STEPS = "roadmap_00_resnet50,roadmap_09_fewer_norms,roadmap_10_layer_norm,roadmap_11_convnext_tiny"


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def roadmap_cmd(convnext, data, out, epochs=2):
    return [convnext, "roadmap", "--steps", STEPS, "--output_dir", out,
            "--data_set", "image_folder", "--data_path", data, "--input_size", "32",
            "--width_mult", "0.125", "--depth_mult", "0.34", "--epochs", str(epochs),
            "--batch_size", "8", "--log_every", "1", "--num_workers", "1"]


def run(cmd, expect_rc=0):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != expect_rc:
        fail(f"{' '.join(cmd)}: exit {p.returncode}, expected {expect_rc}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def rows(out):
    with open(os.path.join(out, "roadmap.csv")) as f:
        return list(csv.DictReader(f))


def final_checkpoints(out):
    """step -> tensors of its last numbered checkpoint (the end of epoch 1)."""
    result = {}
    for step in STEPS.split(","):
        path = os.path.join(out, step, "checkpoint-1.safetensors")
        if not os.path.exists(path):
            fail(f"{path} is missing")
        result[step] = tensors(path)
    return result


def wait_for_train_lines(path, n, proc, timeout=120):
    """Waits until metrics.jsonl at `path` holds n training lines (or the process ends)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        try:
            with open(path) as f:
                if sum('"type":"train"' in line.replace(" ", "") for line in f) >= n:
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    return False


def main():
    convnext = sys.argv[1]
    root = tempfile.mkdtemp(prefix="cnx_roadmap_")
    try:
        data = os.path.join(root, "data")
        run([convnext, "make-folder", "--out", data, "--train_per_class", "48",
             "--val_per_class", "8", "--height", "32", "--width", "32"])

        # 1. Uninterrupted.
        ref = os.path.join(root, "ref")
        p = run(roadmap_cmd(convnext, data, ref))
        if "roadmap: 4 steps done" not in p.stdout:
            fail("no summary line:\n" + p.stdout[-2000:])
        for name in ("roadmap.csv", "roadmap.md", "roadmap.png", "roadmap.json"):
            if not os.path.exists(os.path.join(ref, name)):
                fail(f"{name} is missing")
        with open(os.path.join(ref, "roadmap.png"), "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                fail("roadmap.png is not a PNG")
        ref_rows = rows(ref)
        if [r["step"] for r in ref_rows] != STEPS.split(","):
            fail(f"roadmap.csv rows: {[r['step'] for r in ref_rows]}")
        ref_ckpt = final_checkpoints(ref)
        print("uninterrupted:", [(r["step"], r["top1"]) for r in ref_rows])

        # 2. SIGKILL inside the second step, then the same command again.
        out = os.path.join(root, "killed")
        proc = subprocess.Popen(roadmap_cmd(convnext, data, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        second = STEPS.split(",")[1]
        if not wait_for_train_lines(os.path.join(out, second, "metrics.jsonl"), 14, proc):
            fail("the second step never got under way before the process ended")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if os.path.exists(os.path.join(out, second, "result.json")):
            fail("the kill came after the second step had finished: the test proves nothing")
        p = run(roadmap_cmd(convnext, data, out))
        if f"{STEPS.split(',')[0]}: finished before" not in p.stdout:
            fail("the first step was not skipped:\n" + p.stdout[-2000:])
        if "resumed from" not in p.stdout:
            fail("the second step did not resume from a checkpoint:\n" + p.stdout[-3000:])
        got = final_checkpoints(out)
        for step, want in ref_ckpt.items():
            if got[step] != want:
                diff = [k for k in want if got[step].get(k) != want[k]]
                fail(f"{step}: the resumed roadmap's checkpoint differs in {len(diff)} tensors, e.g. {diff[:3]}")
        for a, b in zip(rows(out), ref_rows):
            for key in ("step", "parameters", "gflops", "top1", "top5", "best_top1", "epochs"):
                if a[key] != b[key]:
                    fail(f"{a['step']}: {key} {a[key]} after the kill, {b[key]} without")
        print("killed and resumed: bitwise the same checkpoints and accuracies")

        # 3. SIGTERM inside a step: a clean stop with the shell's status, then a rerun finishes.
        out3 = os.path.join(root, "term")
        proc = subprocess.Popen(roadmap_cmd(convnext, data, out3), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if not wait_for_train_lines(os.path.join(out3, STEPS.split(",")[0], "metrics.jsonl"), 3, proc):
            fail("the first step never got under way")
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
        if proc.returncode != 143 or "stopped by a signal" not in stdout:
            fail(f"SIGTERM: exit {proc.returncode}\n{stdout[-2000:]}")
        run(roadmap_cmd(convnext, data, out3))
        if final_checkpoints(out3) != ref_ckpt:
            fail("after SIGTERM and a rerun the checkpoints differ from the uninterrupted run")
        print("SIGTERM: exit 143, rerun finished bitwise")

        # 4. Bad input.
        before = open(os.path.join(ref, "roadmap.csv")).read()
        p = run(roadmap_cmd(convnext, data, ref, epochs=3), expect_rc=1)
        if "holds a roadmap trained with epochs 2, this command has 3" not in p.stderr:
            fail("a changed recipe was not refused clearly:\n" + p.stderr)
        if open(os.path.join(ref, "roadmap.csv")).read() != before:
            fail("the refused run changed roadmap.csv")
        p = run([convnext, "roadmap", "--steps", "roadmap_99_vit", "--output_dir",
                 os.path.join(root, "bad")], expect_rc=1)
        if "unknown step 'roadmap_99_vit'" not in p.stderr or "roadmap_06_kernel11" not in p.stderr:
            fail("an unknown step did not list the known ones:\n" + p.stderr)
        p = run([convnext, "train", "--model", "roadmap_01_stage_ratio", "--data_set", "image_folder",
                 "--data_path", data, "--input_size", "32", "--width_mult", "0.125",
                 "--depth_mult", "0.34", "--epochs", "1", "--batch_size", "1", "--mixup", "0",
                 "--cutmix", "0"], expect_rc=1)
        if "BatchNorm in training mode needs more than one value per channel" not in p.stderr:
            fail("batch 1 with BatchNorm did not say why:\n" + p.stderr)
        print("bad input: clear one-line errors")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("PASS")


if __name__ == "__main__":
    main()
