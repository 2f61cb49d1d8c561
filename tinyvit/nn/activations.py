"""GELU and softmax, forward and backward (re-exported by tinyvit.nn.layers, with the same conventions)."""
import math

import numpy as np

from ..backend import get_array_module
from ..cpu.threads import ew_chunks, in_place_blocks, row_chunks
from . import kernels
from .caches import GeluCache
from .special import erf, rowsum

# --- GELU -------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_QUICK = 1.702  # QuickGELU's slope


# float32 Phi(x) by linear interpolation in a 16385-entry table on [-10, 10] (built once from our
# float64 erf): ~10 NumPy passes instead of ~30 for the rational erf. Interpolation error
# h^2/8 * max|Phi''| = 4.5e-8 and index rounding ~1e-9: below float32's resolution of Phi.
_PHI_LO, _PHI_N = -10.0, 16384
_PHI_INV_H = _PHI_N / (2 * -_PHI_LO)
_PHI_TABLE = None


def _phi_table():
    """(values, differences) of Phi on the grid, float32, built on first use."""
    global _PHI_TABLE
    if _PHI_TABLE is None:
        grid = np.linspace(_PHI_LO, -_PHI_LO, _PHI_N + 1)
        phi = 0.5 * (1.0 + erf(grid * _INV_SQRT_2))
        _PHI_TABLE = (phi.astype(np.float32), np.append(np.diff(phi), 0.0).astype(np.float32))
    return _PHI_TABLE


def _phi32_block(x, cdf):
    """float32 Phi(x) into cdf, by table interpolation (NumPy only)."""
    values, diffs = _phi_table()
    half = _PHI_N // 2
    u = x * np.float32(_PHI_INV_H)  # grid units from 0: relative precision, no large offset
    np.clip(u, -half, half, out=u)  # beyond +-10, Phi is 0 or 1 to float32 precision
    i = np.floor(u)
    u -= i  # fractional position in the cell, exact
    i = i.astype(np.intp)  # intp indices: the fast path of take
    i += half
    # mode="clip" keeps the index valid without a pass of its own (NaN casts to INT_MIN; it stays in u)
    np.take(values, i, out=cdf, mode="clip")
    d = np.take(diffs, i, mode="clip")
    d *= u
    cdf += d


# The NumPy blocks below; CuPy runs GELU as one fused kernel (tinyvit.nn.kernels) instead.


def _gelu_erf_block(x, out, cdf):
    """out = x * Phi(x) and cdf = Phi(x) = (1 + erf(x / sqrt 2)) / 2 on one NumPy block."""
    if x.dtype == np.float32:
        _phi32_block(x, cdf)
    else:
        cdf[...] = erf(x * _INV_SQRT_2)
        cdf += 1.0
        cdf *= 0.5
    np.multiply(x, cdf, out=out)


def _gelu_erf_grad_block(x, cdf, dout, dx):
    """dx = dout * GELU'(x) = dout * (Phi(x) + x phi(x)) on one NumPy block, from cdf = Phi(x)."""
    np.multiply(x, x, out=dx)
    dx *= -0.5
    np.exp(dx, out=dx)
    dx *= _INV_SQRT_2PI
    dx *= x  # x phi(x)
    dx += cdf
    dx *= dout


def _gelu_erf_inplace_block(x):
    """x = x * Phi(x) in place on one NumPy block, Phi in a block-sized scratch."""
    _gelu_erf_block(x, x, np.empty_like(x))


def gelu_inplace(x, kind="erf"):
    """GELU overwriting x, with nothing kept for backward: inference on a buffer we own (plain form:
    reference.gelu_forward)."""
    if kind != "erf" or get_array_module(x) is not np:  # CuPy: one fused kernel anyway
        x[...] = gelu_forward(x, kind)[0]
        return x
    in_place_blocks(_gelu_erf_inplace_block, [], [x])
    return x


def gelu_forward(x, kind="erf"):
    """GELU: exact x * Phi(x) ('erf'), torch's tanh approximation ('tanh') or QuickGELU ('quick').

    Both are x * c(x); the cache keeps x and c, from which backward gets GELU'(x) (as torch,
    the derivative is left to backward, so a forward pays only for what it returns). Plain form:
    reference.gelu_forward."""
    xp = get_array_module(x)
    if xp is not np and kind in ("erf", "tanh", "quick"):  # one fused CUDA kernel
        out, c = kernels.gelu(x, kind)
        return out, GeluCache(x, c, kind)
    if kind == "erf":
        out, cdf = xp.empty_like(x, order="C"), xp.empty_like(x, order="C")
        ew_chunks(_gelu_erf_block, [x], [out, cdf])
        return out, GeluCache(x, cdf, kind)
    if kind in ("tanh", "quick"):
        if kind == "tanh":
            z = x * x
            z *= 0.044715
            z += 1.0
            z *= x
            z *= 2 * _SQRT_2_OVER_PI  # z = 2u, u = sqrt(2/pi) * (x + 0.044715 x^3): 0.5 (1 + tanh u) = sigmoid(2u)
        else:
            z = x * _QUICK  # CLIP's QuickGELU: x * sigmoid(1.702 x)
        s = _sigmoid(z)
        return x * s, GeluCache(x, s, kind)
    raise ValueError(f"unknown GELU kind {kind!r}: use 'erf', 'tanh' or 'quick'")


def _sigmoid(z):
    """sigmoid(z) in z's dtype, overwriting z: with e = exp(-|z|) it neither cancels nor overflows."""
    xp = get_array_module(z)
    pos = z >= 0
    e = xp.abs(z, out=z)
    e *= -1.0
    xp.exp(e, out=e)
    s = xp.where(pos, 1.0, e).astype(e.dtype, copy=False)
    e += 1.0
    s /= e
    return s


def gelu_backward(dout, cache):
    """Return dx of gelu_forward (plain form: reference.gelu_backward)."""
    x, c, kind = cache.x, cache.c, cache.kind
    xp = get_array_module(x)
    if xp is not np:
        return kernels.gelu_grad(x, c, dout, kind)
    if kind == "erf":  # c = Phi(x)
        dx = np.empty_like(x, order="C")
        ew_chunks(_gelu_erf_grad_block, [x, c, dout], [dx])
        return dx
    if kind == "quick":  # c = sigmoid(1.702 x): d/dx [x c] = c + 1.702 x c (1 - c)
        dx = x * _QUICK
        dx *= c
        dx *= 1.0 - c
        dx += c
        dx *= dout
        return dx
    # tanh kind, c = sigmoid(2u): d/dx [x c] = c + 2 x c (1 - c) u'(x)
    x = xp.clip(x, -1e4, 1e4)  # beyond, c (1 - c) is exactly 0: keep x^3 from inf * 0 = NaN
    du = x * x
    du *= 3 * 0.044715
    du += 1.0
    du *= 2 * _SQRT_2_OVER_PI  # 2 u'(x)
    du *= x
    du *= c
    du *= 1.0 - c
    du += c
    du *= dout
    return du


# --- softmax ----------------------------------------------------------------------------------
# softmax = e * r with e = exp(x - shift) and r = 1 / rowsum(e). The usual shift is the row max,
# but NumPy's max over short rows costs more than the exp pass (docs/performance.md). Shift 0 is
# as exact whenever every row sum lands in [2^-60, 2^60]: nothing overflows, and any element whose
# exp is denormal weighs < 2^-66 of its row. Only rows outside that range (huge or very negative
# logits) need the max.
_SUM_LO, _SUM_HI = 2.0 ** -60, 2.0 ** 60


def _exp_rows(x, e, r):
    """e = exp(x) and r = its row sums, for a block of rows."""
    with np.errstate(over="ignore"):  # an overflow only sends its row to the shifted path
        get_array_module(x).exp(x, out=e)
        r[...] = rowsum(e)


def _exp_shifted_rows(x, e, r):
    """e = exp(x - row max) and r = its row sums, for a block of rows."""
    xp = get_array_module(x)
    xp.subtract(x, x.max(axis=-1, keepdims=True), out=e)
    xp.exp(e, out=e)
    r[...] = rowsum(e)


def _sums_safe(r):
    """True when every row sum lies in [2^-60, 2^60], where the unshifted exp is exact (NaN fails too)."""
    return bool((r.min() >= _SUM_LO) & (r.max() <= _SUM_HI))


def softmax_parts(x, shift=False):
    """(e, r) with softmax(x) = e * r over the last axis: e (..., N), r (..., 1) = 1 / rowsum(e).

    Keeping the two apart lets attention scale (e @ v) by r, a pass over N x D instead of N x N.
    shift=True always subtracts the row max; by default only when a row sum leaves the safe range.
    Plain form: reference.softmax.
    """
    xp = get_array_module(x)
    if xp is not np:  # CuPy: always shifted, three fused passes (max, sum of exp, exp)
        return kernels.softmax_parts(x)
    e = xp.empty_like(x, order="C")
    r = xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    if not shift:
        row_chunks(_exp_rows, [x], [e, r])
        shift = not _sums_safe(r)
    if shift:
        row_chunks(_exp_shifted_rows, [x], [e, r])
    xp.reciprocal(r, out=r)
    return e, r


def softmax_parts_inplace(x):
    """softmax_parts(x) with e written over x (NumPy; inference: nothing keeps x): returns r, or None
    when a row sum leaves the safe range, x then being spoilt: the caller remakes x and calls
    softmax_parts(x, shift=True)."""
    r = np.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    row_chunks(_exp_rows, [x], [x, r])  # each block's exp overwrites that block, read just before
    if not _sums_safe(r):
        return None
    return np.reciprocal(r, out=r)


def _scale_rows(r, y):
    """y *= r, row by row."""
    y *= r


def softmax_forward(x):
    """Softmax over the last axis, stable for any finite logits (tests only; plain form: reference.softmax)."""
    y, r = softmax_parts(x)
    row_chunks(_scale_rows, [r], [y])
    return y, y


def softmax_backward(dout, cache):
    """Return dx of softmax_forward: y * (dout - sum(dout * y)), softmax_parts_backward with r = 1 (tests only)."""
    y = cache
    xp = get_array_module(y)
    return softmax_parts_backward(dout, y, xp.ones(y.shape[:-1] + (1,), dtype=y.dtype))


def _softmax_parts_grad_rows(dr, e, r, dx):
    """dx = e * (dr - r * sum(dr * e)) for a block of rows, where dr = r * dL/dy."""
    xp = get_array_module(dr)
    xp.multiply(dr, e, out=dx)
    g = rowsum(dx)
    g *= r
    xp.subtract(dr, g, out=dx)
    dx *= e


def softmax_parts_backward(dr, e, r):
    """dL/dx for y = e * r = softmax(x), given dr = r * dL/dy (which attention gets for free).

    With y = e r: y (dy - sum(dy y)) = e (r dy - r sum(r dy e)) = e (dr - r sum(dr e)).
    Plain form: ds in reference.attention_backward.
    """
    if get_array_module(e) is not np:
        return kernels.softmax_parts_grad(dr, e, r)
    dx = np.empty_like(e, order="C")
    row_chunks(_softmax_parts_grad_rows, [dr, e, r], [dx])
    return dx
