"""Pooled features of intermediate blocks: each chosen block's output through the final norm and the
head's pooling (as DINOv2's linear evaluation reads intermediate layers), inference only."""
import numpy as np

from ..backend import get_array_module
from ..errors import TinyViTError
from .block import block_forward, block_infer
from .model import ViTConfig, _embed_forward, _run_batch
from .pool import pool_forward


def block_indices(indices, depth, source="--layers"):
    """The blocks asked for as sorted, distinct non-negative indices (negative ones count from the end,
    as timm's); one out of range is a TinyViTError."""
    out = set()
    for i in indices:
        j = int(i) + depth if int(i) < 0 else int(i)
        if not 0 <= j < depth:
            raise TinyViTError(f"{source}: block {i} does not exist: this model has blocks 0 to {depth - 1}")
        out.add(j)
    if not out:
        raise TinyViTError(f"{source}: no block given")
    return sorted(out)


def _pooled_blocks(params, images, cfg, wanted):
    """{block index: pooled features (B, feature_dim)} of one prepared batch or shard."""
    x, _ = _embed_forward(params, images, cfg, False, None)
    infer = get_array_module(x) is np
    out = {}
    for i in range(wanted[-1] + 1):  # the blocks after the deepest one asked for are not computed
        prefix = f"blocks.{i}."
        x = block_infer(params, prefix, x, cfg) if infer else \
            block_forward(params, prefix, x, cfg, False, None, keep_cache=False)[0]
        if i in wanted:
            out[i] = pool_forward(params, x, cfg)[0]  # the final norm, then the head's pooling
    return out


def vit_block_features(params, images, cfg: ViTConfig, indices):
    """{block index: (B, cfg.feature_dim)}: the outputs of the chosen blocks (negative indices from the
    end), each normed by the final norm and pooled as the head pools; the last block's equals
    vit_features. Eval mode, nothing cached."""
    wanted = block_indices(indices, cfg.depth, "indices")
    shards, outs = _run_batch(lambda x: _pooled_blocks(params, x, cfg, wanted), params, images, cfg, False)
    if shards is None:
        return outs[0]
    xp = get_array_module(params["pos_embed"])
    return {i: xp.concatenate([o[i] for o in outs]) for i in wanted}
