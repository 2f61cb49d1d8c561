"""Torch-free check: central finite differences of the full model's loss vs vit_backward."""
import numpy as np
import pytest

from tinyvit import ViTConfig, init_params, vit_backward, vit_forward
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward


def _loss(params, images, labels, cfg):
    logits, _ = vit_forward(params, images, cfg)
    return float(cross_entropy_forward(logits, labels, 0.1)[0])


@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_full_model_central_differences(gelu):
    cfg = ViTConfig(img_size=8, patch_size=4, in_chans=2, num_classes=3, dim=8, depth=2, heads=2,
                    mlp_dim=12, gelu=gelu)
    rng = np.random.default_rng(0)
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in init_params(cfg, dtype=np.float64).items()}
    images = rng.normal(size=(3, 2, 8, 8))
    labels = rng.integers(0, 3, size=3)
    logits, cache = vit_forward(params, images, cfg)
    _, ce = cross_entropy_forward(logits, labels, 0.1)
    grads = vit_backward(cross_entropy_backward(1.0, ce), cache)
    h = 1e-5
    for name, p in params.items():
        # every entry of small tensors, a random sample of 12 entries of larger ones
        n = p.size
        idx = range(n) if n <= 12 else rng.choice(n, size=12, replace=False)
        for i in idx:
            old = p.flat[i]
            p.flat[i] = old + h
            up = _loss(params, images, labels, cfg)
            p.flat[i] = old - h
            down = _loss(params, images, labels, cfg)
            p.flat[i] = old
            fd = (up - down) / (2 * h)
            g = grads[name].flat[i]
            # central differences have O(h^2) truncation and ~1e-16/h rounding error: ~1e-10 here
            assert abs(fd - g) <= 1e-7 * max(1.0, abs(g)) and abs(fd - g) <= 1e-6 * abs(g) + 2e-9, \
                (name, i, fd, g)
