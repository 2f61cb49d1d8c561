"""Set the thread count of the OpenBLAS that NumPy runs on, when it can be found (Linux, optional).

Data-parallel shards (tinyvit.cpu.threads.run_shards) give each core its own part of the batch. Each
shard's matmuls must then run on one BLAS thread: two callers that each ask OpenBLAS for every
core contend, and a train step got twice as slow in that case. NumPy has no API for this, so we
look up OpenBLAS's own openblas_set_num_threads in every OpenBLAS mapped into the process (NumPy's,
and SciPy's copy if it is loaded), as threadpoolctl does. Where none is found (MKL or Accelerate
builds, macOS, Windows) available() is False and callers keep the batch whole.
"""
import ctypes
import os
import threading
from contextlib import contextmanager

# (set, get) pairs under the names the OpenBLAS builds in NumPy wheels export
_NAMES = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)
_API = None  # None: not looked up yet; else a list of (path, set, get), NumPy's first; [] if none


def _mapped_openblas_libraries():
    """Paths of the shared libraries mapped into this process whose file name mentions openblas."""
    try:
        with open("/proc/self/maps") as f:
            fields = [line.split(None, 5) for line in f]
    except OSError:  # not Linux
        return []
    paths = {x[5].strip() for x in fields if len(x) == 6}
    paths = [p for p in paths if "openblas" in os.path.basename(p).lower() and ".so" in p]
    return sorted(paths, key=lambda p: ("numpy" not in p, p))  # NumPy's own copy first


def _lookup():
    """[(path, set, get)] for every OpenBLAS mapped here, NumPy's first (SciPy may bring another)."""
    import numpy  # noqa: F401  (loads NumPy's BLAS, so it is mapped below)

    found = []
    for path in _mapped_openblas_libraries():
        try:
            lib = ctypes.CDLL(path)  # already loaded: this only returns its handle
        except OSError:
            continue
        for set_name, get_name in _NAMES:
            set_fn, get_fn = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if set_fn is not None and get_fn is not None:
                set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
                get_fn.argtypes, get_fn.restype = [], ctypes.c_int
                found.append((path, set_fn, get_fn))
                break
    return found


def available() -> bool:
    """True when NumPy's BLAS thread count can be set from here."""
    global _API
    if _API is None:
        _API = _lookup()
    return bool(_API)


def threads():
    """NumPy's BLAS thread count now, or None when it cannot be read."""
    return _API[0][2]() if available() else None


_LOCK = threading.Lock()
_USERS = 0  # callers inside single_thread() now, from any thread
_SAVED = None  # the thread count to restore when the last of them leaves


@contextmanager
def single_thread():
    """Run the block with NumPy's BLAS on one thread, then restore its count (no-op if unavailable).

    Overlapping callers (nested, or from several threads) share one setting: the first saves the
    count, the last restores it, so no interleaving leaves BLAS stuck at one thread."""
    global _USERS, _SAVED
    if not available():
        yield
        return
    with _LOCK:
        if _USERS == 0:  # every OpenBLAS we found: a second copy would otherwise still spread out
            _SAVED = [get_fn() for _, _, get_fn in _API]
            for _, set_fn, _ in _API:
                set_fn(1)
        _USERS += 1
    try:
        yield
    finally:
        with _LOCK:
            _USERS -= 1
            if _USERS == 0:
                for (_, set_fn, _), n in zip(_API, _SAVED):
                    set_fn(n)
