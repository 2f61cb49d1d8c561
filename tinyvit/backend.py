"""The array backend: NumPy on CPU or CuPy on CUDA. The only module that imports CuPy."""
import os

import numpy as np

from .errors import TinyViTError

BACKENDS = ("numpy", "cupy", "auto")


STANDIN_ENV = "TINYVIT_CUPY_STANDIN"  # =1: without a usable GPU, 'cupy' is the host stand-in
_CUPY = {}  # the stand-in setting -> the module found (or None), looked up once


def _real_cupy():
    """The cupy module if it is installed and sees a GPU, else None."""
    try:
        import cupy  # noqa: F401  (optional dependency)

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # noqa: BLE001 (ImportError, or a CUDA driver/runtime error: no usable GPU)
        return None
    return None


def _import_cupy():
    """Real CuPy on a GPU; else the stand-in (tinyvit.testing.cupy_standin) when TINYVIT_CUPY_STANDIN=1; else None."""
    standin = os.environ.get(STANDIN_ENV, "") not in ("", "0")
    if standin not in _CUPY:
        cp = _real_cupy()
        if cp is None and standin:
            from .testing import cupy_standin as cp
        _CUPY[standin] = cp
    return _CUPY[standin]


def cupy_available() -> bool:
    """True when CuPy is installed and a CUDA GPU is visible (or the stand-in is switched on)."""
    return _import_cupy() is not None


def is_standin(xp) -> bool:
    """True for the host CuPy stand-in (no GPU behind it)."""
    return getattr(xp, "__name__", "") == "tinyvit.testing.cupy_standin"


def cupy_module():
    """The cupy module, for code that builds CUDA kernels (tinyvit.nn.kernels); an error without a GPU."""
    cp = _import_cupy()
    if cp is None:
        raise TinyViTError("CuPy with a CUDA GPU is needed here, and none is usable")
    return cp


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


def cupy_erf(x):
    """erf of a CuPy array (cupyx.scipy.special; the stand-in's own on the host), for tinyvit.nn.special."""
    xp = get_array_module(x)
    if is_standin(xp):
        return xp.special_erf(x)
    from cupyx.scipy.special import erf

    return erf(x)


def get_array_module(*arrays):
    """numpy or cupy, whichever owns the arrays (cupy.get_array_module without importing CuPy)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):  # the CuPy stand-in's arrays name their module
            return getattr(type(a), "standin_module", None) or _import_cupy()
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
