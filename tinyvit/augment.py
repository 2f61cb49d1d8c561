"""Random affine augmentation (rotation, scale, translation) on the backend, as strong MNIST ViTs use.

Each image gets its own 2x3 map from output to source pixel coordinates about the image centre;
pixels are sampled bilinearly, and whatever falls outside the image is 0 (black), as torchvision's
RandomAffine fills. The draws come from the caller's seeded RNG, so runs and resumes repeat exactly.
"""
import numpy as np

from .backend import get_array_module


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
