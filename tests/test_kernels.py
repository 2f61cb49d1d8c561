"""tinyvit.nn.kernels (the fused CUDA kernels) against torch: on the host through the CuPy stand-in, whose
kernel emulator compiles each kernel's C body with g++, and on CuPy when a GPU is present."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from helpers import torch_gelu

from tinyvit.backend import cupy_available, get_backend, to_numpy
from tinyvit.nn import kernels
from tinyvit.nn.activations import softmax_parts, softmax_parts_backward
from tinyvit.testing import cupy_standin, kernel_emulator

BACKENDS = [
    pytest.param("host", id="host", marks=pytest.mark.skipif(not kernel_emulator.supported(),
                                                              reason="no host C++ compiler")),
    pytest.param("cupy", id="cupy", marks=pytest.mark.skipif(not cupy_available(), reason="no CUDA GPU")),
]
TOL = {np.float32: 2e-6, np.float64: 1e-13}


@pytest.fixture(params=BACKENDS)
def dev(request):
    """Puts an array where the kernels run: the CuPy stand-in (kernel bodies compiled by g++ on the
    host), or the GPU for real CuPy."""
    return cupy_standin.asarray if request.param == "host" else get_backend("cupy").asarray


def _t(a):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=True)


def test_every_kernel_compiles_on_the_host(dev):
    """Each spec builds (both dtypes), including any the tests below do not reach."""
    for name, spec in kernels.SPECS.items():
        for dtype in (np.float32, np.float64):
            args = [dev(np.ones((2, 3), dtype)) if p.split()[0] == "T" else 1 for p in spec.in_params.split(",")]
            out = kernels.kernel(name, args[0])(*args, **({} if isinstance(spec, kernels.Elementwise)
                                                           else {"axis": -1, "keepdims": True}))
            assert all(o.dtype == dtype for o in (out if isinstance(out, tuple) else (out,))), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["erf", "tanh", "quick"])
def test_gelu_kernels(dev, dtype, kind):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 3, 500), [0.0, -1e4, 1e4, -40.0, 40.0, 1e-30, -1e-30]]).astype(dtype)
    g = rng.normal(size=x.shape).astype(dtype)
    xt = _t(x)
    yt = torch_gelu(xt, kind)
    yt.backward(torch.tensor(g.astype(np.float64)))
    y, c = kernels.gelu(dev(x), kind)
    dx = kernels.gelu_grad(dev(x), c, dev(g), kind)
    assert y.dtype == dtype and dx.dtype == dtype
    assert rel_err(y, yt.detach().numpy()) < 4 * TOL[dtype]
    assert rel_err(dx, xt.grad.numpy()) < 4 * TOL[dtype]
    assert np.isfinite(to_numpy(dx)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 64)])
@pytest.mark.parametrize("magnitude", [1.0, 1e30])
def test_layernorm_kernels(dev, dtype, affine, shape, magnitude):
    """Against torch; rows near float32's limit (squares overflow) are scaled on the device, exactly."""
    rng = np.random.default_rng(1)
    x, g = (rng.normal(2, 3, size=shape).astype(dtype) for _ in range(2))
    x[0] *= dtype(magnitude)  # one row (or block of rows) far beyond sqrt(float32 max)
    w, b = (rng.normal(size=shape[-1]).astype(dtype) for _ in range(2))
    eps = 1e-6
    xt, wt, bt = _t(x), _t(w), _t(b)
    yt = F.layer_norm(xt, shape[-1:], wt if affine else None, bt if affine else None, eps)
    yt.backward(torch.tensor(g.astype(np.float64)))
    if affine:
        xhat, rstd, y = kernels.layernorm(dev(x), eps, dev(w), dev(b))
    else:
        y = xhat, rstd = kernels.layernorm(dev(x), eps)
        y = xhat
    assert rstd.shape == shape[:-1] + (1,) and np.isfinite(to_numpy(y)).all()
    assert rel_err(y, yt.detach().numpy()) < 10 * TOL[dtype]
    dx = kernels.layernorm_grad(dev(g), xhat, rstd, dev(w) if affine else None)
    assert dx.dtype == dtype
    # dx scales as 1 / magnitude: compare each row block on its own scale
    assert rel_err(dx[1:], xt.grad.numpy()[1:]) < 10 * TOL[dtype]
    assert rel_err(dx[:1], xt.grad.numpy()[:1]) < 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_softmax_kernels(dev, dtype, scale):
    rng = np.random.default_rng(2)
    x, g = (scale * rng.normal(size=(2, 3, 5, 9))).astype(dtype), rng.normal(size=(2, 3, 5, 9)).astype(dtype)
    xt = _t(x)
    yt = torch.softmax(xt, dim=-1)
    yt.backward(torch.tensor(g.astype(np.float64)))
    e, r = kernels.softmax_parts(dev(x))
    assert rel_err(e * r, yt.detach().numpy()) < 4 * TOL[dtype]
    dx = kernels.softmax_parts_grad(dev(g) * r, e, r)  # dr = r * dL/dy
    # peaked float32 rows cancel in dr - r sum(dr e): no worse than the NumPy path on the same rows
    e_np, r_np = softmax_parts(x)
    ours_np = rel_err(softmax_parts_backward(g * r_np, e_np, r_np), xt.grad.numpy())
    assert rel_err(dx, xt.grad.numpy()) < 2 * ours_np + 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_kernels(dev, dtype, eps):
    rng = np.random.default_rng(3)
    x, labels = (5 * rng.normal(size=(6, 10))).astype(dtype), rng.integers(0, 10, size=6)
    xt = _t(x)
    F.cross_entropy(xt, torch.tensor(labels), label_smoothing=eps).backward()
    logp = kernels.log_softmax(dev(x))
    assert rel_err(logp, torch.log_softmax(xt, dim=1).detach().numpy()) < 4 * TOL[dtype]
    dx = kernels.cross_entropy_grad(logp, dev(labels), eps, 1.0 / 6)
    assert dx.dtype == dtype and rel_err(dx, xt.grad.numpy()) < 4 * TOL[dtype]
