"""Partial fine-tuning's model: the tokens entering a block (vit_tokens, computed once and cached), and
the model from there (tail_forward, tail_backward): blocks[start:], the final norm, the pooling, the head.
The same layer pairs and shards as tinyvit.nn.model."""
from typing import NamedTuple

import numpy as np

from ..backend import get_array_module
from ..cpu.threads import OrderedSum, batch_shards, run_shards
from ..errors import TinyViTError
from .block import block_backward, block_forward, block_infer
from .config import ViTConfig
from .model import (  # the engine's own pieces, shared with the whole model
    _embed_forward,
    _hand_over,
    _run_batch,
    _ShardedCache,
)
from .pool import head_backward, head_forward, pool_backward, pool_forward


class TailCache(NamedTuple):
    """tail_forward's cache of one batch or shard: the first block's index, each block's cache from
    there (popped by tail_backward), the pooling and the head."""

    start: int
    blocks: list  # of BlockCache
    pool: object
    head: object


def vit_tokens(params, images, cfg: ViTConfig, stop):
    """The tokens entering block `stop` (B, T, C), eval mode: the embedding and blocks[:stop]; what
    tail_forward(..., start=stop) takes (partial fine-tuning caches them)."""
    def run(images):
        x, _ = _embed_forward(params, images, cfg, False, None)
        for i in range(stop):
            if get_array_module(x) is np:
                x = block_infer(params, f"blocks.{i}.", x, cfg)
            else:
                x = block_forward(params, f"blocks.{i}.", x, cfg, False, None, keep_cache=False)[0]
        return x

    shards, outs = _run_batch(run, params, images, cfg, False)
    return outs[0] if shards is None else get_array_module(outs[0]).concatenate(outs)


def _tail(params, x, cfg, start, train, rng, keep_cache):
    """blocks[start:], the final norm, the pooling and the head on one batch or shard of tokens."""
    rates = cfg.drop_path_rates() if train else [0.0] * cfg.depth
    infer = not keep_cache and not train and get_array_module(x) is np
    blocks = []
    for i in range(start, cfg.depth):
        queries = cfg.head_tokens if i == cfg.depth - 1 else None
        if infer:
            x = block_infer(params, f"blocks.{i}.", x, cfg, queries)
            continue
        x, c = block_forward(params, f"blocks.{i}.", x, cfg, train, rng, keep_cache, queries, rates[i])
        if keep_cache:
            blocks.append(c)
        del c
    feats, c_pool = pool_forward(params, x, cfg)
    logits, c_h = head_forward(params, feats, cfg)
    return logits, (TailCache(start, blocks, c_pool, c_h) if keep_cache else None)


def tail_forward(params, tokens, cfg: ViTConfig, start, train=False, rng=None, keep_cache=True):
    """vit_forward from the tokens entering block `start` (B, T, C; vit_tokens): blocks[start:], the
    final norm, the pooling and the head -> (logits, cache). Sharded as vit_forward."""
    xp = get_array_module(params["pos_embed"])
    tokens = tokens.astype(params["pos_embed"].dtype, copy=False)
    T = cfg.num_patches + cfg.num_prefix_tokens
    if not 0 <= start < cfg.depth or tokens.ndim != 3 or tuple(tokens.shape[1:]) != (T, cfg.dim):
        raise TinyViTError(f"tail_forward takes the tokens entering a block 0..{cfg.depth - 1} as (B, {T}, {cfg.dim}), "
                           f"got block {start} and {tuple(tokens.shape)}")
    shards = None
    if not (train and cfg.draws_in_training()):  # one RNG stream, drawn in order
        shards = batch_shards(tokens.shape[0], xp)
    if shards is None:
        return _tail(params, tokens, cfg, start, train, rng, keep_cache)
    outs = run_shards(lambda s: _tail(params, tokens[s], cfg, start, train, rng, keep_cache), shards)
    logits = xp.concatenate([shard_logits for shard_logits, _ in outs])
    return logits, (_ShardedCache(shards, [c for _, c in outs]) if keep_cache else None)


def _tail_backward(dlogits, cache, sink=None):
    """tail_backward of one batch or shard; with sink, each block's gradients go to sink(name, g) when done."""
    dfeats, grads = head_backward(dlogits, cache.head)
    dx = pool_backward(dfeats, cache.pool, grads)
    blocks = cache.blocks
    for i in reversed(range(len(blocks))):
        dx = block_backward(dx, blocks.pop(), grads, f"blocks.{cache.start + i}.")  # pop: freed as it goes
        if sink is not None:
            _hand_over(grads, sink, None)
    return grads


def tail_backward(dlogits, cache):
    """Gradients of the parameters tail_forward used (blocks[start:], the final norm, pooling, head)
    given dL/dlogits; consumes the cache, as vit_backward."""
    if not isinstance(cache, _ShardedCache):
        return _tail_backward(dlogits, cache)
    total = OrderedSum(len(cache.slices))  # the shards' gradients summed block by block, in shard order
    run_shards(lambda i: _tail_backward(dlogits[cache.slices[i]], cache.caches[i], lambda k, g: total.add(i, k, g)),
               range(len(cache.slices)))
    return total.result()
