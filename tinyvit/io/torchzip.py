"""Read PyTorch's zip checkpoints (torch.save, torch >= 1.6) into NumPy without torch or foreign code.

A checkpoint is a zip of `<archive>/data.pkl` (a pickle describing the object, whose tensors refer
to storages by key) and `<archive>/data/<key>` (each storage's raw bytes, in the byte order named
by `<archive>/byteorder`, little when absent). The pickle is read by an Unpickler whose find_class
only knows the names torch writes for tensors, storages, dtypes and OrderedDict, each mapped to our
own NumPy-building code; any other global (os.system, builtins.eval, ...) is refused, so nothing
from the file is ever executed.
"""
import collections
import io
import math
import pickle
import struct
import zipfile
import zlib

import numpy as np

from ..errors import TinyViTError, input_file
from .safetensors import bf16_to_float32

_MAX_EXPANDED = 1 << 24  # elements a view may have beyond its storage's (expand()ed tensors copy)
BF16 = "bfloat16"  # marker: raw uint16 bits, widened to float32 when the storage is read
_STORAGES = {  # torch storage class name -> element type
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": BF16,
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "UntypedStorage": "u1",
}
_KINDS = {"f4", "f8", "f2", BF16, "i8", "i4", "i2", "i1", "u1", "?", "u2", "u4", "u8"}
_TORCH_DTYPES = {  # torch dtype name -> element type (for _rebuild_tensor_v3's dtype argument)
    "float32": "f4", "float64": "f8", "float16": "f2", "bfloat16": BF16, "int64": "i8",
    "int32": "i4", "int16": "i2", "int8": "i1", "uint8": "u1", "bool": "?", "uint16": "u2",
    "uint32": "u4", "uint64": "u8",
}


class _Storage:
    """A storage type named in the pickle (torch.FloatStorage, ...), or a dtype (torch.float32)."""

    def __init__(self, name, kind):
        self.name, self.kind = name, kind


class _StorageData:
    """One storage's raw bytes (byte order `order`) and element type, as read from the archive."""

    def __init__(self, raw, kind, order):
        self.raw, self.kind, self.order, self.views = raw, kind, order, {}

    def elements(self, kind, source):
        """The bytes as a flat array of `kind` elements (bfloat16 widened to float32), cached."""
        if kind not in _KINDS:
            raise TinyViTError(f"{source}: unsupported element type {kind!r}")
        if kind not in self.views:
            dt = np.dtype("u2" if kind == BF16 else kind).newbyteorder(self.order)
            if len(self.raw) % dt.itemsize:
                raise TinyViTError(f"{source}: storage of {len(self.raw)} bytes is not a whole number "
                                   f"of {kind} elements")
            x = np.frombuffer(self.raw, dtype=dt).astype(dt.newbyteorder("="), copy=False)
            self.views[kind] = bf16_to_float32(x) if kind == BF16 else x
        return self.views[kind]


def _strided(flat, offset, size, stride, source):
    """flat[offset:] viewed with torch's size/stride, bounds-checked, copied to a fresh array."""
    try:
        offset, size, stride = int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    except (TypeError, ValueError):
        raise TinyViTError(f"{source}: malformed tensor record (offset/size/stride)") from None
    if not isinstance(flat, np.ndarray) or flat.dtype.kind not in "fiub":
        raise TinyViTError(f"{source}: malformed tensor record (storage)")
    flat = np.ascontiguousarray(flat).reshape(-1)  # bounds below hold for this exact buffer
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise TinyViTError(f"{source}: bad tensor geometry size={size} stride={stride} offset={offset}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise TinyViTError(f"{source}: tensor of size {size} stride {stride} offset {offset} "
                               f"reads past its storage of {flat.size} elements")
        numel = math.prod(size)
        if numel > max(flat.size, _MAX_EXPANDED):  # stride-0 views: a few bytes could claim terabytes
            raise TinyViTError(f"{source}: tensor of size {size} would expand its storage of {flat.size} "
                               f"elements to {numel} (broadcast views over {_MAX_EXPANDED} elements are refused)")
        x = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                            strides=tuple(s * flat.itemsize for s in stride), writeable=False)
        return np.array(x)  # copy: contiguous, writable, independent of the storage
    return np.zeros(size, dtype=flat.dtype)


class _SafeUnpickler(pickle._Unpickler):  # noqa: SLF001 (pure Python: a dict memo, see cifar.py)
    """Unpickler for torch's data.pkl that can build tensors, dicts and plain values, nothing else."""

    def __init__(self, data, zf, prefix, order, source):
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix, self.order, self.source = zf, prefix, order, source
        self.storages = {}

    def find_class(self, module, name):
        """Map the few globals torch writes onto our own functions; refuse everything else."""
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_tensor":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return self._rebuild_tensor_v3
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return self._rebuild_parameter
        if module in ("torch", "torch.storage") and name in _STORAGES:
            return _Storage(name, _STORAGES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _Storage(name, _TORCH_DTYPES[name])
        if module == "torch" and name.startswith(("float8", "complex", "qint", "quint", "bits")):
            raise TinyViTError(f"{self.source}: tensor dtype torch.{name} is not supported")
        raise TinyViTError(f"{self.source}: refusing to load {module}.{name} from the pickle "
                           f"(only tensors, dicts and plain values are allowed)")

    def persistent_load(self, pid):
        """('storage', type, key, location, numel) -> the storage's bytes, read once per key."""
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _Storage) or not isinstance(pid[2], str)):
            raise TinyViTError(f"{self.source}: unsupported persistent record {str(pid)[:80]}")
        _, stype, key, _, numel = pid
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                raw = self.zf.read(name)
            except KeyError:
                raise TinyViTError(f"{self.source}: storage {name} is missing from the archive") from None
            item = 2 if stype.kind == BF16 else np.dtype(stype.kind).itemsize
            if not isinstance(numel, int) or numel * item != len(raw):
                raise TinyViTError(f"{self.source}: storage {name} has {len(raw)} bytes, "
                                   f"expected {numel} x {item}")
            self.storages[key] = _StorageData(raw, stype.kind, self.order)
        return self.storages[key]

    def _check(self, storage):
        if not isinstance(storage, _StorageData):
            raise TinyViTError(f"{self.source}: malformed tensor record (no storage)")

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *_):
        """torch._utils._rebuild_tensor[_v2](storage, offset, size, stride, requires_grad, hooks, ...)."""
        self._check(storage)
        return _strided(storage.elements(storage.kind, self.source), storage_offset, size, stride, self.source)

    _rebuild_tensor_v2 = _rebuild_tensor

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_):
        """Like v2, for an untyped (byte) storage whose element type comes as a dtype argument."""
        self._check(storage)
        if not isinstance(dtype, _Storage):
            raise TinyViTError(f"{self.source}: malformed tensor record (dtype)")
        return _strided(storage.elements(dtype.kind, self.source), storage_offset, size, stride, self.source)

    def _rebuild_parameter(self, data, *_):
        """torch._utils._rebuild_parameter(data, requires_grad, hooks[, state]) -> data."""
        if not isinstance(data, np.ndarray):
            raise TinyViTError(f"{self.source}: malformed parameter record")
        return data


def load_torch_zip(path):
    """The object saved by torch.save at path, with every tensor as a NumPy array."""
    path = input_file(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # e.g. a "multi-disk" end record: a zip, corrupt (reported below)
        is_zip = True
    if not is_zip:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            raise TinyViTError(f"{path}: legacy (pre-1.6, non-zip) torch.save format is not supported; "
                               f"re-save it with a recent torch: torch.save(torch.load(f), f)")
        raise TinyViTError(f"{path}: not a PyTorch checkpoint (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            pkls = [n for n in pkls if n.count("/") <= 1]
            if len(pkls) != 1:
                raise TinyViTError(f"{path}: not a torch.save archive (found {len(pkls)} data.pkl records)")
            prefix = pkls[0][:-len("data.pkl")]
            order = "<"
            if prefix + "byteorder" in zf.namelist():
                bo = zf.read(prefix + "byteorder").strip()
                if bo not in (b"little", b"big"):
                    raise TinyViTError(f"{path}: unknown byteorder record {bo[:20]!r}")
                order = "<" if bo == b"little" else ">"
            unpickler = _SafeUnpickler(zf.read(pkls[0]), zf, prefix, order, path)
            return unpickler.load()
    except TinyViTError:
        raise
    except (pickle.UnpicklingError, AttributeError, TypeError, ValueError, IndexError, KeyError,
            RecursionError, MemoryError, OverflowError, struct.error) as e:
        raise TinyViTError(f"{path}: corrupt pickle in PyTorch archive ({type(e).__name__}: "
                           f"{' '.join(str(e).split())})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error,
            NotImplementedError, RuntimeError) as e:  # last two: unknown zip method, encrypted member
        raise TinyViTError(f"{path}: corrupt or truncated PyTorch archive ({type(e).__name__}: "
                           f"{' '.join(str(e).split())})") from None
