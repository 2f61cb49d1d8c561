"""The position embedding resampled to another patch grid in the forward, as timm's dynamic_img_size
does it (timm.layers.resample_abs_pos_embed: torch's bicubic with antialiasing, align_corners False,
the prefix rows kept), with its backward. The resample is linear and separable: one matrix per axis,
out = R_h E R_w^T per channel, so its backward is the transposes."""
import functools
from typing import NamedTuple, Optional

import numpy as np

from ..backend import get_array_module
from ..errors import TinyViTError


def _cubic_aa(x):
    """torch's antialiased bicubic filter (a = -0.5, as PIL), at distances x."""
    x = np.abs(x)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_aa_matrix(n_in, n_out):
    """(n_out, n_in) float64 weights of F.interpolate(mode='bicubic', antialias=True, align_corners=False)
    along one axis: the filter stretched by the scale when shrinking, each row normalised to sum 1."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1 else 2.0
    inv = 1.0 / scale if scale >= 1 else 1.0
    r = np.zeros((n_out, n_in))
    for i in range(n_out):  # n_out is a grid side (tens): a loop over it is setup, not compute
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = _cubic_aa((np.arange(lo, hi) - center + 0.5) * inv)
        r[i, lo:hi] = w / w.sum()
    r.setflags(write=False)
    return r


class PosResampleCache(NamedTuple):
    """pos_resample_forward: the two axes' matrices (None: the grid was unchanged) and the layout."""

    rh: Optional[object]  # (nh, gh)
    rw: Optional[object]  # (nw, gw)
    prefix: int  # rows before the grid, kept as they are
    grid: tuple  # (gh, gw), the stored grid


def _grid_matrices(xp, dtype, grid, new_grid):
    """(R_h, R_w) on xp in dtype for grid -> new_grid."""
    return (xp.asarray(bicubic_aa_matrix(grid[0], new_grid[0]), dtype=dtype),
            xp.asarray(bicubic_aa_matrix(grid[1], new_grid[1]), dtype=dtype))


def pos_resample_forward(pos, grid, new_grid, prefix):
    """pos (1, prefix + gh*gw, C) for a (nh, nw) patch grid: the prefix rows kept, the grid resampled per
    channel as R_h E R_w^T; an unchanged grid returns pos itself (as timm). Plain form:
    reference.pos_resample_forward."""
    xp = get_array_module(pos)
    (gh, gw), (nh, nw) = tuple(grid), tuple(new_grid)
    C = pos.shape[-1]
    if pos.shape != (1, prefix + gh * gw, C):
        raise TinyViTError(f"pos_embed must be (1, {prefix + gh * gw}, C) for a {gh}x{gw} grid, got {tuple(pos.shape)}")
    if (gh, gw) == (nh, nw):
        return pos, PosResampleCache(None, None, prefix, (gh, gw))
    rh, rw = _grid_matrices(xp, pos.dtype, (gh, gw), (nh, nw))
    e = pos[0, prefix:].reshape(gh, gw * C)  # (gh, gw*C)
    t = (rh @ e).reshape(nh, gw, C)  # rows resampled: (nh, gw, C)
    g = xp.matmul(rw, t).reshape(1, nh * nw, C)  # columns: (nh, nw, C) -> (1, nh*nw, C)
    out = xp.concatenate([pos[:, :prefix], g], axis=1) if prefix else g
    return out, PosResampleCache(rh, rw, prefix, (gh, gw))


def pos_resample_backward(dout, cache):
    """d(stored pos) of pos_resample_forward: dE = R_h^T dG R_w per channel, the prefix rows as they came."""
    if cache.rh is None:
        return dout
    xp = get_array_module(dout)
    (gh, gw), P = cache.grid, cache.prefix
    nh, nw = cache.rh.shape[0], cache.rw.shape[0]
    C = dout.shape[-1]
    dg = dout[0, P:].reshape(nh, nw, C)
    dt = xp.matmul(cache.rw.T, dg).reshape(nh, gw * C)  # (nh, gw, C)
    de = (cache.rh.T @ dt).reshape(1, gh * gw, C)  # (gh, gw*C) -> (1, gh*gw, C)
    return xp.concatenate([dout[:, :P], de], axis=1) if P else de
