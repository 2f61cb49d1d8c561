"""The modern ViT family (DINOv2, CLIP, SigLIP, DeiT-III, DeiT distilled, registers, average pooling)
against timm's own models: logits in float32 and float64 and every gradient by name in float64."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from timm_oracle import FAMILIES, params_of, timm_model

from tinyvit import init_params, vit_backward, vit_features, vit_forward
from tinyvit.backend import to_device
from tinyvit.nn import reference
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward
from tinyvit.nn.model import param_shapes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_param_shapes_are_timms(family):
    cfg = FAMILIES[family]
    model = timm_model(cfg)
    assert param_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(init_params(cfg)) == set(param_shapes(cfg))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_family_matches_timm(xp, family, B, dtype):
    cfg = FAMILIES[family]
    model = timm_model(cfg, seed=B)
    params = params_of(model, dtype)  # the float64 oracle runs on our dtype's rounded values
    model.load_state_dict({k: torch.tensor(v.astype(np.float64)) for k, v in params.items()})
    rng = np.random.default_rng(B)
    images = rng.normal(size=(B, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype)
    labels = rng.integers(0, cfg.num_classes, size=B)
    logits_t = model(torch.tensor(images.astype(np.float64)))
    F.cross_entropy(logits_t, torch.tensor(labels), label_smoothing=0.1).backward()

    dev = {k: to_device(v, xp) for k, v in params.items()}
    logits, cache = vit_forward(dev, to_device(images, xp), cfg)
    _, ce = cross_entropy_forward(logits, to_device(labels, xp), 0.1)
    grads = vit_backward(cross_entropy_backward(1.0, ce), cache)
    tol = 1e-9 if dtype == np.float64 else 3e-4
    assert rel_err(logits, logits_t.detach().numpy()) < tol
    assert set(grads) == set(params)
    for name, p in model.named_parameters():
        assert grads[name].dtype == dtype and grads[name].shape == p.shape, name
        assert rel_err(grads[name], p.grad.numpy()) < tol, name
    feats = vit_features(dev, to_device(images, xp), cfg)
    want = model.forward_head(model.forward_features(torch.tensor(images.astype(np.float64))), pre_logits=True)
    if cfg.distilled:  # timm's pre_logits are the two tokens' mean; ours are both, side by side (two heads)
        assert feats.shape == (B, 2 * cfg.dim)
        feats = (feats[:, :cfg.dim] + feats[:, cfg.dim:]) / 2
    assert rel_err(feats, want.detach().numpy()) < tol


def _last_block_queries(cache):
    """How many tokens the last block computed outputs for (one shard's cache when sharded)."""
    cache = cache.caches[0] if hasattr(cache, "caches") else cache
    return cache.features.blocks[-1].attn.q.shape[2]


def test_last_block_runs_on_all_tokens_where_the_pooling_reads_them():
    for family in ("siglip", "siglip_gap", "mae_avg", "dinov2"):
        cfg = FAMILIES[family]
        params = params_of(timm_model(cfg))
        x = np.random.default_rng(0).normal(size=(2, cfg.in_chans, cfg.img_size, cfg.img_size))
        queries = [_last_block_queries(vit_forward(params, x, cfg, all_tokens=a)[1]) for a in (False, True)]
        every = cfg.num_prefix_tokens + cfg.num_patches
        assert queries == [1 if family == "dinov2" else every, every], family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_matches_timm(xp, family):
    cfg = FAMILIES[family]
    model = timm_model(cfg, seed=5)
    params = params_of(model)
    images = np.random.default_rng(5).normal(size=(2, cfg.in_chans, cfg.img_size, cfg.img_size))
    logits_t = model(torch.tensor(images))
    dlogits = np.random.default_rng(6).normal(size=tuple(logits_t.shape))
    logits_t.backward(torch.tensor(dlogits))
    dev = {k: to_device(v, xp) for k, v in params.items()}
    logits, cache = reference.vit_forward(dev, to_device(images, xp), cfg)
    grads = reference.vit_backward(to_device(dlogits, xp), cache)
    assert rel_err(logits, logits_t.detach().numpy()) < 1e-10
    assert list(grads) == list(params)
    for name, p in model.named_parameters():
        assert rel_err(grads[name], p.grad.numpy()) < 1e-10, name


def test_drop_path_gradient_matches_central_differences():
    """Train mode with stochastic depth and LayerScale: the same seeded masks every call, so the loss is
    a smooth function of the params whose gradient vit_backward must give."""
    cfg = dataclasses.replace(FAMILIES["deit3"], depth=3, drop_path=0.5)
    params = params_of(timm_model(cfg))
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(4, 3, 28, 28)), rng.integers(0, 5, size=4)

    def loss(p, keep=False):
        logits, cache = vit_forward(p, images, cfg, train=True, rng=np.random.default_rng(1))
        value, ce = cross_entropy_forward(logits, labels)
        return (value, ce, cache) if keep else float(value)

    _, ce, cache = loss(params, keep=True)
    kept = [c.drop_path1 for c in cache.features.blocks]
    assert any(m is not None and (m == 0).any() for m in kept)  # some sample was dropped
    grads = vit_backward(cross_entropy_backward(1.0, ce), cache)
    h = 1e-6
    for name in ("blocks.2.ls2.gamma", "blocks.1.attn.qkv.weight", "pos_embed", "cls_token", "head.bias"):
        p = params[name]
        for i in np.random.default_rng(2).choice(p.size, size=4, replace=False):
            old = p.flat[i]
            p.flat[i] = old + h
            up = loss(params)
            p.flat[i] = old - h
            down = loss(params)
            p.flat[i] = old
            assert abs((up - down) / (2 * h) - grads[name].flat[i]) <= 1e-6 * max(1.0, abs(grads[name].flat[i])), name
