"""LayerScale and stochastic depth (tinyvit.nn.branch) against torch autograd, and drop path's draws."""
import numpy as np
import pytest
import torch
from helpers import rel_err

from tinyvit.backend import to_device, to_numpy
from tinyvit.nn.branch import drop_path_backward, drop_path_forward, layer_scale_backward, layer_scale_forward

TOL = {np.float64: 1e-12, np.float32: 1e-6}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 5, 8), (3, 7)])
def test_layer_scale(xp, dtype, shape):
    rng = np.random.default_rng(0)
    x, gamma, g = rng.normal(size=shape), rng.normal(size=shape[-1]), rng.normal(size=shape)
    xt, gt = (torch.tensor(a.astype(dtype).astype(np.float64), requires_grad=True) for a in (x, gamma))
    (xt * gt).backward(torch.tensor(g.astype(dtype).astype(np.float64)))
    dev = lambda a: to_device(a.astype(dtype), xp)  # noqa: E731
    y, cache = layer_scale_forward(dev(x), dev(gamma))
    dout = dev(g)
    dx, dgamma = layer_scale_backward(dout, cache)
    assert np.array_equal(to_numpy(dout), g.astype(dtype))  # dout untouched
    assert y.dtype == dx.dtype == dgamma.dtype == dtype
    assert rel_err(y, (xt * gt).detach().numpy()) < TOL[dtype]
    assert rel_err(dx, xt.grad.numpy()) < TOL[dtype] and rel_err(dgamma, gt.grad.numpy()) < 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_drop_path_drops_whole_samples_and_its_backward_is_the_mask(xp, dtype):
    x = to_device(np.random.default_rng(1).normal(size=(4000, 3, 2)).astype(dtype), xp)
    y, mask = drop_path_forward(x, 0.25, xp.random.default_rng(0), train=True)
    m = to_numpy(mask)
    assert m.shape == (4000, 1, 1) and np.array_equal(np.unique(m), np.array([0, 1 / 0.75], dtype))
    assert abs((m == 0).mean() - 0.25) < 0.03  # each sample dropped with probability 0.25
    assert np.array_equal(to_numpy(y), to_numpy(x) * m)
    dout = to_device(np.ones((4000, 3, 2), dtype), xp)
    assert np.array_equal(to_numpy(drop_path_backward(dout, mask)), np.broadcast_to(m, (4000, 3, 2)))
    for train, rate in ((False, 0.25), (True, 0.0)):  # eval, or no rate: the identity, nothing kept
        y, mask = drop_path_forward(x, rate, None, train)
        assert y is x and mask is None and drop_path_backward(dout, mask) is dout
    with pytest.raises(ValueError, match="rng"):
        drop_path_forward(x, 0.1, None, True)
