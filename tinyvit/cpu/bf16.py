"""bfloat16 GEMMs with float32 accumulation for NumPy, through a BLAS that has them (NumPy has none).

oneMKL's cblas_gemm_bf16bf16f32 from the `mkl` wheel (`pip install -e ".[mkl]"`), or OpenBLAS's
cblas_sbgemm where the OpenBLAS loaded here exports it (NumPy's wheels do not), both through ctypes.
Inputs are rounded to bf16 to nearest even as torch's `.bfloat16()` does; products are summed in float32
and returned as float32. Only CPUs with AVX512-BF16 or AMX-BF16 multiply bf16 natively (and oneMKL takes
those kernels on Intel CPUs only): elsewhere the library emulates it, no faster than float32, so require()
refuses unless told otherwise (allow_slow=True or TINYVIT_BF16_ANY_CPU=1), which lets tests check the
results on any CPU.
"""
import ctypes
import ctypes.util
import glob
import importlib.metadata
import os
import sys
from typing import Callable, NamedTuple, Optional

import numpy as np

from ..errors import TinyViTError
from . import blas
from .blas import _mapped_openblas_libraries
from .features import cpu_features, cpu_name, cpu_vendor

ANY_CPU_ENV = "TINYVIT_BF16_ANY_CPU"  # "1": run bf16 GEMMs even where the CPU would emulate them
INSTALL = "pip install mkl (or pip install -e \".[mkl]\")"
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums, the same in oneMKL and OpenBLAS
# OpenBLAS's bf16 GEMM under the names its builds export (NumPy's wheels prefix scipy_, 64-bit ints add 64_)
_SBGEMM_NAMES = ("scipy_cblas_sbgemm64_", "cblas_sbgemm64_", "scipy_cblas_sbgemm", "cblas_sbgemm")


class Gemm(NamedTuple):
    """A bound bf16 GEMM: its library's name, the CBLAS function, its integer type, a thread setter."""
    name: str
    fn: Callable
    int_type: type
    set_threads: Optional[Callable] = None  # n -> None, before each call (oneMKL's own thread count)


def to_bf16(x):
    """float32 -> bfloat16 bits as uint16, rounded to nearest even exactly as torch's .bfloat16(); NaN -> 0xFFFF."""
    x = np.asarray(x, dtype=np.float32, order="C")
    u = x.view(np.uint32)
    t = u >> 16
    t &= 1
    t += 0x7FFF  # the rounding bias: half an ulp of bf16, less one unless the kept bit is odd (ties to even)
    t += u
    t >>= 16
    out = t.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # the bias may carry a NaN's mantissa into its sign or exponent: one quiet NaN, torch's
        out[nan] = 0xFFFF
    return out


def from_bf16(u):
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def bind(name, fn, int_type, set_threads=None):
    """A Gemm from a CBLAS bf16 GEMM function with the signature oneMKL and OpenBLAS share."""
    i, f, p = int_type, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, f, p, i, p, i, f, p, i]
    fn.restype = None
    return Gemm(name, fn, int_type, set_threads)


def _mkl_paths():
    """Where the mkl wheel's libmkl_rt (mkl_rt.N.dll on Windows) may be: its own file list, then the usual places."""
    try:
        files = importlib.metadata.distribution("mkl").files or []
        found = [str(f.locate()) for f in files if os.path.basename(str(f)).startswith(("libmkl_rt.so", "mkl_rt"))]
    except importlib.metadata.PackageNotFoundError:
        found = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    return found + [p for p in [ctypes.util.find_library("mkl_rt")] if p]


def _load_mkl():
    """oneMKL's cblas_gemm_bf16bf16f32 as a Gemm, or None where no libmkl_rt loads."""
    for path in _mkl_paths():
        try:
            lib = ctypes.CDLL(path)
            fn = lib.cblas_gemm_bf16bf16f32
        except (OSError, AttributeError):
            continue
        lib.MKL_Set_Interface_Layer.argtypes, lib.MKL_Set_Interface_Layer.restype = [ctypes.c_int], ctypes.c_int
        layer = lib.MKL_Set_Interface_Layer(0)  # LP64 (32-bit ints) unless the process already chose ILP64
        local = lib.MKL_Set_Num_Threads_Local
        local.argtypes, local.restype = [ctypes.c_int], ctypes.c_int
        try:
            version = importlib.metadata.version("mkl")
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return bind(f"oneMKL {version} cblas_gemm_bf16bf16f32", fn, ctypes.c_int64 if layer & 1 else ctypes.c_int32,
                    local)
    return None


def _load_openblas():
    """OpenBLAS's cblas_sbgemm as a Gemm, where an OpenBLAS mapped into this process exports it; else None."""
    for path in _mapped_openblas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SBGEMM_NAMES:
            fn = getattr(lib, name, None)
            if fn is not None:  # its own thread count: NumPy's, set through tinyvit.cpu.blas
                return bind(f"OpenBLAS {name} ({os.path.basename(path)})", fn,
                            ctypes.c_int64 if name.endswith("64_") else ctypes.c_int32)
    return None


_GEMM = []  # [] not looked up yet; else [Gemm or None]


def library():
    """The bf16 GEMM this process can call (oneMKL first, then OpenBLAS's sbgemm), or None."""
    if not _GEMM:
        _GEMM.append(_load_mkl() or _load_openblas())
    return _GEMM[0]


def slow(gemm):
    """(short, long) phrases saying why gemm would run bf16 no faster than float32 on this CPU, or None if natively."""
    f = cpu_features()
    if f["avx512_bf16"] is None:
        return "CPU features unknown", "cannot tell whether this CPU has AVX512-BF16 or AMX-BF16 (no /proc/cpuinfo)"
    if not (f["avx512_bf16"] or f["amx_bf16"]):
        return "emulated: no AVX512-BF16 or AMX-BF16", (f"this CPU ({cpu_name()}) has neither AVX512-BF16 nor "
                                                         "AMX-BF16, so bf16 would be emulated, slower than float32")
    if gemm.name.startswith("oneMKL") and cpu_vendor() != "GenuineIntel":  # measured on Zen 4: float32's rate
        return "oneMKL's bf16 kernels run on Intel CPUs only", (f"on this {cpu_name()} oneMKL's bf16 GEMM runs no faster "
                                                                "than float32 (it takes its bf16 kernels on Intel CPUs only)")
    return None


def _allowed(allow_slow):
    """allow_slow, or the environment's TINYVIT_BF16_ANY_CPU=1 when it is None."""
    return os.environ.get(ANY_CPU_ENV, "") == "1" if allow_slow is None else bool(allow_slow)


def require(allow_slow=None):
    """The Gemm to use, or TinyViTError in one line: no library (what to install), or a CPU that would emulate bf16."""
    gemm = library()
    if gemm is None:
        raise TinyViTError(f"bf16 GEMMs need oneMKL: {INSTALL}; NumPy's OpenBLAS has no sbgemm. Or use float32")
    why = None if _allowed(allow_slow) else slow(gemm)  # allowed: no /proc/cpuinfo read per GEMM
    if why:
        why = why[1]
        raise TinyViTError(f"{why}: use float32 (oneMKL's bf16 pays on Intel CPUs with AVX512-BF16 or AMX: Cooper "
                           f"Lake, Sapphire Rapids and later), or set {ANY_CPU_ENV}=1 to run bf16 anyway")
    return gemm


def check_precision(precision, xp=np):
    """Refuse precision 'bf16' in one line where it cannot run (CuPy, no library) or would not pay (require()'s
    CPU check, TINYVIT_BF16_ANY_CPU=1 to run it anyway); 'float32' always passes."""
    if precision != "bf16":
        return
    if xp is not np:
        raise TinyViTError("precision bf16 runs on NumPy (CPU) only: use float32 on CuPy")
    require()


def describe():
    """One phrase for the hardware line: which bf16 GEMM would run, and whether natively."""
    gemm = library()
    if gemm is None:
        return f"none ({INSTALL} to have one)"
    why = slow(gemm)
    return gemm.name + (f", no faster than float32 here ({why[0]})" if why else ", native")


def _operand(x, trans):
    """(C-ordered bf16 bits, trans) of one 2-D operand; an F-ordered array is read as its transpose, no copy."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise TinyViTError(f"gemm_bf16 takes 2-D operands, got shape {x.shape}")
    if not x.flags.c_contiguous and x.flags.f_contiguous:
        x, trans = x.T, not trans
    return (np.ascontiguousarray(x) if x.dtype == np.uint16 else to_bf16(x)), trans


def gemm_bf16(a, b, transa=False, transb=False, allow_slow=None):
    """op(a) @ op(b) with both rounded to bf16 (uint16 operands are taken as bf16 bits), summed in float32.

    op(x) is x.T when its trans flag is set. Returns a new float32 (m, n) array. The thread count follows
    NumPy's BLAS (tinyvit.cpu.blas): one thread inside a batch shard, all cores outside."""
    gemm = require(allow_slow)
    (a16, ta), (b16, tb) = _operand(a, transa), _operand(b, transb)
    m, k = a16.shape[::-1] if ta else a16.shape
    k2, n = b16.shape[::-1] if tb else b16.shape
    if k != k2:
        raise TinyViTError(f"gemm_bf16: inner sizes differ, {k} and {k2}")
    if m == 0 or n == 0 or k == 0:
        return np.zeros((m, n), np.float32)
    c = np.empty((m, n), np.float32)  # beta 0: never read
    if gemm.set_threads is not None:
        gemm.set_threads(blas.threads() or 0)  # 0: the library's own default (all cores)
    i = gemm.int_type
    gemm.fn(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS, i(m), i(n), i(k), 1.0,
            a16.ctypes.data, i(a16.shape[1]), b16.ctypes.data, i(b16.shape[1]), 0.0, c.ctypes.data, i(n))
    return c
