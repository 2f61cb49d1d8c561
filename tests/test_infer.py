"""The inference-only block halves (tinyvit.nn.infer) against torch, and the whole inference path
against the cached forward, on blocks small enough that every batch and row count leaves a remainder."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from family_configs import FAMILIES
from helpers import rel_err, torch_gelu

from tinyvit import init_params, preset, vit_forward
from tinyvit.nn import infer

TOL = {np.float64: 1e-12, np.float32: 2e-5}


def _t(a):
    return torch.tensor(np.asarray(a, np.float64))


@pytest.fixture(params=["whole", "blocks"])
def blocks(request, monkeypatch):
    """Run each case with the default block sizes, and with blocks of 1 image and 5 rows."""
    if request.param == "blocks":
        monkeypatch.setattr(infer, "SCORES", 1)
        monkeypatch.setattr(infer, "ROWS", 5)
    return request.param


@pytest.mark.parametrize("B,N,heads,D", [(1, 5, 1, 4), (3, 10, 2, 8), (4, 17, 3, 6)])
@pytest.mark.parametrize("queries", [None, 1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_infer_matches_torch(blocks, B, N, heads, D, queries, dtype):
    rng = np.random.default_rng(0)
    C = heads * D
    qkv = rng.normal(size=(B, N, 3 * C)).astype(dtype)
    w, b = rng.normal(size=(C, C)).astype(dtype) / C ** 0.5, rng.normal(size=C).astype(dtype)
    scaled = qkv.copy()
    scaled[..., :C] *= D ** -0.5  # attention_infer reads q already scaled (ln_linear_infer's q_scale)
    out = infer.attention_infer(scaled, w, b, heads, queries)
    q, k, v = _t(qkv).reshape(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)  # (B, N, C)
    want = (o @ _t(w).T + _t(b))[:, :N if queries is None else queries]
    assert out.dtype == dtype and rel_err(out, want.numpy()) < TOL[dtype]


def test_attention_infer_survives_scores_that_overflow_exp(blocks):
    rng = np.random.default_rng(1)
    B, N, heads, D = 2, 6, 2, 4
    C = heads * D
    qkv = rng.normal(size=(B, N, 3 * C)) * 30.0  # scores ~ 1e3 or more: exp overflows unshifted
    w, b = np.eye(C), np.zeros(C)
    out = infer.attention_infer(qkv, w, b, heads)
    q, k, v = _t(qkv).reshape(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)
    want = torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # q already counts as scaled here
    assert np.isfinite(out).all() and rel_err(out, want.transpose(1, 2).reshape(B, N, C).numpy()) < 1e-12


@pytest.mark.parametrize("rows,outs", [(12, 5), (3, 20)])  # the affine folded into w, or applied
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("q_scale", [None, 0.25])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ln_linear_infer_matches_torch(rows, outs, bias, q_scale, dtype):
    rng = np.random.default_rng(2)
    C = 4
    x = rng.normal(size=(rows, C)).astype(dtype)
    g, beta = rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype)
    w = rng.normal(size=(outs, C)).astype(dtype)
    b = rng.normal(size=outs).astype(dtype) if bias else None
    out = infer.ln_linear_infer(x, g, beta, w, b, 1e-6, q_scale)
    want = F.linear(F.layer_norm(_t(x), (C,), _t(g), _t(beta), 1e-6), _t(w), None if b is None else _t(b))
    if q_scale is not None:
        want[:, :C] *= q_scale
    assert out.dtype == dtype and rel_err(out, want.numpy()) < TOL[dtype]
    assert w.shape == (outs, C) and (b is None or b.shape == (outs,))  # the caller's arrays untouched


@pytest.mark.parametrize("kind", ["erf", "tanh", "quick"])
@pytest.mark.parametrize("shape", [(1, 3, 4), (2, 11, 4)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mlp_residual_infer_matches_torch(blocks, kind, shape, dtype):
    rng = np.random.default_rng(3)
    C, Hd = shape[-1], 7
    x = rng.normal(size=shape).astype(dtype)
    g, beta = rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype)
    w1, b1 = rng.normal(size=(Hd, C)).astype(dtype), rng.normal(size=Hd).astype(dtype)
    w2, b2 = rng.normal(size=(C, Hd)).astype(dtype), rng.normal(size=C).astype(dtype)
    h = F.linear(F.layer_norm(_t(x), (C,), _t(g), _t(beta), 1e-6), _t(w1), _t(b1))
    want = _t(x) + F.linear(torch_gelu(h, kind), _t(w2), _t(b2))
    out = infer.mlp_residual_infer(x, g, beta, w1, b1, w2, b2, kind, 1e-6)
    assert out is x and rel_err(out, want.numpy()) < TOL[dtype]  # in place on x


CASES = {**FAMILIES, "mnist": preset("mnist", depth=2)}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inference_path_matches_the_cached_forward(blocks, name, dtype):
    cfg = CASES[name]
    params = init_params(cfg, seed=0, dtype=dtype)
    rng = np.random.default_rng(4)
    params = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(dtype) for k, v in params.items()}  # LayerScale far from 0
    x = rng.normal(size=(3, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype)
    want, cache = vit_forward(params, x, cfg)
    got, none = vit_forward(params, x, cfg, keep_cache=False)
    assert none is None and cache is not None
    assert got.dtype == dtype and rel_err(got, want) < TOL[dtype] * 10
