"""Checkpoints: one .npz (no pickle) holding params, optional optimizer state, and JSON metadata."""
import json
import math
import zipfile
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..errors import TinyViTError, describe_os_error, input_file
from ..nn.model import ViTConfig, param_shapes
from .filekind import NAMES, file_kind, head
from .files import atomic_write

FORMAT = "tinyvit-checkpoint"
VERSION = 1
_META = "__meta__"  # JSON bytes stored as a uint8 array
_PARAM, _OPT = "param/", "opt/"


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


def read_npz(path, what="checkpoint"):
    """All arrays of an untrusted .npz, without pickle; any failure is a TinyViTError naming the file."""
    path = input_file(path, f"{what} file")
    kind = file_kind(path)
    if kind in ("safetensors", "torch"):  # np.load would call a zip of torch's "corrupt", the rest "pickled"
        raise TinyViTError(f"{path}: is {NAMES[kind]}, not a tinyvit .npz {what}: convert it with "
                           f"scripts/convert_weights.py, or pass it where weights are read")
    if kind == "image":
        raise TinyViTError(f"{path}: is an image, not a tinyvit .npz {what}")
    if not head(path).startswith((b"PK", b"\x93NUMPY", b"\x80")):  # neither zip, .npy nor pickle
        raise TinyViTError(f"{path}: not an .npz {what} (no zip signature: another kind of file, or corrupt)")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise TinyViTError(f"{path}: not an .npz archive (a single .npy array?)")
        with z:
            arrays = {k: z[k] for k in z.files}
    except TinyViTError:
        raise
    except PermissionError as e:  # the system's fault, not the file's: say so, not "corrupt"
        raise TinyViTError(describe_os_error(e)) from None
    except ValueError as e:  # object arrays need pickle, which we refuse; bad .npy headers
        why = ("holds pickled (object) data, which tinyvit never loads from a file" if "pickle" in str(e)
               else " ".join(str(e).split()))
        raise TinyViTError(f"{path}: not a plain-array .npz ({why})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise TinyViTError(f"{path}: not a readable .npz {what} file (truncated or corrupt: {e})") from None
    except Exception as e:  # noqa: BLE001 (untrusted bytes): zlib, tokenize, unknown zip methods, MemoryError, ...
        raise TinyViTError(f"{path}: not a readable .npz {what} file (corrupt: {type(e).__name__}: "
                           f"{' '.join(str(e).split())})") from None
    bad = next((k for k, v in arrays.items() if not isinstance(v, np.ndarray)), None)
    if bad is not None:  # NpzFile hands back raw bytes for a member that is not an .npy
        raise TinyViTError(f"{path}: member {bad!r} of the .npz is not an .npy array (corrupt file)")
    return arrays


def _parse_meta(path, arrays):
    """Decode and check the JSON metadata record."""
    raw = arrays.get(_META)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise TinyViTError(f"{path}: not a tinyvit checkpoint (no metadata record)")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # bad JSON, 5000-digit ints, deep nesting
        raise TinyViTError(f"{path}: corrupt metadata ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
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


def _check_config(d, path):
    """Sizes in a stored config are positive ints and rates are finite numbers >= 0 (else ViTConfig
    could divide by zero, and param_shapes could loop over a forged depth of 10**12)."""
    if not isinstance(d, dict):
        raise TinyViTError(f"{path}: bad config in metadata (missing, or not a JSON object)")
    for k in ("img_size", "patch_size", "in_chans", "num_classes", "dim", "depth", "heads", "mlp_dim"):
        if k in d and (type(d[k]) is not int or d[k] < (0 if k == "depth" else 1)):
            raise TinyViTError(f"{path}: bad config in metadata ({k} = {str(d[k])[:40]}, expected a positive integer)")
    for k in ("ln_eps", "dropout", "attn_dropout"):
        if k in d and (type(d[k]) not in (int, float) or not math.isfinite(d[k]) or d[k] < 0):
            raise TinyViTError(f"{path}: bad config in metadata ({k} = {str(d[k])[:40]}, expected a number >= 0)")


def load_checkpoint(path):
    """Read a checkpoint: returns (params dict of NumPy arrays, ViTConfig, meta dict)."""
    arrays = read_npz(path)
    meta = _parse_meta(path, arrays)
    _check_config(meta.get("config"), path)
    try:
        cfg = ViTConfig.from_dict(meta["config"])
    except (KeyError, TypeError, TinyViTError) as e:
        raise TinyViTError(f"{path}: bad config in metadata ({e})") from None
    params = {k[len(_PARAM):]: v for k, v in arrays.items() if k.startswith(_PARAM)}
    if cfg.depth > len(params):  # a forged depth of 10**12: refuse before listing its names
        raise TinyViTError(f"{path}: config says depth {cfg.depth} but the file holds only {len(params)} "
                           f"parameter arrays")
    check_params(params, cfg, path)
    return params, cfg, meta


def load_optimizer_state(path):
    """The optimizer state stored in a training checkpoint ({} when there is none)."""
    arrays = read_npz(path)
    _parse_meta(path, arrays)
    return {k[len(_OPT):]: v for k, v in arrays.items() if k.startswith(_OPT)}


def read_meta(path):
    """A checkpoint's metadata alone, leaving its arrays on disk (any problem: load_checkpoint's message)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return _parse_meta(path, {_META: z[_META]})
    except Exception:  # noqa: BLE001 (untrusted bytes): the full reader names what is wrong
        return load_checkpoint(path)[2]
