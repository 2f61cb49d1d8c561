"""The array backend: NumPy on CPU or CuPy on CUDA. The only module that imports CuPy."""
import os
import threading

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
    except Exception:  # ImportError, or a CUDA driver/runtime error: no usable GPU
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
    """The cupy module, for code that builds CUDA kernels (tinyvit.kernels); an error without a GPU."""
    cp = _import_cupy()
    if cp is None:
        raise TinyViTError("CuPy with a CUDA GPU is needed here, and none is usable")
    return cp


_MALLOC_TUNED = None  # None: not tried yet; then whether it was applied


def tune_host_malloc() -> bool:
    """Keep freed large arrays in glibc's heap instead of unmapping them; True if it was applied.

    NumPy allocates a fresh array for each temporary. Above glibc's mmap threshold every one is a
    new mapping whose pages fault in again on first touch: about a quarter of a ViT-Ti forward
    here. A high mmap/trim threshold lets them reuse heap memory (peak memory is unchanged; the
    heap just is not handed back between steps). Linux/glibc only; TINYVIT_MALLOC=system opts out.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = os.environ.get("TINYVIT_MALLOC") != "system" and _set_malloc_thresholds()
    return _MALLOC_TUNED


def _set_malloc_thresholds() -> bool:
    """glibc mallopt: no mmap below 1 GiB, no heap trimming below 1 GiB free; False elsewhere."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): keep its defaults
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 1 << 30))


def get_backend(name: str = "numpy"):
    """Return the array module (numpy or cupy) for 'numpy', 'cupy' or 'auto'."""
    if name not in BACKENDS:
        raise TinyViTError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "numpy":
        tune_host_malloc()
        return np
    cp = _import_cupy()
    if cp is not None:
        return cp
    if name == "auto":
        tune_host_malloc()
        return np
    raise TinyViTError(
        "backend 'cupy' needs CuPy and a CUDA GPU, and none is usable here: "
        "install the extra (pip install -e '.[cuda]') on a machine with a GPU, or use --backend numpy"
    )


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
    p = t * coefs[-1]
    for c in coefs[-2:0:-1]:
        p += c
        p *= t
    p += coefs[0]
    return p


# --- sums as BLAS products -------------------------------------------------------------------
# NumPy's reduce over a short last axis (C = 64) is 4-6x slower than a matrix-vector product
# with a ones vector, which BLAS also runs on every core.


def rowsum(x):
    """Sum over the last axis, keeping it as size 1: (..., C) -> (..., 1)."""
    xp = get_array_module(x)
    return (x @ xp.ones(x.shape[-1], dtype=x.dtype))[..., None]


def colsum(x2):
    """Sum over the rows of a 2-D array: (M, C) -> (C,)."""
    xp = get_array_module(x2)
    return xp.ones(x2.shape[0], dtype=x2.dtype) @ x2


_WORKERS = max(1, min(8, os.cpu_count() or 1))  # one pool thread per core, at most 8
_POOL = None


def _pool():
    """The process-wide thread pool for blockwise NumPy work (one thread per core)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        tune_host_malloc()  # blockwise work is NumPy work: give it cheap temporaries too

        _POOL = ThreadPoolExecutor(max_workers=_WORKERS)
    return _POOL


_IN_POOL = threading.local()  # set on pool threads: nested blockwise calls run inline there


def _parallel(block, starts):
    """block(i) for every start i, every n-th block per pool thread; inline on a pool thread."""
    starts = list(starts)
    if getattr(_IN_POOL, "flag", False):  # nested call from a block: no deadlock waiting on ourselves
        for i in starts:
            block(i)
        return
    n = min(_WORKERS, len(starts))

    def share(k):  # one task per thread: per-task scheduling costs more than a small block's work
        _IN_POOL.flag = True
        for i in starts[k::n]:
            block(i)

    list(_pool().map(share, range(n)))


# --- data-parallel shards ---------------------------------------------------------------------
# NumPy runs most ops on one core and OpenBLAS is slow on many small matmuls (attention heads).
# Cutting the batch into one shard per core, each with one BLAS thread, keeps every core busy:
# a ViT-B/16 forward at batch 8 took 1.2 s instead of 1.6 s here (2 cores).


def _shards_wanted():
    """Shards per batch: TINYVIT_SHARDS if set (1 turns sharding off), else one per core."""
    env = os.environ.get("TINYVIT_SHARDS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise TinyViTError(f"TINYVIT_SHARDS must be a positive integer, got {env!r}")
        return int(env)
    return _WORKERS


def batch_shards(n, xp=np):
    """Slices cutting a batch of n into shards to run one per core, or None to run it whole.

    Only on NumPy, outside the pool, and where NumPy's BLAS can be set to one thread (blas.py).
    """
    from . import blas

    if xp is not np or getattr(_IN_POOL, "flag", False):
        return None
    k = min(_shards_wanted(), n)
    if k < 2 or not blas.available():
        return None
    edges = [n * i // k for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:])]


def run_shards(fn, items):
    """[fn(item) for item in items], each on a pool thread with one BLAS thread; all finish first."""
    from concurrent.futures import wait

    from . import blas

    def run(item):
        _IN_POOL.flag = True  # blockwise helpers inside run inline: this core is the shard's
        return fn(item)

    with blas.single_thread():
        futures = [_pool().submit(run, item) for item in items]
        wait(futures)  # every shard done before BLAS gets its threads back
    return [f.result() for f in futures]  # re-raises a shard's exception


CHUNK = 1 << 16  # elements per block: ~256 KB of float32 stays in L2 across a chain of passes


def ew_chunks(fn, inputs, outputs):
    """Run fn(*input_blocks, *output_blocks) over flat blocks of same-size contiguous arrays.

    A chain of NumPy passes over a big array streams it through memory once per pass; done block
    by block the chain stays in cache (2-3x faster here). CuPy gets one call on the whole arrays.
    """
    size = (inputs or outputs)[0].size  # no inputs: fn works in place on its outputs
    if get_array_module((inputs or outputs)[0]) is not np or size <= CHUNK:
        fn(*inputs, *outputs)
        return
    ins = [np.ascontiguousarray(a).reshape(-1) for a in inputs]
    outs = [o.reshape(-1) for o in outputs]  # outputs are ours, allocated contiguous

    def block(i):
        j = i + CHUNK
        fn(*[a[i:j] for a in ins], *[o[i:j] for o in outs])

    # NumPy releases the GIL inside ufunc loops, so blocks on threads use every core
    _parallel(block, range(0, size, CHUNK))


def in_place_blocks(fn, inputs, outputs):
    """ew_chunks for fn updating its outputs in place; one whole-array call unless all are contiguous."""
    if all(o.flags.c_contiguous for o in outputs):
        ew_chunks(fn, inputs, outputs)
    else:  # flat views of a strided array would be copies: the updates would be lost
        fn(*inputs, *outputs)


def row_chunks(fn, inputs, outputs):
    """Run fn(*input_blocks, *output_blocks) over blocks of rows (all leading axes) in parallel.

    Every array is viewed as (rows, its own last-axis size), so row-wise work (softmax,
    layernorm) can be split like ew_chunks; CuPy gets one call on the whole arrays.
    """
    rows = int(np.prod(inputs[0].shape[:-1]))
    width = max(a.shape[-1] for a in (*inputs, *outputs))
    if get_array_module(inputs[0]) is not np or rows * width <= CHUNK:
        fn(*inputs, *outputs)
        return
    ins = [np.ascontiguousarray(a).reshape(rows, -1) for a in inputs]
    outs = [o.reshape(rows, -1) for o in outputs]  # outputs are ours, allocated contiguous
    step = max(1, CHUNK // width)

    def block(i):
        fn(*[a[i:i + step] for a in ins], *[o[i:i + step] for o in outs])

    _parallel(block, range(0, rows, step))


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
    q, p = _COEFS[x.dtype]
    a = np.maximum(np.abs(x), 1.0)  # the tail fit is valid for |x| >= 1 only
    t = a * 0.5
    t += 1.0
    np.reciprocal(t, out=t)  # t = 1 / (1 + a/2)
    e = _horner(p, t)
    a *= a
    e -= a
    np.exp(e, out=e)
    e *= t  # erfc(a)
    np.subtract(1.0, e, out=e)
    e *= np.sign(x)
    xs = np.clip(x, -1.0, 1.0)  # the series branch is only kept for |x| < 1: avoid overflow
    s = xs * xs
    np.copyto(out, e)
    np.copyto(out, xs * _horner(q, s), where=np.abs(x) < 1.0)


def erf(x):
    """Error function, elementwise, in x's dtype (float32 or float64), NumPy or CuPy."""
    xp = get_array_module(x)
    if xp is not np:
        if is_standin(xp):
            return xp.special_erf(x)
        from cupyx.scipy.special import erf as cupy_erf

        return cupy_erf(x)
    x = np.asarray(x)
    if x.dtype not in _COEFS:
        raise TinyViTError(f"erf takes float32 or float64 arrays, got {x.dtype}")
    out = np.empty_like(x, order="C")
    ew_chunks(_erf_block, [x], [out])
    return out
