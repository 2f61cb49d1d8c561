"""Batches on the backend: one batch plan (epoch order, MPI shards), one normalisation rule, the
array dataset (MNIST, CIFAR-10 in memory)."""
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ..backend import get_array_module
from ..errors import TinyViTError
from .augment import _translate, affine, bilinear_resize, random_affine


def shard_bounds(start, end, shard):
    """(a, b): rank's part [a, b) of the global batch [start, end), for shard = (rank, size)."""
    rank, size = shard
    return start + (end - start) * rank // size, start + (end - start) * (rank + 1) // size


@dataclass
class ArrayDataset:
    """Images (uint8, N[C]HW) and labels on the host, with the normalisation the model expects."""

    images: np.ndarray
    labels: np.ndarray
    mean: tuple
    std: tuple
    img_size: int = None  # resize to this side, or (h, w), on the backend (None: as stored)

    def batches(self, batch_size, xp, **kw):
        """iterate_batches over these images (tinyvit.data.loader.FolderDataset answers the same call)."""
        return iterate_batches(self.images, self.labels, batch_size, xp, mean=self.mean, std=self.std,
                               img_size=self.img_size, **kw)

    def fingerprint(self) -> str:
        """A digest of the images, labels and normalisation (as FolderDataset.fingerprint)."""
        h = hashlib.blake2b(digest_size=16)
        for a in (self.images, self.labels):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a)  # the buffer itself: no copy
        h.update(json.dumps([list(self.mean), list(self.std), self.img_size]).encode())
        return h.hexdigest()


def _hw(size):
    """(h, w) of a side or an (h, w)."""
    return (size, size) if isinstance(size, (int, np.integer)) else tuple(size)


def normaliser(mean, std, xp, dtype):
    """(scale, shift), each (1, C, 1, 1) on xp, with uint8 pixels * scale + shift = (x / 255 - mean) / std."""
    scale = xp.asarray(1.0 / (255.0 * np.asarray(std, np.float64)), dtype=dtype).reshape(1, -1, 1, 1)
    shift = xp.asarray(-np.asarray(mean, np.float64) / np.asarray(std, np.float64), dtype=dtype).reshape(1, -1, 1, 1)
    return scale, shift


def num_batches(n, batch_size, drop_last=False):
    """How many batches iterate_batches yields for n images."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batch_plan(n, batch_size, *, shuffle=True, seed=0, epoch=0, drop_last=False, start_batch=0, shard=(0, 1)):
    """An epoch's batches as (positions, image indices): the order seeded by (seed, epoch), cut into
    batches from start_batch on, each this rank's part (shard=(rank, size)). The positions (a slice
    of the epoch's order) index the per-position augmentation, the same on every rank."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for start in range(start_batch * batch_size, num_batches(n, batch_size, drop_last) * batch_size, batch_size):
        sl = slice(*shard_bounds(start, min(start + batch_size, n), shard))
        yield sl, order[sl]


def iterate_batches(images, labels, batch_size, xp, *, mean, std, shuffle=True, seed=0, epoch=0,
                    drop_last=False, augment=None, img_size=None, dtype=np.float32,
                    max_shift=2, crop_pad=4, start_batch=0, shard=(0, 1)):
    """Yield (x float NCHW, y int64) on xp for one epoch; order and augmentation depend only on
    (seed, epoch). augment: None, 'shift' (±max_shift px, zero fill), 'crop_flip' (random crop
    from a zero-padded image, crop_pad px each side, and horizontal flip with p=0.5) or 'affine'
    (rotation ±10°, scale 0.9-1.1, shift ±max_shift px, bilinear, zero fill: tinyvit.data.augment). img_size
    resizes bilinearly after augmentation. start_batch skips batches (resuming mid-epoch).
    shard=(rank, size) yields this rank's part of each batch (data-parallel ranks, tinyvit.train.dist):
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
    aug_rng = np.random.default_rng([seed, epoch, 1])  # per position in the epoch, all drawn now
    pad = max_shift if augment == "shift" else crop_pad
    maps = random_affine(aug_rng, n, translate=max_shift) if augment == "affine" else None
    dy, dx = aug_rng.integers(-pad, pad + 1, size=(2, n)) if augment in ("shift", "crop_flip") else (None, None)
    flip = aug_rng.random(n) < 0.5 if augment == "crop_flip" else None
    on_host = get_array_module(images) is np
    labels = np.asarray(labels) if isinstance(labels, (list, tuple)) else labels
    labels_on_host = get_array_module(labels) is np
    for sl, idx in batch_plan(n, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last,
                              start_batch=start_batch, shard=shard):
        x = xp.asarray(images[idx] if on_host else images[xp.asarray(idx)])  # uint8, one batch
        if x.ndim == 3:
            x = x[:, None]  # (B, 1, H, W)
        if augment in ("shift", "crop_flip"):
            x = _translate(x, dy[sl], dx[sl], pad, None if flip is None else flip[sl])
        x = x.astype(dtype)
        if maps is not None:
            x = affine(x, maps[sl])  # on pixel values: what leaves the frame is black
        x = x * scale + shift  # (x / 255 - mean) / std
        if img_size is not None and tuple(x.shape[2:]) != _hw(img_size):
            x = bilinear_resize(x, img_size)
        y = labels[idx] if labels_on_host else labels[xp.asarray(idx)]
        yield x, xp.asarray(y).astype(xp.int64)


@dataclass
class TokenDataset:
    """Cached tokens (N, T, C), e.g. memory-mapped float16, and their labels: the input of the blocks
    that train in partial fine-tuning (fit's dataset API, as ArrayDataset; no augmentation applies)."""

    tokens: np.ndarray
    labels: np.ndarray

    def batches(self, batch_size, xp, *, shuffle=True, seed=0, epoch=0, drop_last=False, augment=None,
                start_batch=0, dtype=np.float32, shard=(0, 1)):
        """Yield (tokens in dtype, y int64) on xp in batch_plan's order (the order ArrayDataset's batches take)."""
        if augment not in (None, "none"):
            raise TinyViTError(f"cached tokens take no augmentation (got {augment!r}): they were computed once")
        for _, idx in batch_plan(len(self.labels), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                 drop_last=drop_last, start_batch=start_batch, shard=shard):
            x = xp.asarray(np.asarray(self.tokens[idx], dtype=dtype))  # rows read from the file, then cast
            yield x, xp.asarray(self.labels[idx]).astype(xp.int64)
