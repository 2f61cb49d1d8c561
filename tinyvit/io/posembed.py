"""Adapting weights to a new image size or class count: the position embedding resampled as its source
resamples it (timm and HF: bicubic with antialiasing, as timm's resample_abs_pos_embed; Google: bilinear),
its prefix rows kept, and a zero head for a new class count."""
import dataclasses
import math

import numpy as np

from ..backend import get_array_module
from ..data.augment import bilinear_resize
from ..errors import TinyViTError
from ..nn.config import ViTConfig
from ..nn.resample import bicubic_aa_matrix, pos_resample_forward

RESAMPLES = ("bicubic", "bilinear")


def resample_grid(x, size, how="bicubic"):
    """NCHW float x resampled to size (h, w): 'bicubic' as torch's antialiased bicubic, 'bilinear' as
    F.interpolate's bilinear (align_corners=False, no antialias)."""
    if how == "bilinear":
        return bilinear_resize(x, size)
    if how not in RESAMPLES:
        raise TinyViTError(f"resample must be one of {', '.join(RESAMPLES)}, got {how!r}")
    xp = get_array_module(x)
    ry = xp.asarray(bicubic_aa_matrix(x.shape[2], size[0]), dtype=x.dtype)  # (h, H)
    rx = xp.asarray(bicubic_aa_matrix(x.shape[3], size[1]), dtype=x.dtype)  # (w, W)
    return xp.matmul(xp.matmul(ry, x), rx.T)  # (N, C, h, W) -> (N, C, h, w)


def _grid(g):
    return (int(g), int(g)) if isinstance(g, (int, np.integer)) else tuple(int(v) for v in g)


def resize_pos_embed(pos_embed, new_grid, old_grid=None, prefix=1, how="bilinear"):
    """(1, prefix + h*w, D) position embeddings for a new patch grid: the prefix rows kept (1 for the
    class token; 0 when the embedding covers the patches alone), the grid resampled by `how`."""
    xp = get_array_module(pos_embed)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise TinyViTError(f"pos_embed must be (1, {prefix} + N, D), got {tuple(pos_embed.shape)}")
    n, D = pos_embed.shape[1] - prefix, pos_embed.shape[2]
    if old_grid is None:
        g = math.isqrt(max(n, 0))
        if g * g != n:
            raise TinyViTError(f"pos_embed has {n} grid rows, not a square; give old_grid")
        old_grid = g
    (oh, ow), (nh, nw) = _grid(old_grid), _grid(new_grid)
    if oh * ow != n or min(oh, ow, nh, nw) < 1:
        raise TinyViTError(f"cannot resize a {n}-row pos_embed from grid {(oh, ow)} to {(nh, nw)}")
    if how == "bicubic":  # the model's own resample (dynamic_img_size runs it in the forward)
        return pos_resample_forward(pos_embed, (oh, ow), (nh, nw), prefix)[0]
    x = pos_embed[:, prefix:].reshape(1, oh, ow, D).transpose(0, 3, 1, 2)  # (1, D, oh, ow)
    x = resample_grid(xp.ascontiguousarray(x), (nh, nw), how)  # (1, D, nh, nw)
    x = x.transpose(0, 2, 3, 1).reshape(1, nh * nw, D)
    return xp.concatenate([pos_embed[:, :prefix], x.astype(pos_embed.dtype, copy=False)], axis=1)


def adapt(params, cfg: ViTConfig, img_size=None, num_classes=None, resample="bilinear"):
    """(params, cfg) for a new image size (pos_embed resampled by `resample`: the source's own rule) and/or
    class count (zero heads); the input dict is not modified, and an unchanged setting leaves its arrays."""
    params = dict(params)
    if img_size is not None and img_size != cfg.img_size:
        P = cfg.patch_size
        if img_size < P or img_size % P:
            raise TinyViTError(f"img_size {img_size} is not a positive multiple of the patch size {P}")
        prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
        params["pos_embed"] = resize_pos_embed(params["pos_embed"], img_size // P, cfg.img_size // P, prefix, resample)
        cfg = dataclasses.replace(cfg, img_size=int(img_size))
    if num_classes is not None and num_classes != cfg.num_classes:
        if num_classes < 1:
            raise TinyViTError(f"num_classes must be at least 1, got {num_classes}")
        xp = get_array_module(params["pos_embed"])
        dtype = params["pos_embed"].dtype
        for head, width in (("head", cfg.head_dim), ("head_dist", cfg.dim)):
            if head + ".weight" in params:
                params[head + ".weight"] = xp.zeros((num_classes, width), dtype)
                params[head + ".bias"] = xp.zeros((num_classes,), dtype)
        cfg = dataclasses.replace(cfg, num_classes=int(num_classes))
    return params, cfg
