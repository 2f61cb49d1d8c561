"""Special functions for the NumPy engine: erf (rational fits, float32 and float64) and row/column
sums as matmuls."""
import numpy as np

from ..backend import cupy_erf, get_array_module
from ..cpu.threads import ew_chunks
from ..errors import TinyViTError

# --- erf --------------------------------------------------------------------------------------
# NumPy has no erf, so we fit our own (scripts/fit_erf.py: least squares against mpmath at 50
# digits on Chebyshev nodes). Two ranges, the same form for both dtypes:
#   |x| <  1:  erf(x) = x * Q(x^2)
#   |x| >= 1:  erfc(|x|) = t * exp(-x^2 + P(t)),  t = 1 / (1 + |x|/2)
# float64 (Q degree 12, P degree 20): erf absolute error <= 2e-16.
# float32 takes one cheaper form (half the passes): erf(x) = x * R(x^2) / S(x^2) on |x| <= 3.92
# (beyond that float32 erf is 1), degrees 5/5, fitted by reweighted least squares (relative fit
# error 2.7e-8); evaluated in float32 the absolute error is <= 3.2e-7 (about 5 ulp at 1).
_R32 = (1.1283791596206945, 0.18827290968448948, 0.052485843228181034, 0.0036800475449682204,
        0.00028398782054526593, 2.0795537432799185e-06)
_S32 = (1.0, 0.5001855113673804, 0.11324490311027391, 0.014796194869280879,
        0.0011437577661536167, 3.83511953781992e-05)
_Q64 = (1.1283791670955126, -0.3761263890318375, 0.11283791670954882, -0.026866170645077334,
        0.005223977624823223, -0.0008548326981129666, 0.00012055331122299266,
        -1.4925595519506043e-05, 1.6461004480962034e-06, -1.6350354461959655e-07,
        1.4660051998394848e-08, -1.1373902296430911e-09, 5.958930743134941e-11)
_P64 = (-1.2655121234846451, 0.9999999999998072, 0.375000000041853, 0.08333332973667586,
        -0.0859373369426005, -0.14375450290834169, -0.09171441679263669, 0.028518693560231415,
        0.14270937411531692, 0.054067773056695564, 0.3248101444580754, -1.5881571085381936,
        3.8427295715367746, -8.459135431660084, 12.552009661962215, -8.169887995121364,
        -4.656264484736474, 13.875027026036653, -11.979666391174526, 5.03917190574327,
        -0.8774068865048382)
_COEFS = {np.dtype(np.float32): (_R32, _S32), np.dtype(np.float64): (_Q64, _P64)}


def _horner(coefs, t):
    """Evaluate sum(coefs[i] * t**i) in t's dtype on one fresh buffer."""
    y = t * coefs[-1]
    for c in coefs[-2:0:-1]:
        y += c
        y *= t
    y += coefs[0]
    return y


# --- sums as BLAS products -------------------------------------------------------------------
# NumPy's reduce over a short last axis (C = 64) is several times slower than a matrix-vector
# product with a ones vector, which BLAS also runs on every core (docs/performance.md).


def rowsum(x):
    """Sum over the last axis, keeping it as size 1: (..., C) -> (..., 1)."""
    xp = get_array_module(x)
    return (x @ xp.ones(x.shape[-1], dtype=x.dtype))[..., None]


def colsum(x2):
    """Sum over the rows of a 2-D array: (M, C) -> (C,)."""
    xp = get_array_module(x2)
    return xp.ones(x2.shape[0], dtype=x2.dtype) @ x2


def _erf32_block(x, out):
    """float32 erf of one block: x R(x^2) / S(x^2) on x clamped to +-3.92."""
    xc = np.clip(x, -3.92, 3.92)
    s = xc * xc
    r = _horner(_R32, s)
    r /= _horner(_S32, s)
    np.multiply(r, xc, out=out)


def _erf_block(x, out):
    """erf of one block of x, written into out."""
    if x.dtype == np.float32:
        return _erf32_block(x, out)
    q_coefs, p_coefs = _COEFS[x.dtype]  # Q and P of the fits above
    a = np.maximum(np.abs(x), 1.0)  # the tail fit is valid for |x| >= 1 only
    t = a * 0.5
    t += 1.0
    np.reciprocal(t, out=t)  # t = 1 / (1 + a/2)
    e = _horner(p_coefs, t)
    a *= a
    e -= a
    np.exp(e, out=e)
    e *= t  # erfc(a)
    np.subtract(1.0, e, out=e)
    e *= np.sign(x)
    xs = np.clip(x, -1.0, 1.0)  # the series branch is only kept for |x| < 1: avoid overflow
    s = xs * xs
    np.copyto(out, e)
    np.copyto(out, xs * _horner(q_coefs, s), where=np.abs(x) < 1.0)


def erf(x):
    """Error function, elementwise, in x's dtype (float32 or float64), NumPy or CuPy."""
    xp = get_array_module(x)
    if xp is not np:
        return cupy_erf(x)
    x = np.asarray(x)
    if x.dtype not in _COEFS:
        raise TinyViTError(f"erf takes float32 or float64 arrays, got {x.dtype}")
    out = np.empty_like(x, order="C")
    ew_chunks(_erf_block, [x], [out])
    return out
