"""Random affine augmentation (rotation, scale, translation) on the backend, as strong MNIST ViTs use.

Each image gets its own 2x3 map from output to source pixel coordinates about the image centre;
pixels are sampled bilinearly, and whatever falls outside the image is 0 (black), as torchvision's
RandomAffine fills. The draws come from the caller's seeded RNG, so runs and resumes repeat exactly.
"""
import functools

import numpy as np

from ..backend import get_array_module
from ..errors import TinyViTError


def random_affine(rng, n, degrees=10.0, scale=(0.9, 1.1), translate=2.0):
    """(n, 2, 3) inverse maps: rotation in +-degrees, isotropic scale, shift in +-translate px."""
    a = np.deg2rad(rng.uniform(-degrees, degrees, n))
    s = rng.uniform(scale[0], scale[1], n)
    t = rng.uniform(-translate, translate, (n, 2))
    cos, sin = np.cos(a) / s, np.sin(a) / s  # the inverse of rotate-then-scale
    m = np.empty((n, 2, 3))
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, sin, -sin, cos
    m[:, :, 2] = -np.einsum("nij,nj->ni", m[:, :, :2], t)  # shift the output by t
    return m


def affine(x, maps):
    """x (B, C, H, W) float, resampled through maps (B, 2, 3) from output (col, row) to source."""
    xp = get_array_module(x)
    b, c, h, w = x.shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = cols - (w - 1) / 2, rows - (h - 1) / 2  # (H, W) about the centre
    sx = maps[:, 0, 0, None, None] * u + maps[:, 0, 1, None, None] * v + maps[:, 0, 2, None, None] + (w - 1) / 2
    sy = maps[:, 1, 0, None, None] * u + maps[:, 1, 1, None, None] * v + maps[:, 1, 2, None, None] + (h - 1) / 2
    x0, y0 = np.floor(sx), np.floor(sy)  # (B, H, W) source corners, on the host (small)
    fx, fy = (sx - x0).astype(x.dtype), (sy - y0).astype(x.dtype)
    xpad = xp.pad(x, ((0, 0), (0, 0), (1, 2), (1, 2)))  # zeros around: outside reads 0
    bi = xp.arange(b)[:, None, None]

    def at(yy, xx):  # (B, H, W, C): the padded image at integer corners, clipped into the zero border
        return xpad[bi, :, xp.asarray(np.clip(yy + 1, 0, h + 2).astype(np.intp)),
                    xp.asarray(np.clip(xx + 1, 0, w + 2).astype(np.intp))]

    fx, fy = xp.asarray(fx)[..., None], xp.asarray(fy)[..., None]  # (B, H, W, 1)
    out = (at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx) * (1 - fy) + \
          (at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx) * fy  # (B, H, W, C)
    return xp.ascontiguousarray(out.transpose(0, 3, 1, 2))  # (B, C, H, W)


# --- batching -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _interp_matrix(n_in, n_out, dtype):
    """(n_out, n_in) bilinear weights by torch's align_corners=False rule (no antialias), in dtype's
    precision (float32 or float64) as torch computes them, so results agree to rounding."""
    t = np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32).type
    scale = t(n_in) / t(n_out)
    # torch's scale * (i + 0.5) - 0.5 compiles to one fused multiply-add: exact in float64, one
    # rounding to t (for float64 the plain expression is within an ulp of that)
    src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(t)
    src = np.maximum(src, t(0))  # clamp at 0 like torch
    i0 = src.astype(np.int64)  # floor, src >= 0
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(t), 0, 1)
    r = np.zeros((n_out, n_in), t)
    np.add.at(r, (np.arange(n_out), i0), t(1) - w1)
    np.add.at(r, (np.arange(n_out), i1), w1)
    r.setflags(write=False)
    return r


def bilinear_resize(x, size):
    """Resize NCHW float x to size (int or (h, w)): out = Ry @ x @ Rx.T, like F.interpolate bilinear."""
    xp = get_array_module(x)
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if x.ndim != 4 or x.dtype.kind != "f":
        raise TinyViTError(f"bilinear_resize takes a float NCHW array, got {x.dtype} {x.shape}")
    ry = xp.asarray(_interp_matrix(x.shape[2], h, x.dtype), dtype=x.dtype)  # (h, H)
    rx = xp.asarray(_interp_matrix(x.shape[3], w, x.dtype), dtype=x.dtype)  # (w, W)
    return xp.matmul(xp.matmul(ry, x), rx.T)  # (N, C, h, W) -> (N, C, h, w)


def _translate(x, dy, dx, pad, flip=None):
    """out[b, :, i, j] = x[b, :, i - dy[b], j - dx[b]] (zero outside), mirrored in j where flip[b]."""
    xp = get_array_module(x)
    b, c, h, w = x.shape
    xpad = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))  # (B, C, H + 2p, W + 2p), zero fill
    cols = xp.arange(w)
    if flip is not None:
        cols = xp.where(xp.asarray(flip)[:, None], w - 1 - cols, cols)  # (B, W)
    rows = xp.asarray(pad - dy)[:, None] + xp.arange(h)  # (B, H)
    cols = xp.asarray(pad - dx)[:, None] + cols  # (B, W)
    return xpad[xp.arange(b)[:, None, None, None], xp.arange(c)[None, :, None, None],
                rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
