"""Makes tests/data/train_parity/, the fixture of tests/test_train_parity.cpp: 20 training steps
of a small ConvNeXt in PyTorch, done the way the official ConvNeXt training does them
(facebookresearch/ConvNeXt main.py, engine.py, optim_factory.py, utils.py), from initial weights
and batches that the C++ test reuses, so that the C++ training step can be checked against it
loss by loss.

    /usr/bin/python3 tools/make_train_parity.py      # needs torch and numpy

The run (CONFIG below):
  model      tools/convnext_reference.py ConvNeXt, in_chans 1, 10 classes, depths [1, 1, 2, 1],
             dims [8, 16, 24, 32], layer scale 1e-6, with the official initialisation
             (_init_weights: trunc_normal_(std=.02) on [-2, 2] for conv and linear weights, zero
             biases; LayerNorm ones and zeros; gamma 1e-6; head * head_init_scale 1), drop path
             0, model.train()
  data       a synthetic Fashion-MNIST-shaped dataset: 80 uint8 28x28 images of 10 classes
             (class templates plus noise, so that the loss falls), normalised exactly as the C++
             loader does (zero padding to 32x32, (x / 255 - 0.2860f) / 0.3530f in double,
             rounded once to float); 2 epochs of 10 batches of 8, each epoch in its own shuffled
             order; no augmentation
  loss       torch.nn.CrossEntropyLoss(label_smoothing=0.1), equal to the official
             timm LabelSmoothingCrossEntropy(0.1) (checked below)
  optimiser  torch.optim.AdamW, betas (0.9, 0.999), eps 1e-8, the two parameter groups of
             optim_factory.get_parameter_groups (no weight decay for 1-D tensors and biases,
             0.05 for the rest; lr_scale 1), with engine.py's per-iteration assignment
             group["lr"] = lr_schedule[it] * group["lr_scale"] and, for the decayed group,
             group["weight_decay"] = wd_schedule[it] (constant 0.05: weight_decay_end = None)
  schedule   utils.cosine_scheduler(4e-3, 1e-5, epochs=2, niter_per_ep=10, warmup_epochs=1,
             start_warmup_value=0), reimplemented below with numpy exactly as the official code.
             4e-3 is the official recipes' base lr; it is also large enough that the losses
             notice the optimiser's details within 20 steps (with layer scale 1e-6 the blocks
             start as near identities): eps 1e-6 instead of 1e-8 moves them by 2.6e-4 relative,
             weight decay on every tensor by 1e-3, beta2 0.99 by 1e-3 (at 2e-3: 6.6e-5, 3.5e-4,
             4.9e-4)
  step       engine.py, full precision, update_freq 1: forward, loss, loss.item(),
             loss.backward(), optimizer.step(), optimizer.zero_grad() (clipping is only on the
             amp path there; --clip_grad is None by default anyway)

Precision: the reference run is in float64, from the float32 initial weights and float32
images, so the stored losses are the exact answer (to ~1e-15) to the problem the C++ float32
code solves, and the C++ test measures only its own float32 rounding, not PyTorch's as well;
nor does the fixture depend on which CPU kernels this PyTorch build picks. The same run in
float32 PyTorch is made too, and how far it lands from float64 is written into the metadata
(f32_*): the evidence that an f32 implementation can meet the test's tolerances.

Files (official parameter names and shapes everywhere):
  weights_initial.safetensors  the initial weights, float32
  weights_final.safetensors    the weights after the 20 steps (float64 run, stored as float32)
  data.safetensors             images uint8 [80, 28, 28] (the dataset, HxW, 1 channel),
                               labels int64 [80], order int64 [2, 80] (dataset index at each
                               position of each epoch: step s uses positions
                               [8 * (s % 10), 8 * (s % 10) + 8) of epoch s // 10),
                               images_step0 float32 [8, 1, 32, 32] (step 0's normalised batch,
                               NCHW, so the test can check that it builds the same inputs)
  expected.safetensors         lr float64 [20] (the schedule), loss float64 [20] (the loss of
                               each step's forward pass, before its update), loss_full_batch
                               float64 [20] (the same run with every step on all 80 images: for
                               the test that runs the real trainer, whose loader shuffles with
                               its own generator, so only a one-batch epoch has a known batch);
                               the configuration and the float32 cross-check in __metadata__
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convnext_reference as ref  # noqa: E402
import safetensors_io  # noqa: E402
from cosine_schedule import cosine_scheduler  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                   "train_parity")

CONFIG = dict(
    in_chans=1, num_classes=10, depths=[1, 1, 2, 1], dims=[8, 16, 24, 32],
    layer_scale_init_value=1e-6, head_init_scale=1.0, drop_path=0.0,
    dataset_size=80, image_side=28, batch_size=8, epochs=2, warmup_epochs=1, warmup_lr=0.0,
    lr=4e-3, min_lr=1e-5, weight_decay=0.05, smoothing=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
    mean=0.2860, std=0.3530,  # train/data/datasets.cpp, Fashion-MNIST (as float32)
    seed=0,
)
CONFIG["iters_per_epoch"] = CONFIG["dataset_size"] // CONFIG["batch_size"]
STEPS = CONFIG["epochs"] * CONFIG["iters_per_epoch"]


def official_model():
    """The official model with the official init (ConvNeXt._init_weights and head scaling)."""
    c = CONFIG
    torch.manual_seed(c["seed"])
    model = ref.ConvNeXt(c["in_chans"], c["num_classes"], c["depths"], c["dims"],
                         c["layer_scale_init_value"])
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.trunc_normal_(m.weight, std=.02)  # timm's: a=-2, b=2 (absolute)
            torch.nn.init.constant_(m.bias, 0)
    with torch.no_grad():
        model.head.weight.mul_(c["head_init_scale"])
        model.head.bias.mul_(c["head_init_scale"])
    return model


def make_dataset(rng):
    """uint8 [N, 28, 28] images and int64 labels: each class a smooth random template (a 7x7
    pattern upsampled 4x), each image its class's template plus noise, clipped to [0, 255];
    every class appears N / 10 times."""
    c = CONFIG
    n, side, k = c["dataset_size"], c["image_side"], c["num_classes"]
    templates = rng.uniform(0, 255, size=(k, side // 4, side // 4))
    templates = np.kron(templates, np.ones((4, 4)))
    labels = np.arange(n, dtype=np.int64) % k
    rng.shuffle(labels)
    noise = rng.normal(0, 40, size=(n, side, side))
    images = np.clip(np.rint(0.8 * templates[labels] + noise), 0, 255).astype(np.uint8)
    return images, labels


def normalise(images_u8):
    """What the C++ loader makes of uint8 [B, 28, 28]: float32 [B, 1, 32, 32], zero-padded by 2,
    (x / 255 - mean) / std computed in double with mean and std the float32 constants."""
    mean = float(np.float32(CONFIG["mean"]))
    std = float(np.float32(CONFIG["std"]))
    lut = ((np.arange(256) / 255.0 - mean) / std).astype(np.float32)
    padded = np.pad(images_u8, ((0, 0), (2, 2), (2, 2)))  # pixel value 0
    return lut[padded][:, None, :, :]


def parameter_groups(model, weight_decay):
    """optim_factory.get_parameter_groups without layer decay: 'decay' and 'no_decay' groups in
    order of first appearance, lr_scale 1."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if len(p.shape) == 1 or name.endswith(".bias"):
            group_name, wd = "no_decay", 0.0
        else:
            group_name, wd = "decay", weight_decay
        if group_name not in groups:
            groups[group_name] = {"weight_decay": wd, "params": [], "lr_scale": 1.0}
        groups[group_name]["params"].append(p)
    return list(groups.values())


def timm_label_smoothing_ce(x, target, smoothing):
    """timm.loss.LabelSmoothingCrossEntropy, which the official main.py uses when smoothing > 0
    and mixup is off."""
    logprobs = F.log_softmax(x, dim=-1)
    nll_loss = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    smooth_loss = -logprobs.mean(dim=-1)
    return ((1.0 - smoothing) * nll_loss + smoothing * smooth_loss).mean()


def run(initial, batches, lr_schedule, wd_schedule, dtype):
    """engine.train_one_epoch over both epochs, full precision, update_freq 1."""
    c = CONFIG
    model = ref.ConvNeXt(c["in_chans"], c["num_classes"], c["depths"], c["dims"],
                         c["layer_scale_init_value"]).to(dtype)
    model.load_state_dict({k: torch.from_numpy(v.copy()).to(dtype) for k, v in initial.items()})
    model.train(True)
    optimizer = torch.optim.AdamW(parameter_groups(model, c["weight_decay"]), lr=c["lr"],
                                  weight_decay=0.0, eps=c["eps"], betas=(c["beta1"], c["beta2"]))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=c["smoothing"])
    optimizer.zero_grad()
    losses = []
    for it, (images, labels) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule[it] * group["lr_scale"]
            if group["weight_decay"] > 0:
                group["weight_decay"] = wd_schedule[it]
        samples = torch.from_numpy(images).to(dtype)
        targets = torch.from_numpy(labels)
        output = model(samples)
        loss = criterion(output, targets)
        if dtype == torch.float64:
            timm = timm_label_smoothing_ce(output, targets, c["smoothing"]).item()
            assert abs(timm - loss.item()) <= 1e-12 * abs(loss.item()), (timm, loss.item())
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    final = {k: v.detach().to(torch.float64).numpy() for k, v in model.state_dict().items()}
    return np.array(losses), final


def main():
    torch.set_num_threads(1)
    c = CONFIG
    model = official_model()
    initial = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    rng = np.random.default_rng(c["seed"])
    images_u8, labels = make_dataset(rng)
    order = np.stack([rng.permutation(c["dataset_size"]) for _ in range(c["epochs"])]).astype(
        np.int64)
    B, n_it = c["batch_size"], c["iters_per_epoch"]
    batches = []
    for s in range(STEPS):
        idx = order[s // n_it, B * (s % n_it):B * (s % n_it) + B]
        batches.append((normalise(images_u8[idx]), labels[idx]))

    lr_schedule = cosine_scheduler(c["lr"], c["min_lr"], c["epochs"], n_it, c["warmup_epochs"],
                                   c["warmup_lr"])
    wd_schedule = cosine_scheduler(c["weight_decay"], c["weight_decay"], c["epochs"], n_it)

    losses, final = run(initial, batches, lr_schedule, wd_schedule, torch.float64)
    losses32, final32 = run(initial, batches, lr_schedule, wd_schedule, torch.float32)
    # The full-batch run, for the test of the real trainer (whose loader shuffles with its own
    # generator): every step on all 80 images, so the order within the batch does not matter;
    # 20 epochs of 1 iteration with 10 warmup epochs give the same lr values as above.
    full = [(normalise(images_u8), labels)] * STEPS
    full_schedule = cosine_scheduler(c["lr"], c["min_lr"], STEPS, 1, STEPS // 2, c["warmup_lr"])
    assert np.array_equal(full_schedule, lr_schedule)
    losses_full, _ = run(initial, full, lr_schedule, wd_schedule, torch.float64)
    losses_full32, _ = run(initial, full, lr_schedule, wd_schedule, torch.float32)
    full_rel = np.max(np.abs(losses_full32 - losses_full) / np.abs(losses_full))
    loss_rel = np.max(np.abs(losses32 - losses) / np.abs(losses))
    weight_rel = max(np.max(np.abs(final32[k] - final[k])) / np.max(np.abs(final[k]))
                     for k in final)
    worst_tensor = max(final, key=lambda k: np.max(np.abs(final32[k] - final[k]))
                       / np.max(np.abs(final[k])))

    os.makedirs(OUT, exist_ok=True)
    safetensors_io.save(os.path.join(OUT, "weights_initial.safetensors"), list(initial.items()))
    safetensors_io.save(os.path.join(OUT, "weights_final.safetensors"),
                        [(k, v.astype(np.float32)) for k, v in final.items()])
    safetensors_io.save(os.path.join(OUT, "data.safetensors"),
                        [("images", images_u8), ("labels", labels), ("order", order),
                         ("images_step0", batches[0][0])])
    metadata = {k: (",".join(map(str, v)) if isinstance(v, list) else repr(v))
                for k, v in c.items()}
    metadata.update(steps=STEPS, reference_dtype="float64", torch=torch.__version__,
                    f32_max_loss_rel_diff=f"{loss_rel:.3e}",
                    f32_max_final_weight_diff_of_tensor_max=f"{weight_rel:.3e} ({worst_tensor})",
                    f32_max_loss_full_batch_rel_diff=f"{full_rel:.3e}")
    safetensors_io.save(os.path.join(OUT, "expected.safetensors"),
                        [("lr", lr_schedule.astype(np.float64)), ("loss", losses),
                         ("loss_full_batch", losses_full)], metadata)

    for s in range(STEPS):
        print(f"step {s:2d} lr {lr_schedule[s]:.6e} loss {losses[s]:.10f} "
              f"(float32 torch {losses32[s]:.10f}, rel {abs(losses32[s] / losses[s] - 1):.1e})")
    print(f"float32 vs float64 torch: losses {loss_rel:.3e} relative at worst, final weights "
          f"{weight_rel:.3e} of the tensor's largest element at worst ({worst_tensor})")
    print("full batch: losses " + " ".join(f"{v:.6f}" for v in losses_full)
          + f"; float32 vs float64 {full_rel:.3e} relative at worst")
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{sum(v.size for v in initial.values())} parameters; fixture {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
