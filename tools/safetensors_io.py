"""Minimal safetensors read/write with numpy, for the tools in this folder.

Written from the format's specification (8-byte little-endian header size, JSON header with
dtype/shape/data_offsets per tensor and an optional __metadata__, then the raw little-endian
buffer), so that the fixtures the C++ reader is tested on come from an independent writer.
"""
import json
import struct

import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "U8": np.dtype("u1"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def save(path, tensors, metadata=None):
    """tensors: dict or list of (name, numpy array); written in the given order."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header, chunks, offset = {}, [], 0
    for name, array in items:
        array = np.asarray(array)  # not ascontiguousarray: it turns a 0-d array into 1-d
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise ValueError(f"{name}: unsupported dtype {array.dtype}")
        data = array.astype(dtype).tobytes()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the buffer starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for chunk in chunks:
            f.write(chunk)


def load(path):
    """Returns (dict name -> numpy array in file order, metadata dict). BF16 is not supported."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    metadata = header.pop("__metadata__", {})
    base = 8 + n
    out = {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: {name}: dtype {info['dtype']} not supported here")
        out[name] = np.frombuffer(blob[base + begin:base + end], dtype=dtype).reshape(info["shape"])
    return out, metadata
