#!/usr/bin/env python3
"""Converts ConvNeXt checkpoints between PyTorch files and safetensors, and between the official
(facebookresearch/ConvNeXt) and timm parameter names.

    python3 tools/convert_checkpoint.py INPUT OUTPUT [--key KEY] [--to official|timm]
                                        [--eps EPS] [--timm-mlp auto|linear|conv]
                                        [--allow-pickle]

INPUT is read by its content, OUTPUT written by its extension:
  - a PyTorch file (.pth/.pt/.bin, read with torch.load(map_location="cpu", weights_only=True)
    where the installed torch has weights_only) -> OUTPUT.safetensors with the official names,
    the names the C++ code reads (DESIGN.md, "Numerics"). The state dict inside is
    checkpoint[KEY] with --key; else checkpoint["model"] (the official main.py's layout), else
    "state_dict", else "model_ema", else the checkpoint itself when it is a dict of tensors.
  - a .safetensors file -> OUTPUT.pth holding {"model": state_dict} (the official main.py's
    layout) with the official names, or timm's names with --to timm.
  - (also: .safetensors -> .safetensors, e.g. timm's hub files to official names, which needs
    only numpy; and .pth -> .pth, which renames.)
The input naming (official, official isotropic, or timm 0.6+) is detected; a 'module.' or
'model.' prefix on every name (DistributedDataParallel, a flattened training checkpoint) is
stripped. Every tensor is written as float32: float16/bfloat16/float64 are converted, integer
and bool buffers are dropped (each with a note on stdout). timm's conv_mlp models (atto ...
nano) keep mlp.fc1/fc2 weights as 1x1 convs [out, in, 1, 1]: they become [out, in].

--timm-mlp (with --to timm): the form of the mlp.fc1/fc2 weights written. auto (the default):
[out, in, 1, 1] where timm builds the model with conv_mlp=True (atto, femto, pico, nano, found
by their depths and dims) or the input had that form, else [out, in] (timm's Linear MLP, its
default); linear or conv force one form, for other conv_mlp models.

LayerNorm eps: the file does not say which eps its model was trained with, and a model run with
another eps computes different outputs. The official code and this project's C++ model use 1e-6
in every LayerNorm, as timm does except for convnext_xxlarge and its test_convnext* models
(norm_eps 1e-5). The eps is taken from --eps; else from the input's metadata (layer_norm_eps,
which this script writes into every safetensors OUTPUT); else from the architecture, found by
its depths and dims (1e-5 for timm's convnext_xxlarge, depths 3,4,30,3, dims
384,768,1536,3072, and the test_convnext models); else 1e-6. An eps other than 1e-6 is refused
for a .safetensors OUTPUT (the C++ model) and for official names (the official code): only a
timm-named .pth (--to timm) can carry it, and a note says to build the timm model with that
norm_eps. Pass --eps 1e-6 for weights that were trained with 1e-6 despite their architecture.

--allow-pickle: load with weights_only=False, for checkpoints holding other Python objects
(the official main.py saves its argparse Namespace as "args"). Unpickling runs code from the
file: only for files you trust.

Errors print one line "convert_checkpoint: ..." on stderr and exit with status 1; OUTPUT is
written to OUTPUT.tmp and renamed at the end, so a failed run never leaves a partial OUTPUT.

The name mapping below is pure Python (no torch, no numpy), so it can be tested anywhere;
torch and numpy are imported only by the functions that read and write files.
"""
import argparse
import os
import re
import sys

PROG = "convert_checkpoint"


class ConversionError(Exception):
    """A user-facing error: main() prints it as one line and exits with status 1."""


# ---- name mapping (pure) ----------------------------------------------------------------------
# Each row is (official template, timm template). Placeholders: {i} a stage index, {s} a stage
# index >= 1, {j} a block index, {k} 0 or 1 (the module inside a downsample layer), {n} 1 or 2
# (the MLP layer), {p} weight or bias. Indices are canonical decimals (no leading zeros), so the
# mapping is a bijection on the names it accepts.
_FIELDS = {
    "i": r"0|[1-9][0-9]*",
    "s": r"[1-9][0-9]*",
    "j": r"0|[1-9][0-9]*",
    "k": r"[01]",
    "n": r"[12]",
    "p": r"weight|bias",
}

_HIERARCHICAL = [  # official name <-> timm (convnext.py, 0.6 and later) name
    ("downsample_layers.0.0.{p}", "stem.0.{p}"),                       # 4x4/4 conv
    ("downsample_layers.0.1.{p}", "stem.1.{p}"),                       # LayerNorm
    ("downsample_layers.{s}.{k}.{p}", "stages.{s}.downsample.{k}.{p}"),  # LayerNorm, 2x2/2 conv
    ("stages.{i}.{j}.dwconv.{p}", "stages.{i}.blocks.{j}.conv_dw.{p}"),
    ("stages.{i}.{j}.norm.{p}", "stages.{i}.blocks.{j}.norm.{p}"),
    ("stages.{i}.{j}.pwconv{n}.{p}", "stages.{i}.blocks.{j}.mlp.fc{n}.{p}"),
    ("stages.{i}.{j}.gamma", "stages.{i}.blocks.{j}.gamma"),
    ("norm.{p}", "head.norm.{p}"),                                     # final LayerNorm
    ("head.{p}", "head.fc.{p}"),                                       # classifier
]
_SHARED = {"norm.{p}", "head.{p}"}  # official names that the isotropic model has too

_ISOTROPIC = [  # official ConvNeXtIsotropic names; timm has no such model: passed through
    "stem.{p}",
    "blocks.{j}.dwconv.{p}",
    "blocks.{j}.norm.{p}",
    "blocks.{j}.pwconv{n}.{p}",
    "blocks.{j}.gamma",
]

OFFICIAL = "official"
ISOTROPIC = "official-isotropic"
TIMM = "timm"


def _compile(template):
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(part) if k % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})"
                    for k, part in enumerate(parts))
    return re.compile(regex)


_ROWS = [(_compile(o), o, _compile(t), t) for o, t in _HIERARCHICAL]
_ISO_RX = [_compile(t) for t in _ISOTROPIC]


def official_to_timm_name(name):
    """The timm name of an official hierarchical-ConvNeXt name, or None if it is not one."""
    for o_rx, _, _, t in _ROWS:
        m = o_rx.fullmatch(name)
        if m:
            return t.format(**m.groupdict())
    return None


def timm_to_official_name(name):
    """The official name of a timm ConvNeXt name, or None if it is not one."""
    for _, o, t_rx, _ in _ROWS:
        m = t_rx.fullmatch(name)
        if m:
            return o.format(**m.groupdict())
    return None


def classify_name(name):
    """'official', 'official-isotropic', 'shared' (norm.*/head.*: official, both models),
    'timm', or None for a name none of the schemes has."""
    for o_rx, o, _, _ in _ROWS:
        if o_rx.fullmatch(name):
            return "shared" if o in _SHARED else OFFICIAL
    if any(rx.fullmatch(name) for rx in _ISO_RX):
        return ISOTROPIC
    if timm_to_official_name(name) is not None:
        return TIMM
    return None


def _name_list(names, limit=20):
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def detect_naming(names):
    """The naming scheme of a whole state dict: 'official', 'official-isotropic' or 'timm'.
    Raises ConversionError for no names, unknown names (listed) or a mix of schemes."""
    names = list(names)
    if not names:
        raise ConversionError("the state dict holds no floating-point tensors")
    kinds = {name: classify_name(name) for name in names}
    unknown = [name for name in names if kinds[name] is None]
    if unknown:
        raise ConversionError(f"{len(unknown)} unknown parameter name(s) (neither official "
                              f"ConvNeXt nor timm convnext): {_name_list(unknown)}")
    found = set(kinds.values())
    if TIMM in found and len(found) > 1:
        raise ConversionError("mixed naming: timm names (e.g. "
                              f"{next(n for n in names if kinds[n] == TIMM)}) together with "
                              f"official ones (e.g. {next(n for n in names if kinds[n] != TIMM)})")
    if OFFICIAL in found and ISOTROPIC in found:
        raise ConversionError("mixed naming: hierarchical ConvNeXt names (e.g. "
                              f"{next(n for n in names if kinds[n] == OFFICIAL)}) together with "
                              "isotropic ones (e.g. "
                              f"{next(n for n in names if kinds[n] == ISOTROPIC)})")
    if TIMM in found:
        return TIMM
    return ISOTROPIC if ISOTROPIC in found else OFFICIAL


def to_official_names(names):
    """(detected scheme, [official name for each name, in order])."""
    names = list(names)
    scheme = detect_naming(names)
    if scheme == TIMM:
        return scheme, [timm_to_official_name(n) for n in names]
    return scheme, names


def to_timm_names(official_names, scheme=None):
    """timm names for official names; isotropic names (which timm has no model for) are passed
    through. scheme: detect_naming's answer for these names, detected when None."""
    official_names = list(official_names)
    scheme = scheme or detect_naming(official_names)
    if scheme == TIMM:
        raise ConversionError("to_timm_names wants official names, these are timm's")
    if scheme == ISOTROPIC:
        return list(official_names)
    return [official_to_timm_name(n) for n in official_names]


_PWCONV_WEIGHT = re.compile(r"(stages\.[0-9]+\.[0-9]+|blocks\.[0-9]+)\.pwconv[12]\.weight")


def official_shape(official_name, shape):
    """The shape an official checkpoint has for this tensor, given the shape it came with:
    pwconv1/pwconv2 weights stored as 1x1 convs [out, in, 1, 1] (timm's conv_mlp models)
    become [out, in]; everything else is unchanged."""
    shape = tuple(int(d) for d in shape)
    if _PWCONV_WEIGHT.fullmatch(official_name):
        if len(shape) == 4 and shape[2:] == (1, 1):
            return shape[:2]
        if len(shape) != 2:
            raise ConversionError(f"{official_name}: shape {list(shape)} is neither [out, in] nor "
                                  "[out, in, 1, 1]")
    return shape


_TOP_ORDER = {"downsample_layers": 0, "stem": 0, "stages": 1, "blocks": 1, "norm": 2, "head": 3}
_FIELD_ORDER = {"gamma": 0, "dwconv": 1, "norm": 2, "pwconv1": 3, "pwconv2": 4}
_PARAM_ORDER = {"weight": 0, "bias": 1}


def official_sort_key(name):
    """Sorts official names into the order of the official model's state_dict() (a module's own
    parameters, like a block's gamma, come before its submodules')."""
    parts = name.split(".")
    key = [(_TOP_ORDER.get(parts[0], 9), 0)]
    for part in parts[1:]:
        if part.isdigit():
            key.append((0, int(part)))
        elif part in _FIELD_ORDER:
            key.append((1, _FIELD_ORDER[part]))
        elif part in _PARAM_ORDER:
            key.append((2, _PARAM_ORDER[part]))
        else:
            key.append((3, part))
    return key


# ---- the model a state dict holds: LayerNorm eps and timm's MLP form (pure) -------------------
OFFICIAL_EPS = 1e-6  # every LayerNorm of the official code and of the C++ model
HIERARCHICAL, ISO = "hierarchical", "isotropic"

# (kind, depths, dims) -> (model, LayerNorm eps, timm builds the MLP as 1x1 convs). From the
# official models/convnext.py and convnext_isotropic.py (eps 1e-6 throughout) and timm 1.0's
# models/convnext.py: norm_eps=1e-5 for convnext_xxlarge and test_convnext{,2,3} (which also
# use a tanh GELU, or SiLU and smaller kernels, that no official model has); conv_mlp=True for
# atto, femto, pico, nano (and their _ols stems, which have other names).
KNOWN_MODELS = {
    (HIERARCHICAL, (2, 2, 6, 2), (40, 80, 160, 320)): ("convnext_atto", 1e-6, True),
    (HIERARCHICAL, (2, 2, 6, 2), (48, 96, 192, 384)): ("convnext_femto", 1e-6, True),
    (HIERARCHICAL, (2, 2, 6, 2), (64, 128, 256, 512)): ("convnext_pico", 1e-6, True),
    (HIERARCHICAL, (2, 2, 8, 2), (80, 160, 320, 640)): ("convnext_nano", 1e-6, True),
    (HIERARCHICAL, (3, 3, 9, 3), (96, 192, 384, 768)): ("convnext_tiny", 1e-6, False),
    (HIERARCHICAL, (3, 3, 27, 3), (96, 192, 384, 768)): ("convnext_small", 1e-6, False),
    (HIERARCHICAL, (3, 3, 27, 3), (128, 256, 512, 1024)): ("convnext_base", 1e-6, False),
    (HIERARCHICAL, (3, 3, 27, 3), (192, 384, 768, 1536)): ("convnext_large", 1e-6, False),
    (HIERARCHICAL, (3, 3, 27, 3), (256, 512, 1024, 2048)): ("convnext_xlarge", 1e-6, False),
    (HIERARCHICAL, (3, 4, 30, 3), (384, 768, 1536, 3072)): ("timm's convnext_xxlarge", 1e-5,
                                                             False),
    (HIERARCHICAL, (1, 2, 4, 2), (24, 32, 48, 64)): ("timm's test_convnext", 1e-5, False),
    (HIERARCHICAL, (1, 1, 1, 1), (32, 64, 96, 128)): ("timm's test_convnext2/3", 1e-5, False),
    (ISO, (18,), (384,)): ("convnext_isotropic_small", 1e-6, False),
    (ISO, (18,), (768,)): ("convnext_isotropic_base", 1e-6, False),
    (ISO, (36,), (1024,)): ("convnext_isotropic_large", 1e-6, False),
}

_STAGE_BLOCK = re.compile(r"stages\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.")
_ISO_BLOCK = re.compile(r"blocks\.(0|[1-9][0-9]*)\.")


def architecture(named_shapes):
    """(kind, depths, dims) of a state dict with official names, from (name, shape) pairs: the
    blocks per stage and the width of each stage's first depthwise conv (the isotropic stem's
    width); None when the names do not make a whole model."""
    shapes = {name: tuple(int(d) for d in shape) for name, shape in named_shapes}
    if "stem.weight" in shapes:  # isotropic
        blocks = {int(m.group(1)) for m in map(_ISO_BLOCK.match, shapes) if m}
        if not blocks or blocks != set(range(len(blocks))):
            return None
        return ISO, (len(blocks),), (shapes["stem.weight"][0],)
    stages = {}
    for name in shapes:
        m = _STAGE_BLOCK.match(name)
        if m:
            stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not stages or set(stages) != set(range(len(stages))):
        return None
    depths, dims = [], []
    for i in range(len(stages)):
        if stages[i] != set(range(len(stages[i]))):
            return None
        dw = shapes.get(f"stages.{i}.0.dwconv.weight")
        if not dw:
            return None
        depths.append(len(stages[i]))
        dims.append(dw[0])
    return HIERARCHICAL, tuple(depths), tuple(dims)


def _parse_eps(text, what):
    try:
        eps = float(text)
    except (TypeError, ValueError):
        raise ConversionError(f"{what}: expected a positive number, got {text!r}")
    if not eps > 0 or eps == float("inf"):
        raise ConversionError(f"{what}: expected a positive number, got {text!r}")
    return eps


def resolve_eps(eps_arg, recorded, known):
    """(eps, where it came from): --eps (a string) if given, else the input's layer_norm_eps
    metadata (a string), else the known model's (KNOWN_MODELS' value), else OFFICIAL_EPS."""
    if eps_arg is not None:
        return _parse_eps(eps_arg, "--eps"), "--eps"
    if recorded is not None:
        return _parse_eps(recorded, "the input's layer_norm_eps metadata"), "the input's metadata"
    if known is not None:
        return known[1], known[0]
    return OFFICIAL_EPS, "the default"


def is_official_eps(eps):
    return abs(eps - OFFICIAL_EPS) <= 1e-12


def check_eps(eps, source, writes_timm):
    """None when eps is the official 1e-6; a note for a timm-named output (timm builds the model
    with norm_eps); else raises ConversionError: the official code and the C++ model have only
    1e-6 and would compute other outputs."""
    if is_official_eps(eps):
        return None
    if writes_timm:
        return (f"LayerNorm eps {eps:g} ({source}): build the timm model with norm_eps={eps:g} "
                "(timm's convnext_xxlarge and test_convnext models do by default)")
    raise ConversionError(f"the model uses LayerNorm eps {eps:g} ({source}); the official code "
                          "and the C++ model use 1e-6 in every LayerNorm and would compute other "
                          "outputs, so it is not converted to official names; for timm write a "
                          ".pth with --to timm, or give --eps 1e-6 if these weights were trained "
                          "with 1e-6")


def timm_mlp_is_conv(choice, input_was_conv, known):
    """Whether timm's mlp.fc1/fc2 weights are written as 1x1 convs [out, in, 1, 1]: choice
    'conv' or 'linear' decides; 'auto' follows the input's form, then the known model's."""
    if choice == "conv":
        return True
    if choice == "linear":
        return False
    return bool(input_was_conv or (known is not None and known[2]))


def timm_shape(official_name, shape, conv_mlp):
    """The shape timm has for an official tensor: pwconv weights [out, in] become [out, in, 1, 1]
    when conv_mlp; everything else is unchanged."""
    shape = tuple(int(d) for d in shape)
    if conv_mlp and _PWCONV_WEIGHT.fullmatch(official_name) and len(shape) == 2:
        return shape + (1, 1)
    return shape


_WRAPPER_PREFIXES = ("module.", "model.")


def strip_wrapper_prefixes(names):
    """(names without a 'module.'/'model.' prefix that every name has, repeatedly; the prefixes
    stripped, in order)."""
    names, stripped = list(names), []
    while names:
        prefix = next((p for p in _WRAPPER_PREFIXES
                       if all(isinstance(n, str) and n.startswith(p) for n in names)), None)
        if prefix is None:
            break
        stripped.append(prefix)
        names = [n[len(prefix):] for n in names]
    return names, stripped


def select_state_dict(checkpoint, key, is_tensor):
    """(state dict, where it was found) from a loaded checkpoint: checkpoint[key] with a key;
    else checkpoint['model'], 'state_dict', 'model_ema', else the checkpoint itself when it
    holds tensors. is_tensor: the predicate for a tensor (torch.is_tensor)."""
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"the file holds a {type(checkpoint).__name__}, not a checkpoint "
                              "(a dict)")
    if key is not None:
        if key not in checkpoint:
            raise ConversionError(f"no key {key!r} in the checkpoint (its keys: "
                                  f"{_name_list([str(k) for k in checkpoint])})")
        if not isinstance(checkpoint[key], dict):
            raise ConversionError(f"checkpoint[{key!r}] is a {type(checkpoint[key]).__name__}, "
                                  "not a state dict")
        return checkpoint[key], f"checkpoint[{key!r}]"
    for k in ("model", "state_dict", "model_ema"):
        if isinstance(checkpoint.get(k), dict):
            return checkpoint[k], f"checkpoint[{k!r}]"
    if checkpoint and any(is_tensor(v) for v in checkpoint.values()):
        return checkpoint, "the checkpoint itself"
    raise ConversionError("no state dict in the checkpoint: no 'model', 'state_dict' or "
                          "'model_ema' entry and no tensors at the top level (its keys: "
                          f"{_name_list([str(k) for k in checkpoint])}); name one with --key")


# ---- reading and writing (torch, numpy) -------------------------------------------------------
def _one_line(text):
    return " ".join(str(text).split())


def _import_numpy():
    try:
        import numpy
    except ImportError as e:
        raise ConversionError(f"this conversion needs numpy, which is not importable ({e})")
    return numpy


def _import_safetensors_io():
    _import_numpy()
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import safetensors_io
    return safetensors_io


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"this conversion needs PyTorch, which is not importable ({e})")
    return torch


def is_safetensors_file(path):
    """True when the file starts like a safetensors file: an 8-byte little-endian header size
    that fits in the file, then a JSON object."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _load_torch(path, allow_pickle):
    torch = _import_torch()
    import inspect
    try:
        has_weights_only = "weights_only" in inspect.signature(torch.load).parameters
    except (TypeError, ValueError):
        has_weights_only = False
    kwargs = {"map_location": "cpu"}
    if has_weights_only:
        kwargs["weights_only"] = not allow_pickle
    try:
        return torch.load(path, **kwargs)
    except Exception as e:  # pickle, zip and torch errors alike
        text = _one_line(e)[:300]
        if has_weights_only and not allow_pickle and _looks_like_torch_file(path):
            raise ConversionError(f"{path}: torch.load(weights_only=True) failed ("
                                  f"{type(e).__name__}: {text}); if this is a PyTorch "
                                  "checkpoint you trust, rerun with --allow-pickle")
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ("
                              f"{type(e).__name__}: {text})")


def _looks_like_torch_file(path):
    """torch.save's zip format, or the legacy format (a pickle, protocol 2 or later)."""
    import zipfile
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _to_float32_arrays(items, notes):
    """items: (name, value) with torch tensors or numpy arrays. Returns [(name, float32 numpy
    array)], noting conversions and dropped entries in notes."""
    np = _import_numpy()
    converted, dropped = {}, []
    out = []
    for name, value in items:
        if hasattr(value, "detach"):  # a torch tensor
            if not (value.is_floating_point() and not value.is_complex()):
                dropped.append(f"{name} ({str(value.dtype).replace('torch.', '')})")
                continue
            dtype = str(value.dtype).replace("torch.", "")
            array = value.detach().cpu().float().contiguous().numpy()
        elif isinstance(value, np.ndarray):
            if value.dtype.kind != "f":
                dropped.append(f"{name} ({value.dtype})")
                continue
            dtype = str(value.dtype)
            array = value.astype(np.float32)
        else:
            dropped.append(f"{name} (a {type(value).__name__}, not a tensor)")
            continue
        if dtype != "float32":
            converted[dtype] = converted.get(dtype, 0) + 1
        out.append((str(name), array))
    for dtype, count in sorted(converted.items()):
        notes.append(f"converted {count} {dtype} tensor(s) to float32")
    if dropped:
        notes.append(f"dropped {len(dropped)} non-floating-point entr"
                     f"{'y' if len(dropped) == 1 else 'ies'}: {_name_list(dropped)}")
    return out


def _strip_prefixes(items, notes):
    names, stripped = strip_wrapper_prefixes([k for k, _ in items])
    for prefix in stripped:
        why = ("a DistributedDataParallel state dict" if prefix == "module." else
               "a wrapped state dict")
        notes.append(f"stripped the {prefix!r} prefix ({why})")
    return [(n, v) for n, (_, v) in zip(names, items)]


def read_input(path, key, allow_pickle, notes):
    """([(name, float32 numpy array)] in file order, the file's metadata: {} for PyTorch)."""
    if is_safetensors_file(path):
        if key is not None:
            raise ConversionError("--key applies to PyTorch checkpoints, INPUT is a safetensors "
                                  "file")
        safetensors_io = _import_safetensors_io()
        try:
            tensors, metadata = safetensors_io.load(path)
        except Exception as e:
            raise ConversionError(f"{path}: not a readable safetensors file ("
                                  f"{type(e).__name__}: {_one_line(e)[:300]})")
        items = _strip_prefixes(list(tensors.items()), notes)
        return _to_float32_arrays(items, notes), dict(metadata or {})
    torch = _import_torch()
    checkpoint = _load_torch(path, allow_pickle)
    state_dict, where = select_state_dict(checkpoint, key, torch.is_tensor)
    if where != "checkpoint['model']":
        notes.append(f"state dict: {where}")
    items = _strip_prefixes(list(state_dict.items()), notes)
    return _to_float32_arrays(items, notes), {}


def _write_safetensors(tmp, tensors, source, eps):
    safetensors_io = _import_safetensors_io()
    safetensors_io.save(tmp, tensors, {"format": "pt", "naming": OFFICIAL,
                                       "converted_from": os.path.basename(source),
                                       "layer_norm_eps": f"{eps:g}"})


def _write_torch(tmp, tensors):
    torch = _import_torch()
    state_dict = {name: torch.tensor(array) for name, array in tensors}  # copies
    torch.save({"model": state_dict}, tmp)


_TORCH_EXTENSIONS = (".pth", ".pt", ".bin")


def convert(input_path, output_path, key=None, to=OFFICIAL, allow_pickle=False, log=print,
            eps=None, timm_mlp="auto"):
    """Converts one file; raises ConversionError. Returns the summary line. eps: --eps (a
    string) or None; timm_mlp: --timm-mlp."""
    out_lower = output_path.lower()
    if out_lower.endswith(".safetensors"):
        out_format = "safetensors"
        if to != OFFICIAL:
            raise ConversionError("a safetensors OUTPUT always has the official names (the ones "
                                  "the C++ code reads); --to timm needs a .pth OUTPUT")
    elif out_lower.endswith(_TORCH_EXTENSIONS):
        out_format = "torch"
    else:
        raise ConversionError(f"{output_path}: OUTPUT must end in .safetensors, .pth, .pt or "
                              ".bin")
    if not os.path.exists(input_path):
        raise ConversionError(f"{input_path}: no such file")
    if not os.path.isfile(input_path):
        raise ConversionError(f"{input_path}: not a regular file")

    if eps is not None:
        _parse_eps(eps, "--eps")  # a bad value fails before the input is read
    notes = []
    try:
        tensors, metadata = read_input(input_path, key, allow_pickle, notes)
    except OSError as e:
        raise ConversionError(f"{input_path}: cannot read ({_one_line(e)})")
    if not tensors:
        raise ConversionError(f"{input_path}: the state dict holds no floating-point tensors")
    names = [name for name, _ in tensors]
    scheme, official = to_official_names(names)
    arrays = []
    input_conv_mlp = False  # timm's conv_mlp form [out, in, 1, 1] in the input
    for name, (_, array) in zip(official, tensors):
        shape = official_shape(name, array.shape)
        input_conv_mlp = input_conv_mlp or len(shape) != array.ndim
        arrays.append((name, array.reshape(shape)))
    arrays.sort(key=lambda item: official_sort_key(item[0]))

    arch = architecture([(name, array.shape) for name, array in arrays])
    known = KNOWN_MODELS.get(arch) if arch else None
    layer_norm_eps, eps_source = resolve_eps(eps, metadata.get("layer_norm_eps"), known)
    writes_timm = to == TIMM and scheme != ISOTROPIC
    eps_note = check_eps(layer_norm_eps, eps_source, writes_timm)
    if eps_note:
        notes.append(eps_note)
    if to == TIMM:
        timm_names = to_timm_names([name for name, _ in arrays], scheme)
        if scheme == ISOTROPIC:
            notes.append("isotropic ConvNeXt has no timm names: kept the official ones")
        else:
            conv = timm_mlp_is_conv(timm_mlp, input_conv_mlp, known)
            arrays = [(name, array.reshape(timm_shape(name, array.shape, conv)))
                      for name, array in arrays]
            if conv:
                notes.append("mlp.fc1/fc2 weights written as 1x1 convs [out, in, 1, 1] "
                             "(timm's conv_mlp=True" + (f", as {known[0]}" if known and known[2]
                                                         else "") + ")")
        arrays = [(t, array) for t, (_, array) in zip(timm_names, arrays)]
    out_names = "official" if to == OFFICIAL or scheme == ISOTROPIC else "timm"

    tmp = output_path + ".tmp"
    try:
        if out_format == "safetensors":
            _write_safetensors(tmp, arrays, input_path, layer_norm_eps)
        else:
            _write_torch(tmp, arrays)
        os.replace(tmp, output_path)
    except ConversionError:
        raise
    except OSError as e:
        raise ConversionError(f"{output_path}: cannot write ({_one_line(e)})")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for note in notes:
        log(f"{PROG}: note: {note}")
    count = sum(int(array.size) for _, array in arrays)
    summary = (f"{PROG}: wrote {output_path}: {len(arrays)} tensors, {count} parameters, "
               f"naming detected: {scheme}, written: {out_names}")
    log(summary)
    return summary


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 1, like every other error
        print(f"{PROG}: {_one_line(message)} (see --help)", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    parser = _Parser(prog="convert_checkpoint.py",
                     description="Convert ConvNeXt checkpoints: PyTorch (.pth/.pt/.bin) <-> "
                                 "safetensors, official <-> timm names.")
    parser.add_argument("input", metavar="INPUT")
    parser.add_argument("output", metavar="OUTPUT")
    parser.add_argument("--key", help="the checkpoint entry holding the state dict (default: "
                                      "model, state_dict, model_ema, or the checkpoint itself)")
    parser.add_argument("--to", choices=(OFFICIAL, TIMM), default=OFFICIAL,
                        help="names in a .pth OUTPUT (a .safetensors OUTPUT is always official)")
    parser.add_argument("--eps", metavar="EPS",
                        help="the LayerNorm eps the input model was trained with (default: the "
                             "input's layer_norm_eps metadata, else 1e-5 for timm's "
                             "convnext_xxlarge and test_convnext models, else 1e-6); anything "
                             "but 1e-6 is refused unless writing timm names (--to timm)")
    parser.add_argument("--timm-mlp", choices=("auto", "linear", "conv"), default="auto",
                        help="with --to timm: mlp.fc1/fc2 weights as [out, in] (linear) or "
                             "[out, in, 1, 1] (conv, timm's conv_mlp=True); auto: conv for "
                             "atto, femto, pico, nano or a conv-form input (default: auto)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="torch.load with weights_only=False: runs code from the file, only "
                             "for files you trust")
    args = parser.parse_args(argv)
    try:
        convert(args.input, args.output, args.key, args.to, args.allow_pickle, eps=args.eps,
                timm_mlp=args.timm_mlp)
    except ConversionError as e:
        print(f"{PROG}: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug or an unforeseen file: still one line
        print(f"{PROG}: unexpected {type(e).__name__}: {_one_line(e)[:500]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
