"""Fixtures and hooks only: the array backends to run on, the real data and weights (skipped with a hint
when absent), the feature cache. Shared functions and constants live in helpers.py; test files import
them from there."""
import os
import sys
import types

import pytest
from helpers import (  # noqa: F401  (re-exported for the files that still import them from here)
    DATA_HINT,
    TI16_FILE,
    WEIGHTS_HINT,
    dataset_root,
    needs_data,
    needs_ti16,
    rel_err,
    shared_data_dir,
    ti16_weights,
)

from tinyvit.backend import cupy_available, get_backend


def pytest_configure(config):
    """Before any test module is imported: timm and transformers import torchvision's Python parts, and
    the registry's torchvision cannot load its C ops beside the CPU torch wheel; an empty
    _meta_registrations keeps it from trying (README, Tests)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


NO_GPU = "CuPy with a CUDA GPU is not available on this machine"
BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.skipif(not cupy_available(), reason=NO_GPU)),
]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module under test: numpy always, cupy when a GPU is present."""
    return get_backend(request.param)


def _data_root(name):
    """The data root holding the real name/ folder (what --data-dir takes); skips without it."""
    root = dataset_root(name)
    if root is None:
        pytest.skip(DATA_HINT)
    return root


@pytest.fixture(scope="session")
def mnist_root():
    """The data root holding the real mnist/ (load_mnist's root); skips without it."""
    return _data_root("mnist")


@pytest.fixture(scope="session")
def cifar_root():
    """The data root holding the real cifar10/ (load_cifar10's root); skips without it."""
    return _data_root("cifar10")


@pytest.fixture(scope="session")
def ti16():
    """The real ViT-Ti/16 weights file; skips without it."""
    f = ti16_weights()
    if f is None:
        pytest.skip(WEIGHTS_HINT)
    return f


@pytest.fixture(autouse=True, scope="session")
def _feature_cache(tmp_path_factory):
    """Head mode's feature cache in a temporary folder, for the tests and the scripts they start."""
    os.environ["TINYVIT_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))
