"""What reads the last block's tokens: the final norm, the pooling (class token, patch mean, the class
token beside the patch mean, or timm's attention pool with a learned latent query) and the head(s).

Same conventions as tinyvit.nn.layers. Plain forms: reference.pool_forward, reference.head_forward.
"""
import numpy as np

from ..backend import get_array_module
from .activations import softmax_forward
from .caches import AttentionPoolCache, DistilledHeadCache, PoolCache
from .layers import (
    gelu_linear_backward,
    gelu_linear_forward,
    layernorm_backward,
    layernorm_forward,
    layernorm_linear_backward,
    layernorm_linear_forward,
    linear_backward,
    linear_forward,
    softmax_backward,
)

_MAP = "attn_pool."
MAP_PARAMS = ("latent", "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias", "norm.weight",
              "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")  # after _MAP


def attention_pool_forward(x, p, heads, eps, gelu):
    """timm's AttentionPoolLatent on x (B, N, C): the latent's query attends over the tokens, then the
    projection and a residual MLP on its norm; p holds the 'attn_pool.*' params. Returns (B, C)."""
    B, N, C = x.shape
    D = C // heads
    q, c_q = linear_forward(p[_MAP + "latent"], p[_MAP + "q.weight"], p[_MAP + "q.bias"])  # (1, 1, C)
    kv, c_kv = linear_forward(x, p[_MAP + "kv.weight"], p[_MAP + "kv.bias"])  # (B, N, 2C)
    k, v = kv.reshape(B, N, 2, heads, D).transpose(2, 0, 3, 1, 4)  # each (B, H, N, D)
    scale = D ** -0.5
    qh = q.reshape(1, heads, 1, D) * scale  # (1, H, 1, D), already scaled
    a, _ = softmax_forward(qh @ k.transpose(0, 1, 3, 2))  # (B, H, 1, N)
    o = (a @ v).reshape(B, 1, C)  # (B, H, 1, D) -> (B, 1, C): heads side by side
    y, c_proj = linear_forward(o, p[_MAP + "proj.weight"], p[_MAP + "proj.bias"])  # (B, 1, C)
    h, c_fc1 = layernorm_linear_forward(y, p[_MAP + "norm.weight"], p[_MAP + "norm.bias"],
                                        p[_MAP + "mlp.fc1.weight"], p[_MAP + "mlp.fc1.bias"], eps)
    h, c_fc2 = gelu_linear_forward(h, p[_MAP + "mlp.fc2.weight"], p[_MAP + "mlp.fc2.bias"], gelu)
    out = (y + h)[:, 0]  # (B, C)
    return out, AttentionPoolCache(c_q, c_kv, qh, k, v, a, c_proj, c_fc1, c_fc2, scale)


def _trained(want, *names):
    """Whether any of the named params trains (want: a name's predicate, None for every param)."""
    return want is None or any(want(n) for n in names)


def attention_pool_backward(dout, cache, grads, want=None, need_dx=True):
    """Write the 'attn_pool.*' grads of attention_pool_forward into grads (those want(name) asks for, a
    frozen layer's not computed); return dx (B, N, C), or None without need_dx."""
    xp = get_array_module(dout)
    t = {k: _trained(want, _MAP + k + ".weight", _MAP + k + ".bias") for k in ("mlp.fc2", "mlp.fc1", "norm", "proj")}
    t_in = need_dx or _trained(want, _MAP + "kv.weight", _MAP + "kv.bias", _MAP + "q.weight", _MAP + "q.bias",
                               _MAP + "latent")  # what the attention's backward feeds
    d = dout[:, None]  # (B, 1, C)
    need_fc = t["mlp.fc1"] or t["norm"] or t["proj"] or t_in
    dh, grads[_MAP + "mlp.fc2.weight"], grads[_MAP + "mlp.fc2.bias"] = gelu_linear_backward(d, cache.fc2, need_fc,
                                                                                         t["mlp.fc2"])
    if not need_fc:
        return None
    dh, grads[_MAP + "norm.weight"], grads[_MAP + "norm.bias"], grads[_MAP + "mlp.fc1.weight"], \
        grads[_MAP + "mlp.fc1.bias"] = layernorm_linear_backward(dh, cache.fc1, t["proj"] or t_in, t["mlp.fc1"],
                                                                 t["norm"])
    if not (t["proj"] or t_in):
        return None
    dy = d + dh  # the residual
    do, grads[_MAP + "proj.weight"], grads[_MAP + "proj.bias"] = linear_backward(dy, cache.proj, t_in, t["proj"])
    if not t_in:
        return None
    qh, k, v, a = cache.qh, cache.k, cache.v, cache.a
    B, H, N, D = k.shape
    do = do.reshape(B, H, 1, D)
    dkv = xp.empty((B, N, 2, H, D), dtype=dout.dtype)
    dk, dv = dkv.transpose(2, 0, 3, 1, 4)  # each (B, H, N, D), views written in place
    xp.matmul(a.transpose(0, 1, 3, 2), do, out=dv)
    ds = softmax_backward(do @ v.transpose(0, 1, 3, 2), a)  # (B, H, 1, N)
    xp.matmul(ds.transpose(0, 1, 3, 2), xp.broadcast_to(qh, (B, H, 1, D)), out=dk)
    dq = (ds @ k).sum(axis=0) * cache.scale  # (H, 1, D): the latent is shared by the batch
    dx, grads[_MAP + "kv.weight"], grads[_MAP + "kv.bias"] = linear_backward(
        dkv.reshape(B, N, 2 * H * D), cache.kv, need_dx, _trained(want, _MAP + "kv.weight", _MAP + "kv.bias"))
    grads[_MAP + "latent"], grads[_MAP + "q.weight"], grads[_MAP + "q.bias"] = linear_backward(
        dq.reshape(1, 1, H * D), cache.q, _trained(want, _MAP + "latent"),
        _trained(want, _MAP + "q.weight", _MAP + "q.bias"))
    return dx


def pool_forward(params, x, cfg):
    """Features (B, cfg.feature_dim) from the last block's tokens x (B, n, C)."""
    xp = get_array_module(x)
    B, n, C = x.shape
    P, pool, q = cfg.num_prefix_tokens, cfg.global_pool, cfg.head_tokens
    c_norm = c_map = c_fc = None
    y = x if q is None else (x[:, 0] if q == 1 else x[:, :q])  # (B, C) for the class token alone
    if not cfg.use_fc_norm:  # the norm is per token: on the ones the pooling reads
        y, c_norm = layernorm_forward(y, params["norm.weight"], params["norm.bias"], cfg.ln_eps)
    if pool == "token":
        feats = y.reshape(B, q * C)  # (B, C), or (B, 2C): the class and distillation tokens
    elif pool == "avg":
        feats = y[:, P:].mean(axis=1)  # (B, C)
    elif pool == "token_avg":
        feats = xp.concatenate([y[:, 0], y[:, P:].mean(axis=1)], axis=1)  # (B, 2C)
    else:  # map
        feats, c_map = attention_pool_forward(y[:, P:], params, cfg.heads, cfg.ln_eps, cfg.gelu)
    if cfg.use_fc_norm:
        feats, c_fc = layernorm_forward(feats, params["fc_norm.weight"], params["fc_norm.bias"], cfg.ln_eps)
    return feats, PoolCache(pool, P, q, x.shape, c_norm, c_map, c_fc)


def pool_backward(dfeats, cache, grads, want=None, need_dx=True):
    """Write the norm and pooling grads of pool_forward into grads (those want(name) asks for, a frozen
    layer's not computed; want None: all); return dx (B, n, C), or None without need_dx."""
    xp = get_array_module(dfeats)
    B, n, C = cache.x_shape
    P, q = cache.prefix, cache.tokens
    t_norm = cache.norm is not None and _trained(want, "norm.weight", "norm.bias")
    t_map = cache.pool == "map" and _trained(want, *(_MAP + k for k in MAP_PARAMS))
    if cache.fc_norm is not None:
        dfeats, grads["fc_norm.weight"], grads["fc_norm.bias"] = layernorm_backward(
            dfeats, cache.fc_norm, need_dx or t_norm or t_map, _trained(want, "fc_norm.weight", "fc_norm.bias"))
    if not (need_dx or t_norm or t_map):
        return None
    if cache.pool == "token":
        dy = dfeats if q == 1 else dfeats.reshape(B, q, C)
    else:
        dy = xp.zeros((B, n, C), dtype=dfeats.dtype)
        if cache.pool == "map":
            dy_map = attention_pool_backward(dfeats, cache.attn_pool, grads, want, need_dx or t_norm)
            if dy_map is None:
                return None
            dy[:, P:] = dy_map
        else:  # the mean's gradient, shared by the patches; token_avg's class half goes to token 0
            dy[:, P:] = (dfeats[:, -C:] / (n - P))[:, None]
            if cache.pool == "token_avg":
                dy[:, 0] += dfeats[:, :C]
    if cache.norm is not None:
        dy, grads["norm.weight"], grads["norm.bias"] = layernorm_backward(dy, cache.norm, need_dx, t_norm)
    if q is None or dy is None:
        return dy
    dx = xp.zeros((B, n, C), dtype=dfeats.dtype)  # only the first q tokens were read
    dx[:, :q] = dy.reshape(B, q, C)
    return dx


def head_forward(params, feats, cfg):
    """Logits (B, num_classes) from the features: the head, or for a distilled ViT the mean of the
    class token's head and the distillation token's head_dist (in bfloat16 with cfg.precision 'bf16')."""
    bf16 = cfg.precision == "bf16"
    if not cfg.distilled:
        return linear_forward(feats, params["head.weight"], params["head.bias"], bf16)
    C = cfg.dim
    logits, c_h = linear_forward(feats[:, :C], params["head.weight"], params["head.bias"], bf16)
    dist, c_d = linear_forward(feats[:, C:], params["head_dist.weight"], params["head_dist.bias"], bf16)
    logits += dist
    logits *= np.float32(0.5) if logits.dtype == np.float32 else 0.5
    return logits, DistilledHeadCache(c_h, c_d)


def head_backward(dlogits, cache, need_dx=True, need_dw=True):
    """(dfeats, grads of the head params) of head_forward; dfeats is None unless need_dx, the grads {}
    unless need_dw (a frozen head)."""
    xp = get_array_module(dlogits)
    if not isinstance(cache, DistilledHeadCache):
        dx, gw, gb = linear_backward(dlogits, cache, need_dx, need_dw)
        return dx, ({"head.weight": gw, "head.bias": gb} if need_dw else {})
    half = dlogits * 0.5
    d0, gw, gb = linear_backward(half, cache.head, need_dx, need_dw)
    d1, gdw, gdb = linear_backward(half, cache.head_dist, need_dx, need_dw)
    dx = xp.concatenate([d0, d1], axis=1) if need_dx else None
    return dx, ({"head.weight": gw, "head.bias": gb, "head_dist.weight": gdw, "head_dist.bias": gdb} if need_dw else {})
