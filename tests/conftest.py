"""Shared test fixtures: the array backends to run on, and an error measure."""
from pathlib import Path

import numpy as np
import pytest

from tinyvit.backend import cupy_available, get_backend, to_numpy

NO_GPU = "CuPy with a CUDA GPU is not available on this machine"
BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.skipif(not cupy_available(), reason=NO_GPU)),
]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module under test: numpy always, cupy when a GPU is present."""
    return get_backend(request.param)


def rel_err(a, b, floor=1e-12):
    """max |a - b| / max(max |b|, floor): relative to the reference b, absolute when b is ~0."""
    a = to_numpy(a).astype(np.float64)
    b = to_numpy(b).astype(np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = np.max(np.abs(b)) if b.size else 0.0
    diff = np.max(np.abs(a - b)) if a.size else 0.0
    return diff / max(scale, floor)


def shared_data_dir():
    """The read-only data folder beside the checkout (None when absent)."""
    import os

    env = os.environ.get("TINYVIT_DATA")
    p = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return p if p.is_dir() else None
