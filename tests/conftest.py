"""Shared test fixtures: the array backends to run on, and an error measure."""
import os
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


# what a skipped real-data test tells a user to set (a fresh clone has neither)
DATA_HINT = ("real MNIST / CIFAR-10 not found: set TINYVIT_DATA to a folder holding mnist/ and cifar10/ "
             "(python scripts/train_mnist.py and finetune_cifar.py download them to ~/.cache/tinyvit: "
             "then TINYVIT_DATA=~/.cache/tinyvit)")
TI16_FILE = "vit_tiny_patch16_224.augreg_in21k_ft_in1k.npz"
WEIGHTS_HINT = (f"pretrained ViT-Ti/16 weights not found: set TINYVIT_WEIGHTS to a folder holding {TI16_FILE} "
                "(README, 'Example files', says where it comes from)")


def shared_data_dir():
    """The data root of $TINYVIT_DATA (CI: the read-only data beside the checkout); None when absent."""
    env = os.environ.get("TINYVIT_DATA")
    p = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return p if p.is_dir() else None


def ti16_weights():
    """The real ViT-Ti/16 file in $TINYVIT_WEIGHTS (CI: beside the checkout); None when absent."""
    env = os.environ.get("TINYVIT_WEIGHTS")
    f = (Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "weights") / TI16_FILE
    return f if f.is_file() else None


needs_data = pytest.mark.skipif(shared_data_dir() is None, reason=DATA_HINT)
needs_ti16 = pytest.mark.skipif(ti16_weights() is None, reason=WEIGHTS_HINT)


@pytest.fixture(autouse=True, scope="session")
def _feature_cache(tmp_path_factory):
    """Head mode's feature cache in a temporary folder, for the tests and the scripts they start."""
    os.environ["TINYVIT_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))
