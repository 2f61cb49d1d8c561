"""Batches from image files, decoded in background threads with a bounded prefetch.

Evaluation applies the checkpoint's eval transform (tinyvit.data.decode.eval_resize: by default the
shorter side to img_size / crop_pct, bicubic, and the centre img_size, as timm evaluates); training takes a random-resized crop (area 8-100%, aspect 3/4-4/3, as torchvision's
RandomResizedCrop) and a horizontal flip with p = 0.5. Each image's crop depends only on (seed,
epoch, position), so runs and resumes repeat exactly whatever the threads' timing. Pillow decodes
and resizes with the GIL released, so the threads use every core while the model waits least.
"""
import hashlib
import json
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import TinyViTError
from .batches import batch_plan, normaliser
from .decode import MAX_PIXELS, model_pixels, open_image
from .folders import ImageList, Warnings


def random_resized_box(w, h, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box (left, top, right, bottom): 10 tries, then a centre crop."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return (x0, y0, x0 + cw, y0 + ch)
    r = w / h  # fallback: the whole image, clamped to the aspect range, centred
    cw, ch = (w, round(w / min(r, ratio[1]))) if r > ratio[1] else (round(h * max(r, ratio[0])), h)
    cw, ch = min(cw, w), min(ch, h)
    return ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)


def decode(path, size, channels=3, crop_pct=0.875, rng=None, resize="shortest_edge", interpolation="bicubic"):
    """One image file -> uint8 (C, size, size): the eval transform (decode.model_pixels, as predict.py
    and the exports), or (rng given) the train one: a random resized crop, then a flip with p = 0.5."""
    img = open_image(path, MAX_PIXELS)
    box = None if rng is None else random_resized_box(*img.size, rng)
    x = model_pixels(img, size, channels, path, box, resize=resize, crop_pct=crop_pct, interpolation=interpolation)
    if rng is not None and rng.random() < 0.5:
        x = x[:, ::-1]
    return np.rint(x * 255.0).astype(np.uint8).transpose(2, 0, 1)


class FolderDataset:
    """An ImageList decoded on the fly, with the normalisation the model expects (fit's dataset API, as data.batches.ArrayDataset)."""

    def __init__(self, images: ImageList, img_size, mean, std, channels=3, crop_pct=0.875, workers=2,
                 warn=None, resize="shortest_edge", interpolation="bicubic"):
        if not 0.0 < crop_pct <= 1.0:
            raise TinyViTError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.images, self.img_size, self.mean, self.std = images, img_size, tuple(mean), tuple(std)
        self.channels, self.crop_pct, self.workers = channels, crop_pct, max(1, int(workers))
        self.resize, self.interpolation = resize, interpolation
        self.warn = warn or Warnings()
        self.decoded = 0  # images decoded so far (for rate reports)

    @property
    def labels(self):
        return self.images.labels

    def fingerprint(self) -> str:
        """A digest of what the eval-transform pixels depend on: each file's path, size, times and
        inode (a renamed or swapped file changes them), the labels and the transform."""
        h = hashlib.blake2b(digest_size=16)
        for path in self.images.paths:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
        h.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        h.update(json.dumps([self.img_size if isinstance(self.img_size, int) else repr(self.img_size), self.mean, self.std, self.channels, self.crop_pct, self.resize,
                             self.interpolation]).encode())
        return h.hexdigest()

    def _decode_batch(self, idx, train, seed, epoch, first):
        """(uint8 images, kept indices, [(path, why)]) for one batch; runs on a worker thread."""
        xs, kept, bad = [], [], []
        for j, i in enumerate(idx):
            path = self.images.paths[i]
            rng = np.random.default_rng([seed, epoch, 2, first + j]) if train else None
            try:
                xs.append(decode(path, self.img_size, self.channels, self.crop_pct, rng, self.resize,
                                 self.interpolation))
                kept.append(i)
            except TinyViTError as e:
                bad.append((path, str(e).removeprefix(f"{path}: ")))
        return xs, kept, bad

    def batches(self, batch_size, xp, *, shuffle=True, seed=0, epoch=0, drop_last=False, augment=None,
                start_batch=0, dtype=np.float32, shard=(0, 1)):
        """Yield (x float NCHW normalised, y int64) on xp; augment (anything but None/'none') trains.
        shard=(rank, size): this rank's part of each batch, with the whole batch's crops."""
        train = augment not in (None, "none")
        scale, shift = normaliser(self.mean, self.std, xp, dtype)
        todo = batch_plan(len(self.images), batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                          drop_last=drop_last, start_batch=start_batch, shard=shard)
        with ThreadPoolExecutor(self.workers) as pool:
            pending = deque()

            def submit():
                sl, order = next(todo, (None, None))
                if sl is not None:
                    idx = [i for i in order if self.images.paths[i] not in self.images.bad]
                    pending.append(pool.submit(self._decode_batch, idx, train, seed, epoch, sl.start))

            for _ in range(self.workers + 1):  # a bounded prefetch: decoded batches wait, at most this many
                submit()
            while pending:
                xs, kept, bad = pending.popleft().result()
                submit()
                for path, why in bad:
                    self.images.bad[path] = why
                    self.warn(path, why)
                if not kept:
                    continue
                self.decoded += len(kept)
                shapes = {}  # one batch per image shape (an InputSize keeping each image's aspect)
                for j, a in enumerate(xs):
                    shapes.setdefault(a.shape, []).append(j)
                for js in shapes.values():
                    x = xp.asarray(np.stack([xs[j] for j in js])).astype(dtype) * scale + shift  # (x / 255 - mean) / std
                    yield x, xp.asarray(self.images.labels[[kept[j] for j in js]])
