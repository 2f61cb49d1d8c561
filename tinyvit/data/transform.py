"""The eval transform a checkpoint records (resize, crop_pct, interpolation, mean, std, and invert for
models of light digits on dark), read from its metadata; no Pillow here (the exporters use it too)."""
from dataclasses import dataclass

from ..errors import TinyViTError
from .mnist import MNIST_MEAN, MNIST_STD

# the one default rule, for a checkpoint that states none: MNIST's for 1 channel, 0.5 otherwise
DEFAULT_MEAN, DEFAULT_STD = {1: MNIST_MEAN}, {1: MNIST_STD}


def normalisation(meta, in_chans, source="checkpoint"):
    """(mean, std) tuples from checkpoint meta, else MNIST's (1 channel) or 0.5 (3 channels)."""
    mean = meta.get("mean", DEFAULT_MEAN.get(in_chans, (0.5,) * in_chans))
    std = meta.get("std", DEFAULT_STD.get(in_chans, (0.5,) * in_chans))  # 0.5: Google's ViTs and ours
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise TinyViTError(f"{source}: mean/std in the metadata are not lists of numbers") from None
    if len(mean) != in_chans or len(std) != in_chans:
        raise TinyViTError(f"{source}: mean/std have {len(mean)}/{len(std)} values, the model has {in_chans} channels")
    if not all(s > 0 for s in std):
        raise TinyViTError(f"{source}: std values must be positive, got {std}")
    return mean, std


RESIZES = ("shortest_edge", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")  # Pillow filters of tinyvit.data.decode
INVERTS = ("no", "auto")  # auto: gray levels inverted when the border is brighter than the centre (MNIST's)


@dataclass(frozen=True)
class EvalTransform:
    """How a checkpoint's model sees an image file (evaluation, prediction, exports): geometry, then
    x / 255, then 1 - x where invert says so (tinyvit.data.decode.auto_invert), then (x - mean) / std per channel."""

    mean: tuple
    std: tuple
    resize: str = "shortest_edge"  # shorter side to img_size / crop_pct, centre crop | squash: whole image
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    invert: str = "no"  # auto: 1 - x when the border ring is brighter than the centre (dark ink on light paper)

    def to_dict(self) -> dict:
        """The JSON form stored as a checkpoint's meta["eval_transform"] (invert only when it is not "no")."""
        d = {"resize": self.resize, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
             "mean": list(self.mean), "std": list(self.std)}
        return d if self.invert == "no" else dict(d, invert=self.invert)

    def geometry(self) -> dict:
        """The keywords of eval_resize (and of tinyvit.data.loader.decode)."""
        return {"resize": self.resize, "crop_pct": self.crop_pct, "interpolation": self.interpolation}


def eval_transform(meta, in_chans, source="checkpoint", crop_pct=None) -> EvalTransform:
    """The checkpoint's EvalTransform: meta["eval_transform"], else what older files imply (their
    crop_pct; whole images for MNIST and CIFAR-10 runs; timm's 0.875 otherwise; MNIST runs' auto
    inversion). crop_pct overrides."""
    t = meta.get("eval_transform")
    if t is None:
        whole = meta.get("dataset") in ("mnist", "cifar10")
        t = {"crop_pct": meta.get("crop_pct", 1.0 if whole else 0.875)}
    if not isinstance(t, dict):
        raise TinyViTError(f"{source}: eval_transform in the metadata is not a JSON object")
    given = {k: t[k] if k in t else meta[k] for k in ("mean", "std") if k in t or k in meta}
    mean, std = normalisation(given, in_chans, source)
    resize, interp = t.get("resize", "shortest_edge"), t.get("interpolation", "bicubic")
    crop = t.get("crop_pct", 0.875) if crop_pct is None else crop_pct
    invert = t.get("invert", "auto" if meta.get("dataset") == "mnist" else "no")
    if invert not in INVERTS:
        raise TinyViTError(f"{source}: eval_transform has invert {str(invert)[:20]!r} (expected one of {INVERTS})")
    if resize not in RESIZES or interp not in INTERPOLATIONS:
        raise TinyViTError(f"{source}: eval_transform has resize {str(resize)[:20]!r} / interpolation "
                           f"{str(interp)[:20]!r} (expected one of {RESIZES} / {INTERPOLATIONS})")
    if type(crop) not in (int, float) or not 0.0 < crop <= 1.0:
        raise TinyViTError(f"{source}: crop_pct must be a number in (0, 1], got {str(crop)[:20]}")
    return EvalTransform(mean, std, resize, float(crop) if resize == "shortest_edge" else 1.0, interp, invert)
