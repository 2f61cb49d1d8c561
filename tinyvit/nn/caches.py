"""What each forward of the engine (layers, activations, model) keeps for its backward: one NamedTuple
per `out, cache = X_forward(...)`, read by field. A field holding another layer's cache is named after
that layer; a dropout's field (`mask`, or the dropout layer's name) holds dropout_forward's cache: its
scaled keep mask, or None when nothing was dropped.
"""
from typing import Any, NamedTuple, Optional, Union

Array = Any  # a NumPy or CuPy array

# --- layers (tinyvit.nn.layers, tinyvit.nn.activations) -----------------------------------------


class LinearCache(NamedTuple):
    """linear_forward: its input, its weight and whether it added a bias."""

    x: Array  # (..., in)
    w: Array  # (out, in)
    has_b: bool


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


class CrossEntropyCache(NamedTuple):
    """cross_entropy_forward: the log-probabilities, the labels and the label smoothing."""

    logp: Array  # (B, K)
    labels: Array  # (B,)
    label_smoothing: float


# --- the model (tinyvit.nn.model) ------------------------------------------------------------


class BlockCache(NamedTuple):
    """model._block_forward, in forward order (fc2 is a LinearCache at inference, keep_cache=False)."""

    norm1_qkv: LayerNormLinearCache
    attn: AttentionHeadsCache
    proj_drop: Optional[Array]  # after the attention's projection
    norm2_fc1: LayerNormLinearCache
    fc2: Union[GeluLinearCache, LinearCache]
    fc2_drop: Optional[Array]


class FeaturesCache(NamedTuple):
    """model._features_forward: the patch embedding, each block's cache (popped by backward), the final norm."""

    patch_embed: PatchEmbedCache
    pos_drop: Optional[Array]
    blocks: list  # of BlockCache
    norm: LayerNormCache  # of the class token alone
    x_shape: tuple  # (B, n, C), the last block's output (n = 1 when it ran on the class token alone)


class ViTCache(NamedTuple):
    """model vit_forward's cache of one batch or shard: the features and the head."""

    features: FeaturesCache
    head: LinearCache
