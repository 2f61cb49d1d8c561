"""Checkpoints: one .npz (no pickle) holding params, optional optimizer state, and JSON metadata."""
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .backend import to_numpy
from .errors import TinyViTError
from .model import ViTConfig, param_shapes

FORMAT = "tinyvit-checkpoint"
VERSION = 1
_META = "__meta__"  # JSON bytes stored as a uint8 array
_PARAM, _OPT = "param/", "opt/"


def atomic_write(path, write_fn):
    """Write a file via write_fn(file_object) to a temp file beside it, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new, never half
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, params, cfg: ViTConfig, meta=None, opt_state=None, compress=False):
    """Atomically write params (+ optimizer state) and JSON metadata (config included) to an .npz."""
    meta = dict(meta or {})
    meta.update(file_format=FORMAT, file_version=VERSION, config=cfg.to_dict())
    arrays = {_PARAM + k: to_numpy(v) for k, v in params.items()}
    if opt_state:
        arrays.update({_OPT + k: to_numpy(v) for k, v in opt_state.items()})
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    saver = np.savez_compressed if compress else np.savez
    atomic_write(path, lambda f: saver(f, **arrays))
    return Path(path)


def _read_npz(path):
    """All arrays of an .npz, without pickle; any failure is a TinyViTError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TinyViTError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise TinyViTError(f"{path}: file is empty")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle, which we refuse
        raise TinyViTError(f"{path}: not a plain-array .npz ({e})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise TinyViTError(f"{path}: not a readable .npz checkpoint (truncated or corrupt: {e})") from None


def _parse_meta(path, arrays):
    """Decode and check the JSON metadata record."""
    raw = arrays.get(_META)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise TinyViTError(f"{path}: not a tinyvit checkpoint (no metadata record)")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyViTError(f"{path}: corrupt metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("file_format") != FORMAT:
        raise TinyViTError(f"{path}: not a tinyvit checkpoint (format marker missing)")
    if meta.get("file_version") != VERSION:
        raise TinyViTError(f"{path}: checkpoint version {meta.get('file_version')} is not supported (need {VERSION})")
    return meta


def check_params(params, cfg: ViTConfig, source):
    """Raise TinyViTError unless params has exactly cfg's keys and shapes, as float arrays."""
    want = param_shapes(cfg)
    missing, unexpected = sorted(set(want) - set(params)), sorted(set(params) - set(want))
    if missing or unexpected:
        raise TinyViTError(f"{source}: parameter names do not match the config: "
                           f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                           f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    for k, shape in want.items():
        v = params[k]
        if tuple(v.shape) != tuple(shape):
            raise TinyViTError(f"{source}: {k} has shape {tuple(v.shape)}, expected {tuple(shape)}")
        if v.dtype not in (np.float16, np.float32, np.float64):
            raise TinyViTError(f"{source}: {k} has dtype {v.dtype}, expected a float type")
        if not np.isfinite(v).all():
            raise TinyViTError(f"{source}: {k} holds NaN or Inf values")


def load_checkpoint(path):
    """Read a checkpoint: returns (params dict of NumPy arrays, ViTConfig, meta dict)."""
    arrays = _read_npz(path)
    meta = _parse_meta(path, arrays)
    try:
        cfg = ViTConfig.from_dict(meta["config"])
    except (KeyError, TypeError, TinyViTError) as e:
        raise TinyViTError(f"{path}: bad config in metadata ({e})") from None
    params = {k[len(_PARAM):]: v for k, v in arrays.items() if k.startswith(_PARAM)}
    check_params(params, cfg, path)
    return params, cfg, meta


def load_optimizer_state(path):
    """The optimizer state stored in a training checkpoint ({} when there is none)."""
    arrays = _read_npz(path)
    _parse_meta(path, arrays)
    return {k[len(_OPT):]: v for k, v in arrays.items() if k.startswith(_OPT)}
