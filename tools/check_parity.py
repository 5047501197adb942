"""Checks this implementation against PyTorch with `convnext grads`: builds the reference model
(tools/convnext_reference.py, official names) with the given or random far-from-init weights,
runs one forward/backward in PyTorch (float64) and in build/convnext (float32), and compares
the logits, the loss and every parameter gradient.

    /usr/bin/python3 tools/check_parity.py --model convnext_tiny --size 72 --batch 2
    /usr/bin/python3 tools/check_parity.py --depths 2,2,2,2 --dims 16,32,48,64 --num_classes 10
    /usr/bin/python3 tools/check_parity.py --model convnext_tiny --weights official.safetensors

Tolerances (../shared/DESIGN.md): logits and loss 1e-4 relative, each gradient 1e-3 of its
largest element. Exit status 0 when everything is within them, 1 otherwise.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convnext_reference as ref  # noqa: E402
import safetensors_io  # noqa: E402
from make_golden import far_from_init  # noqa: E402

# The named models: (depths, dims, isotropic).
MODELS = {
    "convnext_atto": ([2, 2, 6, 2], [40, 80, 160, 320], False),
    "convnext_femto": ([2, 2, 6, 2], [48, 96, 192, 384], False),
    "convnext_pico": ([2, 2, 6, 2], [64, 128, 256, 512], False),
    "convnext_nano": ([2, 2, 8, 2], [80, 160, 320, 640], False),
    "convnext_tiny": ([3, 3, 9, 3], [96, 192, 384, 768], False),
    "convnext_small": ([3, 3, 27, 3], [96, 192, 384, 768], False),
    "convnext_base": ([3, 3, 27, 3], [128, 256, 512, 1024], False),
    "convnext_large": ([3, 3, 27, 3], [192, 384, 768, 1536], False),
    "convnext_xlarge": ([3, 3, 27, 3], [256, 512, 1024, 2048], False),
    "convnext_isotropic_small": ([18], [384], True),
    "convnext_isotropic_base": ([18], [768], True),
    "convnext_isotropic_large": ([36], [1024], True),
}
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def ints(text):
    return [int(v) for v in text.split(",")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS))
    p.add_argument("--depths", type=ints)
    p.add_argument("--dims", type=ints)
    p.add_argument("--in_chans", type=int, default=3)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--size", type=int, default=72, help="image height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", help="official-named .safetensors (default: random, far from init)")
    p.add_argument("--convnext", default=os.path.join(REPO, "build", "convnext"))
    p.add_argument("--keep", help="keep the files in this folder")
    a = p.parse_args()
    if bool(a.model) == bool(a.depths or a.dims):
        p.error("give --model, or --depths and --dims")
    depths, dims, isotropic = MODELS[a.model] if a.model else (a.depths, a.dims, False)

    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    if isotropic:
        model = ref.ConvNeXtIsotropic(a.in_chans, a.num_classes, depths[0], dims[0])
    else:
        model = ref.ConvNeXt(a.in_chans, a.num_classes, depths, dims)
    model = model.double()
    if a.weights:
        tensors, _ = safetensors_io.load(a.weights)
        model.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in tensors.items()})
    else:
        far_from_init(model, gen)
    model.train()
    images = torch.randn(a.batch, a.in_chans, a.size, a.size, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, a.num_classes, (a.batch,), generator=gen)
    logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()

    folder = a.keep or tempfile.mkdtemp(prefix="cnx_parity_")
    os.makedirs(folder, exist_ok=True)
    f32 = lambda t: t.detach().float().numpy()  # noqa: E731
    weights = os.path.join(folder, "weights.safetensors")
    batch = os.path.join(folder, "batch.safetensors")
    out = os.path.join(folder, "ours.safetensors")
    safetensors_io.save(weights, [(k, f32(v)) for k, v in model.state_dict().items()])
    safetensors_io.save(batch, [("images", f32(images)), ("labels", labels.numpy())])
    model_flags = (["--model", a.model] if a.model else
                   ["--depths", ",".join(map(str, depths)), "--dims", ",".join(map(str, dims))])
    cmd = [a.convnext, "grads", *model_flags, "--in_chans", str(a.in_chans), "--num_classes",
           str(a.num_classes), "--weights", weights, "--batch", batch, "--out", out]
    print("running:", " ".join(cmd))
    subprocess.run(cmd, check=True)
    ours, _ = safetensors_io.load(out)

    def rel(name, want, scale):
        return float(np.abs(ours[name].astype(np.float64) - want).max() / max(scale, 1e-30))

    want_logits = logits.detach().numpy()
    worst = {"logits": rel("logits", want_logits, np.abs(want_logits).max()),
             "loss": rel("loss", loss.item(), abs(loss.item()))}
    grad_worst, grad_name = 0.0, ""
    for name, prm in model.named_parameters():
        g = prm.grad.numpy()
        e = rel("grad." + name, g, np.abs(g).max())
        if e > grad_worst:
            grad_worst, grad_name = e, name
    ok = worst["logits"] <= 1e-4 and worst["loss"] <= 1e-4 and grad_worst <= 1e-3
    print(f"logits: max |ours - torch| / max |torch| = {worst['logits']:.2e}  (limit 1e-4)")
    print(f"loss:   relative error {worst['loss']:.2e}  (limit 1e-4); torch {loss.item():.6f}")
    print(f"grads:  worst {grad_worst:.2e} of the largest element, in {grad_name}  (limit 1e-3)")
    print("PARITY OK" if ok else "PARITY FAILED", "(files in", folder + ")")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
