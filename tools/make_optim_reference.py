"""Makes tests/data/optim/reference.safetensors, the reference numbers for tests/test_optim.cpp:

  adamw.<case>.*   torch.optim.AdamW on a few small tensors over several steps, with the lr and
                   weight decay changing every step, one parameter group per tensor as the
                   official optim_factory/engine.py set them up (lr = lr_schedule * lr_scale,
                   weight decay only for the decayed tensors), and tensors that go without a
                   gradient on some step (PyTorch skips them, step count included)
  clip.*           torch.nn.utils.clip_grad_norm_ below and above the norm
  sched.*          the official utils.cosine_scheduler (numpy) and numpy.linspace
  ema.*            timm ModelEma's update, ema * decay + (1 - decay) * param, in float32 torch
  layers.*         the official optim_factory.get_num_layer_for_convnext, the official decay
                   rule of get_parameter_groups and the LayerDecayValueAssigner scales (layer decay
                   0.8), for every parameter of convnext_tiny and convnext_small in
                   named_parameters() order (tools/convnext_reference.py); the names are in the
                   metadata

    /usr/bin/python3 tools/make_optim_reference.py      # needs torch and numpy

The C++ test hard-codes the same tensors, steps and settings (see the constants below).
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convnext_reference as ref  # noqa: E402
import safetensors_io  # noqa: E402
from cosine_schedule import cosine_scheduler  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "optim",
                   "reference.safetensors")

# name, shape, decay, lr_scale, steps (0-based) on which the tensor has no gradient
PARAMS = [
    ("w", (4, 3), True, 1.0, ()),
    ("b", (4,), False, 1.0, ()),
    ("conv", (2, 3, 2, 2), True, 0.5, ()),
    ("gamma", (3,), False, 0.25, (2,)),
    ("late", (5, 7), True, 1.0, (0,)),  # no gradient on the first step: its state starts later
]
ADAMW_CASES = [
    # name, betas, eps, lr per step, weight decay per step
    ("default", (0.9, 0.999), 1e-8, [1e-3, 2e-3, 5e-4, 3e-3, 1e-2], [0.05, 0.1, 0.0, 0.05, 0.2]),
    ("custom", (0.8, 0.95), 1e-3, [4e-3, 1e-3, 2e-2, 5e-3], [0.3, 0.05, 0.1, 0.0]),
]
EMA_DECAY = 0.9
EMA_UPDATES = 4


def adamw_case(out, name, betas, eps, lrs, wds, rng):
    torch.set_default_dtype(torch.float32)
    tensors = []
    for pname, shape, decay, scale, _ in PARAMS:
        init = rng.standard_normal(shape).astype(np.float32)
        out[f"adamw.{name}.init.{pname}"] = init
        tensors.append(torch.nn.Parameter(torch.from_numpy(init.copy())))
    groups = [{"params": [t], "lr_scale": scale, "weight_decay": 0.05 if decay else 0.0}
              for t, (_, _, decay, scale, _) in zip(tensors, PARAMS)]
    opt = torch.optim.AdamW(groups, lr=lrs[0], betas=betas, eps=eps)
    for step, (lr, wd) in enumerate(zip(lrs, wds)):
        for t, group, (pname, shape, decay, scale, no_grad_steps) in zip(tensors, opt.param_groups,
                                                                         PARAMS):
            group["lr"] = lr * scale  # engine.py: lr_schedule_values[it] * param_group["lr_scale"]
            group["weight_decay"] = wd if decay else 0.0
            if step in no_grad_steps:
                t.grad = None
            else:
                # gradients of different sizes, so that eps and the bias corrections matter
                g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 1)).astype(np.float32)
                out[f"adamw.{name}.grad.{step}.{pname}"] = g
                t.grad = torch.from_numpy(g.copy())
        opt.step()
        for t, (pname, *_rest) in zip(tensors, PARAMS):
            out[f"adamw.{name}.param.{step}.{pname}"] = t.detach().numpy().copy()
    for t, (pname, *_rest) in zip(tensors, PARAMS):
        state = opt.state[t]
        out[f"adamw.{name}.m.{pname}"] = state["exp_avg"].numpy().copy()
        out[f"adamw.{name}.v.{pname}"] = state["exp_avg_sq"].numpy().copy()
        out[f"adamw.{name}.step.{pname}"] = np.array(int(state["step"].item()), dtype=np.int64)


def clip_case(out, rng):
    shapes = [(3, 4), (5,), (2, 2, 2)]
    grads = [(rng.standard_normal(s) * 0.7).astype(np.float32) for s in shapes]
    for i, g in enumerate(grads):
        out[f"clip.grad.{i}"] = g
    for label, factor in (("below", 0.5), ("above", 2.0)):
        ts = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for t, g in zip(ts, grads):
            t.grad = torch.from_numpy(g.copy())
        norm64 = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
        max_norm = factor * norm64
        total = torch.nn.utils.clip_grad_norm_(ts, max_norm)
        out[f"clip.{label}.max_norm"] = np.array(max_norm, dtype=np.float64)
        out[f"clip.{label}.norm"] = np.array(total.item(), dtype=np.float64)
        for i, t in enumerate(ts):
            out[f"clip.{label}.result.{i}"] = t.grad.numpy().copy()


SCHEDULES = [
    # name: (base, final, epochs, niter_per_ep, warmup_epochs, start_warmup_value, warmup_steps)
    ("a", (4e-3, 1e-6, 6, 7, 2, 0, -1)),
    ("b", (1e-3, 1e-5, 4, 5, 1, 1e-5, 7)),       # warmup_steps overrides warmup_epochs
    ("c", (1.0, 0.1, 3, 5, 0, 0, -1)),           # no warmup
    ("d", (0.05, 0.05, 3, 4, 0, 0, -1)),         # constant (the weight decay schedule)
    ("e", (2e-3, 1e-6, 3, 4, 1, 0, 1)),          # a one-step warmup: linspace(0, base, 1) = [0]
    ("f", (4e-3, 1e-6, 100, 37, 20, 0, -1)),     # long: 3700 iterations
    ("g", (5e-4, 2e-6, 5, 3, 5, 1e-6, -1)),      # all warmup
    ("h", (0.05, 1e-4, 3, 2, 2, 1e-5, -1)),      # the warmup's last value needs linspace's end fix
]
LINSPACES = [
    ("a", (0.0, 4e-3, 7)), ("b", (1e-6, 3e-3, 1000)), ("c", (0.3, 0.3, 5)), ("d", (2.0, -1.0, 1)),
    ("e", (-1.5, 2.25, 2)), ("f", (0.1, 0.7, 3)),
    # i * step + start misses stop at the end: numpy sets the last value to stop
    ("g", (1e-6, 1.0, 8)), ("h", (1e-5, 0.05, 4)),
]


def schedule_cases(out):
    for name, args in SCHEDULES:
        out[f"sched.{name}"] = cosine_scheduler(*args).astype(np.float64)
    for name, (start, stop, num) in LINSPACES:
        out[f"linspace.{name}"] = np.linspace(start, stop, num).astype(np.float64)


def ema_case(out, rng):
    shapes = [(3, 2), (4,)]
    models = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    emas = [m.clone() for m in models]
    for i, m in enumerate(models):
        out[f"ema.init.{i}"] = m.numpy().copy()
    for step in range(EMA_UPDATES):
        for i, s in enumerate(shapes):
            models[i] = torch.from_numpy(rng.standard_normal(s).astype(np.float32))
            out[f"ema.param.{step}.{i}"] = models[i].numpy().copy()
        with torch.no_grad():  # timm ModelEma._update
            for ema_v, model_v in zip(emas, models):
                ema_v.copy_(ema_v * EMA_DECAY + (1. - EMA_DECAY) * model_v)
        for i, e in enumerate(emas):
            out[f"ema.avg.{step}.{i}"] = e.numpy().copy()


def get_num_layer_for_convnext(var_name):
    """The official optim_factory.get_num_layer_for_convnext (same logic)."""
    num_max_layer = 12
    if var_name.startswith("downsample_layers"):
        stage_id = int(var_name.split('.')[1])
        if stage_id == 0:
            layer_id = 0
        elif stage_id == 1 or stage_id == 2:
            layer_id = stage_id + 1
        elif stage_id == 3:
            layer_id = 12
        return layer_id
    elif var_name.startswith("stages"):
        stage_id = int(var_name.split('.')[1])
        block_id = int(var_name.split('.')[2])
        if stage_id == 0 or stage_id == 1:
            layer_id = stage_id + 1
        elif stage_id == 2:
            layer_id = 3 + block_id // 3
        elif stage_id == 3:
            layer_id = 12
        return layer_id
    else:
        return num_max_layer + 1


LAYER_DECAY = 0.8


def layer_cases(out, metadata):
    """Per model, in named_parameters() order: the layer ids, the decay flags and the lr scales;
    the names themselves go to the metadata ("layers.<model>.names", comma-separated)."""
    num_layers = 12
    values = list(LAYER_DECAY ** (num_layers + 1 - i) for i in range(num_layers + 2))
    for model, depths in (("convnext_tiny", (3, 3, 9, 3)), ("convnext_small", (3, 3, 27, 3))):
        # The names depend only on the depths: small widths keep this fast.
        net = ref.ConvNeXt(in_chans=3, num_classes=5, depths=depths, dims=(4, 8, 8, 8))
        names, ids, decay, scales = [], [], [], []
        for name, param in net.named_parameters():
            names.append(name)
            ids.append(get_num_layer_for_convnext(name))
            decay.append(0 if len(param.shape) == 1 or name.endswith(".bias") else 1)
            scales.append(values[ids[-1]])
        metadata[f"layers.{model}.names"] = ",".join(names)
        out[f"layers.{model}.id"] = np.array(ids, dtype=np.int64)
        out[f"layers.{model}.decay"] = np.array(decay, dtype=np.int64)
        out[f"layers.{model}.scale"] = np.array(scales, dtype=np.float64)


def main():
    rng = np.random.default_rng(20240601)
    out = {}
    for name, betas, eps, lrs, wds in ADAMW_CASES:
        adamw_case(out, name, betas, eps, lrs, wds, rng)
        out[f"adamw.{name}.lr"] = np.array(lrs, dtype=np.float64)
        out[f"adamw.{name}.wd"] = np.array(wds, dtype=np.float64)
    clip_case(out, rng)
    schedule_cases(out)
    ema_case(out, rng)
    metadata = {"made_by": "tools/make_optim_reference.py", "torch": torch.__version__,
                "numpy": np.__version__, "ema_decay": repr(EMA_DECAY),
                "layer_decay": repr(LAYER_DECAY)}
    layer_cases(out, metadata)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    safetensors_io.save(OUT, out, metadata=metadata)
    print(f"wrote {len(out)} tensors to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
