"""Image files -> the model's pixels: one pipeline for prediction, evaluation, training and the exports.

Rules (the same for every caller; the scripts' --help points here):
- Only the first frame of a multi-frame file (GIF, TIFF) is read; EXIF orientation is applied.
- Modes: 1/L/P/CMYK/YCbCr/LAB/HSV/RGB go through Pillow's own conversions (8 bits, /255).
  I;16* is scaled by 1/65535. I (32-bit int) is clipped to 0..65535 and scaled by 1/65535 when
  any value exceeds 255, else by 1/255. F is taken as 0..1 when its maximum is <= 1, else as
  0..255; NaN becomes 0, then everything is clipped to [0, 1].
- Alpha (RGBA, LA, PA, P with transparency) is dropped, as Pillow's convert("RGB") drops it: the
  model sees the colour stored under each pixel, transparent or not. timm's file loader
  (ImageDataset: Image.open(f).convert("RGB")) and transformers' (load_image, so pipeline() given a
  file) do the same; transformers' CLIP and SigLIP image processors, handed an RGBA Pillow image
  rather than a file, composite it onto white instead. An image whose colour channels hold one flat
  colour while its alpha varies (a drawing on a transparent canvas) is refused: without its alpha
  it is blank. Flatten such an image onto a background first.
- Channels: 1-channel models get luminance (ITU-R 601-2, Pillow's "L"); grayscale images given to
  3-channel models are replicated to R=G=B (Pillow's convert("RGB") of an L image).
- Size: the checkpoint's eval transform (data.transform.EvalTransform, recorded in its metadata):
  the shorter side resized to int(img_size / crop_pct) and the centre img_size x img_size cropped
  (timm's eval), or the whole image squashed to img_size x img_size, with its interpolation; the
  integer rounding is transformers' image processors', so an HF export sees the same pixels. A model
  that takes any size (dynamic_img_size) can be given H x W (timm's eval of a rectangle) or each image
  whole, its shorter side to img_size and the longer in proportion (InputSize, --img-size/--keep-aspect).
- Inversion (after resizing, on [0, 1] values, before normalising): invert=True -> 1 - x,
  False -> never; None (auto) -> only when dataset == "mnist": invert when the border ring is
  brighter than the central square (dark ink on light paper -> MNIST's white on black).
- Limits: a file over max_pixels (width x height from its header, checked before decoding; 64
  megapixels by default, --max-megapixels in predict.py and show_patches.py) is refused, as are
  Pillow's own decompression-bomb warnings and errors.
"""
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from ..errors import TinyViTError, input_file
from .transform import EvalTransform, eval_transform

BICUBIC, BILINEAR = Image.Resampling.BICUBIC, Image.Resampling.BILINEAR
FILTERS = {"bicubic": BICUBIC, "bilinear": BILINEAR}  # the eval transform's interpolations
MAX_PIXELS = 64_000_000  # default refusal limit (64 megapixels)
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, zlib.error, MemoryError,
                  Image.DecompressionBombError, Image.DecompressionBombWarning)


@dataclass(frozen=True)
class InputSize:
    """The input size of a model that takes any (dynamic_img_size): hw = (H, W) for every image, or
    keep_aspect: each image's shorter side to `side`, the longer in proportion, rounded to a multiple of
    `patch` (whole, no crop)."""

    side: int
    patch: int
    hw: Optional[tuple] = None
    keep_aspect: bool = False

    def for_image(self, w, h):
        """(H, W) of an image w wide and h high."""
        if not self.keep_aspect:
            return tuple(self.hw)
        long = max(self.patch, int(self.side * max(w, h) / min(w, h) / self.patch + 0.5) * self.patch)  # nearest
        return (self.side, long) if h <= w else (long, self.side)


def eval_resize(img, size, resize="shortest_edge", crop_pct=0.875, interpolation="bicubic"):
    """A Pillow image -> size x size by the eval geometry: squashed whole, or the shorter side to
    int(size / crop_pct) (the longer in proportion, rounded down) and the centre cropped, both with
    transformers' integer rounding so its image processors see the same pixels. size may be an
    InputSize: (H, W) as timm's eval makes a rectangle (the aspect kept, just covering each side /
    crop_pct, then the centre; squash: the whole image to H x W), or each image whole (keep_aspect)."""
    f = FILTERS[interpolation]
    if isinstance(size, InputSize):
        H, W = size.for_image(*img.size)
        if size.keep_aspect or resize == "squash":  # whole, as the square squash
            return img.resize((W, H), f)
        if H != W:  # timm's eval of a non-square input_size (transforms_factory.transforms_imagenet_eval):
            sh, sw = int(H / crop_pct), int(W / crop_pct)  # ResizeKeepRatio: the aspect kept, just covering
            r = min(img.size[1] / sh, img.size[0] / sw)  # (H, W) / crop_pct, then the centre
            nw, nh = round(img.size[0] / r), round(img.size[1] / r)
            left, top = int(round((nw - W) / 2.0)), int(round((nh - H) / 2.0))  # torchvision's CenterCrop
            return img.resize((nw, nh), f).crop((left, top, left + W, top + H))
        size = H
    if resize == "squash":
        return img.resize((size, size), f)
    w, h = img.size
    r = int(size / crop_pct)
    nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.resize((nw, nh), f).crop((left, top, left + size, top + size))


def open_image(path, max_pixels=MAX_PIXELS, draft_size=None, flag=None):
    """Open, size-check, decode and EXIF-orient an image file (max_pixels None: no limit); problems are
    TinyViTError. flag: the caller's option that sets the limit, named when a file is over it."""
    path = input_file(path, "image file")
    raise_it = f"; {flag} raises the limit" if flag else ""
    old = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own check in open() uses the same limit
            with Image.open(path) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise TinyViTError(f"{path}: {w}x{h} image has {w * h} pixels, over the limit of "
                                       f"{max_pixels} (possible decompression bomb{raise_it})")
                if w < 1 or h < 1:
                    raise TinyViTError(f"{path}: image has no pixels ({w}x{h})")
                if draft_size and img.format == "JPEG":
                    img.draft(img.mode, (draft_size, draft_size))  # decode at 1/2..1/8 scale, >= draft_size
                img.load()
                return ImageOps.exif_transpose(img)  # a new image when rotated, else a copy
    except TinyViTError:
        raise
    except Image.UnidentifiedImageError:
        raise TinyViTError(f"{path}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TinyViTError(f"{path}: image is over the limit of {max_pixels} pixels "
                           f"(possible decompression bomb{raise_it})") from None
    except _DECODE_ERRORS as e:
        raise TinyViTError(f"{path}: cannot decode image (truncated or corrupt: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _without_alpha(img, path):
    """An image with alpha (RGBA, LA, PA, P with transparency) as Pillow's convert to RGB or L leaves
    it: alpha dropped; one whose colour is flat under a varying alpha is a TinyViTError."""
    full = img if img.mode in ("LA", "RGBA") else img.convert("RGBA")  # P: no warning about byte tRNS
    a = np.asarray(full)  # (H, W, 2 or 4)
    colour, alpha = a[..., :-1], a[..., -1]
    if alpha.min() != alpha.max() and (colour == colour[:1, :1]).all():
        raise TinyViTError(f"{path}: the picture is only in the alpha channel (the colour channels are one flat "
                           f"colour); alpha is dropped, as timm's and transformers' loaders drop it, so the model "
                           f"would see a blank image: flatten it onto a background first")
    return full.convert("L" if full.mode == "LA" else "RGB")


def standard_mode(img, path):
    """The image as L or RGB (8-bit, alpha dropped: the module's rules) or F (float, already scaled to [0, 1])."""
    m = img.mode
    if m in ("L", "RGB"):
        return img
    if m == "1":
        return img.convert("L")
    if m in ("LA", "PA", "RGBA") or (m == "P" and "transparency" in img.info):
        return _without_alpha(img, path)
    if m == "P":
        return img.convert("RGB")
    if m.startswith("I;16"):
        x = np.asarray(img).astype(np.float32) / 65535.0  # (H, W), any byte order
    elif m == "I":
        x = np.clip(np.asarray(img), 0, 65535).astype(np.float32)
        x /= 65535.0 if x.size and x.max() > 255 else 255.0
    elif m == "F":
        x = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if x.size and x.max() > 1.0:
            x = x / 255.0
    else:
        try:  # CMYK, YCbCr, LAB, HSV, RGBX, RGBa, ...
            return img.convert("RGB")
        except ValueError as e:
            raise TinyViTError(f"{path}: unsupported image mode {m} ({e})") from None
    return Image.fromarray(np.clip(x, 0.0, 1.0), mode="F")


def crop_box(w, h):
    """The centred square (left, top, right, bottom) of side min(w, h), as floats."""
    m = min(w, h)
    return ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)


def to_array(img):
    """A standard-mode Pillow image -> (H, W, C) float32 in [0, 1]."""
    x = np.asarray(img, dtype=np.float32)
    if img.mode == "F":
        return np.clip(x, 0.0, 1.0)[..., None]  # bicubic overshoot clipped
    x = x / 255.0
    return x[..., None] if x.ndim == 2 else x  # (H, W, 1 or 3)


def auto_invert(x):
    """True when the border ring of a (H, W, C) [0, 1] image is brighter than its central square."""
    h, w = x.shape[:2]
    r = max(1, min(h, w) // 7)  # ring width: 4 px at 28
    ring = np.ones((h, w), bool)
    ring[r:h - r, r:w - r] = False
    return float(x[ring].mean()) > float(x[h // 4:h - h // 4, w // 4:w - w // 4].mean())


def model_pixels(img, size, channels, path="image", box=None, **geometry):
    """The one decode pipeline (prediction, evaluation and training): a Pillow image in any mode ->
    (size, size, channels) float32 in [0, 1]: standard mode, luminance for 1 channel, then the eval
    geometry (eval_resize's keywords), or a bicubic resize of the crop box (training's); alpha dropped."""
    img = standard_mode(img, path)
    if channels == 1 and img.mode == "RGB":
        img = img.convert("L")  # luminance
    img = eval_resize(img, size, **geometry) if box is None else img.resize((size, size), BICUBIC, box=box)
    x = to_array(img)  # (S, S, 1 or 3)
    return x if x.shape[-1] == channels else np.repeat(x, channels, axis=-1)  # grayscale into an RGB model


def image_to_input(img, cfg, t: EvalTransform, invert=None, dataset=None, path="image", size=None):
    """A decoded Pillow image -> normalised float32 (1, C, S, S) for the model (rules: module doc); size: an
    InputSize for a model that takes any (then (1, C, H, W))."""
    S, C = size or cfg.img_size, cfg.in_chans
    if C not in (1, 3):
        raise TinyViTError(f"models with {C} input channels are not supported (1 or 3)")
    x = model_pixels(img, S, C, path, **t.geometry())  # (S, S, C)
    if invert is None:  # the transform's rule (dataset: older callers' way of asking for MNIST's)
        invert = (t.invert == "auto" or dataset == "mnist") and auto_invert(x)
    if invert:
        x = 1.0 - x
    x = (x - np.asarray(t.mean, np.float32)) / np.asarray(t.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)  # (1, C, S, S)


def has_colour(img, path="image") -> bool:
    """True when a decoded image holds colour, not only gray levels (mean channel spread over 4/255)."""
    img = standard_mode(img, path)
    if img.mode != "RGB":
        return False
    img = img.copy()  # thumbnail works in place; the caller's image stays whole
    img.thumbnail((64, 64))
    x = np.asarray(img, np.float32)  # (h, w, 3)
    return float(np.abs(x - x.mean(axis=-1, keepdims=True)).mean()) > 4.0


def load_image(path, cfg, t, max_pixels=MAX_PIXELS, invert=None, dataset=None):
    """Read an image file as the model's float32 (1, C, S, S) input (rules: module docstring); t is
    the checkpoint's eval_transform(meta, cfg.in_chans), or its meta itself (transform and dataset)."""
    if isinstance(t, dict):
        t, dataset = eval_transform(t, cfg.in_chans), t.get("dataset", dataset)
    return image_to_input(open_image(path, max_pixels), cfg, t, invert, dataset, path)
