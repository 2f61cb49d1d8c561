"""NumPy speed machinery that never changes the math: one thread per core over batch shards, and
blockwise passes that keep data in cache."""
import os
import threading

import numpy as np

from ..backend import get_array_module
from ..errors import TinyViTError
from .malloc import tune_host_malloc

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


def parallel_blocks(block, starts):
    """block(i) for every start i, spread over the pool's threads; inline inside a shard (one core)."""
    _parallel(block, starts)


# --- data-parallel shards ---------------------------------------------------------------------
# NumPy runs most ops on one core and OpenBLAS is slow on many small matmuls (attention heads).
# Cutting the batch into one shard per core, each with one BLAS thread, keeps every core busy
# (the figure: docs/performance.md).


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


class OrderedSum:
    """Per-name sums of the shards' arrays, added as each arrives (shard 0's, then += shard 1's, ...): the
    same bits as summing whole per-shard dicts at the end, while no shard keeps more than what it has not
    handed over yet. One that arrives before a lower shard's waits beside the sum until its turn; of two
    shards, none waits (a + b and b + a are the same bits)."""

    def __init__(self, shards=None):
        self.sums, self._next, self._waiting, self._lock = {}, {}, {}, threading.Lock()
        self._two, self._order = shards == 2, []  # _order: shard 0's names, as it handed them over

    def add(self, shard, name, x):
        """Hand over shard's array for name (then the shard's own reference may go)."""
        with self._lock:
            if shard == 0:
                self._order.append(name)
            if self._two:
                if name in self.sums:
                    self.sums[name] += x
                else:
                    self.sums[name] = x
                return
            waiting = self._waiting.setdefault(name, {})
            waiting[shard] = x
            i = self._next.get(name, 0)
            while i in waiting:
                x = waiting.pop(i)
                if i == 0:
                    self.sums[name] = x
                else:
                    self.sums[name] += x
                i += 1
            self._next[name] = i
            if not waiting:
                del self._waiting[name]

    def result(self) -> dict:
        """The sums, in the order shard 0 handed them over (a dict's order is a float sum's order downstream)."""
        return {k: self.sums[k] for k in self._order}


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
