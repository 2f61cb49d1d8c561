"""A ViT's intermediate blocks as timm's forward_intermediates returns them (tinyvit.vit_intermediates)."""
import numpy as np

from ..backend import get_array_module
from ..errors import TinyViTError
from .block import block_forward, block_infer
from .config import ViTConfig
from .layers import layernorm_forward
from .model import _embed_forward, _run_batch


def _take_indices(depth, indices):
    """The blocks to return as timm's feature_take_indices picks them: an int n is the last n blocks, a
    list names blocks (negative ones count from the end), None is every block."""
    indices = depth if indices is None else indices
    if not isinstance(indices, (int, np.integer, list, tuple, range)) or isinstance(indices, bool):
        raise TinyViTError(f"indices must be a whole number (the last n blocks) or a list of block indices, "
                           f"got {type(indices).__name__}")
    if isinstance(indices, (int, np.integer)):
        if not 0 < indices <= depth:
            raise TinyViTError(f"indices {indices}: the last n blocks needs 1 <= n <= {depth}")
        return list(range(depth - int(indices), depth))
    take = [int(i) + depth if int(i) < 0 else int(i) for i in indices]
    bad = [i for i, j in zip(indices, take) if not 0 <= j < depth]
    if bad or not take:
        raise TinyViTError(f"indices {list(indices)}: block indices must lie in -{depth}..{depth - 1} "
                           f"(the model has {depth} blocks), at least one")
    return take


def _intermediates_forward(params, images, cfg, take, norm):
    """The outputs (B, P+N, C) of the blocks in take, in block order, normed by the final norm when
    norm (timm's self.norm: none where the norm follows the pooling); no block after the last is run."""
    x, _ = _embed_forward(params, images, cfg, False, None)
    infer, ys = get_array_module(x) is np, []
    for i in range(max(take) + 1):
        p = f"blocks.{i}."
        x = block_infer(params, p, x, cfg) if infer else block_forward(params, p, x, cfg, False, None, False)[0]
        if i in take:
            ys.append(layernorm_forward(x, params["norm.weight"], params["norm.bias"], cfg.ln_eps)[0]
                      if norm and not cfg.use_fc_norm else x)
    return ys


def vit_intermediates(params, images, cfg: ViTConfig, indices, norm=False, return_prefix_tokens=False):
    """The outputs of the chosen blocks as timm's forward_intermediates(x, indices, norm=norm,
    output_fmt='NCHW', intermediates_only=True) returns them: a list in block order of the patch tokens
    (B, C, h, w), or of (patches, prefix tokens (B, P, C)) pairs with return_prefix_tokens on a model with
    prefix tokens. indices as timm: an int n (the last n blocks), a list (negative from the end) or None (all)."""
    take = set(_take_indices(cfg.depth, indices))
    shards, outs = _run_batch(lambda x: _intermediates_forward(params, x, cfg, take, norm), params, images, cfg, False)
    xp = get_array_module(params["pos_embed"])
    ys = outs[0] if shards is None else [xp.concatenate(parts) for parts in zip(*outs)]
    (B, _, H, W), P, n = images.shape, cfg.patch_size, cfg.num_prefix_tokens
    result = []
    for y in ys:
        grid = xp.ascontiguousarray(y[:, n:].reshape(B, H // P, W // P, -1).transpose(0, 3, 1, 2))  # (B, C, h, w)
        result.append((grid, y[:, :n]) if return_prefix_tokens and n else grid)
    return result
