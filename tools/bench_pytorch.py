"""The PyTorch baseline for the end-to-end training-step benchmark (bench/RESULTS.md): images/s
and peak GPU memory of a ConvNeXt-T training step (forward, backward, AdamW) at 224x224, in
the configurations a PyTorch user would pick for speed:

  eager     bf16 autocast, channels_last, fused AdamW when available
  compile   the same model under torch.compile (mode "max-autotune-no-cudagraphs" by default)

Model: timm's convnext_tiny (the paper's ConvNeXt-T: drop path 0.1, layer scale 1e-6), or, when
timm is missing, tools/convnext_reference.py's ConvNeXt (the official architecture, the same
FLOPs, without drop path). Loss: cross-entropy with label smoothing 0.1 on random labels, as in the recipe (Mixup's
soft targets cost the same). Data: a random batch already on the GPU (the loader is measured
separately by bench_loader).

  python3 tools/bench_pytorch.py --batch 128 256 --modes eager compile --json out.json

Each (mode, batch) runs --warmup steps, then times --steps steps with CUDA events, and reports
images/s = batch * steps / seconds and torch.cuda.max_memory_allocated() over the timed steps
(reset after warm-up). On a machine without a GPU it runs on the CPU (for checking the script
only: --device cpu --batch 2 --size 64 --steps 2).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


def make_model(drop_path):
    try:
        import timm
        return timm.create_model("convnext_tiny", drop_path_rate=drop_path), "timm.convnext_tiny"
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from convnext_reference import ConvNeXt
        return (ConvNeXt(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], layer_scale_init_value=1e-6),
                "tools/convnext_reference.ConvNeXt (timm not installed; no drop path)")


def bench(mode, batch, args, device):
    torch.manual_seed(0)
    model, source = make_model(args.drop_path)
    model = model.to(device).to(memory_format=torch.channels_last)
    model.train()
    fused = device.type == "cuda"
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05, fused=fused)
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
    step_model = model
    if mode == "compile":
        if not hasattr(torch, "compile"):
            return {"mode": mode, "batch": batch, "error": "torch.compile needs PyTorch >= 2.0"}
        step_model = torch.compile(model, mode=args.compile_mode)
    x = torch.randn(batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = device.type == "cuda" and args.precision == "bf16"

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(step_model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.time() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.time()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
        peak = torch.cuda.max_memory_allocated(device)
    else:
        seconds = time.time() - t0
        peak = None
    return {"mode": mode, "batch": batch, "precision": args.precision if amp else "fp32",
            "size": args.size, "steps": args.steps, "seconds": seconds,
            "images_per_s": batch * args.steps / seconds, "ms_per_step": 1e3 * seconds / args.steps,
            "peak_memory_bytes": peak, "warmup_seconds": warmup_s, "final_loss": float(loss),
            "model": source}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[128, 256])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--drop_path", type=float, default=0.1)
    p.add_argument("--compile_mode", default="max-autotune-no-cudagraphs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "runs": []}
    for mode in args.modes:
        for batch in args.batch:
            try:
                r = bench(mode, batch, args, device)
            except torch.cuda.OutOfMemoryError as e:  # report, go on with the others
                r = {"mode": mode, "batch": batch, "error": "out of memory: " + str(e).split("\n")[0]}
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
