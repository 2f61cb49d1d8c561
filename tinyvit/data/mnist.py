"""MNIST: the four IDX files (gzip or plain), found or downloaded, checked."""
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import TinyViTError
from .cifar10 import read_maybe_gz
from .download import _DATA_HINT, fetch

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
MNIST_URLS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
MNIST_FILES = {  # name -> md5 of the .gz (the values torchvision checks)
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}


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
