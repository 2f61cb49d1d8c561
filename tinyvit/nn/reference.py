"""The whole ViT, forward and backward, as plain array math: the reference the fast engine is checked against.

Each layer is a pair `out, cache = X_forward(...)` / `grads = X_backward(dout, cache)` (the cache a
NamedTuple, defined just above its forward), written as the paper reads: no kernels, threads,
shards, lookup tables, affine folding or skipped tokens, and the softmax always shifted by its row
max. Arrays are NumPy or CuPy (xp is taken from the inputs), in the inputs' dtype. There is no
dropout: this is the eval-mode (or dropout-free) model; train-mode dropout is the engine's business
(tinyvit.nn.model). Speed does not matter here, clarity does.
"""
import math
from typing import Any, NamedTuple, Optional

import numpy as np

from ..backend import get_array_module
from .resample import bicubic_aa_matrix
from .special import erf as _xp_erf

Array = Any  # a NumPy or CuPy array

# --- linear -----------------------------------------------------------------------------------


class LinearCache(NamedTuple):
    """What linear_backward needs: the input, the weight and whether there was a bias."""

    x: Array  # (..., in)
    w: Array  # (out, in)
    has_b: bool


def linear_forward(x, w, b):
    """y = x @ w^T + b, with w in torch's (out, in) layout; b None: no bias."""
    y = x @ w.T  # (..., out)
    return (y if b is None else y + b), LinearCache(x, w, b is not None)


def linear_backward(dout, cache):
    """(dx, dw, db) of linear_forward; db is None without a bias."""
    x2 = cache.x.reshape(-1, cache.x.shape[-1])  # (M, in)
    d2 = dout.reshape(-1, dout.shape[-1])  # (M, out)
    # dx = dout @ w, dw = dout^T @ x, db = sum of dout over every row
    return dout @ cache.w, d2.T @ x2, (d2.sum(axis=0) if cache.has_b else None)  # (..., in), (out, in), (out,)


# --- LoRA and DoRA (PEFT's math; tinyvit.nn.lora) -----------------------------------------------


class LoraCache(NamedTuple):
    """What lora_backward needs: x, the branch's dropout mask and dropped copy x_d, W, A, B, s; for DoRA
    the magnitude, the row norms n and W' x_d."""

    x: Array
    mask: Optional[Array]
    x_d: Array
    w: Array
    a: Array
    b: Array
    s: float
    m: Optional[Array]
    n: Optional[Array]
    u: Optional[Array]  # x_d W'^T, W' = W + s B A


def lora_forward(x, w, bias, a, b, s, m=None, mask=None):
    """LoRA: y = x W^T + bias + s x_d A^T B^T. DoRA: y = x W^T + bias + (g - 1) x_d W^T + g s x_d A^T B^T,
    g = m / n, n = ||W'|| per row held constant (PEFT detaches it); that is g (x W'^T) + bias when nothing
    drops. x_d = x * mask, the branch's input after dropout (mask: the scaled keep mask; None: x). W,
    bias frozen."""
    x_d = x if mask is None else x * mask
    w1 = w + s * (b @ a)  # (out, in)
    if m is None:
        return x @ w.T + bias + s * (x_d @ a.T) @ b.T, LoraCache(x, mask, x_d, w, a, b, s, None, None, None)
    n = np.sqrt((w1 * w1).sum(axis=1))  # (out,)
    u = x_d @ w1.T  # W' x_d = W x_d + s B A x_d
    return x @ w.T + bias + (m / n) * u - x_d @ w.T, LoraCache(x, mask, x_d, w, a, b, s, m, n, u)


def lora_backward(dout, cache):
    """(dx, dA, dB, dm) of lora_forward, dx through both x and x_d; dm None for LoRA."""
    c = cache
    xd2 = c.x_d.reshape(-1, c.x.shape[-1])  # (M, in)
    d2 = dout.reshape(-1, dout.shape[-1])  # (M, out)
    dm = None
    dx = d2 @ c.w  # through x W^T
    if c.m is not None:
        # dm = sum over rows of dout * u / n; the x_d path sees dout scaled by g = m / n, less x_d W^T's
        dm = (d2 * c.u.reshape(d2.shape)).sum(axis=0) / c.n
        dx_d = (d2 * (c.m / c.n)) @ (c.w + c.s * (c.b @ c.a)) - d2 @ c.w
        d2 = d2 * (c.m / c.n)
    else:
        dx_d = c.s * (d2 @ c.b) @ c.a
    # the branch's weights: dW' = d2^T x_d; dA = s B^T dW', dB = s dW' A^T
    dw1 = d2.T @ xd2
    dx += dx_d if c.mask is None else dx_d * c.mask.reshape(dx_d.shape)  # x_d = x * mask
    return dx.reshape(c.x.shape), c.s * (c.b.T @ dw1), c.s * (dw1 @ c.a.T), dm


# --- layernorm --------------------------------------------------------------------------------


class LayerNormCache(NamedTuple):
    """What layernorm_backward needs: the normalised x, 1 / sqrt(var + eps) and the scale."""

    xhat: Array  # (..., C)
    rstd: Array  # (..., 1)
    w: Array  # (C,)


def layernorm_forward(x, w, b, eps):
    """(x - mean) / sqrt(var + eps) * w + b over the last axis (biased variance, as torch)."""
    xp = get_array_module(x)
    mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat = (x - mu) * rstd
    return xhat * w + b, LayerNormCache(xhat, rstd, w)


def layernorm_backward(dout, cache):
    """(dx, dw, db) of layernorm_forward."""
    xhat, rstd = cache.xhat, cache.rstd
    C = xhat.shape[-1]
    dxhat = dout * cache.w
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    # dw = sum(dout * xhat), db = sum(dout), over every row
    return dx, (dout * xhat).reshape(-1, C).sum(axis=0), dout.reshape(-1, C).sum(axis=0)  # (C,), (C,)


# --- GELU -------------------------------------------------------------------------------------


def erf(x):
    """erf elementwise: math.erf on NumPy; on CuPy the engine's device erf (no host round trip)."""
    if get_array_module(x) is np:
        return np.vectorize(math.erf, otypes=[x.dtype])(x)
    return _xp_erf(x)


class GeluCache(NamedTuple):
    """What gelu_backward needs: x, and Phi(x) ('erf'), tanh(u) ('tanh') or sigmoid(1.702 x) ('quick')."""

    x: Array
    c: Array
    kind: str


def gelu_forward(x, kind):
    """GELU: x * Phi(x) with Phi(x) = (1 + erf(x / sqrt 2)) / 2 ('erf'), torch's tanh form ('tanh'), or
    CLIP's QuickGELU x * sigmoid(1.702 x) ('quick')."""
    xp = get_array_module(x)
    if kind == "erf":
        phi = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
        return x * phi, GeluCache(x, phi, kind)
    if kind == "quick":
        sig = 1.0 / (1.0 + xp.exp(-1.702 * x))
        return x * sig, GeluCache(x, sig, kind)
    t = xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1.0 + t), GeluCache(x, t, kind)


def gelu_backward(dout, cache):
    """dx of gelu_forward."""
    x, c, kind = cache.x, cache.c, cache.kind
    xp = get_array_module(x)
    if kind == "erf":
        # dx = dout * (Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi))
        return dout * (c + x * xp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi))
    if kind == "quick":  # dx = dout * (s + 1.702 x s (1 - s)), s = sigmoid(1.702 x)
        return dout * (c + 1.702 * x * c * (1.0 - c))
    # dx = dout * ((1 + t) / 2 + x (1 - t^2) / 2 * sqrt(2/pi) (1 + 3 * 0.044715 x^2)), t = tanh(u)
    du = math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x * x)
    return dout * (0.5 * (1.0 + c) + 0.5 * x * (1.0 - c * c) * du)


# --- multi-head self-attention ----------------------------------------------------------------


def softmax(s):
    """Softmax over the last axis, shifted by the row max."""
    xp = get_array_module(s)
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class AttentionCache(NamedTuple):
    """What attention_backward needs: both linears' caches, the heads' q, k, v, the probabilities a."""

    qkv: LinearCache
    proj: LinearCache
    q: Array  # (B, H, N, D)
    k: Array  # (B, H, N, D)
    v: Array  # (B, H, N, D)
    a: Array  # (B, H, N, N)
    scale: float  # D ** -0.5


def attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, heads):
    """Multi-head self-attention: fused qkv, softmax(q k^T / sqrt(D)) v per head, output projection."""
    B, N, C = x.shape
    D = C // heads
    qkv, c_qkv = linear_forward(x, w_qkv, b_qkv)  # (B, N, 3C)
    q, k, v = qkv.reshape(B, N, 3, heads, D).transpose(2, 0, 3, 1, 4)  # each (B, H, N, D)
    scale = D ** -0.5
    a = softmax((q @ k.swapaxes(-1, -2)) * scale)  # (B, H, N, N)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(B, N, C)  # (B, N, C): the heads side by side
    out, c_proj = linear_forward(o, w_proj, b_proj)  # (B, N, C)
    return out, AttentionCache(c_qkv, c_proj, q, k, v, a, scale)


def attention_backward(dout, cache):
    """(dx, dw_qkv, db_qkv, dw_proj, db_proj) of attention_forward."""
    q, k, v, a, scale = cache.q, cache.k, cache.v, cache.a, cache.scale
    xp = get_array_module(dout)
    B, H, N, D = q.shape
    do, dw_proj, db_proj = linear_backward(dout, cache.proj)  # (B, N, C)
    do = do.reshape(B, N, H, D).transpose(0, 2, 1, 3)  # (B, H, N, D)
    # o = a v: da = do v^T, dv = a^T do
    da = do @ v.swapaxes(-1, -2)  # (B, H, N, N)
    dv = a.swapaxes(-1, -2) @ do  # (B, H, N, D)
    # a = softmax(s): ds = a * (da - sum(da * a))
    ds = a * (da - (da * a).sum(axis=-1, keepdims=True))  # (B, H, N, N)
    # s = scale * q k^T: dq = scale * ds k, dk = scale * ds^T q
    dq = scale * (ds @ k)  # (B, H, N, D)
    dk = scale * (ds.swapaxes(-1, -2) @ q)  # (B, H, N, D)
    dqkv = xp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, N, 3 * H * D)  # (B, N, 3C)
    dx, dw_qkv, db_qkv = linear_backward(dqkv, cache.qkv)  # (B, N, C)
    return dx, dw_qkv, db_qkv, dw_proj, db_proj


# --- MLP and the transformer block ------------------------------------------------------------


class MLPCache(NamedTuple):
    """What mlp_backward needs: the caches of fc1, GELU and fc2."""

    fc1: LinearCache
    gelu: GeluCache
    fc2: LinearCache


def mlp_forward(x, w1, b1, w2, b2, kind):
    """fc2(gelu(fc1(x)))."""
    h, c1 = linear_forward(x, w1, b1)  # (B, N, mlp_dim)
    g, cg = gelu_forward(h, kind)
    out, c2 = linear_forward(g, w2, b2)  # (B, N, C)
    return out, MLPCache(c1, cg, c2)


def mlp_backward(dout, cache):
    """(dx, dw1, db1, dw2, db2) of mlp_forward."""
    dg, dw2, db2 = linear_backward(dout, cache.fc2)  # (B, N, mlp_dim)
    dh = gelu_backward(dg, cache.gelu)
    dx, dw1, db1 = linear_backward(dh, cache.fc1)  # (B, N, C)
    return dx, dw1, db1, dw2, db2


class BlockCache(NamedTuple):
    """What block_backward needs: each layer's cache, in forward order, and the LayerScale branches."""

    norm1: LayerNormCache
    attn: AttentionCache
    ls1: Any  # the attention branch before its LayerScale (None without one)
    norm2: LayerNormCache
    mlp: MLPCache
    ls2: Any  # the MLP branch before its LayerScale
    gammas: tuple  # (ls1.gamma, ls2.gamma), or (None, None)


def block_forward(params, prefix, x, cfg):
    """One pre-norm block: x + ls1(attn(norm1(x))), then that + ls2(mlp(norm2(that))); prefix is
    'blocks.{i}.'; LayerScale ls (x * gamma per channel) only where the block has it."""
    g = lambda name: params.get(prefix + name)  # noqa: E731  (None: a parameter the block lacks)
    h, c_n1 = layernorm_forward(x, g("norm1.weight"), g("norm1.bias"), cfg.ln_eps)
    a, c_at = attention_forward(h, g("attn.qkv.weight"), g("attn.qkv.bias"), g("attn.proj.weight"),
                                g("attn.proj.bias"), cfg.heads)
    x = x + (a if g("ls1.gamma") is None else a * g("ls1.gamma"))  # (B, N, C)
    h, c_n2 = layernorm_forward(x, g("norm2.weight"), g("norm2.bias"), cfg.ln_eps)
    m, c_mlp = mlp_forward(h, g("mlp.fc1.weight"), g("mlp.fc1.bias"), g("mlp.fc2.weight"),
                           g("mlp.fc2.bias"), cfg.gelu)
    y = x + (m if g("ls2.gamma") is None else m * g("ls2.gamma"))
    return y, BlockCache(c_n1, c_at, a, c_n2, c_mlp, m, (g("ls1.gamma"), g("ls2.gamma")))


def _layer_scale_backward(dout, h, gamma, gr, name):
    """d(branch) of h * gamma, with gamma's grad sum(dout * h) over every row into gr[name]."""
    if gamma is None:
        return dout
    gr[name] = (dout * h).reshape(-1, h.shape[-1]).sum(axis=0)  # (C,)
    return dout * gamma


def block_backward(dout, cache):
    """(dx, grads) of block_forward; grads are named within the block ('attn.qkv.weight', ...)."""
    gr = {}
    # y = x1 + ls2(mlp(norm2(x1))): dx1 = dout + norm2'(mlp'(ls2'(dout)))
    dm = _layer_scale_backward(dout, cache.ls2, cache.gammas[1], gr, "ls2.gamma")
    dh, gr["mlp.fc1.weight"], gr["mlp.fc1.bias"], gr["mlp.fc2.weight"], gr["mlp.fc2.bias"] = \
        mlp_backward(dm, cache.mlp)
    dh, gr["norm2.weight"], gr["norm2.bias"] = layernorm_backward(dh, cache.norm2)
    dx1 = dout + dh  # (B, N, C)
    # x1 = x + ls1(attn(norm1(x))): dx = dx1 + norm1'(attn'(ls1'(dx1)))
    da = _layer_scale_backward(dx1, cache.ls1, cache.gammas[0], gr, "ls1.gamma")
    dh, gr["attn.qkv.weight"], gr["attn.qkv.bias"], gr["attn.proj.weight"], gr["attn.proj.bias"] = \
        attention_backward(da, cache.attn)
    dh, gr["norm1.weight"], gr["norm1.bias"] = layernorm_backward(dh, cache.norm1)
    return dx1 + dh, {k: v for k, v in gr.items() if v is not None}  # no qkv bias: no such grad


# --- patch embedding --------------------------------------------------------------------------


class PatchEmbedCache(NamedTuple):
    """What patch_embed_backward needs: the linear's cache and the image and weight shapes."""

    lin: LinearCache
    x_shape: tuple  # (B, Cin, H, W)
    w_shape: tuple  # (C, Cin, P, P)


def patch_embed_forward(x, w, b):
    """Conv2d with kernel = stride = P on x (B, Cin, H, W), as a reshape into patches and a matmul."""
    B, Cin, H, W = x.shape
    C, _, P, _ = w.shape
    patches = x.reshape(B, Cin, H // P, P, W // P, P).transpose(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, Cin, P, P)
    patches = patches.reshape(B, (H // P) * (W // P), Cin * P * P)  # (B, N, Cin*P*P): row-major, w's (Cin, P, P) order
    out, c_lin = linear_forward(patches, w.reshape(C, Cin * P * P), b)  # (B, N, C)
    return out, PatchEmbedCache(c_lin, x.shape, w.shape)


def patch_embed_backward(dout, cache):
    """(dx, dw, db) of patch_embed_forward."""
    B, Cin, H, W = cache.x_shape
    P = cache.w_shape[2]
    dpatches, dw, db = linear_backward(dout, cache.lin)  # (B, N, Cin*P*P), (C, Cin*P*P), (C,)
    # dx is dpatches put back where each patch came from: the inverse reshape
    dx = dpatches.reshape(B, H // P, W // P, Cin, P, P).transpose(0, 3, 1, 4, 2, 5)  # (B, Cin, H/P, P, W/P, P)
    dx = dx.reshape(B, Cin, H, W)  # (B, Cin, H, W)
    return dx, dw.reshape(cache.w_shape), db  # dw (C, Cin, P, P)


# --- the position embedding at another grid (dynamic_img_size) -------------------------------


class PosResampleCache(NamedTuple):
    """What pos_resample_backward needs: the axes' interpolation matrices (None: grid unchanged)."""

    rh: Any  # (nh, gh)
    rw: Any  # (nw, gw)
    prefix: int


def pos_resample_forward(pos, grid, new_grid, prefix):
    """pos (1, prefix + gh*gw, C) for a new (nh, nw) grid as timm's resample_abs_pos_embed: the prefix rows
    kept, the grid E resampled per channel by torch's antialiased bicubic, G = R_h E R_w^T, its two
    axes' matrices (resample.bicubic_aa_matrix); the stored grid unchanged."""
    xp = get_array_module(pos)
    (gh, gw), (nh, nw), C = grid, new_grid, pos.shape[-1]
    if (gh, gw) == (nh, nw):
        return pos, PosResampleCache(None, None, prefix)
    rh = xp.asarray(bicubic_aa_matrix(gh, nh), dtype=pos.dtype)  # (nh, gh)
    rw = xp.asarray(bicubic_aa_matrix(gw, nw), dtype=pos.dtype)  # (nw, gw)
    e = pos[0, prefix:].reshape(gh, gw, C)  # (gh, gw, C)
    g = xp.einsum("ih,hwc,jw->ijc", rh, e, rw).reshape(1, nh * nw, C)  # (1, nh*nw, C)
    return xp.concatenate([pos[:, :prefix], g], axis=1), PosResampleCache(rh, rw, prefix)


def pos_resample_backward(dout, cache):
    """d(pos) of pos_resample_forward."""
    if cache.rh is None:
        return dout
    xp = get_array_module(dout)
    rh, rw, P = cache.rh, cache.rw, cache.prefix
    dg = dout[0, P:].reshape(rh.shape[0], rw.shape[0], -1)  # (nh, nw, C)
    # G = R_h E R_w^T per channel: dE = R_h^T dG R_w; the prefix rows pass through
    de = xp.einsum("ih,ijc,jw->hwc", rh, dg, rw).reshape(1, -1, dg.shape[-1])  # (1, gh*gw, C)
    return xp.concatenate([dout[:, :P], de], axis=1)


# --- pooling and heads -----------------------------------------------------------------------


class AttentionPoolCache(NamedTuple):
    """What attention_pool_backward needs: its linears', norm's and MLP's caches, q, k, v and a."""

    q_lin: LinearCache
    kv: LinearCache
    q: Array  # (1, H, 1, D)
    k: Array  # (B, H, N, D)
    v: Array  # (B, H, N, D)
    a: Array  # (B, H, 1, N)
    proj: LinearCache
    norm: LayerNormCache
    mlp: MLPCache


def attention_pool_forward(x, params, cfg):
    """timm's AttentionPoolLatent over x (B, N, C): a learned latent query attends over the tokens,
    y = proj(attention), out = y + mlp(norm(y)) (B, C); params 'attn_pool.*'."""
    g = lambda name: params["attn_pool." + name]  # noqa: E731
    B, N, C = x.shape
    H = cfg.heads
    D = C // H
    ql, c_ql = linear_forward(g("latent"), g("q.weight"), g("q.bias"))  # (1, 1, C)
    kv, c_kv = linear_forward(x, g("kv.weight"), g("kv.bias"))  # (B, N, 2C)
    q = ql.reshape(1, 1, H, D).transpose(0, 2, 1, 3)  # (1, H, 1, D)
    k, v = kv.reshape(B, N, 2, H, D).transpose(2, 0, 3, 1, 4)  # each (B, H, N, D)
    a = softmax((q @ k.swapaxes(-1, -2)) * D ** -0.5)  # (B, H, 1, N)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(B, 1, C)  # (B, 1, C)
    y, c_proj = linear_forward(o, g("proj.weight"), g("proj.bias"))
    h, c_n = layernorm_forward(y, g("norm.weight"), g("norm.bias"), cfg.ln_eps)
    m, c_mlp = mlp_forward(h, g("mlp.fc1.weight"), g("mlp.fc1.bias"), g("mlp.fc2.weight"), g("mlp.fc2.bias"), cfg.gelu)
    return (y + m)[:, 0], AttentionPoolCache(c_ql, c_kv, q, k, v, a, c_proj, c_n, c_mlp)


def attention_pool_backward(dout, cache):
    """(dx, grads named 'attn_pool.*') of attention_pool_forward."""
    gr = {}
    d = dout[:, None]  # (B, 1, C)
    dh, gr["mlp.fc1.weight"], gr["mlp.fc1.bias"], gr["mlp.fc2.weight"], gr["mlp.fc2.bias"] = mlp_backward(d, cache.mlp)
    dh, gr["norm.weight"], gr["norm.bias"] = layernorm_backward(dh, cache.norm)
    do, gr["proj.weight"], gr["proj.bias"] = linear_backward(d + dh, cache.proj)  # (B, 1, C)
    q, k, v, a = cache.q, cache.k, cache.v, cache.a
    B, H, N, D = k.shape
    do = do.reshape(B, 1, H, D).transpose(0, 2, 1, 3)  # (B, H, 1, D)
    da = do @ v.swapaxes(-1, -2)  # (B, H, 1, N)
    dv = a.swapaxes(-1, -2) @ do  # (B, H, N, D)
    ds = a * (da - (da * a).sum(axis=-1, keepdims=True)) * D ** -0.5  # d(scores) / scale
    dq = (ds @ k).sum(axis=0, keepdims=True)  # (1, H, 1, D): one latent for the batch
    dk = ds.swapaxes(-1, -2) @ q  # (B, H, N, D)
    xp = get_array_module(dout)
    dkv = xp.stack([dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, N, 2 * H * D)  # (B, N, 2C)
    dx, gr["kv.weight"], gr["kv.bias"] = linear_backward(dkv, cache.kv)
    gr["latent"], gr["q.weight"], gr["q.bias"] = linear_backward(dq.transpose(0, 2, 1, 3).reshape(1, 1, H * D),
                                                                 cache.q_lin)
    return dx, {"attn_pool." + k_: g for k_, g in gr.items()}


class PoolCache(NamedTuple):
    """What pool_backward needs: the norms' caches (None where absent), the attention pool's, the shape."""

    norm: Any
    attn_pool: Any
    fc_norm: Any
    x_shape: tuple  # (B, P+N, C)


def pool_forward(params, x, cfg):
    """The final norm (on every token, or after the pooling as fc_norm) and the pooling of the blocks'
    output x (B, P+N, C): the class token ('token'; beside the distillation token when distilled), the
    patch mean ('avg'), the class token beside the patch mean ('token_avg') or the attention pool ('map')."""
    xp = get_array_module(x)
    P, pool = cfg.num_prefix_tokens, cfg.global_pool
    c_n = c_map = c_fc = None
    if not cfg.use_fc_norm:
        x, c_n = layernorm_forward(x, params["norm.weight"], params["norm.bias"], cfg.ln_eps)
    if pool == "token":
        f = x[:, :2].reshape(x.shape[0], -1) if cfg.distilled else x[:, 0]  # (B, 2C) or (B, C)
    elif pool == "avg":
        f = x[:, P:].mean(axis=1)  # (B, C)
    elif pool == "token_avg":
        f = xp.concatenate([x[:, 0], x[:, P:].mean(axis=1)], axis=1)  # (B, 2C)
    else:
        f, c_map = attention_pool_forward(x[:, P:], params, cfg)
    if cfg.use_fc_norm:
        f, c_fc = layernorm_forward(f, params["fc_norm.weight"], params["fc_norm.bias"], cfg.ln_eps)
    return f, PoolCache(c_n, c_map, c_fc, x.shape)


def pool_backward(dfeats, cache, cfg):
    """(dx, grads) of pool_forward."""
    xp = get_array_module(dfeats)
    gr = {}
    B, n, C = cache.x_shape
    P = cfg.num_prefix_tokens
    if cache.fc_norm is not None:
        dfeats, gr["fc_norm.weight"], gr["fc_norm.bias"] = layernorm_backward(dfeats, cache.fc_norm)
    dx = xp.zeros(cache.x_shape, dtype=dfeats.dtype)  # (B, P+N, C)
    if cfg.global_pool == "token":
        dx[:, :2 if cfg.distilled else 1] = dfeats.reshape(B, -1, C)
    elif cfg.global_pool == "map":
        dx[:, P:], g = attention_pool_backward(dfeats, cache.attn_pool)
        gr.update(g)
    else:  # the mean spreads its gradient evenly over the patches
        dx[:, P:] = dfeats[:, None, -C:] / (n - P)
        if cfg.global_pool == "token_avg":
            dx[:, 0] += dfeats[:, :C]
    if cache.norm is not None:
        dx, gr["norm.weight"], gr["norm.bias"] = layernorm_backward(dx, cache.norm)
    return dx, gr


# --- the whole model --------------------------------------------------------------------------


class ViTCache(NamedTuple):
    """What vit_backward needs: every layer's cache, the params' names and the config."""

    patch_embed: PatchEmbedCache
    norm_pre: Any  # LayerNormCache, or None without norm_pre
    blocks: list  # of BlockCache
    pool: PoolCache
    heads: list  # of LinearCache: the head, and head_dist when distilled
    names: list  # the params' names, in their order
    cfg: Any
    pos_resample: Any = None  # PosResampleCache


def _prefix(cfg):
    """The prefix tokens' params, in token order: class, distillation, registers."""
    return [n for n, on in (("cls_token", cfg.class_token), ("dist_token", cfg.distilled),
                            ("reg_token", cfg.reg_tokens)) if on]


def vit_forward(params, images, cfg):
    """Logits (B, num_classes) for NCHW images, in the params' dtype; returns (logits, cache)."""
    xp = get_array_module(params["pos_embed"])
    images = images.astype(params["pos_embed"].dtype, copy=False)
    x, c_pe = patch_embed_forward(images, params["patch_embed.proj.weight"],
                                  params.get("patch_embed.proj.bias"))  # (B, N, C)
    B, N, C = x.shape
    prefix = [xp.broadcast_to(params[n], (B,) + params[n].shape[1:]) for n in _prefix(cfg)]  # (B, n, C) each
    g, P = cfg.img_size // cfg.patch_size, cfg.patch_size  # the stored grid; dynamic_img_size: this batch's
    new = (images.shape[2] // P, images.shape[3] // P) if cfg.dynamic_img_size else (g, g)
    pos, c_rs = pos_resample_forward(params["pos_embed"], (g, g), new, 0 if cfg.no_embed_class else cfg.num_prefix_tokens)
    if cfg.no_embed_class:  # the position embedding covers the patches alone
        x = xp.concatenate(prefix + [x + pos], axis=1)  # (B, P+N, C)
    else:
        x = xp.concatenate(prefix + [x], axis=1) + pos  # (B, P+N, C)
    c_pre = None
    if cfg.pre_norm:
        x, c_pre = layernorm_forward(x, params["norm_pre.weight"], params["norm_pre.bias"], cfg.ln_eps)
    blocks = []
    for i in range(cfg.depth):
        x, c = block_forward(params, f"blocks.{i}.", x, cfg)  # (B, P+N, C)
        blocks.append(c)
    f, c_pool = pool_forward(params, x, cfg)  # (B, feature_dim), or (B, 2C) when distilled
    if cfg.distilled:  # the mean of the class token's head and the distillation token's
        logits, c_h = linear_forward(f[:, :C], params["head.weight"], params["head.bias"])
        dist, c_d = linear_forward(f[:, C:], params["head_dist.weight"], params["head_dist.bias"])
        logits, heads = (logits + dist) / 2, [c_h, c_d]
    else:
        logits, c_h = linear_forward(f, params["head.weight"], params["head.bias"])  # (B, num_classes)
        heads = [c_h]
    return logits, ViTCache(c_pe, c_pre, blocks, c_pool, heads, list(params), cfg, c_rs)


def vit_backward(dlogits, cache):
    """Gradients of every parameter (same names, shapes and order as params) given dL/dlogits."""
    xp = get_array_module(dlogits)
    cfg, grads = cache.cfg, {}
    if cfg.distilled:
        df0, grads["head.weight"], grads["head.bias"] = linear_backward(dlogits / 2, cache.heads[0])
        df1, grads["head_dist.weight"], grads["head_dist.bias"] = linear_backward(dlogits / 2, cache.heads[1])
        dfeats = xp.concatenate([df0, df1], axis=1)  # (B, 2C)
    else:
        dfeats, grads["head.weight"], grads["head.bias"] = linear_backward(dlogits, cache.heads[0])
    dx, g = pool_backward(dfeats, cache.pool, cfg)  # (B, P+N, C)
    grads.update(g)
    for i in reversed(range(len(cache.blocks))):
        dx, g = block_backward(dx, cache.blocks[i])  # (B, P+N, C)
        grads.update({f"blocks.{i}.{k}": v for k, v in g.items()})
    if cache.norm_pre is not None:
        dx, grads["norm_pre.weight"], grads["norm_pre.bias"] = layernorm_backward(dx, cache.norm_pre)
    # x = concat(prefix, patches) + pos_embed (or the patches' alone): both sum dx over the batch
    P = cfg.num_prefix_tokens
    grads["pos_embed"] = pos_resample_backward((dx[:, P:] if cfg.no_embed_class else dx).sum(axis=0, keepdims=True),
                                               cache.pos_resample)  # (1, N[+P], C) at the stored grid
    start = 0
    for name in _prefix(cfg):
        n = cfg.reg_tokens if name == "reg_token" else 1
        grads[name] = dx[:, start:start + n].sum(axis=0, keepdims=True)  # (1, n, C)
        start += n
    _, grads["patch_embed.proj.weight"], grads["patch_embed.proj.bias"] = patch_embed_backward(
        dx[:, P:], cache.patch_embed)  # the patch tokens' gradient, (B, N, C)
    return {k: grads[k] for k in cache.names}


# --- loss -------------------------------------------------------------------------------------


class CrossEntropyCache(NamedTuple):
    """What cross_entropy_backward needs: the log-probabilities and the smoothed targets."""

    logp: Array  # (B, K)
    target: Array  # (B, K)


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy over the batch, with label smoothing as torch's CrossEntropyLoss."""
    xp = get_array_module(logits)
    B, K = logits.shape
    z = logits - logits.max(axis=1, keepdims=True)  # (B, K)
    logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))  # (B, K) log-softmax
    onehot = (xp.asarray(labels)[:, None] == xp.arange(K)).astype(logits.dtype)  # (B, K)
    target = (1.0 - label_smoothing) * onehot + label_smoothing / K  # (B, K) smoothed targets
    loss = -(target * logp).sum() / B  # 0-d
    return loss, CrossEntropyCache(logp, target)


def cross_entropy_backward(cache):
    """dlogits of cross_entropy_forward (for dloss = 1)."""
    logp = cache.logp
    # dlogits = (softmax(logits) - target) / B
    return (get_array_module(logp).exp(logp) - cache.target) / logp.shape[0]  # (B, K)
