"""Attention rollout, heat-map overlays and figures (predict.py --attention-map, docs)."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .backend import to_numpy
from .data.decode import BICUBIC, BILINEAR, crop_box, standard_mode, to_array
from .errors import TinyViTError

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


def attention_rollout(maps, prefix=1):
    """The rollout's CLS row over the patch tokens (after `prefix` class, distillation and register
    tokens), on the patch grid: (B, g, g), float64."""
    r = rollout_matrix(maps)
    B, T, _ = r.shape
    g = int(round((T - prefix) ** 0.5))
    if g * g != T - prefix:
        raise TinyViTError(f"{T - prefix} patch tokens do not form a square grid")
    return r[:, 0, prefix:].reshape(B, g, g)  # (B, g, g)


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
    x = to_array(standard_mode(img, "image"))
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return Image.fromarray(np.round(x * 255.0).astype(np.uint8), mode="RGB")


def model_view(img, size):
    """The pixels the model sees (centre square, bicubic to size x size, alpha rules) as uint8 RGB (S, S, 3)."""
    img = standard_mode(img, "image")
    x = to_array(img.resize((size, size), BICUBIC, box=crop_box(*img.size), reducing_gap=3.0))  # (S, S, C)
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
