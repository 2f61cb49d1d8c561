"""The Vision Transformer's forward and backward over a timm-named params dict (config, presets and
init: tinyvit.nn.config, re-exported here)."""
from typing import NamedTuple

import numpy as np

from ..backend import get_array_module
from ..cpu.threads import batch_shards, in_place_blocks, run_shards
from ..errors import TinyViTError
from .branch import drop_path_backward, drop_path_forward
from .caches import BlockCache, DistilledHeadCache, EmbedCache, FeaturesCache, LayerScaleFold, ViTCache
from .config import (  # noqa: F401  (re-exported: the model's names in one place)
    PRESETS,
    ViTConfig,
    count_params,
    init_params,
    param_shapes,
    preset,
    trunc_normal,
)
from .infer import attention_infer, ln_linear_infer, mlp_residual_infer
from .layers import (
    attention_heads_backward,
    attention_heads_forward,
    attention_probs,
    colsum,
    dropout_backward,
    dropout_forward,
    gelu_inplace,
    gelu_linear_backward,
    gelu_linear_forward,
    layernorm_backward,
    layernorm_forward,
    layernorm_linear_backward,
    layernorm_linear_forward,
    linear_forward,
    patch_embed_backward,
    patch_embed_forward,
    rowsum,
)
from .pool import head_backward as _head_backward
from .pool import head_forward, pool_backward, pool_forward

# --- forward / backward -----------------------------------------------------------------------


def _folded(params, prefix, linear, gamma):
    """(w, b, fold) of a branch's last linear with the branch's LayerScale folded in when the block has
    one: gamma * (x @ w.T + b) = x @ (gamma w).T + gamma b, no pass over the activations and nothing
    cached for it (dropout and drop path, per element and per sample, commute with it)."""
    w, b, g = params[prefix + linear + ".weight"], params[prefix + linear + ".bias"], params.get(prefix + gamma)
    if g is None:
        return w, b, None
    return w * g[:, None], b * g, LayerScaleFold(g, w, b)


def _unfold(grads, prefix, linear, gamma, dw, db, fold):
    """Write the linear's (and gamma's) grads from those of its folded weight and bias."""
    if fold is None:
        grads[prefix + linear + ".weight"], grads[prefix + linear + ".bias"] = dw, db
        return
    grads[prefix + gamma] = rowsum(dw * fold.w)[:, 0] + db * fold.b  # d/d gamma_i of (gamma_i w_i., gamma_i b_i)
    grads[prefix + linear + ".weight"], grads[prefix + linear + ".bias"] = dw * fold.gamma[:, None], db * fold.gamma


def _block_forward(params, prefix, x, cfg, train, rng, keep_cache=True, queries=None, drop_path=0.0):
    """One pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x)); prefix is 'blocks.{i}.'.

    Each norm's affine is folded into the linear after it (layernorm_linear_forward), and each branch's
    LayerScale (ls1, ls2, where the block has it) into the linear before it (_folded): same math. Each
    branch ends in drop path at this rate. queries=n returns the first n tokens alone (B, n, C): every
    token still feeds attention's keys and values, but nothing after the attention is computed for the
    other tokens. Plain form: reference.block_forward."""
    qkv, c_n1 = layernorm_linear_forward(x, params[prefix + "norm1.weight"], params[prefix + "norm1.bias"],
                                         params[prefix + "attn.qkv.weight"], params.get(prefix + "attn.qkv.bias"),
                                         cfg.ln_eps)
    w, b, f1 = _folded(params, prefix, "attn.proj", "ls1.gamma")
    h, c_at = attention_heads_forward(qkv, w, b, cfg.heads, cfg.attn_dropout, rng, train, queries)
    del qkv
    h, c_d1 = dropout_forward(h, cfg.dropout, rng, train)
    h, c_dp1 = drop_path_forward(h, drop_path, rng, train)
    x = x[:, :h.shape[1]] + h  # (B, n, C)
    h, c_f1 = layernorm_linear_forward(x, params[prefix + "norm2.weight"], params[prefix + "norm2.bias"],
                                       params[prefix + "mlp.fc1.weight"], params[prefix + "mlp.fc1.bias"], cfg.ln_eps)
    w2, b2, f2 = _folded(params, prefix, "mlp.fc2", "ls2.gamma")
    if keep_cache:  # fc2(dropout(gelu(h))), caching fc1's output and GELU's factor
        h, c_f2 = gelu_linear_forward(h, w2, b2, cfg.gelu, cfg.dropout, rng, train)
    else:  # inference: GELU in place on fc1's output, nothing kept
        h, _ = dropout_forward(gelu_inplace(h, cfg.gelu), cfg.dropout, rng, train)
        h, c_f2 = linear_forward(h, w2, b2)
    h, c_d3 = dropout_forward(h, cfg.dropout, rng, train)
    h, c_dp2 = drop_path_forward(h, drop_path, rng, train)
    x += h  # x is our own buffer here (x + h above), so in place is safe
    return x, BlockCache(c_n1, c_at, c_d1, c_f1, c_f2, c_d3, f1, c_dp1, f2, c_dp2)


def _block_infer(params, prefix, x, cfg, queries=None):
    """_block_forward at inference on NumPy, nothing cached: attention and the MLP run a cache-sized
    block at a time (tinyvit.nn.infer). Same math; plain form: reference.block_forward."""
    qkv = ln_linear_infer(x, params[prefix + "norm1.weight"], params[prefix + "norm1.bias"],
                          params[prefix + "attn.qkv.weight"], params.get(prefix + "attn.qkv.bias"), cfg.ln_eps,
                          q_scale=(cfg.dim // cfg.heads) ** -0.5)
    w, b, _ = _folded(params, prefix, "attn.proj", "ls1.gamma")
    h = attention_infer(qkv, w, b, cfg.heads, queries)
    del qkv
    x = x[:, :h.shape[1]] + h  # (B, n, C), our own buffer: the MLP adds into it in place
    w2, b2, _ = _folded(params, prefix, "mlp.fc2", "ls2.gamma")
    return mlp_residual_infer(x, params[prefix + "norm2.weight"], params[prefix + "norm2.bias"],
                              params[prefix + "mlp.fc1.weight"], params[prefix + "mlp.fc1.bias"], w2, b2,
                              cfg.gelu, cfg.ln_eps)


def _put(grads, name, g):
    """grads[name] = g, unless the layer has no such parameter (g is None: a bias it lacks)."""
    if g is not None:
        grads[name] = g


def _block_backward(dx, cache, grads, prefix):
    """Reverse of _block_forward; writes param grads into `grads`, returns d(block input).

    `cache` is the block's only remaining reference (popped by vit_backward), so each layer's
    saved arrays are freed as soon as its backward is done: a lower peak, as torch frees saved tensors.
    Plain form: reference.block_backward."""
    c_n1, c_at, c_d1, c_f1, c_f2, c_d3, f1, c_dp1, f2, c_dp2 = cache  # unpacked so each part can be freed
    del cache
    dh = dropout_backward(drop_path_backward(dx, c_dp2), c_d3)
    dh, dw, db = gelu_linear_backward(dh, c_f2)
    _unfold(grads, prefix, "mlp.fc2", "ls2.gamma", dw, db, f2)
    del c_f2
    dh, grads[prefix + "norm2.weight"], grads[prefix + "norm2.bias"], grads[prefix + "mlp.fc1.weight"], \
        grads[prefix + "mlp.fc1.bias"] = layernorm_linear_backward(dh, c_f1)
    del c_f1
    dx = dx + dh  # residual: both paths carry the gradient
    dh = dropout_backward(drop_path_backward(dx, c_dp1), c_d1)
    dqkv, dw, db = attention_heads_backward(dh, c_at)
    _unfold(grads, prefix, "attn.proj", "ls1.gamma", dw, db, f1)
    del c_at
    dh, grads[prefix + "norm1.weight"], grads[prefix + "norm1.bias"], grads[prefix + "attn.qkv.weight"], qkv_b = \
        layernorm_linear_backward(dqkv, c_n1)  # (B, N, C)
    _put(grads, prefix + "attn.qkv.bias", qkv_b)
    dh[:, :dx.shape[1]] += dx  # the residual reaches the tokens the block returned (all, or the first n)
    return dh


def _prepare_images(params, images, cfg):
    """images in the params' dtype after checking their shape and values (once per batch)."""
    xp = get_array_module(params["pos_embed"])
    images = images.astype(params["pos_embed"].dtype, copy=False)  # compute in the params' dtype
    if images.ndim != 4 or tuple(images.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size):
        raise TinyViTError(f"images must be (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), "
                           f"got {tuple(images.shape)}")
    # on CuPy this check would stall the GPU every batch (a host read): there non-finite images
    # give non-finite logits, which evaluate and the training loop catch when they read results
    if xp is np and not bool(xp.isfinite(images).all()):
        raise TinyViTError("images contain NaN or Inf values")
    return images


def _prefix_names(cfg):
    """The prefix tokens' params in token order: class, distillation, registers."""
    return [n for n, on in (("cls_token", cfg.class_token), ("dist_token", cfg.distilled),
                            ("reg_token", cfg.reg_tokens)) if on]


def _embed_forward(params, images, cfg, train, rng):
    """Patch embedding, the prefix tokens, the position embedding (over every token, or the patches
    alone: no_embed_class), dropout and norm_pre: the blocks' input (B, P+N, C)."""
    xp = get_array_module(params["pos_embed"])
    x, c_pe = patch_embed_forward(images, params["patch_embed.proj.weight"], params.get("patch_embed.proj.bias"))
    B, N, C = x.shape
    names = _prefix_names(cfg)
    prefix = [xp.broadcast_to(params[n], (B, params[n].shape[1], C)) for n in names]
    if cfg.no_embed_class:
        x += params["pos_embed"]  # x is the patch embedding's own buffer
    if prefix:
        x = xp.concatenate(prefix + [x], axis=1)  # (B, P+N, C)
    if not cfg.no_embed_class:
        x += params["pos_embed"]
    x, c_pd = dropout_forward(x, cfg.dropout, rng, train)
    c_pre = None
    if cfg.pre_norm:
        x, c_pre = layernorm_forward(x, params["norm_pre.weight"], params["norm_pre.bias"], cfg.ln_eps)
    return x, EmbedCache(c_pe, [(n, params[n].shape[1]) for n in names], cfg.no_embed_class, c_pd, c_pre)


def _embed_backward(dx, cache, grads):
    """Reverse of _embed_forward: writes the embedding's grads into grads."""
    if cache.norm_pre is not None:
        dx, grads["norm_pre.weight"], grads["norm_pre.bias"] = layernorm_backward(dx, cache.norm_pre)
    dx = dropout_backward(dx, cache.pos_drop)  # (B, P+N, C)
    P = sum(n for _, n in cache.prefix)
    dpos = dx[:, P:] if cache.no_embed_class else dx
    grads["pos_embed"] = colsum(dpos.reshape(dpos.shape[0], -1)).reshape((1,) + dpos.shape[1:])  # (1, N[+P], C)
    start = 0
    for name, n in cache.prefix:
        grads[name] = dx[:, start:start + n].sum(axis=0, keepdims=True)  # (1, n, C)
        start += n
    _, grads["patch_embed.proj.weight"], patch_b = patch_embed_backward(dx[:, P:], cache.patch_embed, need_dx=False)
    _put(grads, "patch_embed.proj.bias", patch_b)


def _features_forward(params, images, cfg, train, rng, keep_cache=True, all_tokens=False):
    """The embedding, the blocks, the final norm and the pooling: what the head reads (B, feature_dim).

    keep_cache=False (inference) drops each block's intermediates as soon as the next block
    runs, so memory holds about one block's worth instead of the whole backward cache.
    A head reading the class token alone (token pooling) lets the last block compute only that
    token's output (after an attention over every token) unless all_tokens: the same features for
    about 1/depth less work. Plain form: reference.vit_forward, up to its head."""
    x, c_em = _embed_forward(params, images, cfg, train, rng)
    rates = cfg.drop_path_rates() if train else [0.0] * cfg.depth
    blocks = []
    infer = not keep_cache and not train and get_array_module(x) is np
    for i in range(cfg.depth):
        last = i == cfg.depth - 1 and not all_tokens
        if infer:
            x = _block_infer(params, f"blocks.{i}.", x, cfg, cfg.head_tokens if last else None)
            continue
        x, c = _block_forward(params, f"blocks.{i}.", x, cfg, train, rng, keep_cache,
                              cfg.head_tokens if last else None, rates[i])
        if keep_cache:
            blocks.append(c)
        del c
    feats, c_pool = pool_forward(params, x, cfg)
    return feats, (FeaturesCache(c_em, blocks, c_pool) if keep_cache else None)


def _forward(params, images, cfg, train, rng, keep_cache, all_tokens):
    """vit_forward on one (prepared) batch or shard."""
    feats, c_body = _features_forward(params, images, cfg, train, rng, keep_cache, all_tokens)
    logits, c_h = head_forward(params, feats, cfg)
    return logits, (ViTCache(c_body, c_h) if keep_cache else None)


class _ShardedCache(NamedTuple):
    """The cache of a forward run as data-parallel shards: each shard's batch slice and cache."""

    slices: list
    caches: list


def _run_batch(fn, params, images, cfg, train):
    """(shards, outputs): fn on the checked images whole (shards None, one output), or fn on each
    data-parallel shard (tinyvit.cpu.threads.batch_shards), one per core."""
    images = _prepare_images(params, images, cfg)
    shards = None
    if not (train and (cfg.dropout or cfg.attn_dropout or cfg.drop_path)):  # one RNG stream, drawn in order
        shards = batch_shards(images.shape[0], get_array_module(params["pos_embed"]))
    if shards is None:
        return None, [fn(images)]
    return shards, run_shards(lambda s: fn(images[s]), shards)


def vit_forward(params, images, cfg: ViTConfig, train=False, rng=None, keep_cache=True, all_tokens=False):
    """Logits (B, num_classes) for NCHW images, computed in the params' dtype; returns (logits, cache).

    With keep_cache=False (inference only) the cache is None and memory stays about one block's worth.
    The last block runs on the class token alone (the head reads nothing else); all_tokens=True runs
    it on every token, which only attention_maps needs: the logits and gradients are the same.
    On NumPy the batch runs as one shard per core (see tinyvit.cpu.threads.batch_shards; TINYVIT_SHARDS=1 turns
    that off); the logits and gradients are the same up to float rounding. Plain form: reference.vit_forward.
    """
    shards, outs = _run_batch(lambda x: _forward(params, x, cfg, train, rng, keep_cache, all_tokens),
                              params, images, cfg, train)
    if shards is None:
        return outs[0]
    logits = get_array_module(outs[0][0]).concatenate([shard_logits for shard_logits, _ in outs])
    return logits, (_ShardedCache(shards, [shard_cache for _, shard_cache in outs]) if keep_cache else None)


def _backward(dlogits, cache):
    """vit_backward of one batch or shard."""
    features = cache.features
    blocks = features.blocks
    if not blocks:
        raise TinyViTError("this cache was already used by vit_backward (it is consumed to free "
                           "memory) or holds no blocks: run vit_forward again")
    dfeats, grads = _head_backward(dlogits, cache.head)
    dx = pool_backward(dfeats, features.pool, grads)  # (B, n, C): only the tokens the pooling read
    for i in reversed(range(len(blocks))):
        dx = _block_backward(dx, blocks.pop(), grads, f"blocks.{i}.")  # pop: the block's cache is freed
    _embed_backward(dx, features.embed, grads)
    return grads


def _accumulate(x, out):
    """out += x (a block of it)."""
    out += x


def vit_backward(dlogits, cache):
    """Gradients of every parameter (same keys as params) given dL/dlogits; consumes the cache.

    Each block's saved arrays are released as soon as its gradients are done (as torch frees saved
    tensors), so one forward's cache serves one backward. Shards run in parallel and their
    gradients are summed. Plain form: reference.vit_backward."""
    if not isinstance(cache, _ShardedCache):
        return _backward(dlogits, cache)
    parts = run_shards(lambda i: _backward(dlogits[cache.slices[i]], cache.caches[i]), range(len(cache.slices)))
    grads = parts[0]
    for other in parts[1:]:
        for k, g in other.items():
            in_place_blocks(_accumulate, [g], [grads[k]])
    return grads


def head_backward(dlogits, cache):
    """Gradients of the head(s) alone (backbone frozen) from a vit_forward cache; leaves the cache intact."""
    if not isinstance(cache, _ShardedCache):
        return _head_backward(dlogits, cache.head, need_dx=False)[1]
    xp = get_array_module(dlogits)

    def join(parts):  # the shards' LinearCaches as one over the whole batch: one GEMM
        return parts[0]._replace(x=xp.concatenate([p.x for p in parts]))

    heads = [c.head for c in cache.caches]
    joined = DistilledHeadCache(*map(join, zip(*heads))) if isinstance(heads[0], DistilledHeadCache) else join(heads)
    return _head_backward(dlogits, joined, need_dx=False)[1]


def vit_features(params, images, cfg: ViTConfig):
    """What the head(s) read (B, cfg.feature_dim): the pooled, normed features, eval mode; head-only
    training caches them."""
    shards, outs = _run_batch(lambda x: _features_forward(params, x, cfg, False, None, keep_cache=False)[0],
                              params, images, cfg, False)
    return outs[0] if shards is None else get_array_module(outs[0]).concatenate(outs)


def attention_maps(cache):
    """Each block's attention probabilities (B, H, N+1, N+1) from a vit_forward(..., all_tokens=True) cache."""
    if isinstance(cache, _ShardedCache):
        per_shard = [attention_maps(c) for c in cache.caches]
        return [get_array_module(m[0]).concatenate(m) for m in zip(*per_shard)]
    blocks = cache.features.blocks
    if blocks and blocks[-1].attn.q.shape[2] < blocks[-1].attn.k.shape[2]:  # fewer queries than tokens
        raise TinyViTError("this cache holds the last block's class-token attention only: "
                           "run vit_forward with all_tokens=True for attention maps")
    return [attention_probs(c.attn) for c in blocks]
