"""Tests of convert_checkpoint.py.

    cd tools && python3 -m unittest -v test_convert_checkpoint

The name-mapping tests need neither torch nor numpy. The end-to-end tests need torch (and the
numpy it works with) and skip without it; those that only read and write safetensors need numpy.
"""
import contextlib
import io
import os
import random
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
CONVERTER = os.path.join(HERE, "convert_checkpoint.py")

import convert_checkpoint as cc  # noqa: E402  (imports neither torch nor numpy)

try:
    import numpy as np
    HAVE_NUMPY = True
except ImportError:
    HAVE_NUMPY = False
try:
    import torch
    torch.zeros(1).numpy()  # torch without a working numpy cannot run the converter
    HAVE_TORCH = True
except Exception:
    HAVE_TORCH = False

NEEDS_NUMPY = unittest.skipUnless(HAVE_NUMPY, "numpy is not importable by this Python")
NEEDS_TORCH = unittest.skipUnless(HAVE_TORCH and HAVE_NUMPY,
                                  "torch (with numpy) is not importable by this Python")

TINY_DEPTHS, TINY_DIMS = (3, 3, 9, 3), (96, 192, 384, 768)


# ---- name generators, written from the two architectures --------------------------------------
def official_params(depths=TINY_DEPTHS, dims=TINY_DIMS, in_chans=3, num_classes=1000,
                    layer_scale=True):
    """(name, shape) of the official ConvNeXt, in its state_dict() order (a block's own gamma
    before its submodules)."""
    out = [("downsample_layers.0.0.weight", (dims[0], in_chans, 4, 4)),
           ("downsample_layers.0.0.bias", (dims[0],)),
           ("downsample_layers.0.1.weight", (dims[0],)),
           ("downsample_layers.0.1.bias", (dims[0],))]
    for i in range(1, len(dims)):
        out += [(f"downsample_layers.{i}.0.weight", (dims[i - 1],)),
                (f"downsample_layers.{i}.0.bias", (dims[i - 1],)),
                (f"downsample_layers.{i}.1.weight", (dims[i], dims[i - 1], 2, 2)),
                (f"downsample_layers.{i}.1.bias", (dims[i],))]
    for i, (depth, c) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            if layer_scale:
                out.append((p + "gamma", (c,)))
            out += [(p + "dwconv.weight", (c, 1, 7, 7)), (p + "dwconv.bias", (c,)),
                    (p + "norm.weight", (c,)), (p + "norm.bias", (c,)),
                    (p + "pwconv1.weight", (4 * c, c)), (p + "pwconv1.bias", (4 * c,)),
                    (p + "pwconv2.weight", (c, 4 * c)), (p + "pwconv2.bias", (c,))]
    out += [("norm.weight", (dims[-1],)), ("norm.bias", (dims[-1],)),
            ("head.weight", (num_classes, dims[-1])), ("head.bias", (num_classes,))]
    return out


def timm_params(depths=TINY_DEPTHS, dims=TINY_DIMS, in_chans=3, num_classes=1000,
                conv_mlp=False):
    """(name, shape) of timm's ConvNeXt (patch stem, stage 0 without a downsample), in timm's
    module order; conv_mlp: the MLP as 1x1 convs (atto ... nano)."""
    out = [("stem.0.weight", (dims[0], in_chans, 4, 4)), ("stem.0.bias", (dims[0],)),
           ("stem.1.weight", (dims[0],)), ("stem.1.bias", (dims[0],))]
    k = (1, 1) if conv_mlp else ()
    for i, (depth, c) in enumerate(zip(depths, dims)):
        if i > 0:
            out += [(f"stages.{i}.downsample.0.weight", (dims[i - 1],)),
                    (f"stages.{i}.downsample.0.bias", (dims[i - 1],)),
                    (f"stages.{i}.downsample.1.weight", (c, dims[i - 1], 2, 2)),
                    (f"stages.{i}.downsample.1.bias", (c,))]
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}."
            out += [(p + "gamma", (c,)),
                    (p + "conv_dw.weight", (c, 1, 7, 7)), (p + "conv_dw.bias", (c,)),
                    (p + "norm.weight", (c,)), (p + "norm.bias", (c,)),
                    (p + "mlp.fc1.weight", (4 * c, c) + k), (p + "mlp.fc1.bias", (4 * c,)),
                    (p + "mlp.fc2.weight", (c, 4 * c) + k), (p + "mlp.fc2.bias", (c,))]
    out += [("head.norm.weight", (dims[-1],)), ("head.norm.bias", (dims[-1],)),
            ("head.fc.weight", (num_classes, dims[-1])), ("head.fc.bias", (num_classes,))]
    return out


def isotropic_names(depth=2, layer_scale=False):
    out = ["stem.weight", "stem.bias"]
    for j in range(depth):
        p = f"blocks.{j}."
        out += [p + "gamma"] if layer_scale else []
        out += [p + m + s for m in ("dwconv.", "norm.", "pwconv1.", "pwconv2.")
                for s in ("weight", "bias")]
    return out + ["norm.weight", "norm.bias", "head.weight", "head.bias"]


# Every rule of the mapping, official name <-> timm name.
RULE_PAIRS = [
    ("downsample_layers.0.0.weight", "stem.0.weight"),
    ("downsample_layers.0.0.bias", "stem.0.bias"),
    ("downsample_layers.0.1.weight", "stem.1.weight"),
    ("downsample_layers.0.1.bias", "stem.1.bias"),
    ("downsample_layers.1.0.weight", "stages.1.downsample.0.weight"),
    ("downsample_layers.2.0.bias", "stages.2.downsample.0.bias"),
    ("downsample_layers.3.1.weight", "stages.3.downsample.1.weight"),
    ("downsample_layers.1.1.bias", "stages.1.downsample.1.bias"),
    ("stages.0.0.dwconv.weight", "stages.0.blocks.0.conv_dw.weight"),
    ("stages.2.26.dwconv.bias", "stages.2.blocks.26.conv_dw.bias"),
    ("stages.1.2.norm.weight", "stages.1.blocks.2.norm.weight"),
    ("stages.3.0.norm.bias", "stages.3.blocks.0.norm.bias"),
    ("stages.0.1.pwconv1.weight", "stages.0.blocks.1.mlp.fc1.weight"),
    ("stages.2.10.pwconv1.bias", "stages.2.blocks.10.mlp.fc1.bias"),
    ("stages.1.0.pwconv2.weight", "stages.1.blocks.0.mlp.fc2.weight"),
    ("stages.3.2.pwconv2.bias", "stages.3.blocks.2.mlp.fc2.bias"),
    ("stages.0.0.gamma", "stages.0.blocks.0.gamma"),
    ("stages.2.8.gamma", "stages.2.blocks.8.gamma"),
    ("norm.weight", "head.norm.weight"),
    ("norm.bias", "head.norm.bias"),
    ("head.weight", "head.fc.weight"),
    ("head.bias", "head.fc.bias"),
]


class TestNameMapping(unittest.TestCase):
    """Pure Python: runs without torch and numpy."""

    def test_every_rule_official_to_timm(self):
        for official, timm in RULE_PAIRS:
            with self.subTest(official):
                self.assertEqual(cc.official_to_timm_name(official), timm)
                self.assertIsNone(cc.timm_to_official_name(official))

    def test_every_rule_timm_to_official(self):
        for official, timm in RULE_PAIRS:
            with self.subTest(timm):
                self.assertEqual(cc.timm_to_official_name(timm), official)
                self.assertIsNone(cc.official_to_timm_name(timm))

    def test_convnext_tiny_has_182_names(self):
        names = [n for n, _ in official_params()]
        self.assertEqual(len(names), 182)
        self.assertEqual(len(set(names)), 182)
        self.assertEqual(sum(_numel(s) for _, s in official_params()), 28589128)
        self.assertEqual(len(timm_params()), 182)

    def test_convnext_tiny_round_trips(self):
        official = [n for n, _ in official_params()]
        self.assertEqual(cc.detect_naming(official), cc.OFFICIAL)
        timm = cc.to_timm_names(official)
        self.assertEqual(set(timm), {n for n, _ in timm_params()})
        self.assertEqual(cc.detect_naming(timm), cc.TIMM)
        scheme, back = cc.to_official_names(timm)
        self.assertEqual(scheme, cc.TIMM)
        self.assertEqual(back, official)

    def test_timm_generator_maps_to_official_generator(self):
        scheme, mapped = cc.to_official_names([n for n, _ in timm_params()])
        self.assertEqual(scheme, cc.TIMM)
        self.assertEqual(sorted(mapped, key=cc.official_sort_key),
                         [n for n, _ in official_params()])

    def test_official_sort_key_restores_state_dict_order(self):
        names = [n for n, _ in official_params()]
        shuffled = names[:]
        random.Random(0).shuffle(shuffled)
        self.assertEqual(sorted(shuffled, key=cc.official_sort_key), names)
        iso = isotropic_names(3, layer_scale=True)
        self.assertEqual(sorted(reversed(iso), key=cc.official_sort_key), iso)

    def test_conv_mlp_weights_are_squeezed(self):
        official = dict(official_params(dims=(32, 64, 128, 256)))
        timm = timm_params(dims=(32, 64, 128, 256), conv_mlp=True)
        _, names = cc.to_official_names([n for n, _ in timm])
        for name, (_, shape) in zip(names, timm):
            with self.subTest(name):
                self.assertEqual(cc.official_shape(name, shape), official[name])
        self.assertEqual(cc.official_shape("stages.0.0.pwconv1.weight", (128, 32, 1, 1)),
                         (128, 32))
        self.assertEqual(cc.official_shape("stages.0.0.pwconv2.weight", [32, 128, 1, 1]),
                         (32, 128))
        self.assertEqual(cc.official_shape("blocks.4.pwconv1.weight", (16, 4, 1, 1)), (16, 4))
        self.assertEqual(cc.official_shape("stages.0.0.pwconv1.weight", (128, 32)), (128, 32))
        # only the MLP weights: not the convs, biases or the head
        self.assertEqual(cc.official_shape("stages.0.0.dwconv.weight", (32, 1, 7, 7)),
                         (32, 1, 7, 7))
        self.assertEqual(cc.official_shape("downsample_layers.1.1.weight", (64, 32, 1, 1)),
                         (64, 32, 1, 1))
        self.assertEqual(cc.official_shape("stages.0.0.pwconv1.bias", (128,)), (128,))
        self.assertEqual(cc.official_shape("head.weight", (10, 256)), (10, 256))
        with self.assertRaisesRegex(cc.ConversionError, "stages.0.0.pwconv1.weight"):
            cc.official_shape("stages.0.0.pwconv1.weight", (128, 32, 3, 3))

    def test_unknown_names_are_rejected_and_listed(self):
        bad = ["stages.0.0.grn.gamma",          # ConvNeXt-V2
               "norm_pre.weight",               # timm's head_norm_first models
               "stages.0.downsample.0.weight",  # timm's stage 0 has no downsample
               "stages.0.01.gamma",             # not a canonical index
               "head.pre_logits.fc.weight",     # timm's head_hidden_size models
               "stem.2.weight",                 # timm's overlapping stems
               "downsample_layers.0.2.weight", "something"]
        for name in bad:
            with self.subTest(name):
                self.assertIsNone(cc.classify_name(name))
                with self.assertRaises(cc.ConversionError) as ctx:
                    cc.to_official_names(["norm.weight", name, "head.weight"])
                self.assertIn(name, str(ctx.exception))
        with self.assertRaises(cc.ConversionError) as ctx:
            cc.detect_naming([n for n, _ in official_params()] + bad)
        message = str(ctx.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"{len(bad)} unknown", message)
        for name in bad:
            self.assertIn(name, message)

    def test_long_unknown_lists_are_shortened(self):
        bad = [f"x{k}" for k in range(50)]
        with self.assertRaises(cc.ConversionError) as ctx:
            cc.detect_naming(bad)
        self.assertIn("x19, ... (30 more)", str(ctx.exception))

    def test_detects_the_naming_scheme(self):
        self.assertEqual(cc.detect_naming([n for n, _ in official_params()]), cc.OFFICIAL)
        self.assertEqual(cc.detect_naming([n for n, _ in official_params(layer_scale=False)]),
                         cc.OFFICIAL)
        self.assertEqual(cc.detect_naming([n for n, _ in timm_params()]), cc.TIMM)
        self.assertEqual(cc.detect_naming([n for n, _ in timm_params(conv_mlp=True)]), cc.TIMM)
        self.assertEqual(cc.detect_naming(isotropic_names()), cc.ISOTROPIC)
        self.assertEqual(cc.detect_naming(["norm.weight", "head.bias"]), cc.OFFICIAL)
        self.assertEqual(cc.classify_name("stages.1.0.gamma"), cc.OFFICIAL)
        self.assertEqual(cc.classify_name("head.weight"), "shared")
        self.assertEqual(cc.classify_name("blocks.0.dwconv.weight"), cc.ISOTROPIC)
        self.assertEqual(cc.classify_name("head.fc.weight"), cc.TIMM)

    def test_mixed_or_empty_naming_is_rejected(self):
        with self.assertRaisesRegex(cc.ConversionError, "mixed naming"):
            cc.detect_naming(["stem.0.weight", "head.weight"])
        with self.assertRaisesRegex(cc.ConversionError, "mixed naming"):
            cc.detect_naming(["downsample_layers.0.0.weight", "stages.0.blocks.0.gamma"])
        with self.assertRaisesRegex(cc.ConversionError, "mixed naming"):
            cc.detect_naming(["downsample_layers.0.0.weight", "blocks.0.gamma"])
        with self.assertRaisesRegex(cc.ConversionError, "no floating-point tensors"):
            cc.detect_naming([])

    def test_isotropic_names_pass_through(self):
        names = isotropic_names(3, layer_scale=True)
        self.assertEqual(cc.to_official_names(names), (cc.ISOTROPIC, names))
        self.assertEqual(cc.to_timm_names(names), names)
        with self.assertRaises(cc.ConversionError):
            cc.to_timm_names([n for n, _ in timm_params()])

    def test_selects_the_state_dict(self):
        class T:  # stands in for a tensor
            pass
        is_tensor = lambda v: isinstance(v, T)  # noqa: E731
        sd, other = {"head.weight": T()}, {"head.bias": T()}
        self.assertIs(cc.select_state_dict({"model": sd, "state_dict": other, "epoch": 3}, None,
                                           is_tensor)[0], sd)
        self.assertIs(cc.select_state_dict({"state_dict": sd, "model_ema": other}, None,
                                           is_tensor)[0], sd)
        self.assertIs(cc.select_state_dict({"model_ema": sd, "epoch": 1}, None, is_tensor)[0], sd)
        self.assertIs(cc.select_state_dict(sd, None, is_tensor)[0], sd)
        self.assertIs(cc.select_state_dict({"model": other, "ema": sd}, "ema", is_tensor)[0], sd)
        with self.assertRaisesRegex(cc.ConversionError, "no key 'nope'.*model"):
            cc.select_state_dict({"model": sd}, "nope", is_tensor)
        with self.assertRaisesRegex(cc.ConversionError, "not a state dict"):
            cc.select_state_dict({"epoch": 3}, "epoch", is_tensor)
        with self.assertRaisesRegex(cc.ConversionError, "no state dict.*epoch.*--key"):
            cc.select_state_dict({"epoch": 3, "args": "x"}, None, is_tensor)
        with self.assertRaisesRegex(cc.ConversionError, "not a checkpoint"):
            cc.select_state_dict([1, 2], None, is_tensor)


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def isotropic_params(depth=2, dim=24, layer_scale=False):
    shapes = {"stem.weight": (dim, 3, 16, 16), "stem.bias": (dim,), "dwconv.weight": (dim, 1, 7, 7),
              "pwconv1.weight": (4 * dim, dim), "pwconv1.bias": (4 * dim,),
              "pwconv2.weight": (dim, 4 * dim), "head.weight": (1000, dim),
              "head.bias": (1000,)}
    return [(n, shapes.get(n, shapes.get(n.split(".", 2)[-1], (dim,))))
            for n in isotropic_names(depth, layer_scale)]


class TestModelFacts(unittest.TestCase):
    """Pure Python: the architecture of a state dict, its LayerNorm eps and timm's MLP form."""

    def test_architecture_from_names_and_shapes(self):
        self.assertEqual(cc.architecture(official_params()),
                         ("hierarchical", TINY_DEPTHS, TINY_DIMS))
        self.assertEqual(cc.architecture(official_params((3, 4, 30, 3), (384, 768, 1536, 3072),
                                                         layer_scale=False)),
                         ("hierarchical", (3, 4, 30, 3), (384, 768, 1536, 3072)))
        self.assertEqual(cc.architecture(isotropic_params(18, 384)), ("isotropic", (18,), (384,)))
        # not a whole model: a block or a stage missing
        holed = [(n, s) for n, s in official_params() if not n.startswith("stages.1.1.")]
        self.assertIsNone(cc.architecture(holed))
        self.assertIsNone(cc.architecture([(n, s) for n, s in official_params()
                                           if not n.startswith("stages.0.")]))
        self.assertIsNone(cc.architecture([("head.weight", (10, 8))]))

    def test_known_models(self):
        def known(depths, dims, kind="hierarchical"):
            return cc.KNOWN_MODELS[(kind, depths, dims)]
        # timm's xxlarge recipe: LayerNorm eps 1e-5 (timm's convnext.py: norm_eps 1e-5)
        self.assertEqual(known((3, 4, 30, 3), (384, 768, 1536, 3072))[1], 1e-5)
        self.assertEqual(known((1, 2, 4, 2), (24, 32, 48, 64))[1], 1e-5)
        # every official model: 1e-6; the 1x1-conv MLP exactly for atto ... nano
        conv_mlp = {"convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano"}
        for (kind, depths, dims), (name, eps, conv) in cc.KNOWN_MODELS.items():
            with self.subTest(name):
                if not name.startswith("timm's"):
                    self.assertEqual(eps, 1e-6)
                self.assertEqual(conv, name in conv_mlp)
                self.assertEqual(len(depths), len(dims))
        self.assertEqual(known(TINY_DEPTHS, TINY_DIMS)[0], "convnext_tiny")
        self.assertEqual(known((2, 2, 8, 2), (80, 160, 320, 640))[0], "convnext_nano")

    def test_eps_comes_from_the_flag_the_metadata_the_model_or_the_default(self):
        xxl = cc.KNOWN_MODELS[("hierarchical", (3, 4, 30, 3), (384, 768, 1536, 3072))]
        tiny = cc.KNOWN_MODELS[("hierarchical", TINY_DEPTHS, TINY_DIMS)]
        self.assertEqual(cc.resolve_eps(None, None, None), (1e-6, "the default"))
        self.assertEqual(cc.resolve_eps(None, None, tiny), (1e-6, "convnext_tiny"))
        self.assertEqual(cc.resolve_eps(None, None, xxl), (1e-5, "timm's convnext_xxlarge"))
        self.assertEqual(cc.resolve_eps(None, "1e-05", tiny), (1e-5, "the input's metadata"))
        self.assertEqual(cc.resolve_eps("1e-6", "1e-05", xxl), (1e-6, "--eps"))
        for bad in ("abc", "0", "-1e-6", "inf", "nan"):
            with self.subTest(bad), self.assertRaisesRegex(cc.ConversionError,
                                                           "--eps: expected a positive number"):
                cc.resolve_eps(bad, None, None)

    def test_an_eps_other_than_1e6_is_refused_unless_written_for_timm(self):
        self.assertIsNone(cc.check_eps(1e-6, "the default", writes_timm=False))
        self.assertIsNone(cc.check_eps(1e-6, "--eps", writes_timm=True))
        with self.assertRaises(cc.ConversionError) as e:
            cc.check_eps(1e-5, "timm's convnext_xxlarge", writes_timm=False)
        message = str(e.exception)
        for part in ("LayerNorm eps 1e-05 (timm's convnext_xxlarge)", "use 1e-6",
                     "--to timm", "--eps 1e-6"):
            self.assertIn(part, message)
        self.assertIn("norm_eps=1e-05", cc.check_eps(1e-5, "--eps", writes_timm=True))

    def test_timm_mlp_form(self):
        atto = cc.KNOWN_MODELS[("hierarchical", (2, 2, 6, 2), (40, 80, 160, 320))]
        tiny = cc.KNOWN_MODELS[("hierarchical", TINY_DEPTHS, TINY_DIMS)]
        self.assertTrue(cc.timm_mlp_is_conv("auto", False, atto))
        self.assertFalse(cc.timm_mlp_is_conv("auto", False, tiny))
        self.assertFalse(cc.timm_mlp_is_conv("auto", False, None))
        self.assertTrue(cc.timm_mlp_is_conv("auto", True, None))  # the input's own form
        self.assertFalse(cc.timm_mlp_is_conv("linear", True, atto))
        self.assertTrue(cc.timm_mlp_is_conv("conv", False, tiny))

    def test_atto_to_timm_has_timms_shapes(self):
        """--to timm for atto: every (name, shape) is timm's conv_mlp model's."""
        depths, dims = (2, 2, 6, 2), (40, 80, 160, 320)
        official = official_params(depths, dims)
        conv = cc.timm_mlp_is_conv("auto", False,
                                   cc.KNOWN_MODELS[cc.architecture(official)])
        got = {cc.official_to_timm_name(n): cc.timm_shape(n, s, conv) for n, s in official}
        self.assertEqual(got, dict(timm_params(depths, dims, conv_mlp=True)))
        self.assertEqual(got["stages.0.blocks.0.mlp.fc1.weight"], (160, 40, 1, 1))
        # the Linear form is unchanged
        self.assertEqual(cc.timm_shape("stages.0.0.pwconv2.weight", (40, 160), False), (40, 160))
        self.assertEqual(cc.timm_shape("head.weight", (10, 320), True), (10, 320))
        self.assertEqual(cc.timm_shape("stages.0.0.pwconv1.bias", (160,), True), (160,))

    def test_wrapper_prefixes_are_stripped(self):
        self.assertEqual(cc.strip_wrapper_prefixes(["module.model.head.weight",
                                                    "module.model.norm.bias"]),
                         (["head.weight", "norm.bias"], ["module.", "model."]))
        self.assertEqual(cc.strip_wrapper_prefixes(["model.head.weight", "norm.bias"]),
                         (["model.head.weight", "norm.bias"], []))
        self.assertEqual(cc.strip_wrapper_prefixes([]), ([], []))


def run_converter(*args):
    """(exit status, stdout, stderr) of the converter run as a program."""
    proc = subprocess.run([sys.executable, CONVERTER, *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


class _TempDirTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.dir = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def assertFailsCleanly(self, args, output, message_part):
        """One stderr line 'convert_checkpoint: ...' containing message_part, status 1, no
        OUTPUT and no OUTPUT.tmp."""
        rc, out, err = run_converter(*args)
        self.assertEqual(rc, 1, msg=out + err)
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, msg=err)
        self.assertTrue(lines[0].startswith("convert_checkpoint: "), msg=err)
        self.assertIn(message_part, lines[0])
        self.assertFalse(os.path.exists(output))
        self.assertFalse(os.path.exists(output + ".tmp"))
        return lines[0]


class TestCommandLineWithoutTorch(_TempDirTest):
    """Errors found before torch or numpy is needed: run everywhere."""

    def test_missing_input(self):
        out = self.path("out.safetensors")
        self.assertFailsCleanly([self.path("missing.pth"), out], out, "no such file")

    def test_bad_output_extension(self):
        src = self.path("in.pth")
        with open(src, "wb") as f:
            f.write(b"\x80\x02")
        out = self.path("out.npz")
        self.assertFailsCleanly([src, out], out, "OUTPUT must end in")

    def test_timm_names_need_a_pth_output(self):
        src = self.path("in.pth")
        with open(src, "wb") as f:
            f.write(b"\x80\x02")
        out = self.path("out.safetensors")
        self.assertFailsCleanly([src, out, "--to", "timm"], out, "--to timm needs a .pth")

    def test_usage_errors_are_one_line(self):
        out = self.path("out.safetensors")
        self.assertFailsCleanly([], out, "required")
        self.assertFailsCleanly(["a.pth", out, "--to", "keras"], out, "invalid choice")


    def test_bad_eps_fails_before_reading(self):
        src = self.path("in.pth")
        with open(src, "wb") as f:
            f.write(b"\x80\x02")
        out = self.path("out.safetensors")
        self.assertFailsCleanly([src, out, "--eps", "abc"], out,
                                "--eps: expected a positive number, got 'abc'")
        self.assertFailsCleanly([src, out, "--timm-mlp", "1x1"], out, "invalid choice")

    @unittest.skipIf(HAVE_NUMPY, "numpy is importable by this Python")
    def test_without_numpy_says_so(self):
        src, out = self.path("in.safetensors"), self.path("out.safetensors")
        header = b'{"head.bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        with open(src, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header + b"\0" * 4)
        self.assertFailsCleanly([src, out], out, "needs numpy")

    @unittest.skipIf(HAVE_TORCH, "torch is importable by this Python")
    def test_without_torch_says_so(self):
        src, out = self.path("in.pth"), self.path("out.safetensors")
        with open(src, "wb") as f:
            f.write(b"\x80\x02")
        self.assertFailsCleanly([src, out], out, "needs PyTorch")


@NEEDS_NUMPY
class TestSafetensorsOnly(_TempDirTest):
    """.safetensors -> .safetensors needs numpy only (e.g. timm's hub files)."""

    def test_timm_safetensors_to_official_safetensors(self):
        import safetensors_io
        rng = np.random.default_rng(0)
        dims = (8, 16, 24, 32)
        timm = [(n, rng.standard_normal(s).astype(np.float32))
                for n, s in timm_params((1, 1, 2, 1), dims, num_classes=5, conv_mlp=True)]
        timm.append(("stages.0.blocks.0.counter", np.array([3], dtype=np.int64)))
        timm[0] = (timm[0][0], timm[0][1].astype(np.float16))
        src, out = self.path("timm.safetensors"), self.path("official.safetensors")
        safetensors_io.save(src, timm)
        rc, stdout, err = run_converter(src, out)
        self.assertEqual(rc, 0, msg=err)
        self.assertEqual(err, "")
        self.assertIn("naming detected: timm", stdout)
        self.assertIn("converted 1 float16 tensor(s) to float32", stdout)
        self.assertIn("dropped 1 non-floating-point entry: stages.0.blocks.0.counter (int64)",
                      stdout)
        got, metadata = safetensors_io.load(out)
        expected = official_params((1, 1, 2, 1), dims, num_classes=5)
        self.assertEqual([(n, a.shape) for n, a in got.items()], expected)
        self.assertEqual(metadata["naming"], "official")
        source = dict(timm)
        for name, array in got.items():
            self.assertEqual(array.dtype, np.float32)
            original = source[cc.official_to_timm_name(name)]
            np.testing.assert_array_equal(array, original.astype(np.float32).reshape(array.shape))

    def _timm_file(self, depths, dims, name="timm.safetensors", metadata=None):
        import safetensors_io
        rng = np.random.default_rng(1)
        timm = [(n, rng.standard_normal(s).astype(np.float32))
                for n, s in timm_params(depths, dims, num_classes=3)]
        src = self.path(name)
        safetensors_io.save(src, timm, metadata)
        return src, timm

    def test_a_model_with_another_layernorm_eps_is_refused(self):
        """timm's test_convnext (the xxlarge recipe's eps 1e-5, small enough for a test)."""
        import safetensors_io
        src, timm = self._timm_file((1, 2, 4, 2), (24, 32, 48, 64))
        out = self.path("official.safetensors")
        line = self.assertFailsCleanly([src, out], out, "LayerNorm eps 1e-05 (timm's "
                                                        "test_convnext)")
        self.assertIn("would compute other outputs", line)
        # official names in a .pth are refused too (the official code has 1e-6 only)
        pth = self.path("official.pth")
        self.assertFailsCleanly([src, pth], pth, "LayerNorm eps 1e-05")
        # an explicit --eps 1e-6 says the weights were trained with 1e-6: converted, recorded
        rc, stdout, err = run_converter(src, out, "--eps", "1e-6")
        self.assertEqual(rc, 0, msg=err)
        got, metadata = safetensors_io.load(out)
        self.assertEqual(metadata["layer_norm_eps"], "1e-06")
        self.assertEqual(len(got), len(timm))
        # and an explicit other eps for an unknown architecture is refused
        custom, _ = self._timm_file((1, 1, 2, 1), (8, 16, 24, 32), "custom.safetensors")
        out2 = self.path("custom_official.safetensors")
        self.assertFailsCleanly([custom, out2, "--eps", "1e-5"], out2,
                                "LayerNorm eps 1e-05 (--eps)")
        rc, _, err = run_converter(custom, out2)
        self.assertEqual(rc, 0, msg=err)
        self.assertEqual(safetensors_io.load(out2)[1]["layer_norm_eps"], "1e-06")

    def test_the_eps_recorded_in_the_input_is_honoured(self):
        src, _ = self._timm_file((1, 1, 2, 1), (8, 16, 24, 32),
                                 metadata={"layer_norm_eps": "1e-05"})
        out = self.path("official.safetensors")
        self.assertFailsCleanly([src, out], out, "LayerNorm eps 1e-05 (the input's metadata)")

    def test_atto_written_for_timm_has_1x1_conv_mlp_weights(self):
        """--to timm from a safetensors atto: what reaches torch.save is timm's conv_mlp model's
        state dict (torch.save replaced by a recorder, so that only numpy is needed)."""
        import safetensors_io
        depths, dims = (2, 2, 6, 2), (40, 80, 160, 320)
        rng = np.random.default_rng(3)
        official = [(n, rng.standard_normal(s).astype(np.float32))
                    for n, s in official_params(depths, dims, num_classes=3)]
        src = self.path("atto.safetensors")
        safetensors_io.save(src, official)
        written = {}

        def record(tmp, tensors):
            written[tmp] = list(tensors)
            open(tmp, "wb").close()
        logged = []
        for mlp, conv in (("auto", True), ("linear", False)):
            written.clear()
            with mock.patch.object(cc, "_write_torch", record):
                cc.convert(src, self.path("atto_timm.pth"), to="timm", timm_mlp=mlp,
                           log=logged.append)
            (tensors,) = written.values()
            got = dict(tensors)
            self.assertEqual({n: a.shape for n, a in tensors},
                             dict(timm_params(depths, dims, num_classes=3, conv_mlp=conv)))
            self.assertEqual(got["stages.2.blocks.5.mlp.fc2.weight"].shape,
                             (160, 640, 1, 1) if conv else (160, 640))
            for name, array in official:
                np.testing.assert_array_equal(
                    got[cc.official_to_timm_name(name)].reshape(array.shape), array)
        self.assertTrue(any("timm's conv_mlp=True, as convnext_atto" in line for line in logged))

    def test_wrapped_names_are_unwrapped(self):
        import safetensors_io
        rng = np.random.default_rng(2)
        params = official_params((1, 1, 2, 1), (8, 16, 24, 32), num_classes=3)
        src, out = self.path("wrapped.safetensors"), self.path("official.safetensors")
        safetensors_io.save(src, [("model." + n, rng.standard_normal(s).astype(np.float32))
                                  for n, s in params])
        rc, stdout, err = run_converter(src, out)
        self.assertEqual(rc, 0, msg=err)
        self.assertIn("stripped the 'model.' prefix", stdout)
        got, _ = safetensors_io.load(out)
        self.assertEqual([(n, a.shape) for n, a in got.items()], params)

    def test_broken_safetensors_input(self):
        src, out = self.path("bad.safetensors"), self.path("out.safetensors")
        header = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
        with open(src, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header + b"\0" * 4)  # data cut short
        self.assertFailsCleanly([src, out], out, "not a readable safetensors file")


@NEEDS_TORCH
class TestEndToEnd(_TempDirTest):
    DEPTHS, DIMS = (1, 1, 2, 1), (8, 16, 24, 32)

    def setUp(self):
        super().setUp()
        import convnext_reference
        torch.manual_seed(0)
        model = convnext_reference.ConvNeXt(in_chans=3, num_classes=10, depths=self.DEPTHS,
                                            dims=self.DIMS, layer_scale_init_value=0.5)
        # random values everywhere, so that a swapped tensor cannot go unnoticed
        self.sd = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
        self.src = self.path("official.pth")
        torch.save({"model": self.sd, "epoch": 3}, self.src)

    def convert(self, *args):
        rc, out, err = run_converter(*args)
        self.assertEqual(rc, 0, msg=out + err)
        self.assertEqual(err, "")
        self.assertFalse(os.path.exists(str(args[1]) + ".tmp"))
        return out

    def load_safetensors(self, path):
        import safetensors_io
        tensors, _ = safetensors_io.load(path)
        return tensors

    def assertSameAsSd(self, tensors, sd=None, names=None):
        sd = self.sd if sd is None else sd
        names = list(sd) if names is None else names
        self.assertEqual(list(tensors), names)
        for name, key in zip(names, sd):
            value = tensors[name]
            value = value if isinstance(value, np.ndarray) else value.numpy()
            self.assertEqual(value.dtype, np.float32, msg=name)
            np.testing.assert_array_equal(value, sd[key].float().numpy(), err_msg=name)

    def test_name_generator_matches_the_reference_model(self):
        import convnext_reference
        names = list(convnext_reference.ConvNeXt().state_dict())
        self.assertEqual(names, [n for n, _ in official_params()])
        small = convnext_reference.ConvNeXt(num_classes=10, depths=self.DEPTHS, dims=self.DIMS)
        self.assertEqual([(k, tuple(v.shape)) for k, v in small.state_dict().items()],
                         official_params(self.DEPTHS, self.DIMS, num_classes=10))

    def test_pth_to_safetensors(self):
        out = self.path("model.safetensors")
        stdout = self.convert(self.src, out)
        params = sum(v.numel() for v in self.sd.values())
        self.assertEqual(stdout.strip().splitlines()[-1],
                         f"convert_checkpoint: wrote {out}: {len(self.sd)} tensors, {params} "
                         "parameters, naming detected: official, written: official")
        self.assertSameAsSd(self.load_safetensors(out))

    def test_safetensors_to_pth_official_and_timm(self):
        st = self.path("model.safetensors")
        self.convert(self.src, st)
        official, timm = self.path("official_back.pth"), self.path("timm.pth")
        self.convert(st, official)
        checkpoint = torch.load(official)
        self.assertEqual(list(checkpoint), ["model"])
        self.assertSameAsSd(checkpoint["model"])
        stdout = self.convert(st, timm, "--to", "timm")
        self.assertIn("naming detected: official, written: timm", stdout)
        timm_sd = torch.load(timm)["model"]
        self.assertEqual(set(timm_sd), {n for n, _ in timm_params(self.DEPTHS, self.DIMS, 3, 10)})
        self.assertSameAsSd(timm_sd, names=[cc.official_to_timm_name(n) for n in self.sd])
        # and the timm file comes back to the same safetensors file
        st2 = self.path("again.safetensors")
        self.assertIn("naming detected: timm", self.convert(timm, st2))
        self.assertSameAsSd(self.load_safetensors(st2))
        # a .pth -> .pth conversion renames
        official2 = self.path("official2.pth")
        self.convert(timm, official2)
        self.assertSameAsSd(torch.load(official2)["model"])

    def test_timm_named_conv_mlp_input(self):
        timm_sd = {}
        for name, value in self.sd.items():  # in timm's order: downsamples inside the stages
            timm_name = cc.official_to_timm_name(name)
            if ".mlp.fc" in timm_name and timm_name.endswith("weight"):
                value = value[:, :, None, None]  # conv_mlp: a 1x1 conv
            timm_sd[timm_name] = value
        order = [n for n, _ in timm_params(self.DEPTHS, self.DIMS, 3, 10)]
        timm_sd = {n: timm_sd[n] for n in order}
        src = self.path("timm_conv_mlp.pth")
        torch.save(timm_sd, src)  # a bare state dict, as timm's own files are
        out = self.path("model.safetensors")
        stdout = self.convert(src, out)
        self.assertIn("naming detected: timm, written: official", stdout)
        self.assertIn("state dict: the checkpoint itself", stdout)
        self.assertSameAsSd(self.load_safetensors(out))

    def test_conv_mlp_models_are_written_for_timm_as_1x1_convs(self):
        """atto ... nano: timm builds them with conv_mlp=True, [out, in, 1, 1] MLP weights."""
        import convnext_reference
        depths, dims = (2, 2, 6, 2), (40, 80, 160, 320)
        model = convnext_reference.ConvNeXt(depths=depths, dims=dims)
        sd = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}
        src, timm = self.path("atto.pth"), self.path("atto_timm.pth")
        torch.save({"model": sd}, src)
        stdout = self.convert(src, timm, "--to", "timm")
        self.assertIn("as 1x1 convs [out, in, 1, 1] (timm's conv_mlp=True, as convnext_atto)",
                      stdout)
        timm_sd = torch.load(timm)["model"]
        self.assertEqual({n: tuple(v.shape) for n, v in timm_sd.items()},
                         dict(timm_params(depths, dims, conv_mlp=True)))
        for name, value in sd.items():
            np.testing.assert_array_equal(
                timm_sd[cc.official_to_timm_name(name)].reshape(value.shape).numpy(),
                value.numpy(), err_msg=name)
        # --timm-mlp linear: timm's Linear form
        linear = self.path("atto_linear.pth")
        self.convert(src, linear, "--to", "timm", "--timm-mlp", "linear")
        self.assertEqual({n: tuple(v.shape) for n, v in torch.load(linear)["model"].items()},
                         dict(timm_params(depths, dims, conv_mlp=False)))

    def test_reduced_and_double_precision_become_float32(self):
        for dtype, label in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
                             (torch.float64, "float64")):
            with self.subTest(label):
                sd = {k: v.to(dtype) for k, v in self.sd.items()}
                src, out = self.path(f"{label}.pth"), self.path(f"{label}.safetensors")
                torch.save({"model": sd}, src)
                stdout = self.convert(src, out)
                self.assertIn(f"converted {len(sd)} {label} tensor(s) to float32", stdout)
                self.assertSameAsSd(self.load_safetensors(out), sd)

    def test_float16_safetensors_become_float32_in_pth(self):
        import safetensors_io
        st, out = self.path("half.safetensors"), self.path("half.pth")
        safetensors_io.save(st, [(k, v.half().numpy()) for k, v in self.sd.items()])
        stdout = self.convert(st, out)
        self.assertIn("float16 tensor(s) to float32", stdout)
        self.assertSameAsSd(torch.load(out)["model"], {k: v.half() for k, v in self.sd.items()})

    def test_integer_buffers_and_other_entries_are_dropped(self):
        sd = dict(self.sd)
        sd["stages.0.0.norm.num_batches_tracked"] = torch.tensor(7)
        sd["stages.0.0.mask"] = torch.ones(3, dtype=torch.bool)
        src, out = self.path("buffers.pth"), self.path("buffers.safetensors")
        torch.save({"model": sd}, src)
        stdout = self.convert(src, out)
        self.assertIn("dropped 2 non-floating-point entries: "
                      "stages.0.0.norm.num_batches_tracked (int64), stages.0.0.mask (bool)",
                      stdout)
        self.assertSameAsSd(self.load_safetensors(out))

    def test_state_dict_location(self):
        cases = [({"state_dict": self.sd}, []), ({"model_ema": self.sd, "epoch": 1}, []),
                 ({"model": {"x": torch.zeros(1)}, "ema": self.sd}, ["--key", "ema"]),
                 ({"module." + k: v for k, v in self.sd.items()}, [])]
        for k, (checkpoint, extra) in enumerate(cases):
            with self.subTest(k):
                src, out = self.path(f"where{k}.pth"), self.path(f"where{k}.safetensors")
                torch.save(checkpoint, src)
                self.convert(src, out, *extra)
                self.assertSameAsSd(self.load_safetensors(out))

    def test_isotropic_model(self):
        import convnext_reference
        model = convnext_reference.ConvNeXtIsotropic(num_classes=10, depth=2, dim=16,
                                                     layer_scale_init_value=1e-6)
        sd = model.state_dict()
        self.assertEqual(list(sd), isotropic_names(2, layer_scale=True))
        src, st, back = self.path("iso.pth"), self.path("iso.safetensors"), self.path("iso2.pth")
        torch.save({"model": sd}, src)
        self.assertIn("naming detected: official-isotropic", self.convert(src, st))
        self.assertSameAsSd(self.load_safetensors(st), sd)
        stdout = self.convert(st, back, "--to", "timm")
        self.assertIn("no timm names: kept the official ones", stdout)
        self.assertSameAsSd(torch.load(back)["model"], sd)

    def test_bad_inputs_fail_cleanly(self):
        out = self.path("out.safetensors")
        text = self.path("notes.pth")
        with open(text, "w") as f:
            f.write("this is not a checkpoint\n")
        self.assertFailsCleanly([text, out], out, "not a readable PyTorch checkpoint")
        self.assertFailsCleanly([self.path("missing.pth"), out], out, "no such file")
        unknown = self.path("unknown.pth")
        torch.save({"model": {**self.sd, "stages.0.0.grn.gamma": torch.ones(8),
                              "mystery.weight": torch.ones(2)}}, unknown)
        line = self.assertFailsCleanly([unknown, out], out, "2 unknown parameter name(s)")
        self.assertIn("stages.0.0.grn.gamma", line)
        self.assertIn("mystery.weight", line)
        lone = self.path("tensor.pth")
        torch.save(torch.zeros(3), lone)
        self.assertFailsCleanly([lone, out], out, "not a checkpoint")
        nothing = self.path("nothing.pth")
        torch.save({"epoch": 3}, nothing)
        self.assertFailsCleanly([nothing, out], out, "no state dict")
        self.assertFailsCleanly([self.src, out, "--key", "optimizer"], out, "no key 'optimizer'")
        ints = self.path("ints.pth")
        torch.save({"model": {"head.weight": torch.zeros(2, dtype=torch.int32)}}, ints)
        self.assertFailsCleanly([ints, out], out, "no floating-point tensors")

    @unittest.skipUnless(HAVE_TORCH and "weights_only" in __import__("inspect").signature(
        torch.load).parameters, "this torch has no weights_only")
    def test_pickled_objects_need_allow_pickle(self):
        import argparse
        src, out = self.path("main_py.pth"), self.path("main_py.safetensors")
        torch.save({"model": self.sd, "args": argparse.Namespace(lr=4e-3)}, src)
        self.assertFailsCleanly([src, out], out, "--allow-pickle")
        self.convert(src, out, "--allow-pickle")
        self.assertSameAsSd(self.load_safetensors(out))

    def test_a_failed_write_leaves_no_output(self):
        out = self.path("out.safetensors")

        def half_write(tmp, tensors, source):
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")

        stderr = io.StringIO()
        with mock.patch.object(cc, "_write_safetensors", half_write), \
                contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(cc.main([self.src, out]), 1)
        self.assertEqual(stderr.getvalue(), f"convert_checkpoint: {out}: cannot write "
                                            "(disk full)\n")
        self.assertFalse(os.path.exists(out))
        self.assertFalse(os.path.exists(out + ".tmp"))

    def test_a_failed_run_keeps_an_existing_output(self):
        out = self.path("out.safetensors")
        with open(out, "w") as f:
            f.write("previous")
        bad = self.path("bad.pth")
        torch.save({"model": {"mystery": torch.ones(1)}}, bad)
        rc, _, err = run_converter(bad, out)
        self.assertEqual(rc, 1, msg=err)
        with open(out) as f:
            self.assertEqual(f.read(), "previous")
        self.assertFalse(os.path.exists(out + ".tmp"))


if __name__ == "__main__":
    unittest.main()
