"""The array backend: NumPy on CPU or CuPy on CUDA. The only module that imports CuPy."""
import numpy as np

from .errors import TinyViTError

BACKENDS = ("numpy", "cupy", "auto")


def _import_cupy():
    """Return the cupy module if it is installed and sees a GPU, else None."""
    try:
        import cupy  # noqa: F401  (optional dependency)

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # ImportError, or a CUDA driver/runtime error: no usable GPU
        return None
    return None


def cupy_available() -> bool:
    """True when CuPy is installed and a CUDA GPU is visible."""
    return _import_cupy() is not None


def get_backend(name: str = "numpy"):
    """Return the array module (numpy or cupy) for 'numpy', 'cupy' or 'auto'."""
    if name not in BACKENDS:
        raise TinyViTError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "numpy":
        return np
    cp = _import_cupy()
    if cp is not None:
        return cp
    if name == "auto":
        return np
    raise TinyViTError(
        "backend 'cupy' needs CuPy and a CUDA GPU, and none is usable here: "
        "install the extra (pip install -e '.[cuda]') on a machine with a GPU, or use --backend numpy"
    )


def get_array_module(*arrays):
    """numpy or cupy, whichever owns the arrays (cupy.get_array_module without importing CuPy)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np


def to_device(x, xp):
    """Move a NumPy array (or a dict of them) onto the backend xp."""
    if isinstance(x, dict):
        return {k: to_device(v, xp) for k, v in x.items()}
    return xp.asarray(x)


def to_numpy(x):
    """Bring an array (or a dict of them) back to host NumPy."""
    if isinstance(x, dict):
        return {k: to_numpy(v) for k, v in x.items()}
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)


def synchronize(xp):
    """Wait for queued GPU work (a no-op on NumPy); used for honest timing."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


# --- erf --------------------------------------------------------------------------------------
# NumPy has no erf, so we fit our own (scripts/fit_erf.py: least squares against mpmath at 50
# digits on Chebyshev nodes). Two ranges, the same form for both dtypes:
#   |x| <  1:  erf(x) = x * Q(x^2)
#   |x| >= 1:  erfc(|x|) = t * exp(-x^2 + P(t)),  t = 1 / (1 + |x|/2)
# float64 (Q degree 12, P degree 20): erf absolute error <= 2e-16.
# float32 (Q degree 7, P degree 10): fit error <= 1e-9, so float32 rounding (~1 ulp) dominates.
_Q32 = (1.1283791670623609, -0.3761263847599132, 0.11283782622062184, -0.026865438310515116,
        0.005221053412537675, -0.0008484396550601893, 0.00011268253894199437,
        -9.673590811750782e-06)
_P32 = (-1.2655121226729855, 0.9999996848396239, 0.37502029721854596, 0.08282199512586526,
        -0.07931920322460721, -0.1936838309867749, 0.1416003080189808, -0.6580973446849859,
        1.3718690327358027, -1.0788125923513558, 0.30465606497050945)
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
_COEFS = {np.dtype(np.float32): (_Q32, _P32), np.dtype(np.float64): (_Q64, _P64)}


def _horner(coefs, t):
    """Evaluate sum(coefs[i] * t**i) in t's dtype on one fresh buffer."""
    p = t * coefs[-1]
    for c in coefs[-2:0:-1]:
        p += c
        p *= t
    p += coefs[0]
    return p


def erf(x):
    """Error function, elementwise, in x's dtype (float32 or float64), NumPy or CuPy."""
    if get_array_module(x) is not np:
        from cupyx.scipy.special import erf as cupy_erf

        return cupy_erf(x)
    x = np.asarray(x)
    if x.dtype not in _COEFS:
        raise TinyViTError(f"erf takes float32 or float64 arrays, got {x.dtype}")
    q, p = _COEFS[x.dtype]
    a = np.maximum(np.abs(x), 1.0)  # the tail fit is valid for |x| >= 1 only
    t = a * 0.5
    t += 1.0
    np.reciprocal(t, out=t)  # t = 1 / (1 + a/2)
    out = _horner(p, t)
    out -= a * a
    np.exp(out, out=out)
    out *= t  # erfc(a)
    np.subtract(1.0, out, out=out)
    out *= np.sign(x)
    xs = np.clip(x, -1.0, 1.0)  # the series branch is only kept for |x| < 1: avoid overflow
    return np.where(np.abs(x) < 1.0, xs * _horner(q, xs * xs), out)
