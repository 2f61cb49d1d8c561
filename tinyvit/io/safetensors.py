"""A self-contained reader and writer for the .safetensors format (no safetensors package needed).

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, optional "__metadata__": {str: str}}, then the raw little-endian
tensor bytes, offsets relative to the start of that buffer. Every field is checked on reading.
"""
import json
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import TinyViTError
from .files import atomic_write

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit on the JSON header
# safetensors dtype code -> little-endian NumPy dtype (BF16 is read as raw uint16, then widened)
_DTYPES = {
    "F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?",
}
_CODES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
          np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16",
          np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64", np.dtype(np.bool_): "BOOL"}


def bf16_to_float32(u16):
    """bfloat16 bit patterns (uint16 array) -> float32 values, exactly (bf16 is float32's top half)."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _no_duplicates(pairs):
    """json object_pairs_hook refusing repeated names (which would silently shadow a tensor)."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _parse_header(path, raw, buf_len):
    """Decode and validate the JSON header; returns (entries sorted by offset, metadata)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurd nesting
        raise TinyViTError(f"{path}: corrupt safetensors header (invalid JSON: {e})") from None
    if not isinstance(header, dict):
        raise TinyViTError(f"{path}: corrupt safetensors header (JSON is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise TinyViTError(f"{path}: __metadata__ must map strings to strings")
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise TinyViTError(f"{path}: tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise TinyViTError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r} "
                               f"(supported: {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise TinyViTError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1] <= buf_len):
            raise TinyViTError(f"{path}: tensor {name!r}: data_offsets {offs!r} outside the "
                               f"{buf_len}-byte data buffer (file truncated or corrupt)")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize  # Python ints: no wrap-around
        if nbytes != offs[1] - offs[0]:
            raise TinyViTError(f"{path}: tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, "
                               f"data_offsets span {offs[1] - offs[0]}")
        entries.append((offs[0], offs[1], name, dtype, tuple(shape)))
    entries.sort()
    end = 0
    for begin, stop, name, _, _ in entries:
        if begin != end:
            raise TinyViTError(f"{path}: tensor {name!r} starts at byte {begin}, expected {end} "
                               f"(data_offsets overlap or leave a hole)")
        end = stop
    if end != buf_len:
        raise TinyViTError(f"{path}: data buffer is {buf_len} bytes but the tensors cover {end}")
    return entries, metadata


def read_safetensors(path):
    """Read a .safetensors file -> (dict name -> NumPy array, metadata dict); BF16 becomes float32."""
    path = Path(path)
    if not path.is_file():
        raise TinyViTError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 8:
        raise TinyViTError(f"{path}: not a safetensors file ({'empty' if size == 0 else f'only {size} bytes'})")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise TinyViTError(f"{path}: bad safetensors header length {n} (file has {size} bytes; "
                               f"truncated, corrupt, or not a safetensors file)")
        raw = f.read(n)
        entries, metadata = _parse_header(path, raw, size - 8 - n)
        buf = bytearray(size - 8 - n)  # writable, so the arrays below are too
        if f.readinto(buf) != len(buf):
            raise TinyViTError(f"{path}: file shrank while reading")
    tensors = {}
    for begin, stop, name, dtype, shape in sorted(entries, key=lambda e: e[2]):
        dt = np.dtype(_DTYPES[dtype])
        x = np.frombuffer(buf, dtype=dt, count=(stop - begin) // dt.itemsize, offset=begin).reshape(shape)
        if dtype == "BF16":
            x = bf16_to_float32(x)
        elif dt.byteorder == "<" and not dt.isnative:  # big-endian host
            x = x.astype(dt.newbyteorder("="))
        tensors[name] = x
    return tensors, metadata


def write_safetensors(path, tensors, metadata=None):
    """Atomically write a dict of NumPy arrays (and optional {str: str} metadata) as .safetensors."""
    path = Path(path)
    header, arrays, offset = {}, [], 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TinyViTError(f"{path}: safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    for name, x in tensors.items():
        x = np.asarray(x)
        if name == "__metadata__" or not isinstance(name, str):
            raise TinyViTError(f"{path}: invalid tensor name {name!r}")
        code = _CODES.get(x.dtype.newbyteorder("=") if x.dtype.byteorder != "|" else x.dtype)
        if code is None:
            raise TinyViTError(f"{path}: tensor {name!r} has dtype {x.dtype}, which safetensors cannot hold")
        x = x.astype(np.dtype(_DTYPES[code]), order="C", copy=False)  # (ascontiguousarray makes 0-d 1-d)
        header[name] = {"dtype": code, "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
        arrays.append(x)
        offset += x.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the buffer starts 8-byte aligned, as the reference does

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for x in arrays:
            f.write(x.tobytes())

    atomic_write(path, write)
    return path


def read_sharded(index, max_shards=1000):
    """Read the shards a model.safetensors.index.json names (files beside it) -> (merged tensors, the first
    shard's metadata); each tensor must come from the shard its weight_map names."""
    index = Path(index)
    try:
        wmap = json.loads(index.read_text(), object_pairs_hook=_no_duplicates)["weight_map"]
        shards = sorted(set(wmap.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise TinyViTError(f"{index}: not a safetensors index ({type(e).__name__}: {str(e)[:100]})") from None
    if not shards or len(shards) > max_shards or not all(isinstance(s, str) and "/" not in s and "\\" not in s
                                                          and s not in (".", "..") for s in shards):
        raise TinyViTError(f"{index}: weight_map names no usable shard files ({str(shards)[:80]})")
    tensors, metadata = {}, None
    for s in shards:
        part, md = read_safetensors(index.parent / s)
        metadata = md if metadata is None else metadata
        wrong = next((k for k in part if wmap.get(k) != s), None)
        if wrong is not None:
            raise TinyViTError(f"{index.parent / s}: holds {wrong}, which {index.name} places in {wmap.get(wrong)}")
        tensors.update(part)
    lacking = sorted(set(wmap) - set(tensors))
    if lacking:
        raise TinyViTError(f"{index}: names tensors no shard holds: {lacking[:4]}")
    return tensors, metadata or {}
