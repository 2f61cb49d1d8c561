"""Datasets (MNIST, CIFAR-10): find or download, validate, and batch on the backend with augmentation."""
import functools
import hashlib
import http.client
import math
import os
import struct
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from . import cifar
from .augment import affine, random_affine
from .backend import get_array_module
from .dist import shard_bounds
from .cifar import CIFAR10_CLASSES, read_maybe_gz
from .errors import TinyViTError

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)  # train set, per channel (R, G, B)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
MNIST_URLS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
MNIST_FILES = {  # name -> md5 of the .gz (the values torchvision checks)
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
_NET_ERRORS = (OSError, http.client.HTTPException, ValueError)  # URLError/timeouts are OSError
_DATA_HINT = "or point --data-dir / TINYVIT_DATA at the folder that holds"


def data_root(data_dir=None) -> Path:
    """data_dir if given, else $TINYVIT_DATA, else $XDG_CACHE_HOME/tinyvit or ~/.cache/tinyvit."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("TINYVIT_DATA"):
        return Path(os.environ["TINYVIT_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "tinyvit"


# --- download -----------------------------------------------------------------------------------
def _progress(done, total, name):
    """One stderr progress line, rewritten in place."""
    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
    sys.stderr.write(f"\rdownloading {name}: {size}")
    sys.stderr.flush()


def _download_one(url, dest, md5):
    """Stream url into a temp file beside dest, check its md5, then os.replace it into place."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    shown = None
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=30) as resp:
            headers = getattr(resp, "headers", None)
            total = int(headers.get("Content-Length") or 0) if headers is not None else 0
            done = 0
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if done * 20 // max(total, 1) != shown or not total:
                    shown = done * 20 // max(total, 1)
                    _progress(done, total, dest.name)
        if h.hexdigest() != md5:
            raise ValueError(f"md5 mismatch from {url}: got {h.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        if shown is not None:
            sys.stderr.write("\n")  # end the progress line, also when the download broke off
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(urls, dest, md5, hint):
    """Download dest (from the first mirror in urls that works, md5-checked, atomically); return it.

    On failure raise one TinyViTError: which mirrors failed and `hint` (what to put where)."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TinyViTError(f"cannot create {dest.parent} ({e.strerror or e}); {hint}") from None
    reasons = []
    for base in urls:
        url = base if base.endswith(dest.name) else base + dest.name
        try:
            _download_one(url, dest, md5)
            return dest
        except _NET_ERRORS as e:
            reasons.append(f"{url}: {getattr(e, 'reason', None) or e}")
    raise TinyViTError(f"cannot download {dest.name} ({'; '.join(reasons)}); {hint}")


# --- MNIST --------------------------------------------------------------------------------------
def _parse_idx(data, path, magic, ndim):
    """The uint8 array in an IDX file's bytes, after checking magic number and size."""
    hdr = 4 * (1 + ndim)
    if len(data) == 0:
        raise TinyViTError(f"{path}: empty file")
    if len(data) < hdr:
        raise TinyViTError(f"{path}: {len(data)} bytes is too short for an IDX header")
    m, *dims = struct.unpack(f">{1 + ndim}I", data[:hdr])
    if m != magic:
        raise TinyViTError(f"{path}: bad magic number {m}, expected {magic} "
                           f"({'images' if magic == 2051 else 'labels'} IDX file)")
    expected = hdr + math.prod(dims)  # Python ints: int64 would wrap for absurd headers
    if len(data) != expected:
        raise TinyViTError(f"{path}: {len(data)} bytes but the header {tuple(dims)} says {expected} "
                           f"({'truncated' if len(data) < expected else 'trailing bytes'})")
    return np.frombuffer(data, np.uint8, offset=hdr).reshape(dims).copy()


def load_mnist(root, split="train", download=True):
    """MNIST (images uint8 (N, 28, 28), labels int64 (N,)) from <root>/mnist/ IDX files (.gz or raw)."""
    if split not in ("train", "test"):
        raise TinyViTError(f"unknown MNIST split {split!r}: choose 'train' or 'test'")
    folder = Path(root) / "mnist"
    stems = [f"{'train' if split == 'train' else 't10k'}-{kind}" for kind in
             ("images-idx3-ubyte", "labels-idx1-ubyte")]

    def find(stem):
        return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)

    missing = [s for s in stems if find(s) is None]
    if missing:
        hint = (f"put {', '.join(s + '.gz' for s in missing)} (gzip or uncompressed) in {folder}, "
                f"{_DATA_HINT} mnist/")
        if not download:
            raise TinyViTError(f"MNIST {split} files missing; {hint}")
        for s in missing:
            fetch(MNIST_URLS, folder / f"{s}.gz", MNIST_FILES[s], hint)
    img_path, lab_path = find(stems[0]), find(stems[1])
    images = _parse_idx(read_maybe_gz(img_path), img_path, 2051, 3)
    if images.shape[1:] != (28, 28):
        raise TinyViTError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    labels = _parse_idx(read_maybe_gz(lab_path), lab_path, 2049, 1).astype(np.int64)
    if len(labels) != len(images):
        raise TinyViTError(f"{lab_path}: {len(labels)} labels but {img_path.name} has {len(images)} images")
    if labels.size and labels.max() > 9:
        i = int(np.argmax(labels > 9))
        raise TinyViTError(f"{lab_path}: label {labels[i]} at index {i} is outside 0..9")
    return images, labels


# --- CIFAR-10 -----------------------------------------------------------------------------------
def load_cifar10(root, split="train", download=True, limit=None):
    """CIFAR-10 (images uint8 (N, 3, 32, 32), labels int64 (N,), class names) from <root>/cifar10/.

    Sources, first found wins: cifar-10-batches-bin/*.bin[.gz], cifar-10-binary.tar.gz,
    cifar-10-batches-py/ (pickles, read with an allow-list); else download the binary tar.gz.
    limit=N reads only the binary batches that hold the first N images (and needs only those)."""
    stems = cifar.batch_names(split)
    if limit is not None:
        stems = stems[:max(1, -(-int(limit) // cifar.RECORDS_PER_BATCH))]
    folder = Path(root) / "cifar10"
    bin_dir, tar_path, py_dir = folder / cifar.BIN_DIR, folder / cifar.TAR_NAME, folder / cifar.PY_DIR
    bins = [next((p for p in (bin_dir / f"{s}.bin", bin_dir / f"{s}.bin.gz") if p.is_file()), None)
            for s in stems]
    if all(bins):
        meta = bin_dir / "batches.meta.txt"
        names = cifar.parse_class_names(meta.read_bytes(), meta) if meta.is_file() else None
        return _stack(((p, read_maybe_gz(p)) for p in bins), len(stems)) + (names or CIFAR10_CLASSES,)
    if not tar_path.is_file() and not all((py_dir / s).is_file() for s in stems):
        listed = ", ".join(f"{s}.bin" for s in stems)
        hint = (f"put {cifar.BIN_DIR}/{{{listed}}} (each .bin or .bin.gz, plus batches.meta.txt), "
                f"or {cifar.TAR_NAME}, in {folder}, {_DATA_HINT} cifar10/")
        if not download:
            raise TinyViTError(f"CIFAR-10 {split} files missing; {hint}")
        fetch(cifar.TAR_URLS, tar_path, cifar.TAR_MD5, hint)
    if tar_path.is_file():
        batches, meta = cifar.read_tar(tar_path, split)
        names = cifar.parse_class_names(meta, f"{tar_path}:batches.meta.txt") if meta else None
        return _stack(batches[:len(stems)], len(stems)) + (names or CIFAR10_CLASSES,)
    images = np.empty((len(stems) * cifar.RECORDS_PER_BATCH, 3, 32, 32), np.uint8)
    labels = np.empty(len(images), np.int64)
    for i, s in enumerate(stems):
        sl = slice(i * cifar.RECORDS_PER_BATCH, (i + 1) * cifar.RECORDS_PER_BATCH)
        images[sl], labels[sl] = cifar.parse_py_batch(py_dir / s)
    meta = py_dir / "batches.meta"
    return images, labels, cifar.parse_py_meta(meta) if meta.is_file() else list(CIFAR10_CLASSES)


def _stack(batches, n_batches):
    """Parse (name, bytes) binary batches into one preallocated (images, labels) pair."""
    r = cifar.RECORDS_PER_BATCH
    images = np.empty((n_batches * r, 3, 32, 32), np.uint8)
    labels = np.empty(n_batches * r, np.int64)
    for i, (name, data) in enumerate(batches):
        images[i * r:(i + 1) * r], labels[i * r:(i + 1) * r] = cifar.parse_records(data, name)
    return images, labels


# --- batching -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _interp_matrix(n_in, n_out, dtype):
    """(n_out, n_in) bilinear weights by torch's align_corners=False rule (no antialias), in dtype's
    precision (float32 or float64) as torch computes them, so results agree to rounding."""
    t = np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32).type
    scale = t(n_in) / t(n_out)
    # torch's scale * (i + 0.5) - 0.5 compiles to one fused multiply-add: exact in float64, one
    # rounding to t (for float64 the plain expression is within an ulp of that)
    src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(t)
    src = np.maximum(src, t(0))  # clamp at 0 like torch
    i0 = src.astype(np.int64)  # floor, src >= 0
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(t), 0, 1)
    r = np.zeros((n_out, n_in), t)
    np.add.at(r, (np.arange(n_out), i0), t(1) - w1)
    np.add.at(r, (np.arange(n_out), i1), w1)
    r.setflags(write=False)
    return r


def bilinear_resize(x, size):
    """Resize NCHW float x to size (int or (h, w)): out = Ry @ x @ Rx.T, like F.interpolate bilinear."""
    xp = get_array_module(x)
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if x.ndim != 4 or x.dtype.kind != "f":
        raise TinyViTError(f"bilinear_resize takes a float NCHW array, got {x.dtype} {x.shape}")
    ry = xp.asarray(_interp_matrix(x.shape[2], h, x.dtype), dtype=x.dtype)  # (h, H)
    rx = xp.asarray(_interp_matrix(x.shape[3], w, x.dtype), dtype=x.dtype)  # (w, W)
    return xp.matmul(xp.matmul(ry, x), rx.T)  # (N, C, h, W) -> (N, C, h, w)


def _translate(x, dy, dx, pad, flip=None):
    """out[b, :, i, j] = x[b, :, i - dy[b], j - dx[b]] (zero outside), mirrored in j where flip[b]."""
    xp = get_array_module(x)
    b, c, h, w = x.shape
    xpad = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))  # (B, C, H + 2p, W + 2p), zero fill
    cols = xp.arange(w)
    if flip is not None:
        cols = xp.where(xp.asarray(flip)[:, None], w - 1 - cols, cols)  # (B, W)
    rows = xp.asarray(pad - dy)[:, None] + xp.arange(h)  # (B, H)
    cols = xp.asarray(pad - dx)[:, None] + cols  # (B, W)
    return xpad[xp.arange(b)[:, None, None, None], xp.arange(c)[None, :, None, None],
                rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def normaliser(mean, std, xp, dtype):
    """(scale, shift), each (1, C, 1, 1) on xp, with uint8 pixels * scale + shift = (x / 255 - mean) / std."""
    scale = xp.asarray(1.0 / (255.0 * np.asarray(std, np.float64)), dtype=dtype).reshape(1, -1, 1, 1)
    shift = xp.asarray(-np.asarray(mean, np.float64) / np.asarray(std, np.float64), dtype=dtype).reshape(1, -1, 1, 1)
    return scale, shift


def num_batches(n, batch_size, drop_last=False):
    """How many batches iterate_batches yields for n images."""
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(images, labels, batch_size, xp, *, mean, std, shuffle=True, seed=0, epoch=0,
                    drop_last=False, augment=None, img_size=None, dtype=np.float32,
                    max_shift=2, crop_pad=4, start_batch=0, shard=(0, 1)):
    """Yield (x float NCHW, y int64) on xp for one epoch; order and augmentation depend only on
    (seed, epoch). augment: None, 'shift' (±max_shift px, zero fill), 'crop_flip' (random crop
    from a zero-padded image, crop_pad px each side, and horizontal flip with p=0.5) or 'affine'
    (rotation ±10°, scale 0.9-1.1, shift ±max_shift px, bilinear, zero fill: tinyvit.augment). img_size
    resizes bilinearly after augmentation. start_batch skips batches (resuming mid-epoch).
    shard=(rank, size) yields this rank's part of each batch (data-parallel ranks, tinyvit.dist):
    the positions, and so the augmentation each image gets, are those of the whole batch."""
    n = len(images)
    if images.ndim not in (3, 4) or len(labels) != n:
        raise TinyViTError(f"images must be (N, H, W) or (N, C, H, W) with one label each, "
                           f"got {images.shape} and {len(labels)} labels")
    if int(batch_size) < 1:
        raise TinyViTError(f"batch_size must be >= 1, got {batch_size}")
    if augment not in (None, "shift", "crop_flip", "affine"):
        raise TinyViTError(f"unknown augment {augment!r}: choose None, 'shift', 'crop_flip' or 'affine'")
    c = 1 if images.ndim == 3 else images.shape[1]
    if len(mean) != c or len(std) != c:
        raise TinyViTError(f"mean/std need {c} values (one per channel), got {len(mean)}/{len(std)}")
    if not (np.isfinite(np.asarray(mean, np.float64)).all() and (np.asarray(std, np.float64) > 0).all()
            and np.isfinite(np.asarray(std, np.float64)).all()):
        raise TinyViTError(f"mean/std must be finite with std > 0, got mean {tuple(mean)}, std {tuple(std)}")
    scale, shift = normaliser(mean, std, xp, dtype)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    aug_rng = np.random.default_rng([seed, epoch, 1])  # per position in the epoch, all drawn now
    pad = max_shift if augment == "shift" else crop_pad
    maps = random_affine(aug_rng, n, translate=max_shift) if augment == "affine" else None
    dy, dx = aug_rng.integers(-pad, pad + 1, size=(2, n)) if augment in ("shift", "crop_flip") else (None, None)
    flip = aug_rng.random(n) < 0.5 if augment == "crop_flip" else None
    on_host = get_array_module(images) is np
    labels = np.asarray(labels) if isinstance(labels, (list, tuple)) else labels
    labels_on_host = get_array_module(labels) is np
    stop = num_batches(n, batch_size, drop_last) * batch_size
    for start in range(start_batch * batch_size, stop, batch_size):
        sl = slice(*shard_bounds(start, min(start + batch_size, n), shard))
        idx = order[sl]
        x = xp.asarray(images[idx] if on_host else images[xp.asarray(idx)])  # uint8, one batch
        if x.ndim == 3:
            x = x[:, None]  # (B, 1, H, W)
        if augment in ("shift", "crop_flip"):
            x = _translate(x, dy[sl], dx[sl], pad, None if flip is None else flip[sl])
        x = x.astype(dtype)
        if maps is not None:
            x = affine(x, maps[sl])  # on pixel values: what leaves the frame is black
        x = x * scale + shift  # (x / 255 - mean) / std
        if img_size is not None and tuple(x.shape[2:]) != (img_size, img_size):
            x = bilinear_resize(x, img_size)
        y = labels[idx] if labels_on_host else labels[xp.asarray(idx)]
        yield x, xp.asarray(y).astype(xp.int64)
