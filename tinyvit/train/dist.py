"""Data-parallel training over MPI: `mpirun -n N python scripts/train_mnist.py ...` runs N ranks.

Every rank walks the same seeded order and takes its slice of each global batch; the gradients are
summed with one Allreduce over a single flat buffer per step, weighted so that the result is the
gradient of the global batch's mean loss. Without an MPI launcher (or with one rank) nothing
changes and mpi4py is never imported. A rank that fails aborts the whole job (MPI_Abort), so the
others do not wait forever in a collective.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..backend import get_array_module, to_numpy
from ..data.batches import shard_bounds
from ..errors import TinyViTError
from ..io.files import prepare_out_dir

_LAUNCHER_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")  # MPICH/Intel, Open MPI, PMIx


class World:
    """This process's rank among `size` (comm None: a single process)."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1

    @property
    def lead(self) -> bool:
        """True on the rank that prints, logs and writes files (rank 0)."""
        return self.rank == 0

    def out_dir(self, path) -> Path:
        """The run's output folder: made and checked writable by rank 0, which alone writes files; the other
        ranks only name it (a folder they made could beat rank 0 to it, which then took it for the user's
        and kept it, empty, after an early failure: tinyvit.cli.args.removed_if_unused)."""
        return prepare_out_dir(path) if self.lead else Path(path)

    def part(self, n):
        """This rank's slice of a global batch of n."""
        return slice(*shard_bounds(0, n, (self.rank, self.size)))

    def sum_(self, buf):
        """Sum a host NumPy array over the ranks, in place (a no-op on one rank)."""
        if self.comm is not None:
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def sum_grads(self, grads, extra=()):
        """(grads, extra) summed over the ranks in one Allreduce of one flat buffer (extra: a few
        host numbers riding along, e.g. votes to stop)."""
        if self.comm is None:
            return grads, list(extra)
        xp = get_array_module(*grads.values())
        dtype = np.result_type(*(g.dtype for g in grads.values()))
        flat = np.concatenate([to_numpy(g).ravel().astype(dtype, copy=False) for g in grads.values()]
                              + [np.asarray(extra, dtype)])  # host-staged on CuPy
        self.sum_(flat)
        out, o = {}, 0
        for k, g in grads.items():
            out[k] = xp.asarray(flat[o:o + g.size].reshape(g.shape).astype(g.dtype, copy=False))
            o += g.size
        return out, [float(v) for v in flat[o:]]

    def abort(self, code):
        """End every rank of the job (after this rank printed why)."""
        if self.comm is not None:
            sys.stderr.flush()
            time.sleep(0.5)  # the launcher forwards this rank's last lines before Abort kills its I/O (they were lost ~1 in 6)
            self.comm.Abort(code)


_WORLD = None


def world() -> World:
    """The MPI world when launched by mpirun/mpiexec with more than one rank, else a single process."""
    global _WORLD
    if _WORLD is None:
        comm = None
        if any(v in os.environ for v in _LAUNCHER_ENV):
            try:
                from mpi4py import MPI
            except ImportError:
                raise TinyViTError("launched under MPI, but mpi4py is not installed: pip install -e '.[mpi]'") from None
            if MPI.COMM_WORLD.Get_size() > 1:
                comm = MPI.COMM_WORLD
        _WORLD = World(comm)
        if comm is not None:
            _abort_on_uncaught(_WORLD)
    return _WORLD


def _abort_on_uncaught(w):
    """A traceback on one rank ends the job instead of leaving the others in a collective."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        w.abort(1)

    sys.excepthook = hook
