"""Class names: a checkpoint's own (checked), a foreign file's id2label, and ImageNet-1k's, in class-index
(sorted-WNID) order, shipped with tinyvit.

Origin of imagenet_classes.txt: the list `_IMAGENET_CATEGORIES` in torchvision/models/_meta.py,
read as data out of the torchvision 0.29.1 wheel from PyPI (BSD-3-Clause; file
torchvision-0.29.1-cp311-cp311-manylinux_2_28_x86_64.whl, sha256
2cb678029a5dd45afbbfa662fce49736827d52be33242b5a8a731e0db02ccdf5), one name per line: index 0 =
"tench", 285 = "Egyptian cat", 999 = "toilet tissue". Cross-checked against timm's
data/_info/imagenet_synsets.txt with imagenet_synset_to_lemma.txt: 998 of 1000 names equal the
synset's first WordNet lemma; the two others are torchvision's de-duplicated "crane bird" (134; 517
is "crane") and "maillot tank suit" (639; 638 is "maillot").
"""
import re
from functools import lru_cache
from pathlib import Path

from ..errors import TinyViTError

IMAGENET_FILE = Path(__file__).with_name("imagenet_classes.txt")
NUM_IMAGENET_CLASSES = 1000


@lru_cache(maxsize=1)
def _read_imagenet():
    """The names file as a tuple, read once; a missing or damaged file is one TinyViTError."""
    try:
        names = tuple(IMAGENET_FILE.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as e:
        raise TinyViTError(f"{IMAGENET_FILE}: cannot read the ImageNet class names ({e})") from None
    if len(names) != NUM_IMAGENET_CLASSES or not all(names):
        raise TinyViTError(f"{IMAGENET_FILE}: expected {NUM_IMAGENET_CLASSES} non-empty lines, "
                           f"found {len(names)} (a damaged install?)")
    return names


def imagenet_classes() -> list:
    """The 1000 ImageNet-1k class names by class index (a fresh list; the file is read once)."""
    return list(_read_imagenet())


def class_names(meta, num_classes, source):
    """A checkpoint's class_names, checked against its head (None when it has none)."""
    names = meta.get("class_names")
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TinyViTError(f"{source}: class_names in the metadata is not a list of strings")
    if len(names) != num_classes:
        raise TinyViTError(f"{source}: class_names has {len(names)} entries, the model has {num_classes} classes")
    return list(names)


def class_names_for(id2label, num_classes, trained_head=True):
    """A foreign file's id2label with real names, else ImageNet-1k's for a trained 1000-class head,
    else class_i."""
    names = [f"class_{i}" for i in range(num_classes)]
    if trained_head and isinstance(id2label, dict) and len(id2label) == num_classes:
        got = [str(id2label.get(str(i), names[i])) for i in range(num_classes)]
        if not all(re.fullmatch(r"(LABEL|class)_?\d+", n) for n in got):  # HF's LABEL_i are no names
            return got
    return imagenet_classes() if trained_head and num_classes == NUM_IMAGENET_CLASSES else names
