"""The pooling and heads (tinyvit.nn.pool): timm's attention pool against torch autograd, each pooling
against plain torch, and the distilled head."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err, torch_gelu

from tinyvit import ViTConfig
from tinyvit.backend import to_device
from tinyvit.nn.pool import (
    attention_pool_backward,
    attention_pool_forward,
    head_backward,
    head_forward,
    pool_backward,
    pool_forward,
)

TOL = {np.float64: 1e-10, np.float32: 3e-5}
_MAP_SHAPES = {"latent": (1, 1, "C"), "q.weight": ("C", "C"), "q.bias": ("C",), "kv.weight": ("2C", "C"),
               "kv.bias": ("2C",), "proj.weight": ("C", "C"), "proj.bias": ("C",), "norm.weight": ("C",),
               "norm.bias": ("C",), "mlp.fc1.weight": ("M", "C"), "mlp.fc1.bias": ("M",),
               "mlp.fc2.weight": ("C", "M"), "mlp.fc2.bias": ("C",)}


def _torch_attention_pool(x, p, heads, eps, gelu):
    """AttentionPoolLatent's math in torch, from its parts."""
    B, N, C = x.shape
    D = C // heads
    q = F.linear(p["latent"], p["q.weight"], p["q.bias"]).reshape(1, 1, heads, D).transpose(1, 2)
    k, v = F.linear(x, p["kv.weight"], p["kv.bias"]).reshape(B, N, 2, heads, D).permute(2, 0, 3, 1, 4)
    a = ((q * D ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
    y = F.linear((a @ v).transpose(1, 2).reshape(B, 1, C), p["proj.weight"], p["proj.bias"])
    h = F.layer_norm(y, (C,), p["norm.weight"], p["norm.bias"], eps)
    h = F.linear(torch_gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"]), gelu), p["mlp.fc2.weight"],
                 p["mlp.fc2.bias"])
    return (y + h)[:, 0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B,N,C,heads,gelu", [(1, 2, 4, 1, "erf"), (3, 9, 16, 4, "tanh"), (2, 20, 12, 3, "quick")])
def test_attention_pool(xp, dtype, B, N, C, heads, gelu):
    rng = np.random.default_rng(N)
    size = {"C": C, "2C": 2 * C, "M": 3 * C}
    p = {k: rng.normal(size=tuple(size.get(d, d) for d in s)) for k, s in _MAP_SHAPES.items()}
    x, g = rng.normal(size=(B, N, C)), rng.normal(size=(B, C))
    pt = {k: torch.tensor(v.astype(dtype).astype(np.float64), requires_grad=True) for k, v in p.items()}
    xt = torch.tensor(x.astype(dtype).astype(np.float64), requires_grad=True)
    yt = _torch_attention_pool(xt, pt, heads, 1e-6, gelu)
    yt.backward(torch.tensor(g.astype(dtype).astype(np.float64)))
    dev = {"attn_pool." + k: to_device(v.astype(dtype), xp) for k, v in p.items()}
    y, cache = attention_pool_forward(to_device(x.astype(dtype), xp), dev, heads, 1e-6, gelu)
    grads = {}
    dx = attention_pool_backward(to_device(g.astype(dtype), xp), cache, grads)
    assert y.dtype == dx.dtype == dtype
    assert rel_err(y, yt.detach().numpy()) < TOL[dtype] and rel_err(dx, xt.grad.numpy()) < TOL[dtype]
    assert set(grads) == set(dev)
    for k, t in pt.items():
        assert grads["attn_pool." + k].shape == t.shape and rel_err(grads["attn_pool." + k], t.grad.numpy()) < TOL[dtype], k


_CFG = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=16)
POOLS = {  # config, and the torch form of what it reads from the normed tokens y (P prefix tokens)
    "token": (ViTConfig(**_CFG), lambda y, P: y[:, 0]),
    "token_distilled": (ViTConfig(**_CFG, distilled=True), lambda y, P: y[:, :2].reshape(len(y), -1)),
    "avg_after_norm": (ViTConfig(**_CFG, global_pool="avg", fc_norm=False, reg_tokens=2), lambda y, P: y[:, P:].mean(1)),
    "token_avg": (ViTConfig(**_CFG, global_pool="token_avg", reg_tokens=1),
                  lambda y, P: torch.cat([y[:, 0], y[:, P:].mean(1)], 1)),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(POOLS) + ["avg_fc_norm"])
def test_pooling(xp, dtype, name):
    cfg, read = POOLS.get(name, (ViTConfig(**_CFG, global_pool="avg", class_token=False), None))
    P, n, C = cfg.num_prefix_tokens, cfg.num_prefix_tokens + cfg.num_patches, cfg.dim
    rng = np.random.default_rng(3)
    norm = "fc_norm" if cfg.use_fc_norm else "norm"
    p = {f"{norm}.weight": rng.normal(size=C), f"{norm}.bias": rng.normal(size=C)}
    x = rng.normal(size=(2, n, C))
    t = {k: torch.tensor(v.astype(dtype).astype(np.float64), requires_grad=True) for k, v in dict(p, x=x).items()}
    if cfg.use_fc_norm:
        ft = F.layer_norm(t["x"][:, P:].mean(1), (C,), t["fc_norm.weight"], t["fc_norm.bias"], cfg.ln_eps)
    else:
        ft = read(F.layer_norm(t["x"], (C,), t["norm.weight"], t["norm.bias"], cfg.ln_eps), P)
    g = rng.normal(size=tuple(ft.shape))
    ft.backward(torch.tensor(g.astype(dtype).astype(np.float64)))
    x_dev = to_device(x.astype(dtype), xp)
    q = cfg.head_tokens  # token pooling: the last block returned the tokens it reads alone
    feats, cache = pool_forward({k: to_device(v.astype(dtype), xp) for k, v in p.items()},
                                x_dev if q is None else x_dev[:, :q], cfg)
    grads = {}
    dx = pool_backward(to_device(g.astype(dtype), xp), cache, grads)
    assert rel_err(feats, ft.detach().numpy()) < TOL[dtype]
    want_dx = t["x"].grad.numpy() if q is None else t["x"].grad.numpy()[:, :q]
    assert rel_err(dx, want_dx) < TOL[dtype]
    for k in p:
        assert rel_err(grads[k], t[k].grad.numpy()) < TOL[dtype], k


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_distilled_head_is_the_mean_of_both_heads(xp, dtype):
    cfg = ViTConfig(**_CFG, distilled=True)
    rng = np.random.default_rng(4)
    p = {"head.weight": rng.normal(size=(3, 8)), "head.bias": rng.normal(size=3),
         "head_dist.weight": rng.normal(size=(3, 8)), "head_dist.bias": rng.normal(size=3)}
    f, g = rng.normal(size=(5, 16)), rng.normal(size=(5, 3))
    t = {k: torch.tensor(v.astype(dtype).astype(np.float64), requires_grad=True) for k, v in dict(p, f=f).items()}
    yt = (F.linear(t["f"][:, :8], t["head.weight"], t["head.bias"]) +
          F.linear(t["f"][:, 8:], t["head_dist.weight"], t["head_dist.bias"])) / 2
    yt.backward(torch.tensor(g.astype(dtype).astype(np.float64)))
    y, cache = head_forward({k: to_device(v.astype(dtype), xp) for k, v in p.items()}, to_device(f.astype(dtype), xp), cfg)
    df, grads = head_backward(to_device(g.astype(dtype), xp), cache)
    assert y.dtype == dtype and rel_err(y, yt.detach().numpy()) < TOL[dtype]
    assert rel_err(df, t["f"].grad.numpy()) < TOL[dtype]
    for k in p:
        assert rel_err(grads[k], t[k].grad.numpy()) < TOL[dtype], k
    assert head_backward(to_device(g.astype(dtype), xp), cache, need_dx=False)[0] is None
