"""What each forward of the engine (layers, activations, model) keeps for its backward: one NamedTuple
per `out, cache = X_forward(...)`, read by field. A field holding another layer's cache is named after
that layer; a dropout's field (`mask`, or the dropout layer's name) holds dropout_forward's cache: its
scaled keep mask, or None when nothing was dropped.
"""
from typing import Any, NamedTuple, Optional, Union

Array = Any  # a NumPy or CuPy array

# --- layers (tinyvit.nn.layers, tinyvit.nn.activations) -----------------------------------------


class LinearCache(NamedTuple):
    """linear_forward: its input, its weight, whether it added a bias, and w's bf16 bits where its GEMMs
    ran in bfloat16 (None: float32)."""

    x: Array  # (..., in)
    w: Array  # (out, in)
    has_b: bool
    w16: Optional[Array] = None  # (out, in) uint16


class LayerNormCache(NamedTuple):
    """layernorm_forward: the normalised rows and their 1 / sqrt(var + eps); w is None without an affine."""

    xhat: Array  # (..., C)
    rstd: Array  # (..., 1)
    w: Optional[Array]  # (C,)


class LayerNormLinearCache(NamedTuple):
    """layernorm_linear_forward. Folded, the linear ran on xhat with weight w * ln_w: the last four
    fields keep the linear's own weight and the norm's affine (None when not folded)."""

    ln: LayerNormCache
    lin: LinearCache
    fold: bool
    w: Optional[Array] = None  # (out, C)
    ln_w: Optional[Array] = None  # (C,)
    ln_b: Optional[Array] = None  # (C,)
    has_b: Optional[bool] = None


class GeluCache(NamedTuple):
    """gelu_forward: GELU(x) = x c(x), c = Phi(x) ('erf') or sigmoid(2u) ('tanh')."""

    x: Array
    c: Array
    kind: str


class GeluLinearCache(NamedTuple):
    """gelu_linear_forward: not the linear's input, which backward remakes from GELU's cache and the mask."""

    gelu: GeluCache
    mask: Optional[Array]
    w: Array  # (out, in)
    has_b: bool
    w16: Optional[Array] = None  # w's bf16 bits (bfloat16 GEMMs), or None


class AttentionHeadsCache(NamedTuple):
    """attention_heads_forward: softmax(s) = e * r per head, e_d = dropout(e)."""

    q: Array  # (B, H, n, D), already scaled
    k: Array  # (B, H, N, D)
    v: Array  # (B, H, N, D)
    e: Array  # (B, H, n, N)
    r: Array  # (B, H, n, 1)
    e_d: Array  # (B, H, n, N)
    mask: Optional[Array]  # (B, H, n, N)
    proj: LinearCache
    scale: float  # D ** -0.5


class AttentionCache(NamedTuple):
    """attention_forward: the qkv linear, then the heads."""

    qkv: LinearCache
    heads: AttentionHeadsCache


class PatchEmbedCache(NamedTuple):
    """patch_embed_forward: the linear over the patches, and the image and weight shapes."""

    lin: LinearCache
    x_shape: tuple  # (B, Cin, H, W)
    w_shape: tuple  # (C, Cin, P, P)


class LayerScaleCache(NamedTuple):
    """layer_scale_forward (tinyvit.nn.branch): its input and gamma."""

    x: Array  # (..., C)
    gamma: Array  # (C,)


class CrossEntropyCache(NamedTuple):
    """cross_entropy_forward: the log-probabilities, the labels and the label smoothing."""

    logp: Array  # (B, K)
    labels: Array  # (B,)
    label_smoothing: float


class AttentionPoolCache(NamedTuple):
    """attention_pool_forward (tinyvit.nn.pool): the latent's query, the tokens' keys and values."""

    q: LinearCache  # the latent's query linear
    kv: LinearCache
    qh: Array  # (1, H, 1, D), already scaled
    k: Array  # (B, H, N, D)
    v: Array  # (B, H, N, D)
    a: Array  # (B, H, 1, N) attention probabilities
    proj: LinearCache
    fc1: LayerNormLinearCache  # the MLP's norm and fc1
    fc2: GeluLinearCache
    scale: float


class PoolCache(NamedTuple):
    """pool_forward (tinyvit.nn.pool): the pooling, the prefix length, the tokens' shape, the norms."""

    pool: str  # the config's global_pool
    prefix: int  # tokens before the patches
    tokens: Optional[int]  # how many leading tokens 'token' pooling read (config.head_tokens)
    x_shape: tuple  # (B, n, C)
    norm: Optional[LayerNormCache]  # the final norm before the pooling (None with fc_norm)
    attn_pool: Optional[AttentionPoolCache]
    fc_norm: Optional[LayerNormCache]  # the final norm after the pooling


class DistilledHeadCache(NamedTuple):
    """head_forward of a distilled ViT: the class token's head and the distillation token's."""

    head: LinearCache
    head_dist: LinearCache


# --- the model (tinyvit.nn.model) ------------------------------------------------------------


class LayerScaleFold(NamedTuple):
    """block._folded: a branch's LayerScale gamma folded into the linear before it, and that linear's own
    weight and bias (the cache of that linear holds the folded weight)."""

    gamma: Array  # (C,)
    w: Array  # (C, in)
    b: Array  # (C,)


class BlockCache(NamedTuple):
    """block.block_forward, in forward order (fc2 is a LinearCache at inference, keep_cache=False)."""

    norm1_qkv: LayerNormLinearCache
    attn: AttentionHeadsCache
    proj_drop: Optional[Array]  # after the attention's projection
    norm2_fc1: LayerNormLinearCache
    fc2: Union[GeluLinearCache, LinearCache]
    fc2_drop: Optional[Array]
    ls1: Optional["LayerScaleFold"] = None  # LayerScale (folded into attn.proj) and drop path of the attention branch
    drop_path1: Optional[Array] = None
    ls2: Optional["LayerScaleFold"] = None  # and of the MLP branch (folded into mlp.fc2)
    drop_path2: Optional[Array] = None
    lora: Optional[list] = None  # the adapted linears' (name, LoraWeightCache) (tinyvit.nn.lora.adapted_block)
    lora_drop: Optional[tuple] = None  # LoRA's branch dropout on qkv, proj, fc1, fc2 (tinyvit.nn.lora_branch)


class BlockCheckpoint(NamedTuple):
    """model._features_forward with grad_checkpointing: what recomputes a block in the backward in place of
    its BlockCache: its input, the record of its random draws (tinyvit.nn.recompute; None when it drew
    none) and what it ran with."""

    x: Array  # (B, N, C), the block's input
    draws: Any
    params: dict
    cfg: Any
    train: bool
    queries: Optional[int]
    drop_path: float


class EmbedCache(NamedTuple):
    """model._embed_forward: the patch embedding, the prefix tokens' names and lengths, dropout, norm_pre and
    the position embedding's resample (dynamic_img_size)."""

    patch_embed: PatchEmbedCache
    prefix: list  # of (name, length), in token order
    no_embed_class: bool
    pos_drop: Optional[Array]
    norm_pre: Optional[LayerNormCache]
    resample: Any = None  # resample.PosResampleCache where dynamic_img_size resampled pos_embed


class FeaturesCache(NamedTuple):
    """model._features_forward: the embedding, each block's cache (popped by backward), the pooling."""

    embed: EmbedCache
    blocks: list  # of BlockCache, or of BlockCheckpoint with grad_checkpointing
    pool: PoolCache


class ViTCache(NamedTuple):
    """model vit_forward's cache of one batch or shard: the features and the head."""

    features: FeaturesCache
    head: Union[LinearCache, DistilledHeadCache]
