"""The whole ViT, forward and backward, as plain array math: the reference the fast engine is checked against.

Each layer is a pair `out, cache = X_forward(...)` / `grads = X_backward(dout, cache)` (the cache a
NamedTuple, defined just above its forward), written as the paper reads: no kernels, threads,
shards, lookup tables, affine folding or skipped tokens, and the softmax always shifted by its row
max. Arrays are NumPy or CuPy (xp is taken from the inputs), in the inputs' dtype. There is no
dropout: this is the eval-mode (or dropout-free) model; train-mode dropout is the engine's business
(tinyvit.nn.model). Speed does not matter here, clarity does.
"""
import math
from typing import Any, NamedTuple

import numpy as np

from ..backend import get_array_module
from .special import erf as _xp_erf

Array = Any  # a NumPy or CuPy array

# --- linear -----------------------------------------------------------------------------------


class LinearCache(NamedTuple):
    """What linear_backward needs: the input and the weight."""

    x: Array  # (..., in)
    w: Array  # (out, in)


def linear_forward(x, w, b):
    """y = x @ w^T + b, with w in torch's (out, in) layout."""
    return x @ w.T + b, LinearCache(x, w)  # (..., out)


def linear_backward(dout, cache):
    """(dx, dw, db) of linear_forward."""
    x2 = cache.x.reshape(-1, cache.x.shape[-1])  # (M, in)
    d2 = dout.reshape(-1, dout.shape[-1])  # (M, out)
    # dx = dout @ w, dw = dout^T @ x, db = sum of dout over every row
    return dout @ cache.w, d2.T @ x2, d2.sum(axis=0)  # (..., in), (out, in), (out,)


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
    """What block_backward needs: each layer's cache, in forward order."""

    norm1: LayerNormCache
    attn: AttentionCache
    norm2: LayerNormCache
    mlp: MLPCache


def block_forward(params, prefix, x, cfg):
    """One pre-norm block: x + attn(norm1(x)), then that + mlp(norm2(that)); prefix is 'blocks.{i}.'."""
    g = lambda name: params[prefix + name]  # noqa: E731
    h, c_n1 = layernorm_forward(x, g("norm1.weight"), g("norm1.bias"), cfg.ln_eps)
    h, c_at = attention_forward(h, g("attn.qkv.weight"), g("attn.qkv.bias"), g("attn.proj.weight"),
                                g("attn.proj.bias"), cfg.heads)
    x = x + h  # (B, N, C)
    h, c_n2 = layernorm_forward(x, g("norm2.weight"), g("norm2.bias"), cfg.ln_eps)
    h, c_mlp = mlp_forward(h, g("mlp.fc1.weight"), g("mlp.fc1.bias"), g("mlp.fc2.weight"),
                           g("mlp.fc2.bias"), cfg.gelu)
    return x + h, BlockCache(c_n1, c_at, c_n2, c_mlp)


def block_backward(dout, cache):
    """(dx, grads) of block_forward; grads are named within the block ('attn.qkv.weight', ...)."""
    gr = {}
    # y = x1 + mlp(norm2(x1)): dx1 = dout + norm2'(mlp'(dout))
    dh, gr["mlp.fc1.weight"], gr["mlp.fc1.bias"], gr["mlp.fc2.weight"], gr["mlp.fc2.bias"] = \
        mlp_backward(dout, cache.mlp)
    dh, gr["norm2.weight"], gr["norm2.bias"] = layernorm_backward(dh, cache.norm2)
    dx1 = dout + dh  # (B, N, C)
    # x1 = x + attn(norm1(x)): dx = dx1 + norm1'(attn'(dx1))
    dh, gr["attn.qkv.weight"], gr["attn.qkv.bias"], gr["attn.proj.weight"], gr["attn.proj.bias"] = \
        attention_backward(dx1, cache.attn)
    dh, gr["norm1.weight"], gr["norm1.bias"] = layernorm_backward(dh, cache.norm1)
    return dx1 + dh, gr


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


# --- the whole model --------------------------------------------------------------------------


class ViTCache(NamedTuple):
    """What vit_backward needs: every layer's cache, the last block's output shape, the params' names."""

    patch_embed: PatchEmbedCache
    blocks: list  # of BlockCache
    norm: LayerNormCache  # of the class token alone
    head: LinearCache
    x_shape: tuple  # (B, N+1, C)
    names: list  # the params' names, in their order


def vit_forward(params, images, cfg):
    """Logits (B, num_classes) for NCHW images, in the params' dtype; returns (logits, cache)."""
    xp = get_array_module(params["pos_embed"])
    images = images.astype(params["pos_embed"].dtype, copy=False)
    x, c_pe = patch_embed_forward(images, params["patch_embed.proj.weight"],
                                  params["patch_embed.proj.bias"])  # (B, N, C)
    B, N, C = x.shape
    cls = xp.broadcast_to(params["cls_token"], (B, 1, C))  # (B, 1, C)
    x = xp.concatenate([cls, x], axis=1) + params["pos_embed"]  # (B, N+1, C)
    blocks = []
    for i in range(cfg.depth):
        x, c = block_forward(params, f"blocks.{i}.", x, cfg)  # (B, N+1, C)
        blocks.append(c)
    # the final norm is per token and the head reads the class token alone: normalise just that one
    feats, c_n = layernorm_forward(x[:, 0], params["norm.weight"], params["norm.bias"], cfg.ln_eps)  # (B, C)
    logits, c_h = linear_forward(feats, params["head.weight"], params["head.bias"])  # (B, num_classes)
    return logits, ViTCache(c_pe, blocks, c_n, c_h, x.shape, list(params))


def vit_backward(dlogits, cache):
    """Gradients of every parameter (same names, shapes and order as params) given dL/dlogits."""
    xp = get_array_module(dlogits)
    grads = {}
    dfeats, grads["head.weight"], grads["head.bias"] = linear_backward(dlogits, cache.head)  # (B, C)
    dcls, grads["norm.weight"], grads["norm.bias"] = layernorm_backward(dfeats, cache.norm)  # (B, C)
    dx = xp.zeros(cache.x_shape, dtype=dlogits.dtype)  # (B, N+1, C): the head read the class token only
    dx[:, 0] = dcls
    for i in reversed(range(len(cache.blocks))):
        dx, g = block_backward(dx, cache.blocks[i])  # (B, N+1, C)
        grads.update({f"blocks.{i}.{k}": v for k, v in g.items()})
    # x = concat(cls, patches) + pos_embed: pos_embed and cls_token sum dx over the batch
    grads["pos_embed"] = dx.sum(axis=0, keepdims=True)  # (1, N+1, C)
    grads["cls_token"] = dx[:, :1].sum(axis=0, keepdims=True)  # (1, 1, C)
    _, grads["patch_embed.proj.weight"], grads["patch_embed.proj.bias"] = patch_embed_backward(
        dx[:, 1:], cache.patch_embed)  # the patch tokens' gradient, (B, N, C)
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
