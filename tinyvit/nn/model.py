"""The Vision Transformer's forward and backward over a timm-named params dict (config, presets and
init: tinyvit.nn.config, re-exported here)."""
from typing import NamedTuple

import numpy as np

from ..backend import get_array_module
from ..cpu.bf16 import check_precision
from ..cpu.threads import OrderedSum, batch_shards, run_shards
from ..errors import TinyViTError
from .block import block_backward, block_forward, block_infer, put_grad
from .caches import BlockCheckpoint, DistilledHeadCache, EmbedCache, FeaturesCache, ViTCache
from .config import (  # noqa: F401  (re-exported: the model's names in one place)
    PRESETS,
    ViTConfig,
    count_params,
    init_params,
    param_shapes,
    preset,
    trunc_normal,
)
from .layers import (
    attention_probs,
    colsum,
    dropout_backward,
    dropout_forward,
    layernorm_backward,
    layernorm_forward,
    patch_embed_backward,
    patch_embed_forward,
)
from .pool import head_backward as _head_backward
from .pool import head_forward, pool_backward, pool_forward
from .recompute import mark, replay
from .resample import pos_resample_backward, pos_resample_forward

# --- forward / backward -----------------------------------------------------------------------



def _prepare_images(params, images, cfg):
    """images in the params' dtype after checking their shape and values (once per batch)."""
    xp = get_array_module(params["pos_embed"])
    images = images.astype(params["pos_embed"].dtype, copy=False)  # compute in the params' dtype
    if cfg.dynamic_img_size:  # any size the patches tile
        P = cfg.patch_size
        if images.ndim != 4 or images.shape[1] != cfg.in_chans or min(images.shape[2:]) < P \
                or images.shape[2] % P or images.shape[3] % P:
            raise TinyViTError(f"images must be (B, {cfg.in_chans}, H, W) with H and W multiples of the patch "
                               f"size {P}, got {tuple(images.shape)}")
    elif images.ndim != 4 or tuple(images.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size):
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
    x, c_pe = patch_embed_forward(images, params["patch_embed.proj.weight"], params.get("patch_embed.proj.bias"),
                                  cfg.precision == "bf16")
    B, N, C = x.shape
    names = _prefix_names(cfg)
    prefix = [xp.broadcast_to(params[n], (B, params[n].shape[1], C)) for n in names]
    pos, c_rs = params["pos_embed"], None
    if cfg.dynamic_img_size:  # resampled to this batch's grid (itself when the grid is the stored one)
        g, P = cfg.img_size // cfg.patch_size, cfg.patch_size
        pos, c_rs = pos_resample_forward(pos, (g, g), (images.shape[2] // P, images.shape[3] // P),
                                         0 if cfg.no_embed_class else cfg.num_prefix_tokens)
    if cfg.no_embed_class:
        x += pos  # x is the patch embedding's own buffer
    if prefix:
        x = xp.concatenate(prefix + [x], axis=1)  # (B, P+N, C)
    if not cfg.no_embed_class:
        x += pos
    x, c_pd = dropout_forward(x, cfg.dropout, rng, train)
    c_pre = None
    if cfg.pre_norm:
        x, c_pre = layernorm_forward(x, params["norm_pre.weight"], params["norm_pre.bias"], cfg.ln_eps)
    return x, EmbedCache(c_pe, [(n, params[n].shape[1]) for n in names], cfg.no_embed_class, c_pd, c_pre, c_rs)


def _embed_backward(dx, cache, grads, want=None):
    """Reverse of _embed_forward: writes the embedding's grads (those want(name) asks for; None: all) into grads."""
    P = sum(n for _, n in cache.prefix)
    t_pos, t_patch = want is None or want("pos_embed"), want is None or any(
        want("patch_embed.proj." + k) for k in ("weight", "bias"))
    t_tokens = [want is None or want(name) for name, _ in cache.prefix]
    if cache.norm_pre is not None:
        dx, grads["norm_pre.weight"], grads["norm_pre.bias"] = layernorm_backward(
            dx, cache.norm_pre, t_pos or t_patch or any(t_tokens), want is None or want("norm_pre.weight")
            or want("norm_pre.bias"))
        if dx is None:
            return
    dx = dropout_backward(dx, cache.pos_drop)  # (B, P+N, C)
    if t_pos:
        dpos = dx[:, P:] if cache.no_embed_class else dx
        grads["pos_embed"] = colsum(dpos.reshape(dpos.shape[0], -1)).reshape((1,) + dpos.shape[1:])  # (1, N[+P], C)
        if cache.resample is not None:  # back through the resample to the stored grid
            grads["pos_embed"] = pos_resample_backward(grads["pos_embed"], cache.resample)
    start = 0
    for (name, n), t in zip(cache.prefix, t_tokens):
        if t:
            grads[name] = dx[:, start:start + n].sum(axis=0, keepdims=True)  # (1, n, C)
        start += n
    if t_patch:
        _, grads["patch_embed.proj.weight"], patch_b = patch_embed_backward(dx[:, P:], cache.patch_embed, need_dx=False)
        put_grad(grads, "patch_embed.proj.bias", patch_b)


def _features_forward(params, images, cfg, train, rng, keep_cache=True, all_tokens=False, checkpoint=False):
    """The embedding, the blocks, the final norm and the pooling: what the head reads (B, feature_dim).

    keep_cache=False (inference) drops each block's intermediates as soon as the next block
    runs, so memory holds about one block's worth instead of the whole backward cache; checkpoint
    keeps each block's input alone (a BlockCheckpoint), which the backward runs the block again from.
    A head reading the class token alone (token pooling) lets the last block compute only that
    token's output (after an attention over every token) unless all_tokens: the same features for
    about 1/depth less work. Plain form: reference.vit_forward, up to its head."""
    x, c_em = _embed_forward(params, images, cfg, train, rng)
    rates = cfg.drop_path_rates() if train else [0.0] * cfg.depth
    blocks = []
    infer = not keep_cache and not train and get_array_module(x) is np
    for i in range(cfg.depth):
        q = cfg.head_tokens if i == cfg.depth - 1 and not all_tokens else None  # the last block: the head's tokens
        if infer:
            x = block_infer(params, f"blocks.{i}.", x, cfg, q)
            continue
        draws, record = rng, None
        if keep_cache and checkpoint:
            x_in = x
            if train and cfg.draws_in_training():  # the draws the recompute repeats
                draws, record = mark(rng)
        x, c = block_forward(params, f"blocks.{i}.", x, cfg, train, draws, keep_cache, q, rates[i])
        if keep_cache:
            blocks.append(BlockCheckpoint(x_in, record, params, cfg, train, q, rates[i]) if checkpoint else c)
        del c
    feats, c_pool = pool_forward(params, x, cfg)
    return feats, (FeaturesCache(c_em, blocks, c_pool) if keep_cache else None)


def _forward(params, images, cfg, train, rng, keep_cache, all_tokens, checkpoint=False):
    """vit_forward on one (prepared) batch or shard."""
    feats, c_body = _features_forward(params, images, cfg, train, rng, keep_cache, all_tokens, checkpoint)
    logits, c_h = head_forward(params, feats, cfg)
    return logits, (ViTCache(c_body, c_h) if keep_cache else None)


class _ShardedCache(NamedTuple):
    """The cache of a forward run as data-parallel shards: each shard's batch slice and cache."""

    slices: list
    caches: list


def _run_batch(fn, params, images, cfg, train):
    """(shards, outputs): fn on the checked images whole (shards None, one output), or fn on each
    data-parallel shard (tinyvit.cpu.threads.batch_shards), one per core. Precision bf16 is refused
    (one line) where it cannot run or would not pay (tinyvit.cpu.bf16.check_precision)."""
    check_precision(cfg.precision, get_array_module(params["pos_embed"]))
    images = _prepare_images(params, images, cfg)
    shards = None
    if not (train and cfg.draws_in_training()):  # one RNG stream, drawn in order
        shards = batch_shards(images.shape[0], get_array_module(params["pos_embed"]))
    if shards is None:
        return None, [fn(images)]
    return shards, run_shards(lambda s: fn(images[s]), shards)


def vit_forward(params, images, cfg: ViTConfig, train=False, rng=None, keep_cache=True, all_tokens=False,
                grad_checkpointing=False):
    """Logits (B, num_classes) for NCHW images, computed in the params' dtype; returns (logits, cache).

    With keep_cache=False (inference only) the cache is None and memory stays about one block's worth.
    grad_checkpointing (timm's name) keeps each block's input alone and vit_backward runs the block again
    (with the same dropout and drop-path draws): the same gradients, bit for bit, for about one block's
    cache in memory instead of every block's, at the cost of a second forward of the blocks.
    The last block runs on the class token alone (the head reads nothing else); all_tokens=True runs
    it on every token, which only attention_maps needs: the logits and gradients are the same.
    On NumPy the batch runs as one shard per core (see tinyvit.cpu.threads.batch_shards; TINYVIT_SHARDS=1 turns
    that off); the logits and gradients are the same up to float rounding. Plain form: reference.vit_forward.
    """
    shards, outs = _run_batch(lambda x: _forward(params, x, cfg, train, rng, keep_cache, all_tokens, grad_checkpointing),
                              params, images, cfg, train)
    if shards is None:
        return outs[0]
    logits = get_array_module(outs[0][0]).concatenate([shard_logits for shard_logits, _ in outs])
    return logits, (_ShardedCache(shards, [shard_cache for _, shard_cache in outs]) if keep_cache else None)


def _block_cache(c, prefix):
    """A block's BlockCache: c itself, or from a BlockCheckpoint, the block run again with the same draws."""
    if not isinstance(c, BlockCheckpoint):
        return c
    return block_forward(c.params, prefix, c.x, c.cfg, c.train, replay(c.draws), True, c.queries, c.drop_path)[1]


_EMBED = ("cls_token", "dist_token", "reg_token", "pos_embed", "patch_embed.", "norm_pre.")


def param_stage(name, depth):
    """Where a param sits in the backward's order, bottom up: -1 the embedding, i block i, depth the
    final norms and pooling, depth + 1 the head(s)."""
    if name.startswith(_EMBED):
        return -1
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    return depth + 1 if name.startswith(("head.", "head_dist.")) else depth


def _hand_over(grads, sink, trainable):
    """Move the trained params' finished gradients out of grads into sink(name, g) (a shard's ordered sum)."""
    for k in list(grads):
        g = grads.pop(k)
        if g is not None and (trainable is None or k in trainable):
            sink(k, g)


def _backward(dlogits, cache, trainable=None, sink=None):
    """vit_backward of one batch or shard; with sink, each block's gradients go to sink(name, g) as soon
    as they are done (the shards' sum then holds one set of gradients, not one per shard) and None returns."""
    features = cache.features
    blocks = features.blocks
    if not blocks:
        raise TinyViTError("this cache was already used by vit_backward (it is consumed to free "
                           "memory) or holds no blocks: run vit_forward again")
    depth = len(blocks)
    want = None if trainable is None else trainable.__contains__
    low = -1 if trainable is None else min((param_stage(n, depth) for n in trainable), default=depth + 2)
    t_head = trainable is None or any(param_stage(n, depth) == depth + 1 for n in trainable)
    dfeats, grads = _head_backward(dlogits, cache.head, low <= depth, t_head)
    dx = None
    if low <= depth:
        dx = pool_backward(dfeats, features.pool, grads, want, low < depth)  # (B, n, C): the tokens the pooling read
    for i in reversed(range(max(low, 0), depth)):  # pop: the block's cache is freed
        dx = block_backward(dx, _block_cache(blocks.pop(), f"blocks.{i}."), grads, f"blocks.{i}.", want, low < i)
        if sink is not None:
            _hand_over(grads, sink, trainable)
    blocks.clear()  # the blocks under the lowest trained param: no backward reaches them
    if low == -1:
        _embed_backward(dx, features.embed, grads, want)
    if sink is not None:
        return _hand_over(grads, sink, trainable)
    return grads if trainable is None else {k: g for k, g in grads.items() if g is not None and k in trainable}


def vit_backward(dlogits, cache, trainable=None):
    """Gradients of every parameter (same keys as params), or of the names in `trainable` alone, given
    dL/dlogits; consumes the cache.

    trainable (a set of param names; None: all) leaves the rest frozen: a frozen layer's weight gradient
    is not computed, and the backward stops at the lowest trained param (nothing flows below it); the
    trained params' gradients are the same bits as the full backward's. Each block's saved arrays are
    released as soon as its gradients are done (as torch frees saved tensors), so one forward's cache
    serves one backward. Shards run in parallel and their gradients are summed. Plain form:
    reference.vit_backward."""
    trainable = None if trainable is None else frozenset(trainable)
    if not isinstance(cache, _ShardedCache):
        return _backward(dlogits, cache, trainable)
    total = OrderedSum(len(cache.slices))  # the shards' gradients summed block by block, in shard order
    run_shards(lambda i: _backward(dlogits[cache.slices[i]], cache.caches[i], trainable,
                                   lambda k, g: total.add(i, k, g)), range(len(cache.slices)))
    return total.result()


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
    if any(isinstance(c, BlockCheckpoint) for c in blocks):
        raise TinyViTError("this cache holds the blocks' inputs alone (grad_checkpointing): run vit_forward "
                           "without it for attention maps")
    if blocks and blocks[-1].attn.q.shape[2] < blocks[-1].attn.k.shape[2]:  # fewer queries than tokens
        raise TinyViTError("this cache holds the last block's class-token attention only: "
                           "run vit_forward with all_tokens=True for attention maps")
    return [attention_probs(c.attn) for c in blocks]
