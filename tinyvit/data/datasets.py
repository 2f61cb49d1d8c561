"""Which images a run reads: one dispatch for fine-tuning and evaluation (CIFAR-10 in memory, Oxford-IIIT
Pet or an image folder as ImageLists; files decoded with a checkpoint's eval transform)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .batches import ArrayDataset
from .cifar10 import load_cifar10
from .download import data_root
from .folders import Warnings, folder_splits, pets_splits, subset
from .loader import FolderDataset
from .transform import EvalTransform


@dataclass(frozen=True)
class DataSource:
    """The images a fine-tuning run reads (tinyvit.cli builds it from --data and its flags)."""

    data: str  # cifar10, pets, or a folder of class folders
    root: Optional[str] = None  # the data root holding cifar10/, pets/ (None: $TINYVIT_DATA, else ~/.cache/tinyvit)
    limit_train: Optional[int] = None  # the first N training images only (a seeded subset of files)
    limit_test: Optional[int] = None
    val_split: float = 0.1  # a folder without train/ and val/: the fraction of each class held out
    split_seed: int = 0  # seeds that split and the --limit subsets of files
    strict: bool = False  # an unreadable image file is an error, not a warning
    workers: int = 2  # decoding threads


def image_lists(data, root, *, val_split=0.1, seed=0, strict=False, workers=2, warn=None, min_classes=2):
    """(train, test) ImageLists of `data`: 'pets' (Oxford-IIIT Pet under the data root) or a folder
    (train/ and val/, or class folders split by val_split and seed, at least min_classes of them);
    warn counts what it names."""
    warn = warn or Warnings(strict)
    if data == "pets":
        return pets_splits(root, strict=strict, workers=workers, warn=warn)
    return folder_splits(data, val_split, seed, strict, workers, warn=warn, min_classes=min_classes)


def image_dataset(images, img_size, channels, t: EvalTransform, workers=2, warn=None):
    """An ImageList as batches: t's eval transform (training's random crops when batches() augments)."""
    return FolderDataset(images, img_size, t.mean, t.std, channels, t.crop_pct, workers, warn, t.resize,
                         t.interpolation)


def load_data(src: DataSource, img_size, in_chans, t: EvalTransform):
    """(train, test datasets, class names, metadata about the data) of src at img_size px; t: the eval transform."""
    if src.data == "cifar10":
        root = data_root(src.root)
        tr_x, tr_y, names = load_cifar10(root, "train", limit=src.limit_train)  # only the batches needed
        te_x, te_y, _ = load_cifar10(root, "test", limit=src.limit_test)
        train = ArrayDataset(tr_x[:src.limit_train], tr_y[:src.limit_train], t.mean, t.std, img_size=img_size)
        test = ArrayDataset(te_x[:src.limit_test], te_y[:src.limit_test], t.mean, t.std, img_size=img_size)
        return train, test, list(names), {"dataset": "cifar10"}
    warn = Warnings(src.strict)  # one per run: header checks and decoding, counted once
    tr, te = image_lists(src.data, data_root(src.root), val_split=src.val_split, seed=src.split_seed,
                         strict=src.strict, workers=src.workers, warn=warn)
    info = ({"dataset": "pets", "split_seed": src.split_seed} if src.data == "pets" else  # seeds the --limit subsets
            {"dataset": "folder", "data": str(Path(src.data).resolve()), "val_split": src.val_split,
             "split_seed": src.split_seed})
    tr, te = subset(tr, src.limit_train, src.split_seed), subset(te, src.limit_test, src.split_seed)
    train, test = (image_dataset(lst, img_size, in_chans, t, src.workers, warn) for lst in (tr, te))
    return train, test, tr.classes, dict(info, crop_pct=t.crop_pct)
