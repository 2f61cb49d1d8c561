"""The Vision Transformer: config, presets, init, and forward/backward over a timm-named params dict."""
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..backend import get_array_module
from ..cpu.threads import batch_shards, in_place_blocks, run_shards
from ..errors import TinyViTError
from .caches import BlockCache, FeaturesCache, ViTCache
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
    linear_backward,
    linear_forward,
    patch_embed_backward,
    patch_embed_forward,
)


@dataclass(frozen=True)
class ViTConfig:
    """Shape and behaviour of a ViT (timm's VisionTransformer with class-token pooling)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    ln_eps: float = 1e-6
    gelu: str = "erf"  # 'erf' (exact, as timm/torch default) or 'tanh'
    dropout: float = 0.0  # after pos-embed, attention proj and in the MLP (timm's drop_rate)
    attn_dropout: float = 0.0  # on the attention weights (timm's attn_drop_rate)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise TinyViTError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise TinyViTError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.gelu not in ("erf", "tanh"):
            raise TinyViTError(f"gelu must be 'erf' or 'tanh', got {self.gelu!r}")

    @property
    def num_patches(self) -> int:
        """Patches per image (tokens without the class token)."""
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        """Plain dict, for JSON metadata."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        """Inverse of to_dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise TinyViTError(f"unknown ViTConfig fields: {', '.join(extra)}")
        return cls(**d)


_VIT16 = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, ln_eps=1e-6)
PRESETS = {
    # MNIST from scratch: 7x7 patches of 4 px (49 tokens + CLS), width 64, 6 blocks.
    "mnist": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, dim=64, depth=6,
                  heads=4, mlp_dim=128, ln_eps=1e-6),
    "vit-ti16": dict(_VIT16, dim=192, depth=12, heads=3, mlp_dim=768),
    "vit-s16": dict(_VIT16, dim=384, depth=12, heads=6, mlp_dim=1536),
    "vit-b16": dict(_VIT16, dim=768, depth=12, heads=12, mlp_dim=3072),
    "vit-l16": dict(_VIT16, dim=1024, depth=24, heads=16, mlp_dim=4096),
}


def preset(name: str, **overrides) -> ViTConfig:
    """A named config ('mnist', 'vit-ti16', 'vit-s16', 'vit-b16', 'vit-l16') with overrides."""
    if name not in PRESETS:
        raise TinyViTError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return ViTConfig(**{**PRESETS[name], **overrides})


def param_shapes(cfg: ViTConfig) -> dict:
    """Every parameter's name (timm's) and shape (torch layout), in timm's order."""
    C, P, Cin = cfg.dim, cfg.patch_size, cfg.in_chans
    shapes = {
        "cls_token": (1, 1, C),
        "pos_embed": (1, cfg.num_patches + 1, C),
        "patch_embed.proj.weight": (C, Cin, P, P),
        "patch_embed.proj.bias": (C,),
    }
    for i in range(cfg.depth):
        prefix = f"blocks.{i}."
        shapes.update({prefix + name: shape for name, shape in {
            "norm1.weight": (C,), "norm1.bias": (C,),
            "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
            "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
            "norm2.weight": (C,), "norm2.bias": (C,),
            "mlp.fc1.weight": (cfg.mlp_dim, C), "mlp.fc1.bias": (cfg.mlp_dim,),
            "mlp.fc2.weight": (C, cfg.mlp_dim), "mlp.fc2.bias": (C,),
        }.items()})
    shapes.update({"norm.weight": (C,), "norm.bias": (C,),
                   "head.weight": (cfg.num_classes, C), "head.bias": (cfg.num_classes,)})
    return shapes


def trunc_normal(rng, shape, std, a=-2.0, b=2.0):
    """Normal(0, std) truncated to [a, b] (absolute bounds, as timm's trunc_normal_), by redrawing."""
    x = rng.normal(0.0, std, size=shape)
    bad = (x < a) | (x > b)
    while bad.any():
        x[bad] = rng.normal(0.0, std, size=int(bad.sum()))
        bad = (x < a) | (x > b)
    return x


def init_params(cfg: ViTConfig, seed: int = 0, dtype=np.float32, std: float = 0.02) -> dict:
    """Fresh params as timm inits them: trunc-normal(std) linears and pos_embed, zero biases.

    std = 0.02 is timm's; small models trained from scratch learn faster with a larger one.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("bias"):
            x = np.zeros(shape)
        elif name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            x = np.ones(shape)
        elif name == "cls_token":
            x = rng.normal(0.0, 1e-6, size=shape)
        elif name == "patch_embed.proj.weight":  # timm leaves the conv at torch's default init
            bound = 1.0 / math.sqrt(shape[1] * shape[2] * shape[3])  # U(+-1/sqrt(fan_in))
            x = rng.uniform(-bound, bound, size=shape)
        elif name == "pos_embed":
            x = trunc_normal(rng, shape, 0.02)
        else:
            x = trunc_normal(rng, shape, std)
        params[name] = x.astype(dtype)
    return params


def count_params(params: dict) -> int:
    """Total number of scalars in a params dict."""
    return int(sum(int(np.prod(v.shape)) for v in params.values()))


# --- forward / backward -----------------------------------------------------------------------


def _block_forward(params, prefix, x, cfg, train, rng, keep_cache=True, queries=None):
    """One pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x)); prefix is 'blocks.{i}.'.

    Each norm's affine is folded into the linear after it (layernorm_linear_forward): same math.
    queries=n returns the first n tokens alone (B, n, C): every token still feeds attention's keys
    and values, but nothing after the attention is computed for the other tokens.
    Plain form: reference.block_forward."""
    qkv, c_n1 = layernorm_linear_forward(x, params[prefix + "norm1.weight"], params[prefix + "norm1.bias"],
                                         params[prefix + "attn.qkv.weight"], params[prefix + "attn.qkv.bias"],
                                         cfg.ln_eps)
    h, c_at = attention_heads_forward(qkv, params[prefix + "attn.proj.weight"], params[prefix + "attn.proj.bias"],
                                      cfg.heads, cfg.attn_dropout, rng, train, queries)
    del qkv
    h, c_d1 = dropout_forward(h, cfg.dropout, rng, train)
    x = x[:, :h.shape[1]] + h  # (B, n, C)
    h, c_f1 = layernorm_linear_forward(x, params[prefix + "norm2.weight"], params[prefix + "norm2.bias"],
                                       params[prefix + "mlp.fc1.weight"], params[prefix + "mlp.fc1.bias"], cfg.ln_eps)
    w2, b2 = params[prefix + "mlp.fc2.weight"], params[prefix + "mlp.fc2.bias"]
    if keep_cache:  # fc2(dropout(gelu(h))), caching fc1's output and GELU's factor
        h, c_f2 = gelu_linear_forward(h, w2, b2, cfg.gelu, cfg.dropout, rng, train)
    else:  # inference: GELU in place on fc1's output, nothing kept
        h, _ = dropout_forward(gelu_inplace(h, cfg.gelu), cfg.dropout, rng, train)
        h, c_f2 = linear_forward(h, w2, b2)
    h, c_d3 = dropout_forward(h, cfg.dropout, rng, train)
    x += h  # x is our own buffer here (x + h above), so in place is safe
    return x, BlockCache(c_n1, c_at, c_d1, c_f1, c_f2, c_d3)


def _block_backward(dx, cache, grads, prefix):
    """Reverse of _block_forward; writes param grads into `grads`, returns d(block input).

    `cache` is the block's only remaining reference (popped by vit_backward), so each layer's
    saved arrays are freed as soon as its backward is done: a lower peak, as torch frees saved tensors.
    Plain form: reference.block_backward."""
    c_n1, c_at, c_d1, c_f1, c_f2, c_d3 = cache  # the BlockCache, unpacked so that each part can be freed
    del cache
    dh = dropout_backward(dx, c_d3)
    dh, grads[prefix + "mlp.fc2.weight"], grads[prefix + "mlp.fc2.bias"] = gelu_linear_backward(dh, c_f2)
    del c_f2
    dh, grads[prefix + "norm2.weight"], grads[prefix + "norm2.bias"], grads[prefix + "mlp.fc1.weight"], \
        grads[prefix + "mlp.fc1.bias"] = layernorm_linear_backward(dh, c_f1)
    del c_f1
    dx = dx + dh  # residual: both paths carry the gradient
    dh = dropout_backward(dx, c_d1)
    dqkv, grads[prefix + "attn.proj.weight"], grads[prefix + "attn.proj.bias"] = attention_heads_backward(dh, c_at)
    del c_at
    dh, grads[prefix + "norm1.weight"], grads[prefix + "norm1.bias"], grads[prefix + "attn.qkv.weight"], \
        grads[prefix + "attn.qkv.bias"] = layernorm_linear_backward(dqkv, c_n1)  # (B, N, C)
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


def _features_forward(params, images, cfg, train, rng, keep_cache=True, all_tokens=False):
    """Patch embed + CLS + pos, the blocks and the final norm; returns CLS features (B, C).

    keep_cache=False (inference) drops each block's intermediates as soon as the next block
    runs, so memory holds about one block's worth instead of the whole backward cache.
    The head reads the class token alone, so the last block computes only its output (after an
    attention over every token) unless all_tokens: the same features for about 1/depth less work.
    Plain form: reference.vit_forward, up to its head."""
    xp = get_array_module(params["pos_embed"])
    x, c_pe = patch_embed_forward(images, params["patch_embed.proj.weight"], params["patch_embed.proj.bias"])
    B, N, C = x.shape
    cls = xp.broadcast_to(params["cls_token"], (B, 1, C))
    x = xp.concatenate([cls, x], axis=1)  # (B, N+1, C)
    x += params["pos_embed"]
    x, c_pd = dropout_forward(x, cfg.dropout, rng, train)
    blocks = []
    for i in range(cfg.depth):
        last = i == cfg.depth - 1 and not all_tokens
        x, c = _block_forward(params, f"blocks.{i}.", x, cfg, train, rng, keep_cache, 1 if last else None)
        if keep_cache:
            blocks.append(c)
        del c
    # layernorm is per token: normalise just the class token, the one the head reads
    feats, c_n = layernorm_forward(x[:, 0], params["norm.weight"], params["norm.bias"], cfg.ln_eps)  # (B, C)
    cache = FeaturesCache(c_pe, c_pd, blocks, c_n, x.shape) if keep_cache else None
    return feats, cache


def _forward(params, images, cfg, train, rng, keep_cache, all_tokens):
    """vit_forward on one (prepared) batch or shard."""
    feats, c_body = _features_forward(params, images, cfg, train, rng, keep_cache, all_tokens)
    logits, c_h = linear_forward(feats, params["head.weight"], params["head.bias"])
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
    if not (train and (cfg.dropout or cfg.attn_dropout)):  # dropout: one RNG stream, drawn in order
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
    xp = get_array_module(dlogits)
    grads = {}
    dfeats, grads["head.weight"], grads["head.bias"] = linear_backward(dlogits, cache.head)
    dcls, grads["norm.weight"], grads["norm.bias"] = layernorm_backward(dfeats, features.norm)
    dx = xp.zeros(features.x_shape, dtype=dlogits.dtype)  # (B, n, C): only the class token was read
    dx[:, 0] = dcls
    for i in reversed(range(len(blocks))):
        dx = _block_backward(dx, blocks.pop(), grads, f"blocks.{i}.")  # pop: the block's cache is freed
    dx = dropout_backward(dx, features.pos_drop)  # (B, N+1, C)
    grads["pos_embed"] = colsum(dx.reshape(dx.shape[0], -1)).reshape((1,) + dx.shape[1:])  # (1, N+1, C)
    grads["cls_token"] = dx[:, :1].sum(axis=0, keepdims=True)  # (1, 1, C)
    _, grads["patch_embed.proj.weight"], grads["patch_embed.proj.bias"] = patch_embed_backward(
        dx[:, 1:], features.patch_embed, need_dx=False)
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
    """Gradients of the head alone (backbone frozen) from a vit_forward cache; leaves the cache intact."""
    if isinstance(cache, _ShardedCache):  # one GEMM over every shard's class-token features
        heads = [c.head for c in cache.caches]
        feats = get_array_module(dlogits).concatenate([h.x for h in heads])
        c_h = heads[0]._replace(x=feats)
    else:
        c_h = cache.head
    _, gw, gb = linear_backward(dlogits, c_h, need_dx=False)
    return {"head.weight": gw, "head.bias": gb}


def vit_features(params, images, cfg: ViTConfig):
    """Class-token features after the final norm (B, C), eval mode; head-only training uses them."""
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
