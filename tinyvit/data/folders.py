"""Image-folder datasets (one folder per class) and Oxford-IIIT Pet: find, check, split and decode.

A folder dataset is DIR/train/<class>/* with DIR/val/<class>/* (or test/), or only DIR/<class>/*,
split by a seeded, stratified val_split. Classes are the sorted folder names that hold images (at
least 2 to train on); hidden files and folders (.DS_Store, .ipynb_checkpoints/) are not data, skipped.
Files are checked from their headers when the dataset is built: a non-image, an empty file, a tiny
image or a decompression bomb is named in one warning and skipped (strict: an error). Corrupt or
truncated pixel data shows only when decoded: the batch loader then warns and drops that image.
"""
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import TinyViTError
from .decode import MAX_PIXELS
from .download import fetch

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MIN_SIDE = 8  # smaller images carry no usable content for a 16-px-patch model
PETS_URLS = {"images.tar.gz": ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
                               "5c4f3ee8e5d25df40f4fd59a7f44e54c"),
             "annotations.tar.gz": ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
                                    "95a8c909bbe2e81eed6a22bccdf3f68f")}


@dataclass
class ImageList:
    """Image files with their class index, and the class names (shared by a dataset's splits)."""

    paths: list
    labels: np.ndarray
    classes: list
    bad: dict = field(default_factory=dict)  # path -> why, found while decoding

    def __len__(self):
        return len(self.paths)


class Warnings:
    """Unreadable files: one line each on stderr (the first `limit`), or an error when strict;
    count is the number of files named (each once)."""

    def __init__(self, strict=False, limit=50, stream=None):
        self.strict, self.limit = strict, limit
        self.stream = stream or sys.stderr
        self.named = set()

    @property
    def count(self) -> int:
        """Files named so far (each once)."""
        return len(self.named)

    def __call__(self, path, why):
        if self.strict:
            raise TinyViTError(f"{path}: {why} (--strict: unreadable files are errors)")
        if str(path) in self.named:
            return
        self.named.add(str(path))
        if self.count <= self.limit:
            print(f"warning: {path}: {why}; skipped", file=self.stream)
        elif self.count == self.limit + 1:
            print("warning: more unreadable files; not listing them", file=self.stream)


def _header_problem(path, max_pixels=MAX_PIXELS):
    """Why a file cannot be a training image, from its size and header alone; None when it can."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as img:  # the header only: no pixel data is decoded here
            w, h = img.size
    except Image.DecompressionBombError as e:
        return f"possible decompression bomb ({e})"
    except OSError as e:
        return f"not an image Pillow can read ({e.strerror or type(e).__name__})" if not isinstance(
            e, Image.UnidentifiedImageError) else "not an image Pillow can read"
    except (ValueError, SyntaxError, EOFError) as e:
        return f"unreadable image header ({e})"
    if w * h > max_pixels:
        return f"{w}x{h} is over the limit of {max_pixels} pixels (possible decompression bomb)"
    if min(w, h) < MIN_SIDE:
        return f"{w}x{h} is too small (under {MIN_SIDE} px)"
    return None


def visible_files(folder):
    """Every file below folder (recursive, sorted) except hidden ones and those inside a hidden folder
    (.DS_Store, ._x, .ipynb_checkpoints/): they are not meant as data."""
    folder = Path(folder)
    return sorted(f for f in folder.rglob("*") if not f.is_dir() and not any(
        part.startswith(".") for part in f.relative_to(folder).parts))


def _class_files(folder, warn):
    """{class name: [image paths]} from the class folders of one split (names sorted, files sorted;
    hidden folders and files skipped without a word)."""
    out = {}
    for d in sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = []
        for f in visible_files(d):
            if f.suffix.lower() not in EXTENSIONS:
                warn(f, "not an image file (by its extension)")
                continue
            files.append(str(f))
        out[d.name] = files
    return out


def _checked(files, warn, workers):
    """The files whose headers make sense (each other one warned about), order kept."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(_header_problem, files))
    kept = []
    for f, why in zip(files, problems):
        if why is None:
            kept.append(f)
        else:
            warn(f, why)
    return kept


def _image_list(by_class, classes, warn, workers, where):
    """An ImageList over `classes` (indices in that order) from {class: files}, headers checked."""
    paths, labels = [], []
    for k, name in enumerate(classes):
        for f in _checked(by_class.get(name, []), warn, workers):
            paths.append(f)
            labels.append(k)
    if not paths:
        raise TinyViTError(f"{where}: no readable images")
    return ImageList(paths, np.asarray(labels, np.int64), list(classes))


def folder_splits(root, val_split=0.1, seed=0, strict=False, workers=4, warn=None, min_classes=2):
    """(train, val) ImageLists of a folder dataset (layouts: the module docstring); warn: a Warnings
    that also counts what it named (a new one by default); fewer than min_classes classes with images
    is a TinyViTError (training needs 2; evaluating a model on one of its classes needs 1)."""
    root = Path(root)
    if not root.is_dir():
        raise TinyViTError(f"{root}: no such folder (expected train/<class>/ and val/<class>/, or <class>/ folders)")
    warn = warn or Warnings(strict)
    val_dir = _val_dir(root)
    if val_dir is not None:
        train_files, val_files = _class_files(root / "train", warn), _class_files(val_dir, warn)
        classes = _nonempty(train_files, root / "train", min_classes)
        extra = sorted(set(n for n, fs in val_files.items() if fs) - set(classes))
        if extra:
            raise TinyViTError(f"{val_dir}: class folder {extra[0]!r} has no counterpart with images in {root / 'train'}")
        return (_image_list(train_files, classes, warn, workers, root / "train"),
                _image_list(val_files, classes, warn, workers, val_dir))
    by_class = _class_files(root, warn)
    classes = _nonempty(by_class, root, min_classes)
    checked = {c: _checked(by_class[c], warn, workers) for c in classes}
    return _stratified(checked, classes, val_split, seed, root)


def _val_dir(root):
    """val/ (valid/, validation/, test/) of a train/val layout; None for class folders only."""
    found = next((root / n for n in ("val", "valid", "validation", "test") if (root / n).is_dir()), None)
    return found if (root / "train").is_dir() else None


def evaluation_images(root, val_split=0.1, seed=0, workers=4, warn=None):
    """The images a folder dataset's model is evaluated on: val/ of a train/val layout (by its own
    class folders: train/ plays no part), else the val part of the split training made; at least one class."""
    root = Path(root)
    val_dir = _val_dir(root) if root.is_dir() else None
    if val_dir is None:
        return folder_splits(root, val_split, seed, workers=workers, warn=warn, min_classes=1)[1]
    warn = warn or Warnings()
    by_class = _class_files(val_dir, warn)
    return _image_list(by_class, _nonempty(by_class, val_dir, 1), warn, workers, val_dir)


def _nonempty(by_class, where, min_classes):
    """Class names with at least one file (at least min_classes of them); empty class folders are
    warned about and left out."""
    classes = [c for c, fs in by_class.items() if fs]
    for c, fs in by_class.items():
        if not fs:
            print(f"warning: {Path(where) / c}: empty class folder; left out", file=sys.stderr)
    if not classes:
        raise TinyViTError(f"{where}: no class folders with images (expected <class>/<image> files)")
    if len(classes) < min_classes:
        raise TinyViTError(f"{where}: {len(classes)} class folder(s) with images ({', '.join(classes)}): a "
                           f"classifier needs at least {min_classes} classes, one folder of images each")
    return classes


def _stratified(by_class, classes, val_split, seed, root):
    """Seeded split of each class's files: about val_split of each (at least one) to val."""
    if not 0.0 < val_split < 1.0:
        raise TinyViTError(f"--val-split must be between 0 and 1, got {val_split}")
    rng = np.random.default_rng(seed)
    tr, va = ([], []), ([], [])
    for k, c in enumerate(classes):
        files = by_class[c]
        if len(files) < 2:
            raise TinyViTError(f"{root / c}: {len(files)} readable image(s): a class needs 2 to be split "
                               f"into train and val")
        order = rng.permutation(len(files))
        n_val = min(len(files) - 1, max(1, round(val_split * len(files))))
        for j, i in enumerate(order):
            part = va if j < n_val else tr
            part[0].append(files[i])
            part[1].append(k)
    return tuple(ImageList(p, np.asarray(y, np.int64), list(classes)) for p, y in (tr, va))


def subset(images: ImageList, n, seed):
    """A seeded random n of an ImageList (every class keeps about its share), in the list's order."""
    if n is None or n >= len(images):
        return images
    keep = np.sort(np.random.default_rng([seed, 7]).permutation(len(images))[:n])
    return ImageList([images.paths[i] for i in keep], images.labels[keep], images.classes, images.bad)


def relabel(images: ImageList, names, where):
    """images with labels that index `names` (a model's classes, matched by name); a class with
    images that is not among names is a TinyViTError."""
    index = {n: i for i, n in enumerate(names)}
    foreign = [images.classes[k] for k in np.unique(images.labels) if images.classes[k] not in index]
    if foreign:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise TinyViTError(f"{where}: class folder {foreign[0]!r} is not one of the model's {len(names)} classes "
                           f"({shown}); a folder of some of its classes is evaluated on those")
    to_model = np.array([index.get(c, -1) for c in images.classes], np.int64)
    return ImageList(images.paths, to_model[images.labels], list(names), images.bad)


# --- Oxford-IIIT Pet ---------------------------------------------------------------------------


def pets_splits(root, download=True, strict=False, workers=4, warn=None):
    """Oxford-IIIT Pet's official (trainval, test) split, 37 breeds, from <root>/oxford-iiit-pet/."""
    folder = Path(root) / "oxford-iiit-pet"
    lists = {s: folder / "annotations" / f"{s}.txt" for s in ("trainval", "test")}
    if not (folder / "images").is_dir() or not all(p.is_file() for p in lists.values()):
        hint = f"put images/ and annotations/ (from images.tar.gz and annotations.tar.gz) in {folder}"
        if not download:
            raise TinyViTError(f"Oxford-IIIT Pet files missing; {hint}")
        for name, (url, md5) in PETS_URLS.items():
            _extract(fetch([url], folder / name, md5, hint), folder)
    warn = warn or Warnings(strict)
    rows = {s: _pets_rows(p) for s, p in lists.items()}
    names = {}
    for image, cls in rows["trainval"] + rows["test"]:
        names.setdefault(cls, " ".join(w[:1].upper() + w[1:] for w in image.rsplit("_", 1)[0].split("_")))
    if sorted(names) != list(range(1, len(names) + 1)):
        raise TinyViTError(f"{lists['trainval']}: class ids are not 1..{len(names)}")
    classes = [names[i] for i in range(1, len(names) + 1)]
    out = []
    for s in ("trainval", "test"):
        files = {c: [] for c in classes}
        for image, cls in rows[s]:
            files[classes[cls - 1]].append(str(folder / "images" / f"{image}.jpg"))
        out.append(_image_list(files, classes, warn, workers, lists[s]))
    return tuple(out)


def _pets_rows(path):
    """[(image stem, class id)] from an annotations list ('Abyssinian_100 1 1 1'; '#' lines skipped)."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or line.startswith("#"):
            continue
        if len(parts) < 2 or not parts[1].isdigit():
            raise TinyViTError(f"{path}:{n}: expected 'IMAGE CLASS_ID ...', got {line[:60]!r}")
        rows.append((parts[0], int(parts[1])))
    if not rows:
        raise TinyViTError(f"{path}: no images listed")
    return rows


def _extract(tar_path, dest):
    """Unpack a downloaded tar.gz into dest, refusing links and paths that leave it."""
    try:
        with tarfile.open(tar_path, "r:gz") as tf:
            tf.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TinyViTError(f"{tar_path}: cannot unpack ({e})") from None
