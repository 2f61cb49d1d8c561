"""The modern ViT family (DINOv2, CLIP, SigLIP, DeiT-III, DeiT distilled, registers, average pooling)
against timm's own models: logits in float32 and float64 and every gradient by name in float64."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from timm_oracle import FAMILIES, params_of, timm_model

from tinyvit import TinyViTError, init_params, vit_backward, vit_features, vit_forward, vit_intermediates
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


# the stored 28 px (a 2x2 or 4x4 grid) and three others: larger, a rectangle, one side smaller (antialiased)
DYNAMIC_SIZES = [(42, 42), (56, 28), (14, 28)]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("size,dtype", [(s, np.float64) for s in DYNAMIC_SIZES] + [((56, 28), np.float32)],
                         ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else np.dtype(v).name)
def test_dynamic_img_size_matches_timm(xp, monkeypatch, family, size, dtype):
    """Images of another size through timm's dynamic_img_size=True model and ours: logits and every
    gradient by name (pos_embed's through the resample, at the stored grid)."""
    cfg = dataclasses.replace(FAMILIES[family], dynamic_img_size=True)
    model = timm_model(cfg, seed=7)
    params = params_of(model, dtype)
    model.load_state_dict({k: torch.tensor(v.astype(np.float64)) for k, v in params.items()})
    if dtype == np.float64:  # timm resamples in float32 (posemb.float()); its float64 twin resamples in float64
        monkeypatch.setattr(torch.Tensor, "float", lambda t: t)
    rng = np.random.default_rng(7)
    images = rng.normal(size=(2, cfg.in_chans) + size).astype(dtype)
    logits_t = model(torch.tensor(images.astype(np.float64)))
    dlogits = rng.normal(size=tuple(logits_t.shape)).astype(dtype)
    logits_t.backward(torch.tensor(dlogits.astype(np.float64)))
    logits, cache = vit_forward(to_device(params, xp), to_device(images, xp), cfg)
    grads = vit_backward(to_device(dlogits, xp), cache)
    tol = 1e-9 if dtype == np.float64 else 3e-4
    assert rel_err(logits, logits_t.detach().numpy()) < tol
    assert set(grads) == set(params)
    for name, p in model.named_parameters():
        assert grads[name].shape == p.shape and grads[name].dtype == dtype, name
        assert rel_err(grads[name], p.grad.numpy()) < tol, name
    if dtype == np.float64:  # and the plain form
        ref_logits, ref_cache = reference.vit_forward(to_device(params, xp), to_device(images, xp), cfg)
        assert rel_err(ref_logits, logits_t.detach().numpy()) < tol
        ref = reference.vit_backward(to_device(dlogits, xp), ref_cache)
        for name, p in model.named_parameters():
            assert rel_err(ref[name], p.grad.numpy()) < tol, name


def test_dynamic_img_size_is_off_by_default():
    """Without dynamic_img_size another size is refused, one line; with it, sizes the patches do not tile are."""
    cfg = FAMILIES["dinov2"]
    params = init_params(cfg, dtype=np.float64)
    with pytest.raises(TinyViTError, match=r"images must be \(B, 3, 28, 28\)"):
        vit_forward(params, np.zeros((1, 3, 42, 42)), cfg)
    dyn = dataclasses.replace(cfg, dynamic_img_size=True)
    for bad in ((1, 3, 42, 40), (1, 3, 0, 28), (1, 1, 28, 28)):
        with pytest.raises(TinyViTError, match="multiples of the patch size 14"):
            vit_forward(params, np.zeros(bad), dyn)
    assert vit_forward(params, np.zeros((1, 3, 14, 70)), dyn)[0].shape == (1, cfg.num_classes)


@pytest.mark.parametrize("family", ["dinov2_reg", "siglip", "reg4_gap", "deit_distilled", "mae_avg"])
@pytest.mark.parametrize("indices,norm,prefix", [(2, False, False), ([0, -1], True, True), ([2, 0], True, False)])
def test_intermediates_match_timm(xp, monkeypatch, family, indices, norm, prefix):
    """vit_intermediates as timm's forward_intermediates(intermediates_only=True, output_fmt='NCHW'), at the
    stored size and, dynamic, at a rectangle; blocks after the last index are not run."""
    monkeypatch.setattr(torch.Tensor, "float", lambda t: t)  # timm's resample in float64 (see above)
    cfg = dataclasses.replace(FAMILIES[family], depth=4, dynamic_img_size=True)
    model = timm_model(cfg, seed=3)
    params = to_device(params_of(model), xp)
    for size in ((28, 28), (42, 28)):
        images = np.random.default_rng(3).normal(size=(3, cfg.in_chans) + size)
        want = model.forward_intermediates(torch.tensor(images), indices, norm=norm, output_fmt="NCHW",
                                           intermediates_only=True, return_prefix_tokens=prefix)
        got = vit_intermediates(params, to_device(images, xp), cfg, indices, norm=norm, return_prefix_tokens=prefix)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            g, w = (g, w) if isinstance(w, tuple) else ((g,), (w,))  # (patches, prefix tokens) with prefix
            assert len(g) == len(w)
            for a, b in zip(g, w):
                assert rel_err(a, b.detach().numpy()) < 1e-10
    cut = {k: v for k, v in params.items() if not k.startswith("blocks.3.")}  # never read for blocks 0..2
    assert len(vit_intermediates(cut, to_device(images, xp), cfg, [1, -2])) == 2


def test_intermediates_refuse_bad_indices():
    cfg = FAMILIES["dinov2"]
    params = init_params(cfg, dtype=np.float64)
    x = np.zeros((1, 3, 28, 28))
    assert len(vit_intermediates(params, x, cfg, None)) == cfg.depth  # None: every block, as timm
    for bad in (0, 3, [2], [-3], [], True, "1", 1.0):
        with pytest.raises(TinyViTError, match="indices"):
            vit_intermediates(params, x, cfg, bad)
