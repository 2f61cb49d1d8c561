"""Which images a run reads: one dispatch for fine-tuning and evaluation (Oxford-IIIT Pet or an image
folder, as ImageLists; files decoded with a checkpoint's eval transform)."""
from .folders import Warnings, folder_splits, pets_splits
from .loader import FolderDataset
from .transform import EvalTransform


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
