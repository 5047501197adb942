"""Makes the roadmap golden fixtures in tests/data/roadmap/<case>/ with the PyTorch reference
(tools/roadmap_reference.py): reduced-size versions of the paper's roadmap steps (ResNet-50 ->
ConvNeXt-T, "A ConvNet for the 2020s" section 3), the same structure with small widths and
depths, weights far from init, one forward/backward pass in TRAINING mode (BatchNorm on batch
statistics, updating its running statistics), then the same batch in EVAL mode.

Regenerate (needs python3-torch, Debian's 1.13 is fine; deterministic, CPU, float64):

    /usr/bin/python3 tools/make_roadmap_golden.py              # all cases
    /usr/bin/python3 tools/make_roadmap_golden.py roadmap_07   # the cases whose name has this
    /usr/bin/python3 tools/make_roadmap_golden.py --verify     # read every case back, recompute
    /usr/bin/python3 tools/roadmap_reference.py --summary      # tests/data/roadmap/summary.json

Per case:
  weights.safetensors   the state_dict before the step, params AND buffers, in PyTorch's order
                        and layouts (conv (Co, Ci/groups, k, k)); float32, num_batches_tracked
                        int64 [] (7).
  batch.safetensors     "images" float32 [N, C, H, W], "labels" int64 [N].
  expected.safetensors  "logits" [N, K], "loss" [] (mean cross-entropy), "grad.<name>" for every
                        parameter (named_parameters order), "buffer.<name>" for every buffer
                        AFTER the training forward (running_mean/var updated with momentum 0.1
                        and, for running_var, the UNBIASED batch variance, as PyTorch;
                        num_batches_tracked 8), "eval_logits" [N, K] (eval mode, those updated
                        running statistics, no grad).
  __metadata__ of expected.safetensors:
    "config"  the config dict as JSON (the spec's keys: name (the roadmap step), in_chans,
              num_classes, depths, dims, stem, stem_width, block, spatial, groups, kernel, act,
              acts, norm, norms, downsampling, layer_scale_init_value, drop_path_rate; plus
              "case"),
    and the same fields flat, one metadata entry each (strings as they are, numbers as
    decimal text, lists comma-joined as in tests/data/golden: "depths": "2,1,2,1"), plus
    "image_hw" ("32,32"), "batch" ("3") and "torch" (the version that made it).

Everything is computed in float64 from inputs (weights, images) that are exactly float32
values, then stored as float32: the fixtures hold the exact answer to float32 precision.

Conditioning. For each draw the script also runs the model in float32 and measures its error
against the float64 answer in units of the C++ test's tolerances (logits 1e-4 of max |logit|,
loss 1e-4 relative, grads 1e-3 of each tensor's largest element, buffers 1e-5, eval logits
1e-4). A draw is kept only if every error is under MARGIN = 0.2 of its tolerance, otherwise the
next seed (seed + 1000) is tried: BatchNorm in training mode over 3 samples of a 1x1 map (stage
3 at 32x32) is badly conditioned for some draws (in a first version of these cases, PyTorch's
own float32 run of the GELU case was 1.36x over the gradient tolerance, and 0.8x on most
parameters). The seed used is in the metadata ("seed").

Structurally zero gradients. Some parameters do not affect the loss at all: the bias of a
BatchNorm followed, through linear layers only, by another training-mode BatchNorm (step 08:
every block's bn1.bias, since dwconv -> bn1 -> 1x1 -> bn2 has no activation between), and a
per-channel constant added to the last block of stage 2 when stage 3's first block turns its
2x2 map into a 1x1 one followed by BatchNorm (its conv3/bn3 and downsample biases). Their
float64 gradients are rounding noise (~1e-16); they are stored as exact zeros and listed in the
metadata "zero_grads" (comma-separated parameter names, "" if none). A C++ test must compare
them with an absolute tolerance, e.g. 1e-3 of the largest gradient element of the whole model
(PyTorch's float32 run is within 0.002 of that), instead of 1e-3 of their own (zero) maximum,
and must not require them to be non-zero. Every other gradient is non-zero.

The cases (images 32x32, batch 3, drop path 0; stage maps 8, 4, 2, 1 for both stems):
  roadmap_00_resnet50           ResNet stem (7x7/2 + maxpool), bottleneck, dense 3x3, ReLU
                                everywhere, BatchNorm everywhere; dims 16,24,32,40 (hidden 4..10),
                                stem 8, depths 2,2,1,1 (stage 0: a stride-1 projection block and
                                an identity block; stages 1-3: stride-2 projection blocks).
  roadmap_00_resnet50_gray_37x45  the same with in_chans 1 and a 37x45 image (floors:
                                19x23 -> 10x12 -> 5x6 -> 3x3 -> 2x2).
  roadmap_01_stage_ratio        depths 2,1,2,1 (a stride-1 identity block in stage 2, at 2x2);
                                steps 02 and 03 keep these depths.
  roadmap_02_patchify_stem      4x4/4 stem conv (no bias) + BN + ReLU, no maxpool.
  roadmap_03_resnextify         depthwise 3x3 in the middle; dims 32,48,64,80, stem 12.
  roadmap_04_inverted_bottleneck  hidden 4x: dims 8,12,16,24, stem 8, depths 2,1,1,1 (stage 0
                                has only identity blocks, as in the full-size model); every
                                later inverted case has these sizes unless said otherwise.
  roadmap_05_move_up_dwconv     depthwise 3x3 at the top (strided in the first block of stages
                                1-3), then 1x1 up, 1x1 down.
  roadmap_06_kernel7            7x7 (also larger than the 2x2 and 1x1 maps).
  roadmap_06_kernel5, roadmap_06_kernel11   the kernel variants.
  roadmap_07_gelu               GELU (this case writes stem_width 0, meaning dims[0] = 8).
  roadmap_08_fewer_activations  one GELU per block, nothing after the residual add.
  roadmap_09_fewer_norms        one BatchNorm per block (after the dwconv); conv2/conv3 biased;
                                the shortcut projections keep their BatchNorm.
  roadmap_10_layer_norm         LayerNorm (over channels, eps 1e-6) everywhere; every conv biased.
  roadmap_11_convnext_tiny      downsampling "separate" = the official ConvNeXt (official names),
                                layer scale (gamma far from 1e-6).
  extra_inverted_projection_layer_scale_37x45   not a roadmap step: step 10 with layer scale in
                                the in_block model ("layer{i}.{j}.gamma" first in each block),
                                stem_width 12 != dims[0] (a stride-1 projection shortcut whose
                                conv has a bias, followed by LayerNorm), kernel 5, in_chans 2,
                                a 37x45 image (9x11 -> 5x6 -> 3x3 -> 2x2).
  extra_bottleneck_top_kernel5  not a roadmap step: step 02 (bottleneck, BatchNorm, ReLU, acts
                                and norms all) with spatial "top": a depthwise 5x5 on the block
                                input (strided), then 1x1 down to dims/4, 1x1 up.
  extra_resnext_groups4_expansion05  not a roadmap step: ResNeXt's block (step 00 with 4 groups
                                in the 3x3 conv and hidden width dims / 2, as ResNeXt-50 32x4d's
                                32 groups and expansion 0.5): a grouped, strided conv2d.
  extra_inverted_middle_dense   not a roadmap step: step 08 (inverted, GELU, acts one, BatchNorm
                                everywhere) with spatial "middle", groups 1: a DENSE 3x3 on the
                                4x-wide hidden layer (16 channels); dims 4,4,4,4, stem 8
                                (a stride-1 projection in stage 0), depths 1,1,1,1.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convnext_reference as cnx_ref  # noqa: E402
import roadmap_reference as ref  # noqa: E402
import safetensors_io  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "roadmap")

# Reduced sizes. The bottleneck widths are multiples of 4 (hidden = dims / 4).
SMALL_BOTTLENECK = dict(dims=[16, 24, 32, 40], stem_width=8)
SMALL_RESNEXT = dict(dims=[32, 48, 64, 80], stem_width=12)
SMALL_INVERTED = dict(dims=[8, 12, 16, 24], stem_width=8, depths=(2, 1, 1, 1))


def case(name, step, seed, num_classes, hw=(32, 32), batch=3, in_chans=3, depths=(2, 1, 2, 1),
         **overrides):
    """A case: the full-size step's config with reduced sizes (and any overrides)."""
    cfg = dict(ref.STEPS[step][2])
    cfg.update(in_chans=in_chans, num_classes=num_classes, depths=list(depths),
               drop_path_rate=0.0)
    cfg.update(overrides)
    cfg["case"] = name
    return dict(name=name, config=cfg, hw=hw, batch=batch, seed=seed)


CASES = [
    case("roadmap_00_resnet50", "roadmap_00_resnet50", 100, 10, depths=(2, 2, 1, 1),
         **SMALL_BOTTLENECK),
    case("roadmap_00_resnet50_gray_37x45", "roadmap_00_resnet50", 101, 5, hw=(37, 45),
         in_chans=1, depths=(2, 2, 1, 1), **SMALL_BOTTLENECK),
    case("roadmap_01_stage_ratio", "roadmap_01_stage_ratio", 102, 7, **SMALL_BOTTLENECK),
    case("roadmap_02_patchify_stem", "roadmap_02_patchify_stem", 103, 6, **SMALL_BOTTLENECK),
    case("roadmap_03_resnextify", "roadmap_03_resnextify", 104, 8, **SMALL_RESNEXT),
    case("roadmap_04_inverted_bottleneck", "roadmap_04_inverted_bottleneck", 105, 9,
         **SMALL_INVERTED),
    case("roadmap_05_move_up_dwconv", "roadmap_05_move_up_dwconv", 106, 5, **SMALL_INVERTED),
    case("roadmap_06_kernel7", "roadmap_06_kernel7", 107, 10, **SMALL_INVERTED),
    case("roadmap_06_kernel5", "roadmap_06_kernel5", 108, 6, **SMALL_INVERTED),
    case("roadmap_06_kernel11", "roadmap_06_kernel11", 109, 7, **SMALL_INVERTED),
    case("roadmap_07_gelu", "roadmap_07_gelu", 110, 8, dims=[8, 12, 16, 24], stem_width=0,
         depths=(2, 1, 1, 1)),
    case("roadmap_08_fewer_activations", "roadmap_08_fewer_activations", 111, 9,
         **SMALL_INVERTED),
    case("roadmap_09_fewer_norms", "roadmap_09_fewer_norms", 112, 10, **SMALL_INVERTED),
    case("roadmap_10_layer_norm", "roadmap_10_layer_norm", 113, 5, **SMALL_INVERTED),
    case("roadmap_11_convnext_tiny", "roadmap_11_convnext_tiny", 114, 6, **SMALL_INVERTED),
    case("extra_inverted_projection_layer_scale_37x45", "roadmap_10_layer_norm", 115, 7,
         hw=(37, 45), in_chans=2, dims=[8, 12, 16, 24], stem_width=12, kernel=5,
         layer_scale_init_value=1e-6, depths=(2, 1, 1, 1)),
    case("extra_bottleneck_top_kernel5", "roadmap_02_patchify_stem", 116, 6, spatial="top",
         kernel=5, **SMALL_BOTTLENECK),
    case("extra_inverted_middle_dense", "roadmap_08_fewer_activations", 117, 5,
         spatial="middle", groups=1, kernel=3, dims=[4, 4, 4, 4], stem_width=8,
         depths=(1, 1, 1, 1)),
    case("extra_resnext_groups4_expansion05", "roadmap_00_resnet50", 118, 7, groups=4,
         expansion=0.5, dims=[16, 24, 32, 48], stem_width=8, depths=(2, 1, 1, 1)),
]


def far_from_init(model, gen):
    """Every part of the model matters: norm weights ~ 1 + N(0, 0.2), norm biases ~ N(0, 0.2),
    conv/linear weights ~ N(0, 1 / fan_in), their biases ~ N(0, 0.1), gamma ~ U(0.5, 1.5),
    BatchNorm running_mean ~ N(0, 0.2), running_var ~ U(0.5, 1.5), num_batches_tracked 7.
    Then everything is rounded to float32 values (the fixtures store float32)."""
    def randn(t, std):
        return std * torch.randn(t.shape, generator=gen, dtype=t.dtype)

    def rand(t, lo, hi):
        return lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=t.dtype)

    norms = (nn.BatchNorm2d, nn.LayerNorm, ref.ChannelLayerNorm, cnx_ref.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norms):
                module.weight.copy_(1.0 + randn(module.weight, 0.2))
                module.bias.copy_(randn(module.bias, 0.2))
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.copy_(randn(module.running_mean, 0.2))
                    module.running_var.copy_(rand(module.running_var, 0.5, 1.5))
                    module.num_batches_tracked.fill_(7)
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.copy_(randn(module.weight, module.weight[0].numel() ** -0.5))
                if module.bias is not None:
                    module.bias.copy_(randn(module.bias, 0.1))
            if isinstance(module, (ref.RoadmapBlock, cnx_ref.Block)) and \
                    module.gamma is not None:
                module.gamma.copy_(rand(module.gamma, 0.5, 1.5))
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.float().double())


def run(model, images, labels):
    """Training-mode forward/backward, then eval-mode logits. Leaves the buffers updated."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    grads = [(k, p.grad.detach().clone()) for k, p in model.named_parameters()]
    buffers = [(k, b.detach().clone()) for k, b in model.named_buffers()]
    model.eval()
    with torch.no_grad():
        eval_logits = model(images)
    return logits.detach(), loss.detach(), grads, buffers, eval_logits


def flat_metadata(cfg):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, (list, tuple)):
            out[k] = ",".join(str(x) for x in v)
        elif isinstance(v, float):
            out[k] = repr(v)
        else:
            out[k] = str(v)
    return out


def structural_zeros(grads):
    """Names whose gradient is zero up to float64 rounding (max |g| <= 1e-10 of the model's
    largest gradient element): parameters the loss does not depend on, e.g. the bias of a
    BatchNorm followed, through linear layers only, by another training-mode BatchNorm."""
    scale = max(g.abs().max().item() for _, g in grads)
    return [k for k, g in grads if g.abs().max().item() <= 1e-10 * scale]


def float32_margin(cfg, state0, images, labels, want, zeros):
    """The worst error of a float32 PyTorch run, in units of the C++ test's tolerances (a
    structurally zero gradient against 1e-3 of the model's largest gradient element)."""
    m32 = ref.make_model(cfg).float()
    m32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state0.items()})
    logits, loss, grads, buffers, eval_logits = run(m32, images.float(), labels)
    w_logits, w_loss, w_grads, w_buffers, w_eval = want
    global_grad = max(w.abs().max().item() for _, w in w_grads)

    def err(a, b, tol):
        return (a.double() - b).abs().max().item() / tol

    worst = {
        "logits": err(logits, w_logits, 1e-4 * w_logits.abs().max().item()),
        "loss": err(loss, w_loss, 1e-4 * abs(w_loss.item())),
        "grads": max(err(g, w, 1e-3 * w.abs().max().item())
                     for (k, g), (_, w) in zip(grads, w_grads) if k not in zeros),
        "eval_logits": err(eval_logits, w_eval, 1e-4 * w_eval.abs().max().item()),
    }
    if zeros:
        worst["zero_grads"] = max(err(g, w, 1e-3 * global_grad)
                                  for (k, g), (_, w) in zip(grads, w_grads) if k in zeros)
    fb = [(b, w) for (_, b), (_, w) in zip(buffers, w_buffers) if w.is_floating_point()]
    if fb:
        worst["buffers"] = max(err(b, w, 1e-5 * max(1.0, w.abs().max().item())) for b, w in fb)
    return worst


def attempt(c, seed):
    cfg = c["config"]
    gen = torch.Generator().manual_seed(seed)
    model = ref.make_model(cfg).double()
    far_from_init(model, gen)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    n, (h, w) = c["batch"], c["hw"]
    images = torch.randn(n, cfg["in_chans"], h, w, generator=gen, dtype=torch.float64)
    images = images.float().double()
    labels = torch.randint(0, cfg["num_classes"], (n,), generator=gen)
    result = run(model, images, labels)
    zeros = structural_zeros(result[2])
    result = result[:2] + ([(k, torch.zeros_like(g) if k in zeros else g)
                            for k, g in result[2]],) + result[3:]
    margin = float32_margin(cfg, state0, images, labels, result, zeros)
    return model, state0, images, labels, result, zeros, margin


# A case is kept only if PyTorch's own float32 run is within this fraction of every tolerance
# of the C++ test; otherwise the next seed is tried (BatchNorm over 3 samples of a 1x1 map can
# be ill-conditioned for some draws).
MARGIN = 0.2


def make_case(c):
    cfg = c["config"]
    for tries in range(40):
        seed = c["seed"] + 1000 * tries
        model, state0, images, labels, result, zeros, margin = attempt(c, seed)
        if max(margin.values()) < MARGIN:
            break
    else:
        raise RuntimeError(f"{c['name']}: no well-conditioned draw in 40 seeds")
    logits, loss, grads, buffers, eval_logits = result
    n, (h, w) = c["batch"], c["hw"]

    out = os.path.join(ROOT, c["name"])
    os.makedirs(out, exist_ok=True)

    def f32(t):
        t = t.detach()
        return t.float().numpy() if t.is_floating_point() else t.numpy()

    safetensors_io.save(os.path.join(out, "weights.safetensors"),
                        [(k, f32(v)) for k, v in state0.items()])
    safetensors_io.save(os.path.join(out, "batch.safetensors"),
                        [("images", f32(images)), ("labels", labels.numpy())])
    expected = [("logits", f32(logits)), ("loss", f32(loss))]
    expected += [("grad." + k, f32(g)) for k, g in grads]
    expected += [("buffer." + k, f32(b)) for k, b in buffers]
    expected += [("eval_logits", f32(eval_logits))]
    metadata = {"config": json.dumps(cfg)}
    metadata.update(flat_metadata(cfg))
    metadata.update(image_hw=f"{h},{w}", batch=str(n), seed=str(seed),
                    zero_grads=",".join(zeros), torch=torch.__version__)
    safetensors_io.save(os.path.join(out, "expected.safetensors"), expected, metadata)

    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{c['name']}: seed {seed} (try {tries + 1}), {ref.count_params(model)} params, "
          f"{len(buffers)} buffers, loss {loss.item():.6f}, logits {tuple(logits.shape)}, "
          f"{size / 1024:.0f} KiB; structural zero grads {len(zeros)} {zeros}; "
          "float32 error / tolerance: " + ", ".join(f"{k} {v:.3f}" for k, v in margin.items()))
    return margin


def verify(name):
    """Reads a case back as a consumer would (config from the metadata, weights and batch from
    the files), recomputes it in float64 and checks every stored tensor (float32 rounding only).
    Returns the worst relative error."""
    out = os.path.join(ROOT, name)
    expected, md = safetensors_io.load(os.path.join(out, "expected.safetensors"))
    weights, _ = safetensors_io.load(os.path.join(out, "weights.safetensors"))
    batch, _ = safetensors_io.load(os.path.join(out, "batch.safetensors"))
    cfg = json.loads(md["config"])
    if flat_metadata(cfg) != {k: md[k] for k in cfg}:
        raise RuntimeError(f"{name}: flat metadata differs from the JSON config")
    model = ref.make_model(cfg).double()
    sd = model.state_dict()
    if list(sd) != list(weights):
        raise RuntimeError(f"{name}: weights.safetensors names/order differ from the model's")
    model.load_state_dict({k: torch.from_numpy(v.copy()).to(sd[k].dtype) for k, v in weights.items()})
    images = torch.from_numpy(batch["images"].copy()).double()
    labels = torch.from_numpy(batch["labels"].copy())
    logits, loss, grads, buffers, eval_logits = run(model, images, labels)
    zeros = set(filter(None, md["zero_grads"].split(",")))
    got = [("logits", logits), ("loss", loss)]
    got += [("grad." + k, torch.zeros_like(g) if k in zeros else g) for k, g in grads]
    got += [("buffer." + k, b) for k, b in buffers] + [("eval_logits", eval_logits)]
    if [k for k, _ in got] != list(expected):
        raise RuntimeError(f"{name}: expected.safetensors holds other tensors")
    worst = 0.0
    for k, t in got:
        want = torch.from_numpy(expected[k].copy()).double()
        scale = max(want.abs().max().item(), 1e-30)
        worst = max(worst, (t.double() - want).abs().max().item() / scale)
    if worst > 1e-5:
        raise RuntimeError(f"{name}: recomputed values differ by {worst:.3g} (relative)")
    return worst


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    check_only = "--verify" in args
    pick = [a for a in args if a != "--verify"]
    worst = 0.0
    for c in CASES:
        if pick and not any(p in c["name"] for p in pick):
            continue
        if check_only:
            print(f"{c['name']}: read back and recomputed, worst relative error "
                  f"{verify(c['name']):.3g}")
        else:
            worst = max(worst, max(make_case(c).values()))
    if not check_only:
        print(f"worst float32 error / tolerance over the cases: {worst:.3f}")
