"""Layers on a block's residual branch: LayerScale and stochastic depth (DropPath), forward and backward.

Same conventions as tinyvit.nn.layers: `out, cache = X_forward(...)`, `grads = X_backward(dout, cache)`,
backward never writes into dout. The model folds LayerScale into the linear before it (block._folded);
layer_scale_forward is the layer itself, checked against torch. Plain form: reference.block_forward.
"""
from ..backend import get_array_module
from .caches import LayerScaleCache
from .special import colsum


def layer_scale_forward(x, gamma):
    """x * gamma per channel (timm's LayerScale, gamma (C,)) on x (..., C)."""
    return x * gamma, LayerScaleCache(x, gamma)


def layer_scale_backward(dout, cache):
    """Return (dx, dgamma) of layer_scale_forward."""
    x = cache.x
    dgamma = colsum((dout * x).reshape(-1, x.shape[-1]))  # (C,)
    return dout * cache.gamma, dgamma


def drop_path_forward(x, rate, rng=None, train=True):
    """Stochastic depth: each sample's branch x (B, ...) kept with probability 1 - rate and scaled by
    1 / (1 - rate), as timm's DropPath; identity at eval or rate 0. The cache is the scaled (B, 1, ...)
    keep mask, or None when nothing is dropped."""
    if not train or rate == 0.0:
        return x, None
    if rng is None:
        raise ValueError("drop path in training needs an explicit rng")
    xp = get_array_module(x)
    keep = rng.random((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype) >= rate
    mask = keep.astype(x.dtype)
    mask *= 1.0 / (1.0 - rate)
    return xp.multiply(x, mask), mask


def drop_path_backward(dout, cache):
    """Return dx of drop_path_forward."""
    return dout if cache is None else dout * cache
