"""tinyvit.nn.reference (the plain-math ViT) against torch autograd, and the fast engine against it."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch_vit import torch_vit_from_params

from tinyvit import ViTConfig, init_params
from tinyvit.backend import is_standin, to_device, to_numpy
from tinyvit.nn import model, reference
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward

# name -> (config, batch size)
CONFIGS = {
    # one block, one head, 2x2 patches + CLS = 5 tokens
    "tiny-1block-1head": (ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, dim=8, depth=1,
                                    heads=1, mlp_dim=16), 2),
    # two blocks, four heads, RGB, tanh GELU
    "tanh-2blocks-4heads": (ViTConfig(img_size=12, patch_size=4, in_chans=3, num_classes=5, dim=16, depth=2,
                                      heads=4, mlp_dim=24, gelu="tanh"), 3),
    # three blocks, three heads, 4x4 patches + CLS = 17 tokens (odd), batch 1, torch's default eps
    "odd-3blocks-3heads-b1": (ViTConfig(img_size=16, patch_size=4, in_chans=2, num_classes=7, dim=12, depth=3,
                                        heads=3, mlp_dim=20, ln_eps=1e-5), 1),
    # 65 tokens and narrow linears: the engine folds every norm's affine into the next linear
    "65-tokens-narrow": (ViTConfig(img_size=16, patch_size=2, in_chans=1, num_classes=4, dim=8, depth=2,
                                   heads=2, mlp_dim=12), 2),
}
# float32, engine vs reference: both round every op to float32 (unit roundoff 6e-8) in a different
# order (the engine pre-scales q, keeps softmax as e * r, folds norms into linears, sums by BLAS,
# and its float32 GELU reads a Phi table good to 4.5e-8). Through ~25 chained ops of sums over up to
# 65 tokens x 24 features the two differ by at most 2e-6 relative here (measured); 3e-5 leaves
# >10x margin while any wrong formula (a missed term, scale or transpose) is off by 1e-2 or more.
TOL = {np.float64: 1e-10, np.float32: 3e-5}


def _setup(name, seed=0, dtype=np.float64):
    """(cfg, params, images, labels, dlogits) as host arrays in dtype; params perturbed from init."""
    cfg, B = CONFIGS[name]
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed=seed, dtype=np.float64)
    # move norms, biases and cls off 1 / 0 / ~0, so that no gradient is trivially zero or exact
    params = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(dtype) for k, v in params.items()}
    images = rng.normal(size=(B, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype)
    labels = rng.integers(0, cfg.num_classes, size=B)
    dlogits = rng.normal(size=(B, cfg.num_classes)).astype(dtype)
    return cfg, params, images, labels, dlogits


def _torch_run(cfg, params, images, labels, label_smoothing):
    """Torch float64: logits, loss, dL/dlogits and every parameter's gradient, as NumPy."""
    net = torch_vit_from_params(cfg, params)
    logits = net(torch.tensor(images, dtype=torch.float64))
    logits.retain_grad()
    loss = F.cross_entropy(logits, torch.tensor(labels), label_smoothing=label_smoothing)
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in net.named_parameters()}
    return logits.detach().numpy(), loss.item(), logits.grad.numpy(), grads


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_matches_torch_autograd(xp, name, smoothing):
    cfg, params, images, labels, _ = _setup(name, seed=1)
    logits_t, loss_t, dlogits_t, grads_t = _torch_run(cfg, params, images, labels, smoothing)

    dev = to_device(params, xp)
    logits, cache = reference.vit_forward(dev, to_device(images, xp), cfg)
    loss, ce_cache = reference.cross_entropy_forward(logits, to_device(labels, xp), smoothing)
    dlogits = reference.cross_entropy_backward(ce_cache)
    grads = reference.vit_backward(dlogits, cache)

    assert rel_err(logits, logits_t) < 1e-9
    assert abs(float(loss) - loss_t) <= 1e-12 * abs(loss_t)
    assert rel_err(dlogits, dlogits_t) < 1e-9
    assert list(grads) == list(params) == list(grads_t)  # every parameter, in params' order
    for k, g in grads.items():
        assert g.shape == params[k].shape and g.dtype == np.float64, k
        assert rel_err(g, grads_t[k]) < 1e-9, k


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_matches_reference(xp, name, dtype):
    cfg, params, images, _, dlogits = _setup(name, seed=2, dtype=dtype)
    params, images, dlogits = to_device(params, xp), to_device(images, xp), to_device(dlogits, xp)
    ref_logits, ref_cache = reference.vit_forward(params, images, cfg)
    ref_grads = reference.vit_backward(dlogits, ref_cache)
    logits, cache = model.vit_forward(params, images, cfg)
    grads = model.vit_backward(dlogits, cache)

    assert ref_logits.dtype == logits.dtype == dtype
    assert rel_err(logits, ref_logits) < TOL[dtype]
    assert set(grads) == set(ref_grads) == set(params)
    for k, g in ref_grads.items():
        assert g.dtype == dtype and g.shape == params[k].shape, k
        assert rel_err(grads[k], g) < TOL[dtype], k


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_engine_cross_entropy_matches_reference(xp, dtype, smoothing):
    rng = np.random.default_rng(3)
    logits = to_device((10.0 * rng.normal(size=(6, 9))).astype(dtype), xp)
    labels = to_device(rng.integers(0, 9, size=6), xp)
    loss, cache = reference.cross_entropy_forward(logits, labels, smoothing)
    loss_e, cache_e = cross_entropy_forward(logits, labels, smoothing)
    assert loss.dtype == dtype
    assert abs(float(loss_e) - float(loss)) <= TOL[dtype] * abs(float(loss))
    assert rel_err(cross_entropy_backward(1.0, cache_e), reference.cross_entropy_backward(cache)) < TOL[dtype]


def test_reference_leaves_inputs_unmodified_and_reads_nothing_from_the_device(xp):
    cfg, params, images, labels, dlogits = _setup("tanh-2blocks-4heads", seed=4)
    dev = to_device(params, xp)
    images_d, labels_d, dlogits_d = to_device(images, xp), to_device(labels, xp), to_device(dlogits, xp)
    syncs = xp.sync_count() if is_standin(xp) else None
    logits, cache = reference.vit_forward(dev, images_d, cfg)
    grads = reference.vit_backward(dlogits_d, cache)
    _, ce_cache = reference.cross_entropy_forward(logits, labels_d, 0.1)
    reference.cross_entropy_backward(ce_cache)
    if syncs is not None:  # the strict stand-in counts every device-to-host read
        assert xp.sync_count() == syncs
    assert all(np.array_equal(to_numpy(dev[k]), params[k]) for k in params)
    assert np.array_equal(to_numpy(images_d), images)
    assert np.array_equal(to_numpy(labels_d), labels)
    assert np.array_equal(to_numpy(dlogits_d), dlogits)
    again = reference.vit_backward(dlogits_d, cache)  # the cache is left intact: the same grads again
    assert all(np.array_equal(to_numpy(again[k]), to_numpy(grads[k])) for k in grads)


def test_erf_and_gelu_are_exact(xp):
    x = np.linspace(-7.0, 7.0, 57)
    want = np.array([math.erf(v) for v in x])
    assert np.max(np.abs(to_numpy(reference.erf(to_device(x, xp))) - want)) <= 4e-16
    t = torch.tensor(x)
    for kind, approx in (("erf", "none"), ("tanh", "tanh")):
        t.grad = None
        t.requires_grad_(True)
        y_t = F.gelu(t, approximate=approx)
        y_t.backward(torch.ones_like(t))
        y, cache = reference.gelu_forward(to_device(x, xp), kind)
        dx = reference.gelu_backward(xp.ones_like(y), cache)
        assert rel_err(y, y_t.detach().numpy()) < 1e-14, kind  # a few ulp: torch orders the ops otherwise
        assert rel_err(dx, t.grad.numpy()) < 1e-14, kind
