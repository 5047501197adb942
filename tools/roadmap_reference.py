"""The roadmap of "A ConvNet for the 2020s" (Liu et al. 2022, section 3) in PyTorch: ResNet-50
modernised step by step into ConvNeXt-T, as one configurable model. Used only as an oracle: it
makes the golden test data (tools/make_roadmap_golden.py) and the summary of the steps
(tests/data/roadmap/summary.json) that the C++ model is checked against.

    /usr/bin/python3 tools/roadmap_reference.py            # self-checks (torchvision, counts)
    /usr/bin/python3 tools/roadmap_reference.py --summary  # + writes tests/data/roadmap/summary.json

The design space (the config dict; the C++ ConvNeXtConfig has the same field names):
  name, in_chans, num_classes, depths [4], dims [4] (each stage's block output width),
  stem "resnet" (conv 7x7/2 pad 3 -> norm -> act -> maxpool 3/2/1) | "patchify" (conv 4x4/4 ->
       norm -> act; the act only with downsampling "in_block"), stem_width (0: dims[0]),
  block "bottleneck" (hidden = dims[i] / 4) | "inverted" (hidden = 4 dims[i]),
  spatial "middle" (1x1, kxk, 1x1) | "top" (kxk depthwise, 1x1, 1x1),
  groups 1 (dense spatial conv) | 0 (depthwise) (any other positive value: that many groups),
  expansion (optional): hidden width / block width instead of the block's own 1/4 or 4,
  kernel (odd; padding kernel // 2), act "relu" | "gelu" (exact erf), acts "all" | "one",
  norm "batch" (BatchNorm2d eps 1e-5 momentum 0.1) | "layer" (over channels, eps 1e-6),
  norms "all" | "one", downsampling "in_block" | "separate" (= the official ConvNeXt),
  layer_scale_init_value (0: no gamma), drop_path_rate (linear in the block index, as ConvNeXt).

With downsampling "in_block" the parameter names are torchvision's ResNet ones (step 00's
state_dict IS torchvision's resnet50's, names, shapes and order); with "separate" the model is
tools/convnext_reference.py's ConvNeXt (official names).
"""
import collections
import copy
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convnext_reference as cnx_ref  # noqa: E402

# ---- the steps -------------------------------------------------------------------------------

BASE = dict(
    name="roadmap_00_resnet50", in_chans=3, num_classes=1000,
    depths=[3, 4, 6, 3], dims=[256, 512, 1024, 2048],
    stem="resnet", stem_width=64, block="bottleneck", spatial="middle", groups=1, kernel=3,
    act="relu", acts="all", norm="batch", norms="all", downsampling="in_block",
    layer_scale_init_value=0.0,
    # The paper trains every step with the same modern recipe (its section 2), whose stochastic
    # depth rate for ConvNeXt-T is 0.1; it changes neither parameters nor MACs, and the golden
    # fixtures use 0.
    drop_path_rate=0.1,
)

CONFIG_KEYS = list(BASE)


def _steps():
    steps = collections.OrderedDict()
    cfg = dict(BASE)

    def step(name, description, top1, **changes):
        nonlocal cfg
        cfg = dict(cfg, name=name, **changes)
        steps[name] = (description, top1, copy.deepcopy(cfg))

    step("roadmap_00_resnet50", "ResNet-50 (torchvision), trained with the modern recipe", 78.8)
    step("roadmap_01_stage_ratio", "stage compute ratio 3:4:6:3 -> 3:3:9:3", 79.4,
         depths=[3, 3, 9, 3])
    step("roadmap_02_patchify_stem", "stem 7x7/2 conv + maxpool -> 4x4/4 patchify conv", 79.5,
         stem="patchify", stem_width=64)
    step("roadmap_03_resnextify", "depthwise 3x3 conv (ResNeXt-ify), width 64 -> 96", 80.5,
         groups=0, dims=[384, 768, 1536, 3072], stem_width=96)
    step("roadmap_04_inverted_bottleneck", "inverted bottleneck (hidden 4x the block width)",
         80.6, block="inverted", dims=[96, 192, 384, 768], stem_width=96)
    step("roadmap_05_move_up_dwconv", "depthwise conv moved up to the top of the block", 79.9,
         spatial="top", kernel=3)
    base6 = copy.deepcopy(cfg)
    for k in (5, 7, 9, 11):
        if k == 7:
            continue
        steps[f"roadmap_06_kernel{k}"] = (f"depthwise kernel 3x3 -> {k}x{k} (variant)", None,
                                          dict(base6, name=f"roadmap_06_kernel{k}", kernel=k))
    step("roadmap_06_kernel7", "depthwise kernel 3x3 -> 7x7", 80.6, kernel=7)
    step("roadmap_07_gelu", "ReLU -> GELU", 80.6, act="gelu")
    step("roadmap_08_fewer_activations", "one activation per block (between the 1x1 convs)",
         81.3, acts="one")
    step("roadmap_09_fewer_norms", "one norm per block (after the depthwise conv)", 81.4,
         norms="one")
    step("roadmap_10_layer_norm", "BatchNorm -> LayerNorm", 81.5, norm="layer")
    step("roadmap_11_convnext_tiny",
         "separate downsampling layers (LN + 2x2/2 conv), final LN, layer scale = ConvNeXt-T",
         82.0, downsampling="separate", layer_scale_init_value=1e-6)
    # Put the kernel variants after kernel7 (the named order of the paper's figure 2).
    order = [n for n in steps if not n.startswith("roadmap_06_kernel") or n.endswith("7")]
    i = order.index("roadmap_06_kernel7") + 1
    order[i:i] = [f"roadmap_06_kernel{k}" for k in (5, 9, 11)]
    return collections.OrderedDict((n, steps[n]) for n in order)


# name -> (one-line description of the change, the paper's ImageNet top-1 or None, config)
STEPS = _steps()


# ---- the model -------------------------------------------------------------------------------

class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) tensor: F.layer_norm on the channels-last
    view (biased variance, eps 1e-6). Parameters weight, bias (C)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def make_norm(kind, channels):
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    if kind == "layer":
        return ChannelLayerNorm(channels, eps=1e-6)
    raise ValueError(f"norm {kind!r}")


def make_act(kind):
    if kind == "relu":
        return nn.ReLU()
    if kind == "gelu":
        return nn.GELU()  # exact erf form
    raise ValueError(f"act {kind!r}")


def drop_path(x, p, training):
    """Stochastic depth per sample (timm's): zero a sample's branch with probability p, scale
    the others by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class RoadmapBlock(nn.Module):
    """One residual block of the "in_block" design space. Registration order (= state_dict
    order): gamma, conv1, {bn,ln}1, conv2, {bn,ln}2, conv3, {bn,ln}3, downsample."""

    def __init__(self, cfg, cin, cout, stride, drop_prob):
        super().__init__()
        if cfg["block"] not in ("bottleneck", "inverted"):
            raise ValueError(f"block {cfg['block']!r}")
        if cfg.get("expansion", 0) > 0:
            # An explicit hidden width / block width (ResNeXt-50 32x4d: 0.5 with 32 groups).
            hidden = round(cout * cfg["expansion"])
        elif cfg["block"] == "bottleneck":
            if cout % 4:
                raise ValueError(f"bottleneck width {cout} is not a multiple of 4")
            hidden = cout // 4
        else:
            hidden = 4 * cout
        k = cfg["kernel"]
        if k % 2 != 1:
            raise ValueError(f"kernel {k} is not odd")
        norm_prefix = {"batch": "bn", "layer": "ln"}[cfg["norm"]]
        norms = {"all": (True, True, True), "one": (True, False, False)}[cfg["norms"]]
        self.acts_all = {"all": True, "one": False}[cfg["acts"]]
        self.drop_prob = drop_prob

        # (in, out, kernel, stride, groups) of conv1, conv2, conv3.
        if cfg["spatial"] == "middle":
            g = hidden if cfg["groups"] == 0 else cfg["groups"]
            convs = [(cin, hidden, 1, 1, 1), (hidden, hidden, k, stride, g),
                     (hidden, cout, 1, 1, 1)]
        elif cfg["spatial"] == "top":
            convs = [(cin, cin, k, stride, cin), (cin, hidden, 1, 1, 1), (hidden, cout, 1, 1, 1)]
        else:
            raise ValueError(f"spatial {cfg['spatial']!r}")

        if cfg["layer_scale_init_value"] > 0:
            self.gamma = nn.Parameter(cfg["layer_scale_init_value"] * torch.ones(cout))
        else:
            self.gamma = None
        self.norm_names = []
        for i, ((ci, co, kk, s, groups), has_norm) in enumerate(zip(convs, norms), start=1):
            # A conv has a bias iff it is not directly followed by a BatchNorm.
            bias = not (has_norm and cfg["norm"] == "batch")
            setattr(self, f"conv{i}", nn.Conv2d(ci, co, kk, stride=s, padding=kk // 2,
                                                groups=groups, bias=bias))
            name = f"{norm_prefix}{i}" if has_norm else None
            if name:
                setattr(self, name, make_norm(cfg["norm"], co))
            self.norm_names.append(name)
        self.act = make_act(cfg["act"])
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=cfg["norm"] != "batch"),
                make_norm(cfg["norm"], cout))
        else:
            self.downsample = None

    def _conv_norm(self, i, x):
        x = getattr(self, f"conv{i}")(x)
        name = self.norm_names[i - 1]
        return getattr(self, name)(x) if name else x

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self._conv_norm(1, x)
        if self.acts_all:
            y = self.act(y)
        y = self.act(self._conv_norm(2, y))  # the one act of acts == "one"
        y = self._conv_norm(3, y)
        if self.gamma is not None:
            y = self.gamma[:, None, None] * y
        out = shortcut + drop_path(y, self.drop_prob, self.training)
        return self.act(out) if self.acts_all else out


class RoadmapNet(nn.Module):
    """The "in_block" model: stem (conv1, bn1|ln1), layer1..layer4, global average pool, fc."""

    def __init__(self, cfg):
        super().__init__()
        cfg = dict(cfg)
        depths, dims = list(cfg["depths"]), list(cfg["dims"])
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError("depths and dims have four entries")
        stem_width = cfg["stem_width"] or dims[0]
        bias = cfg["norm"] != "batch"
        if cfg["stem"] == "resnet":
            self.conv1 = nn.Conv2d(cfg["in_chans"], stem_width, 7, stride=2, padding=3, bias=bias)
        elif cfg["stem"] == "patchify":
            self.conv1 = nn.Conv2d(cfg["in_chans"], stem_width, 4, stride=4, padding=0, bias=bias)
        else:
            raise ValueError(f"stem {cfg['stem']!r}")
        self.stem_norm_name = {"batch": "bn1", "layer": "ln1"}[cfg["norm"]]
        setattr(self, self.stem_norm_name, make_norm(cfg["norm"], stem_width))
        self.act = make_act(cfg["act"])
        self.maxpool = (nn.MaxPool2d(3, stride=2, padding=1) if cfg["stem"] == "resnet"
                        else None)

        total = sum(depths)
        rates = ([x.item() for x in torch.linspace(0, cfg["drop_path_rate"], total)]
                 if total > 1 else [0.0] * total)
        cin, b = stem_width, 0
        for i in range(4):
            blocks = []
            for j in range(depths[i]):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(RoadmapBlock(cfg, cin, dims[i], stride, rates[b]))
                cin, b = dims[i], b + 1
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(dims[3], cfg["num_classes"])

    def forward(self, x):
        x = self.act(getattr(self, self.stem_norm_name)(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _ConvNeXtBlockDropPath(cnx_ref.Block):
    """convnext_reference's Block with stochastic depth (its forward has none)."""

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        return shortcut + drop_path(x.permute(0, 3, 1, 2), self.drop_prob, self.training)


def make_model(cfg):
    """An nn.Module for a config dict (keys as CONFIG_KEYS; extra keys such as "case" are
    ignored)."""
    if cfg["downsampling"] == "in_block":
        return RoadmapNet(cfg)
    if cfg["downsampling"] != "separate":
        raise ValueError(f"downsampling {cfg['downsampling']!r}")
    # "separate" is exactly the official ConvNeXt; only its own choices are accepted.
    convnext = dict(stem="patchify", block="inverted", spatial="top", groups=0, kernel=7,
                    act="gelu", acts="one", norm="layer", norms="one")
    wrong = {k: cfg[k] for k, v in convnext.items() if cfg[k] != v}
    if cfg["stem_width"] not in (0, cfg["dims"][0]):
        wrong["stem_width"] = cfg["stem_width"]
    if wrong:
        raise ValueError(f"downsampling 'separate' is ConvNeXt; these fields differ: {wrong}")
    model = cnx_ref.ConvNeXt(cfg["in_chans"], cfg["num_classes"], list(cfg["depths"]),
                             list(cfg["dims"]), cfg["layer_scale_init_value"])
    total = sum(cfg["depths"])
    rates = ([x.item() for x in torch.linspace(0, cfg["drop_path_rate"], total)]
             if total > 1 else [0.0] * total)
    blocks = [blk for stage in model.stages for blk in stage]
    for blk, rate in zip(blocks, rates):
        blk.__class__ = _ConvNeXtBlockDropPath
        blk.drop_prob = rate
    return model


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model, hw, in_chans=None):
    """Multiply-adds of one image of size hw (int or (h, w)) through every Conv2d and Linear:
    output elements * (Cin / groups) * kh * kw for a conv, in * out per row for a Linear.
    Norms, activations and pools are not counted."""
    h, w = (hw, hw) if isinstance(hw, int) else hw
    if in_chans is None:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        in_chans = first.in_channels
    total = [0]

    def conv_hook(m, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        total[0] += (out.numel() // m.out_features) * m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, h, w))
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return total[0]


# ---- self-checks and the summary -------------------------------------------------------------

def _perturb(model, gen):
    """Far-from-init values for every parameter and BatchNorm statistic, so that a wrong
    mapping of names cannot hide behind ones and zeros."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("bn" in name or "ln" in name or "downsample.1" in name):
                p.copy_((1.0 if name.endswith("weight") else 0.0)
                        + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * fan_in ** -0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.num_batches_tracked.fill_(7)


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def self_check(verbose=True):
    import torchvision

    ok = True

    def report(what, good, detail=""):
        nonlocal ok
        ok &= bool(good)
        if verbose:
            print(f"[{'ok' if good else 'FAIL'}] {what} {detail}")

    torch.manual_seed(0)
    # Step 00 is torchvision's resnet50: state_dict names, shapes, order; parameter count.
    tv = torchvision.models.resnet50()
    # drop path 0 (the step's 0.1 would drop samples' branches in training mode)
    mine = make_model(dict(STEPS["roadmap_00_resnet50"][2], drop_path_rate=0.0))
    tv_sd, my_sd = tv.state_dict(), mine.state_dict()
    same = [(k, tuple(v.shape)) for k, v in tv_sd.items()] == \
           [(k, tuple(v.shape)) for k, v in my_sd.items()]
    report("step 00 state_dict == torchvision resnet50 (names, shapes, order)", same,
           f"({len(my_sd)} entries)")
    report("step 00 parameters", count_params(mine) == count_params(tv) == 25_557_032,
           f"{count_params(mine):,} (torchvision {count_params(tv):,})")

    # Same logits with torchvision's weights (perturbed off init), eval and training mode.
    gen = torch.Generator().manual_seed(1)
    _perturb(tv, gen)
    for dtype in (torch.float32, torch.float64):
        a, b = copy.deepcopy(tv).to(dtype), copy.deepcopy(mine).to(dtype)
        b.load_state_dict(a.state_dict())
        x = torch.randn(2, 3, 224, 224, generator=gen, dtype=dtype)
        a.eval(), b.eval()
        with torch.no_grad():
            d = _max_rel(b(x), a(x))
        report(f"step 00 == torchvision, eval, {dtype}", d < 1e-6, f"max|diff|/max|logit| {d:.3g}")
        a.train(), b.train()
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        la, lb = a(xa), b(xb)
        d = _max_rel(lb, la)
        la.square().sum().backward()
        lb.square().sum().backward()
        dbuf = max(_max_rel(b.state_dict()[k].double(), v.double())
                   for k, v in a.state_dict().items() if "running" in k)
        nbt = all(torch.equal(b.state_dict()[k], v)
                  for k, v in a.state_dict().items() if "num_batches" in k)
        dgrad = max(_max_rel(pb.grad, pa.grad)
                    for pa, pb in zip(a.parameters(), b.parameters()))
        report(f"step 00 == torchvision, train, {dtype}", d < 1e-6 and dbuf < 1e-6 and nbt
               and dgrad < 1e-5,
               f"logits {d:.3g}, running stats {dbuf:.3g}, num_batches_tracked equal {nbt}, "
               f"grads {dgrad:.3g}")

    # Step 11 is convnext_tiny: names, shapes and order of convnext_reference's.
    ct = cnx_ref.ConvNeXt()
    m11 = make_model(STEPS["roadmap_11_convnext_tiny"][2])
    same = [(k, tuple(v.shape)) for k, v in ct.state_dict().items()] == \
           [(k, tuple(v.shape)) for k, v in m11.state_dict().items()]
    report("step 11 state_dict == convnext_reference convnext_tiny", same)
    report("step 11 parameters", count_params(m11) == 28_589_128, f"{count_params(m11):,}")

    # Step 10's block with layer scale is the official ConvNeXt block (dwconv -> LN -> 1x1 ->
    # GELU -> 1x1 -> gamma -> + x) written with convs: same output with the weights mapped.
    cfg10 = dict(STEPS["roadmap_10_layer_norm"][2], layer_scale_init_value=1e-6,
                 drop_path_rate=0.0)
    blk, off = RoadmapBlock(cfg10, 24, 24, 1, 0.0).double(), cnx_ref.Block(24).double()
    _perturb(off, gen)
    with torch.no_grad():
        off.gamma.uniform_(0.5, 1.5, generator=gen)
        off.norm.weight.normal_(1.0, 0.2, generator=gen)
        off.norm.bias.normal_(0.0, 0.2, generator=gen)
        blk.gamma.copy_(off.gamma)
        blk.conv1.weight.copy_(off.dwconv.weight)
        blk.conv1.bias.copy_(off.dwconv.bias)
        blk.ln1.weight.copy_(off.norm.weight)
        blk.ln1.bias.copy_(off.norm.bias)
        blk.conv2.weight.copy_(off.pwconv1.weight[:, :, None, None])
        blk.conv2.bias.copy_(off.pwconv1.bias)
        blk.conv3.weight.copy_(off.pwconv2.weight[:, :, None, None])
        blk.conv3.bias.copy_(off.pwconv2.bias)
        x = torch.randn(2, 24, 9, 11, generator=gen, dtype=torch.float64)
        d = _max_rel(blk(x), off(x))
    report("step 10 block (+ layer scale) == the official ConvNeXt block, float64", d < 1e-12,
           f"max|diff|/max|out| {d:.3g}")

    macs00, macs11 = count_macs(mine, 224), count_macs(m11, 224)
    report("ResNet-50 MACs ~4.1 G", abs(macs00 / 1e9 - 4.1) < 0.05, f"{macs00:,}")
    report("ConvNeXt-T MACs ~4.47 G", abs(macs11 / 1e9 - 4.47) < 0.02, f"{macs11:,}")

    # Every step builds, runs at 224 and counts.
    for name, (desc, top1, cfg) in STEPS.items():
        m = make_model(cfg)
        print(f"  {name:32s} params {count_params(m):>11,}  MACs {count_macs(m, 224) / 1e9:6.3f} G"
              f"  top-1 {top1}")
    return ok


def _state_list(model):
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def summary():
    steps = collections.OrderedDict()
    for name, (desc, top1, cfg) in STEPS.items():
        m = make_model(cfg)
        entry = collections.OrderedDict(
            description=desc, paper_top1=top1, params=count_params(m),
            macs=count_macs(m, 224), config=cfg)
        if name in ("roadmap_00_resnet50", "roadmap_05_move_up_dwconv", "roadmap_09_fewer_norms",
                    "roadmap_10_layer_norm", "roadmap_11_convnext_tiny"):
            entry["state_dict"] = _state_list(m)
        steps[name] = entry
    return steps


def write_summary(path):
    """JSON, compact: one line per step field and per state_dict entry."""
    steps = summary()
    lines = ["{", ' "image_size": [224, 224],', ' "steps": {']
    for si, (name, e) in enumerate(steps.items()):
        lines.append(f"  {json.dumps(name)}: {{")
        fields = []
        for k, v in e.items():
            if k == "state_dict":
                body = ",\n".join("    " + json.dumps(x) for x in v)
                fields.append(f"   \"state_dict\": [\n{body}\n   ]")
            else:
                fields.append(f"   {json.dumps(k)}: {json.dumps(v)}")
        lines.append(",\n".join(fields))
        lines.append("  }" + ("," if si + 1 < len(steps) else ""))
    lines += [" }", "}"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    json.load(open(path))  # well-formed
    print(f"wrote {path}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    good = self_check()
    if "--summary" in sys.argv:
        write_summary(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                   "data", "roadmap", "summary.json"))
    print("self-check:", "PASSED" if good else "FAILED")
    sys.exit(0 if good else 1)
