"""Toy training data and a tiny config, shared by the training tests and the MPI runs they start."""
import numpy as np

from tinyvit import preset
from tinyvit.data.batches import ArrayDataset

TINY = preset("mnist", depth=2, dim=32, heads=2, mlp_dim=64, patch_size=7)


def synthetic(n, seed):
    """Toy 28x28 uint8 data: class k is a fixed random template k plus pixel noise."""
    templates = np.random.default_rng(123).integers(0, 256, size=(10, 28, 28))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    x = np.clip(templates[y] + rng.normal(0, 40, size=(n, 28, 28)), 0, 255).astype(np.uint8)
    return ArrayDataset(x, y.astype(np.int64), (0.1307,), (0.3081,))
