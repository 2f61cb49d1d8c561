"""Image files -> model input (any Pillow mode and size), attention rollout, heat-map overlays and figures.

Rules (the same for every caller):
- Only the first frame of multi-frame files (GIF, TIFF) is read; EXIF orientation is applied.
- Modes: 1/L/P/CMYK/YCbCr/LAB/HSV/RGB go through Pillow's own conversions (8 bits, /255).
  I;16* is scaled by 1/65535. I (32-bit int) is clipped to 0..65535 and scaled by 1/65535 when
  any value exceeds 255, else by 1/255 (Pillow itself treats I as 0..255). F is taken as 0..1
  when its maximum is <= 1, else as 0..255; NaN becomes 0, then everything is clipped to [0, 1].
- Alpha (RGBA, LA, PA, P with transparency): composited onto white, unless the opaque content is
  light (alpha-weighted mean luminance > 0.5), then onto black: drawn content always stays visible
  (a black digit on a transparent canvas lands on white, a white one on black). MNIST polarity is
  then the inversion rule's business.
- Channels: 1-channel models get luminance (ITU-R 601-2, Pillow's "L"); grayscale images given to
  3-channel models are replicated to R=G=B.
- Size: the checkpoint's eval transform (EvalTransform, recorded in its metadata): the shorter side
  resized to int(img_size / crop_pct) and the centre img_size x img_size cropped (timm's eval), or
  the whole image squashed to img_size x img_size, with its interpolation; the integer rounding is
  transformers' (ConvNext/Bit and ViT image processors), so an HF export sees the same pixels.
- Inversion (after resizing, on [0, 1] values, before normalising): invert=True -> 1 - x,
  False -> never; None (auto) -> only when dataset == "mnist": invert when the border ring is
  brighter than the central square (dark ink on light paper -> MNIST's white on black).
- Limits: files over max_pixels (width x height from the header, checked before decoding) are
  refused, as are Pillow's own decompression-bomb warnings/errors.
"""
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .backend import to_numpy
from .errors import TinyViTError, input_file

MAX_PIXELS = 64_000_000  # default refusal limit (64 megapixels)
BICUBIC, BILINEAR = Image.Resampling.BICUBIC, Image.Resampling.BILINEAR
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, zlib.error, MemoryError,
                  Image.DecompressionBombError, Image.DecompressionBombWarning)
DEFAULT_MEAN = {1: (0.1307,), 3: (0.5, 0.5, 0.5)}  # MNIST's for 1 channel, 0.5 for 3
DEFAULT_STD = {1: (0.3081,), 3: (0.5, 0.5, 0.5)}


def normalisation(meta, in_chans, source="checkpoint"):
    """(mean, std) tuples from checkpoint meta, else MNIST's (1 channel) or 0.5 (3 channels)."""
    mean = meta.get("mean", DEFAULT_MEAN.get(in_chans, (0.5,) * in_chans))
    std = meta.get("std", DEFAULT_STD.get(in_chans, (0.5,) * in_chans))
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
INTERPOLATIONS = {"bicubic": BICUBIC, "bilinear": BILINEAR}


@dataclass(frozen=True)
class EvalTransform:
    """How a checkpoint's model sees an image file (evaluation, prediction, exports): geometry, then
    x / 255, then (x - mean) / std per channel."""

    mean: tuple
    std: tuple
    resize: str = "shortest_edge"  # shorter side to img_size / crop_pct, centre crop | squash: whole image
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        """The JSON form stored as a checkpoint's meta["eval_transform"]."""
        return {"resize": self.resize, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}

    def geometry(self) -> dict:
        """The keywords of eval_resize (and of tinyvit.loader.decode)."""
        return {"resize": self.resize, "crop_pct": self.crop_pct, "interpolation": self.interpolation}


def eval_transform(meta, in_chans, source="checkpoint", crop_pct=None) -> EvalTransform:
    """The checkpoint's EvalTransform: meta["eval_transform"], else what older files imply (their
    crop_pct; whole images for MNIST and CIFAR-10 runs; timm's 0.875 otherwise). crop_pct overrides."""
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
    if resize not in RESIZES or interp not in INTERPOLATIONS:
        raise TinyViTError(f"{source}: eval_transform has resize {str(resize)[:20]!r} / interpolation "
                           f"{str(interp)[:20]!r} (expected one of {RESIZES} / {tuple(INTERPOLATIONS)})")
    if type(crop) not in (int, float) or not 0.0 < crop <= 1.0:
        raise TinyViTError(f"{source}: crop_pct must be a number in (0, 1], got {str(crop)[:20]}")
    return EvalTransform(mean, std, resize, float(crop) if resize == "shortest_edge" else 1.0, interp)


def eval_resize(img, size, resize="shortest_edge", crop_pct=0.875, interpolation="bicubic"):
    """A Pillow image -> size x size by the eval geometry: squashed whole, or the shorter side to
    int(size / crop_pct) (the longer in proportion, rounded down) and the centre cropped, both with
    transformers' integer rounding so its image processors see the same pixels."""
    f = INTERPOLATIONS[interpolation]
    if resize == "squash":
        return img.resize((size, size), f)
    w, h = img.size
    r = int(size / crop_pct)
    nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.resize((nw, nh), f).crop((left, top, left + size, top + size))


def open_image(path, max_pixels=MAX_PIXELS, draft_size=None):
    """Open, size-check, decode and EXIF-orient an image file (max_pixels None: no limit); problems are TinyViTError."""
    path = input_file(path, "image file")
    old = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own check in open() uses the same limit
            with Image.open(path) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise TinyViTError(f"{path}: {w}x{h} image has {w * h} pixels, over the limit of "
                                       f"{max_pixels} (possible decompression bomb)")
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
                           f"(possible decompression bomb)") from None
    except _DECODE_ERRORS as e:
        raise TinyViTError(f"{path}: cannot decode image (truncated or corrupt: {e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _standard_mode(img, path):
    """The image as L, LA, RGB, RGBA (8-bit) or F (float, already scaled to [0, 1])."""
    m = img.mode
    if m in ("L", "LA", "RGB", "RGBA"):
        return img
    if m == "1":
        return img.convert("L")
    if m in ("P", "PA"):
        return img.convert("RGBA" if m == "PA" or "transparency" in img.info else "RGB")
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
        try:  # CMYK, YCbCr, LAB, HSV, RGBX, La, RGBa, ...
            return img.convert("RGBA" if m.endswith(("A", "a")) else "RGB")
        except ValueError as e:
            raise TinyViTError(f"{path}: unsupported image mode {m} ({e})") from None
    return Image.fromarray(np.clip(x, 0.0, 1.0), mode="F")


def crop_box(w, h):
    """The centred square (left, top, right, bottom) of side min(w, h), as floats."""
    m = min(w, h)
    return ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)


def _composite(x, alpha):
    """Blend (H, W, C) values in [0, 1] onto white, or onto black when the opaque content is light."""
    lum = x[..., 0] if x.shape[-1] == 1 else x @ np.array([0.299, 0.587, 0.114], np.float32)
    total = float(alpha.sum())
    bg = 0.0 if total > 0 and float((lum * alpha).sum()) / total > 0.5 else 1.0
    a = alpha[..., None]
    return x * a + bg * (1.0 - a)


def _to_array(img):
    """A standard-mode Pillow image -> (H, W, C) float32 in [0, 1], alpha composited away."""
    x = np.asarray(img, dtype=np.float32)
    if img.mode == "F":
        return np.clip(x, 0.0, 1.0)[..., None]  # bicubic overshoot clipped
    x = x / 255.0
    if x.ndim == 2:
        x = x[..., None]  # (H, W, 1)
    if img.mode in ("LA", "RGBA"):
        x = _composite(x[..., :-1], x[..., -1])
    return x


def auto_invert(x):
    """True when the border ring of a (S, S, C) [0, 1] image is brighter than its central square."""
    s = x.shape[0]
    r = max(1, s // 7)  # ring width: 4 px at 28
    ring = np.ones((s, s), bool)
    ring[r:s - r, r:s - r] = False
    c0, c1 = s // 4, s - s // 4
    return float(x[ring].mean()) > float(x[c0:c1, c0:c1].mean())


def image_to_input(img, cfg, t: EvalTransform, invert=None, dataset=None, path="image"):
    """A decoded Pillow image -> normalised float32 (1, C, S, S) for the model (rules: module doc)."""
    S, C = cfg.img_size, cfg.in_chans
    if C not in (1, 3):
        raise TinyViTError(f"models with {C} input channels are not supported (1 or 3)")
    img = _standard_mode(img, path)
    if C == 1 and img.mode in ("RGB", "RGBA"):
        img = img.convert("LA" if img.mode == "RGBA" else "L")  # luminance, alpha kept
    x = _to_array(eval_resize(img, S, **t.geometry()))  # (S, S, 1 or 3)
    if x.shape[-1] != C:
        x = np.repeat(x, C, axis=-1)  # grayscale image into an RGB model
    if invert is None:
        invert = dataset == "mnist" and auto_invert(x)
    if invert:
        x = 1.0 - x
    x = (x - np.asarray(t.mean, np.float32)) / np.asarray(t.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)  # (1, C, S, S)


def is_colour(path, max_pixels=MAX_PIXELS) -> bool:
    """True when an image file holds colour, not only gray levels (mean channel spread over 4/255)."""
    img = _standard_mode(open_image(path, max_pixels), path)
    if img.mode not in ("RGB", "RGBA"):
        return False
    img.thumbnail((64, 64))
    x = np.asarray(img.convert("RGB"), np.float32)  # (h, w, 3)
    return float(np.abs(x - x.mean(axis=-1, keepdims=True)).mean()) > 4.0


def load_image(path, cfg, t, max_pixels=MAX_PIXELS, invert=None, dataset=None):
    """Read an image file as the model's float32 (1, C, S, S) input (rules: module docstring); t is
    the checkpoint's eval_transform(meta, cfg.in_chans), or its meta itself (transform and dataset)."""
    if isinstance(t, dict):
        t, dataset = eval_transform(t, cfg.in_chans), t.get("dataset", dataset)
    return image_to_input(open_image(path, max_pixels), cfg, t, invert, dataset, path)


# --- attention ----------------------------------------------------------------------------------


def rollout_matrix(maps):
    """Abnar & Zuidema rollout (B, T, T): per block mean over heads, + I, rows renormalised, chained."""
    if not maps:
        raise TinyViTError("attention rollout needs at least one block's attention maps")
    r = None
    for a in maps:
        a = to_numpy(a).astype(np.float64)
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise TinyViTError(f"attention maps must be (B, H, T, T), got {a.shape}")
        a = a.mean(axis=1) + np.eye(a.shape[-1])  # (B, T, T): residual as identity
        a /= a.sum(axis=-1, keepdims=True)
        r = a if r is None else a @ r  # later blocks apply on the left
    return r


def attention_rollout(maps):
    """The rollout's CLS row over the patch tokens, on the patch grid: (B, g, g), float64."""
    r = rollout_matrix(maps)
    B, T, _ = r.shape
    g = int(round((T - 1) ** 0.5))
    if g * g != T - 1:
        raise TinyViTError(f"{T - 1} patch tokens do not form a square grid")
    return r[:, 0, 1:].reshape(B, g, g)  # (B, g, g)


# matplotlib's "inferno" (CC0, Smith & van der Walt) sampled at 17 points: dark purple -> pale yellow
_ANCHORS = np.array([[0, 0, 4], [11, 7, 36], [33, 12, 74], [61, 9, 101], [87, 16, 110], [113, 25, 110],
                     [138, 34, 106], [163, 44, 97], [188, 55, 84], [208, 69, 69], [227, 89, 51],
                     [241, 113, 31], [249, 140, 10], [252, 170, 15], [249, 201, 50], [242, 232, 101],
                     [252, 255, 164]], np.float32)
MIN_PANEL = 224  # figure panels are at least this many pixels wide (an integer multiple of img_size)


def colormap(v):
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3) on the inferno colour map (perceptually uniform)."""
    v = np.clip(np.asarray(v, np.float32), 0.0, 1.0)
    t = np.linspace(0.0, 1.0, len(_ANCHORS))
    rgb = np.stack([np.interp(v, t, _ANCHORS[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def display_rgb(img):
    """A decoded image as 8-bit RGB at its own size, with the same mode and alpha rules as the model input."""
    x = _to_array(_standard_mode(img, "image"))
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return Image.fromarray(np.round(x * 255.0).astype(np.uint8), mode="RGB")


def model_view(img, size):
    """The pixels the model sees (centre square, bicubic to size x size, alpha rules) as uint8 RGB (S, S, 3)."""
    img = _standard_mode(img, "image")
    x = _to_array(img.resize((size, size), BICUBIC, box=crop_box(*img.size), reducing_gap=3.0))  # (S, S, C)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.round(x * 255.0).astype(np.uint8)


def normalise_heat(heat, lo_pct=10.0, hi_pct=99.0):
    """(g, g) rollout -> [0, 1] between its lo_pct-th and hi_pct-th percentiles (clipped; constant -> 0)."""
    h = np.asarray(heat, np.float64)
    lo, hi = np.percentile(h, [lo_pct, hi_pct])
    if not hi > lo:
        lo, hi = float(h.min()), float(h.max())
    return np.clip((h - lo) / max(hi - lo, 1e-12), 0.0, 1.0).astype(np.float32)


def upsample(v, w, h):
    """A (g, g) float map resized bilinearly (pixel centres, edges clamped) to (h, w)."""
    return np.asarray(Image.fromarray(np.asarray(v, np.float32), mode="F").resize((w, h), BILINEAR))


def blend_heat(base, v, dim=0.65, max_alpha=0.8):
    """uint8 (H, W, 3) image dimmed to `dim` under the colour-mapped (H, W) values v, opacity max_alpha * v."""
    a = (max_alpha * np.clip(v, 0.0, 1.0))[..., None]  # (H, W, 1)
    out = (1.0 - a) * (dim * base.astype(np.float32)) + a * colormap(v).astype(np.float32)
    return np.round(out).astype(np.uint8)


def overlay_attention(img, heat, dim=0.65):
    """img at its own size, heat blended (blend_heat) over the centre square the model saw, the sides at 40%."""
    base = np.asarray(display_rgb(img))  # (H, W, 3)
    left, top, right, bottom = (int(round(v)) for v in crop_box(img.width, img.height))
    out = np.round(base * 0.4).astype(np.uint8)
    v = upsample(normalise_heat(heat), right - left, bottom - top)
    out[top:bottom, left:right] = blend_heat(base[top:bottom, left:right], v, dim)
    return Image.fromarray(out, mode="RGB")


# --- figures ------------------------------------------------------------------------------------


def font(size):
    """Pillow's default font at `size` px (its bitmap font where FreeType or Pillow < 10.1 lacks sizes)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):
        return ImageFont.load_default()


_M, _GAP, _LABEL, _TITLE, _BAR, _BAR_W = 10, 12, 20, 24, 18, 64  # margins, label rows, colour bar


def panel_size(img_size):
    """Side of a figure panel: img_size times the smallest integer reaching MIN_PANEL."""
    return img_size * max(1, -(-MIN_PANEL // img_size))


def attention_layout(img_size, title=True):
    """Boxes (left, top, right, bottom) of the attention figure: image, heat, overlay, bar; and (W, H)."""
    p = panel_size(img_size)
    top = _M + (_TITLE if title else 0) + _LABEL
    x = [_M + i * (p + _GAP) for i in range(3)]
    boxes = {k: (x0, top, x0 + p, top + p) for k, x0 in zip(("image", "heat", "overlay"), x)}
    bx = x[2] + p + _GAP
    boxes["bar"] = (bx, top + 8, bx + _BAR, top + p - 8)
    boxes["size"] = (bx + _BAR_W, top + p + _M)
    return boxes


def input_view(x, mean, std):
    """A normalised (C, S, S) model input back to uint8 RGB (S, S, 3): the pixels the model saw."""
    m, s = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]
    x = np.clip((to_numpy(x).astype(np.float32) * s + m).transpose(1, 2, 0), 0.0, 1.0)  # (S, S, C)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.round(x * 255.0).astype(np.uint8)


def attention_figure(view, heat, title=None):
    """Figure of the uint8 (S, S, 3) view the model saw, the heat map, their overlay and a colour bar."""
    img_size = view.shape[0]
    b = attention_layout(img_size, title is not None)
    p = panel_size(img_size)
    view = Image.fromarray(np.ascontiguousarray(view), mode="RGB").resize((p, p), Image.Resampling.NEAREST)
    v = upsample(normalise_heat(heat), p, p)  # (p, p) in [0, 1]
    fig = Image.new("RGB", b["size"], (255, 255, 255))
    fig.paste(view, b["image"][:2])
    fig.paste(Image.fromarray(colormap(v), mode="RGB"), b["heat"][:2])
    fig.paste(Image.fromarray(blend_heat(np.asarray(view), v), mode="RGB"), b["overlay"][:2])
    x0, y0, x1, y1 = b["bar"]
    ramp = colormap(np.linspace(1.0, 0.0, y1 - y0))[:, None, :]  # (h, 1, 3), high on top
    fig.paste(Image.fromarray(np.ascontiguousarray(np.repeat(ramp, x1 - x0, axis=1)), mode="RGB"), (x0, y0))
    d, f = ImageDraw.Draw(fig), font(12)
    d.rectangle((x0 - 1, y0 - 1, x1, y1), outline=(80, 80, 80))
    d.text((x1 + 5, y0 - 2), "high", fill=(0, 0, 0), font=f)
    d.text((x1 + 5, y1 - 12), "low", fill=(0, 0, 0), font=f)
    g = int(np.asarray(heat).shape[-1])
    labels = {"image": f"input ({img_size}x{img_size}, as the model sees it)",
              "heat": f"attention rollout ({g}x{g} patches)", "overlay": "overlay"}
    for k, text in labels.items():
        d.text((b[k][0], b[k][1] - _LABEL + 3), text, fill=(0, 0, 0), font=f)
    if title is not None:
        d.text((_M, _M), title, fill=(0, 0, 0), font=font(14))
    return fig
