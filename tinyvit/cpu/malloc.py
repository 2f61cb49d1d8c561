"""glibc malloc tuning for NumPy's many large temporaries (TINYVIT_MALLOC=system opts out)."""
import os

_MALLOC_TUNED = None  # None: not tried yet; then whether it was applied


def tune_host_malloc() -> bool:
    """Keep freed large arrays in glibc's heap instead of unmapping them; True if it was applied.

    NumPy allocates a fresh array for each temporary. Above glibc's mmap threshold every one is a
    new mapping whose pages fault in again on first touch: about a quarter of a ViT-Ti forward
    here. A high mmap/trim threshold lets them reuse heap memory (the heap is not handed back between
    steps). One arena for every thread: with one per shard thread, each kept its own freed arrays,
    which added about 300 MiB to a ViT-B/16 batch-32 train step's peak for no speed (docs/performance.md).
    Linux/glibc only; TINYVIT_MALLOC=system opts out.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = os.environ.get("TINYVIT_MALLOC") != "system" and _set_malloc_thresholds()
    return _MALLOC_TUNED


def _set_malloc_thresholds() -> bool:
    """glibc mallopt: no mmap below 1 GiB, no heap trimming below 1 GiB free, one arena; False elsewhere."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): keep its defaults
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 1 << 30)
                and mallopt(M_ARENA_MAX, 1))
