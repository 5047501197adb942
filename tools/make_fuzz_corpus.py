#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets: tests/fuzz/corpus/<target>/<name>.

A few small valid and near-valid inputs per target (a few KB per target), made with the
standard library only (the JPEGs with libjpeg-turbo through ctypes), independently of the C++
writers. The input layouts of the idx and cifar targets (a flags byte, then length-prefixed
pieces) are described at the top of tests/fuzz/fuzz_idx.cpp and fuzz_cifar.cpp.

    python3 tools/make_fuzz_corpus.py          # rewrites tests/fuzz/corpus/ (deterministic)

The output is committed; rerun this only to change the seeds. tools/fuzz.sh never writes
into tests/fuzz/corpus/: it fuzzes a copy.
"""
import ctypes
import ctypes.util
import gzip
import json
import os
import shutil
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fuzz", "corpus")


def put(target, name, data):
    folder = os.path.join(ROOT, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def piece(data):
    """A length-prefixed piece of the idx/cifar layouts: 16-bit little-endian length, bytes."""
    assert len(data) <= 0xFFFF
    return struct.pack("<H", len(data)) + data


# ---- safetensors ------------------------------------------------------------------------------

SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1}


def safetensors(tensors, metadata=None, pad=True, raw_metadata=False):
    """tensors: list of (name, dtype, shape); the data bytes are made up (i % 251)."""
    header, data = {}, b""
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + n]}
        data += bytes(i % 251 for i in range(n))
    if metadata is not None or raw_metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


def make_safetensors():
    t = "safetensors"
    put(t, "two_tensors", safetensors([("w", "F32", [2, 3]), ("b", "U8", [4])], {"a": "b"}))
    put(t, "every_dtype", safetensors([("f32", "F32", [1]), ("f16", "F16", [2]),
                                       ("bf16", "BF16", [2, 1]), ("f64", "F64", []),
                                       ("i64", "I64", [1, 1, 1]), ("i32", "I32", [3]),
                                       ("u8", "U8", [1, 2, 1, 2, 1])]))
    put(t, "empty_header", safetensors([]))
    put(t, "zero_size", safetensors([("z", "F32", [0, 4]), ("x", "I32", [2])]))
    put(t, "metadata_null", safetensors([("x", "F16", [2])], raw_metadata=True))
    put(t, "unpadded", safetensors([("x", "F64", [2])], {"k": "v"}, pad=False))
    good = safetensors([("w", "F32", [2, 2])])
    put(t, "truncated_data", good[:-3])
    put(t, "trailing_bytes", good + b"\0\0")
    put(t, "header_past_end", struct.pack("<Q", 1000) + b'{"a":1}')


# ---- checkpoint --------------------------------------------------------------------------------

CONFIG = {
    "model": "", "depths": [1, 1, 1, 1], "dims": [4, 8, 16, 32], "drop_path": 0.1,
    "layer_scale_init_value": 0.1, "head_init_scale": 1.0, "data_set": "fashion_mnist",
    "data_path": "", "augment": False, "num_workers": 2, "input_size": 224, "crop_pct": -1,
    "aa": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "reprob": -1, "mixup": -1, "cutmix": -1,
    "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "batch_size": 128, "update_freq": 1,
    "epochs": 10, "lr": 0.128, "min_lr": 1e-6, "warmup_lr": 0.0, "warmup_epochs": 1,
    "warmup_steps": -1, "weight_decay": 0.05, "clip_grad": 0.0, "layer_decay": 1.0,
    "smoothing": 0.1, "model_ema": True, "model_ema_decay": 0.9999, "model_ema_eval": False,
    "seed": 0, "output_dir": "out", "resume": "", "auto_resume": True, "save_ckpt": True,
    "save_ckpt_freq": 1, "save_ckpt_num": 3, "finetune": "", "device": "auto", "use_amp": "auto",
    "log_every": 50, "max_steps": -1,
}


def checkpoint(step="3", state=None, tensors=None, fmt="convnext-checkpoint/1"):
    if state is None:
        state = json.dumps({"epoch": 1, "batch": 0, "step": 3, "best_acc1": 12.5,
                            "drop_gen": {"seed": 0, "offset": 7}, "data_seed": 0,
                            "resume_key": "k", "config": CONFIG})
    if tensors is None:
        tensors = [("model.head.weight", "F32", [2, 2]), ("model.head.bias", "F32", [2]),
                   ("adamw.step", "I64", []), ("ema.head.weight", "F32", [2, 2])]
    md = {"state": state}
    if fmt is not None:
        md["format"] = fmt
    if step is not None:
        md["step"] = step
    return safetensors(tensors, md)


def make_checkpoint():
    t = "checkpoint"
    put(t, "valid", checkpoint())
    put(t, "no_ema", checkpoint(tensors=[("model.norm.weight", "F32", [3]), ("adamw.step", "I64", [])]))
    put(t, "config_subset", checkpoint(state=json.dumps({"config": {"epochs": 2, "dims": [1, 2, 3, 4]}})))
    put(t, "plain_weights", safetensors([("head.weight", "F32", [2, 2]), ("head.bias", "F32", [2])]))
    put(t, "step_not_number", checkpoint(step="x1"))
    put(t, "state_not_json", checkpoint(state="{\"config\": [1,"))
    put(t, "config_wrong_type", checkpoint(state=json.dumps({"config": {"epochs": "ten"}})))
    put(t, "other_format", checkpoint(fmt="convnext-checkpoint/2"))


# ---- idx (Fashion-MNIST) -----------------------------------------------------------------------

def idx3(n, rows, cols, pixels=None):
    body = bytes((i * 37) % 256 for i in range(n * rows * cols)) if pixels is None else pixels
    return struct.pack(">IIII", 0x803, n, rows, cols) + body


def idx1(labels):
    return struct.pack(">II", 0x801, len(labels)) + bytes(labels)


def idx_input(flags, images, labels):
    return bytes([flags]) + piece(images) + labels


def make_idx():
    t = "idx"
    # flags: 1 gzip images here, 2 gzip labels here, 4 test split, 8/16 plain file names.
    put(t, "train_gz", idx_input(3, idx3(2, 3, 3), idx1([1, 9])))
    put(t, "test_gz", idx_input(7, idx3(3, 2, 4), idx1([0, 5, 2])))
    put(t, "train_plain_names", idx_input(8 | 16, idx3(1, 28, 28), idx1([7])))
    put(t, "given_gzip", idx_input(0, gzip.compress(idx3(2, 2, 2), mtime=0), gzip.compress(idx1([3, 4]), mtime=0)))
    put(t, "label_out_of_range", idx_input(3, idx3(2, 3, 3), idx1([1, 10])))
    put(t, "count_mismatch", idx_input(3, idx3(2, 3, 3), idx1([1, 2, 3])))
    put(t, "images_truncated", idx_input(3, idx3(2, 3, 3)[:-4], idx1([1, 2])))
    put(t, "gzip_truncated", idx_input(2, idx3(1, 2, 2), gzip.compress(idx1([1]), mtime=0)[:-6]))


# ---- CIFAR -------------------------------------------------------------------------------------

def make_cifar():
    t = "cifar"
    # flags: 1 cifar100, 2 test split, 4 subfolder, 8 compact pieces (labels only), 16 names file.
    put(t, "c10_test_compact", bytes([2 | 8]) + piece(bytes([1, 2, 3, 9])))
    put(t, "c10_train_compact_names", bytes([8 | 16]) +
        piece("\n".join(f"class{i}" for i in range(10)).encode() + b"\n") +
        b"".join(piece(bytes([i, (i + 3) % 10])) for i in range(5)))
    put(t, "c10_train_subdir", bytes([4 | 8]) + b"".join(piece(bytes([i])) for i in range(5)))
    put(t, "c100_train_compact", bytes([1 | 8]) + piece(bytes([0, 99, 19, 0, 5, 42])))
    put(t, "c100_test_subdir_names", bytes([1 | 2 | 4 | 8 | 16]) +
        piece(b"\n".join(b"n%d" % i for i in range(100))) + piece(bytes([3, 30])))
    record = bytes([7]) + bytes((i * 13) % 256 for i in range(3072))
    put(t, "c10_test_raw_record", bytes([2]) + piece(record))
    put(t, "c10_test_raw_short", bytes([2]) + piece(record[:100]))
    put(t, "c100_coarse_out_of_range", bytes([1 | 2 | 8]) + piece(bytes([20, 1])))
    put(t, "c10_names_too_few", bytes([2 | 8 | 16]) + piece(b"a\nb\n") + piece(bytes([1])))


# ---- PGM / PPM ---------------------------------------------------------------------------------

def make_pnm():
    t = "pnm"
    put(t, "p5_3x2", b"P5\n3 2\n255\n" + bytes(range(6)))
    put(t, "p6_2x2_comment", b"P6\n# a comment\n2 2\n255\n" + bytes(range(12)))
    put(t, "p5_maxval_15", b"P5 4 1 15 " + bytes([0, 5, 10, 15]))
    put(t, "p5_16bit", b"P5\n2 1\n65535\n" + bytes(4))
    put(t, "p6_truncated", b"P6\n4 4\n255\n" + bytes(20))
    put(t, "p2_ascii", b"P2\n2 1\n255\n0 255\n")


# ---- JPEG (libjpeg-turbo through ctypes) -------------------------------------------------------

TJPF_RGB, TJPF_GRAY, TJPF_CMYK = 0, 6, 11
TJSAMP_444, TJSAMP_420, TJSAMP_GRAY = 0, 2, 3
TJFLAG_PROGRESSIVE = 16384


def jpeg_encoder():
    name = ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0"
    tj = ctypes.CDLL(name)
    tj.tjInitCompress.restype = ctypes.c_void_p
    tj.tjCompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                               ctypes.POINTER(ctypes.c_ulong), ctypes.c_int, ctypes.c_int,
                               ctypes.c_int]
    tj.tjFree.argtypes = [ctypes.c_void_p]
    tj.tjDestroy.argtypes = [ctypes.c_void_p]
    handle = tj.tjInitCompress()

    def encode(w, h, pf, channels, subsamp, quality=75, flags=0):
        px = bytes(((x * 29 + y * 53 + c * 101) % 256) for y in range(h) for x in range(w)
                   for c in range(channels))
        buf, size = ctypes.c_void_p(), ctypes.c_ulong(0)
        if tj.tjCompress2(handle, px, w, 0, h, pf, ctypes.byref(buf), ctypes.byref(size),
                          subsamp, quality, flags) != 0:
            raise RuntimeError("tjCompress2 failed")
        out = ctypes.string_at(buf, size.value)
        tj.tjFree(buf)
        return out

    return encode


def make_jpeg():
    t = "jpeg"
    encode = jpeg_encoder()
    rgb = encode(8, 8, TJPF_RGB, 3, TJSAMP_420)
    put(t, "rgb_8x8_420", rgb)
    put(t, "rgb_9x7_444", encode(9, 7, TJPF_RGB, 3, TJSAMP_444, quality=95))
    put(t, "gray_16x8", encode(16, 8, TJPF_GRAY, 1, TJSAMP_GRAY))
    put(t, "progressive_12x12", encode(12, 12, TJPF_RGB, 3, TJSAMP_420, flags=TJFLAG_PROGRESSIVE))
    put(t, "cmyk_8x8", encode(8, 8, TJPF_CMYK, 4, TJSAMP_444))
    put(t, "cut_in_data", rgb[:-20])
    put(t, "cut_in_header", rgb[:100])
    put(t, "not_jpeg", b"\x89PNG\r\n\x1a\n" + bytes(16))


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    for make in (make_safetensors, make_checkpoint, make_idx, make_cifar, make_pnm, make_jpeg):
        make()
    for target in sorted(os.listdir(ROOT)):
        folder = os.path.join(ROOT, target)
        files = os.listdir(folder)
        total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        print(f"{target}: {len(files)} files, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
