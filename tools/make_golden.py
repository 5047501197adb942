"""Makes the golden fixtures in tests/data/golden/<case>/ with the PyTorch reference model
(tools/convnext_reference.py): weights far from init, a batch, and the logits, loss and every
parameter gradient of one forward/backward pass in training mode with drop path 0 and mean
cross-entropy. Computed in float64 and stored as float32, so that the fixtures hold the exact
answer to float32 precision.

    /usr/bin/python3 tools/make_golden.py            # needs python3-torch (Debian) or torch

Per case: weights.safetensors (official names and shapes), batch.safetensors (images float32
[N, C, H, W], labels int64 [N]), expected.safetensors (logits [N, K], loss [], grad.<name>);
the model's configuration is in the __metadata__ of expected.safetensors.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convnext_reference as ref  # noqa: E402
import safetensors_io  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "golden")

CASES = [
    # 72x72: the stages see 18 -> 9 -> 4 -> 2, a 9x9 map floored by the 2x2/2 downsampling.
    dict(name="hierarchical_72", in_chans=3, num_classes=10, depths=[2, 1, 2, 1],
         dims=[8, 16, 24, 32], isotropic=False, hw=(72, 72), batch=2, seed=1),
    # One input channel, a non-square odd image: 37x45 -> 9x11 -> 4x5 -> 2x2 -> 1x1.
    dict(name="hierarchical_37x45_gray", in_chans=1, num_classes=5, depths=[1, 1, 1, 1],
         dims=[8, 12, 16, 20], isotropic=False, hw=(37, 45), batch=3, seed=2),
    # Isotropic, no layer scale (the official default): 40x40 -> 2x2 with a 16x16/16 stem.
    dict(name="isotropic_40", in_chans=3, num_classes=7, depths=[2], dims=[24],
         isotropic=True, hw=(40, 40), batch=2, seed=3),
]


def far_from_init(model, gen):
    """Weights that make every part of the model matter: gamma ~ U(0.5, 1.5) (not 1e-6),
    LayerNorm weights around 1 and biases around 0, conv/linear weights ~ N(0, 1/fan_in) and
    non-zero biases."""
    def randn(p, std):
        return std * torch.randn(p.shape, generator=gen, dtype=p.dtype)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (ref.LayerNorm, torch.nn.LayerNorm)):
                module.weight.copy_(1.0 + randn(module.weight, 0.2))
                module.bias.copy_(randn(module.bias, 0.2))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.copy_(randn(module.weight, module.weight[0].numel() ** -0.5))
                module.bias.copy_(randn(module.bias, 0.1))
            elif isinstance(module, ref.Block) and module.gamma is not None:
                module.gamma.copy_(0.5 + torch.rand(module.gamma.shape, generator=gen,
                                                    dtype=module.gamma.dtype))


def make_case(case):
    gen = torch.Generator().manual_seed(case["seed"])
    if case["isotropic"]:
        model = ref.ConvNeXtIsotropic(case["in_chans"], case["num_classes"], case["depths"][0],
                                      case["dims"][0])
    else:
        model = ref.ConvNeXt(case["in_chans"], case["num_classes"], case["depths"], case["dims"])
    model = model.double()
    far_from_init(model, gen)
    model.train()

    n, (h, w) = case["batch"], case["hw"]
    images = torch.randn(n, case["in_chans"], h, w, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, case["num_classes"], (n,), generator=gen)
    logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()

    out = os.path.join(ROOT, case["name"])
    os.makedirs(out, exist_ok=True)
    f32 = lambda t: t.detach().float().numpy()  # noqa: E731
    safetensors_io.save(os.path.join(out, "weights.safetensors"),
                        [(k, f32(v)) for k, v in model.state_dict().items()])
    safetensors_io.save(os.path.join(out, "batch.safetensors"),
                        [("images", f32(images)), ("labels", labels.numpy())])
    expected = [("logits", f32(logits)), ("loss", f32(loss))]
    expected += [("grad." + k, f32(p.grad)) for k, p in model.named_parameters()]
    metadata = {"in_chans": case["in_chans"], "num_classes": case["num_classes"],
                "depths": ",".join(map(str, case["depths"])),
                "dims": ",".join(map(str, case["dims"])),
                "isotropic": int(case["isotropic"]), "torch": torch.__version__}
    safetensors_io.save(os.path.join(out, "expected.safetensors"), expected, metadata)
    print(f"{case['name']}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"loss {loss.item():.6f}, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for c in CASES:
        make_case(c)
