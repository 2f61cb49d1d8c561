"""The ViT's config (timm's VisionTransformer arguments), named presets, parameter shapes and init."""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import TinyViTError
from .lora import LoraConfig, adapter_shapes, init_adapters

PRECISIONS = ("float32", "bf16")  # bf16: the linears' GEMMs in bfloat16 with float32 sums (NumPy on CPU)
GELUS = ("erf", "tanh", "quick")  # exact, torch's tanh form, CLIP's x * sigmoid(1.702 x)
POOLS = ("token", "avg", "map", "token_avg")  # token_avg: the class token beside the patch mean (DINOv2's probe)


@dataclass(frozen=True)
class ViTConfig:
    """Shape and behaviour of a ViT: timm's VisionTransformer, with timm's argument names from class_token on."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    ln_eps: float = 1e-6
    gelu: str = "erf"  # one of GELUS
    dropout: float = 0.0  # after pos-embed, attention proj and in the MLP (timm's drop_rate)
    attn_dropout: float = 0.0  # on the attention weights (timm's attn_drop_rate)
    class_token: bool = True
    reg_tokens: int = 0  # register tokens after the class token (timm's reg_token)
    distilled: bool = False  # DeiT's distillation token and second head; logits are the two heads' mean
    no_embed_class: bool = False  # the position embedding covers the patches only (DeiT-III, SigLIP)
    pre_norm: bool = False  # a LayerNorm (norm_pre) after the position embedding (CLIP)
    patch_bias: bool = True  # CLIP's patch embedding has none
    qkv_bias: bool = True
    init_values: Optional[float] = None  # LayerScale (ls1, ls2) with this init when set (DINOv2, DeiT-III)
    global_pool: str = "token"  # one of POOLS
    fc_norm: Optional[bool] = None  # the final norm after the pooling; None: only for 'avg' (timm's rule)
    drop_path: float = 0.0  # stochastic depth, rising linearly to this over the blocks (timm's drop_path_rate)
    lora: Optional[LoraConfig] = None  # LoRA/DoRA adapters on the blocks' linears (tinyvit.nn.lora)
    dynamic_img_size: bool = False  # any H x W multiple of the patch: pos_embed resampled in the forward (timm's)
    # how it runs, not what the model is: not compared, not saved (to_dict); a training run keeps its own
    # in its TrainConfig. One of PRECISIONS
    precision: str = field(default="float32", compare=False)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise TinyViTError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise TinyViTError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.precision not in PRECISIONS:
            raise TinyViTError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.gelu not in GELUS:
            raise TinyViTError(f"gelu must be one of {', '.join(GELUS)}, got {self.gelu!r}")
        if self.global_pool not in POOLS:
            raise TinyViTError(f"global_pool must be one of {', '.join(POOLS)}, got {self.global_pool!r}")
        if self.global_pool in ("token", "token_avg") and not self.class_token:
            raise TinyViTError(f"global_pool {self.global_pool!r} reads the class token: class_token must be on")
        if self.distilled and (self.global_pool != "token" or self.reg_tokens or not self.class_token):
            raise TinyViTError("a distilled ViT pools the class and distillation tokens: global_pool 'token', "
                               "a class token and no registers")
        if self.use_fc_norm and (self.global_pool in ("map", "token_avg") or self.distilled):
            raise TinyViTError("fc_norm normalises one pooled token: not with global_pool 'map' or 'token_avg' "
                               "or a distilled ViT")
        if self.reg_tokens < 0 or not 0 <= self.drop_path < 1:
            raise TinyViTError("reg_tokens must be >= 0 and drop_path in [0, 1)")

    @property
    def num_patches(self) -> int:
        """Patches per image (tokens without the prefix tokens)."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation and register tokens."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def use_fc_norm(self) -> bool:
        """Whether the final norm follows the pooling (fc_norm) instead of preceding it (norm)."""
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    @property
    def head_tokens(self):
        """How many leading tokens the head reads (1, or 2 when distilled), or None when it reads every token."""
        return (2 if self.distilled else 1) if self.global_pool == "token" else None

    @property
    def head_dim(self) -> int:
        """Width of what one head reads: dim, or 2 dim for the class token beside the patch mean."""
        return 2 * self.dim if self.global_pool == "token_avg" else self.dim

    @property
    def feature_dim(self) -> int:
        """Width of the pooled features (vit_features): head_dim, or both tokens' 2 dim when distilled."""
        return 2 * self.dim if self.distilled else self.head_dim

    def drop_path_rates(self) -> list:
        """Each block's stochastic-depth rate: 0 to drop_path linearly, as timm."""
        return [float(r) for r in np.linspace(0.0, self.drop_path, self.depth)] if self.depth else []

    def draws_in_training(self) -> bool:
        """Whether a training forward draws random numbers: dropout, attention dropout, drop path, LoRA's."""
        return bool(self.dropout or self.attn_dropout or self.drop_path or (self.lora and self.lora.dropout))

    def to_dict(self) -> dict:
        """Plain dict, for JSON metadata (lora only when the model has adapters; no precision: how it runs)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "precision"}
        if self.lora is None:
            del d["lora"]
        else:
            d["lora"] = self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        """Inverse of to_dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise TinyViTError(f"unknown ViTConfig fields: {', '.join(extra)}")
        lora = d.get("lora")
        if lora is not None and not isinstance(lora, dict):
            raise TinyViTError("ViTConfig field lora must be an object (rank, alpha, dropout, targets, rslora, dora)")
        return cls(**{**d, "lora": LoraConfig(**lora) if lora is not None else None})


_VIT16 = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, ln_eps=1e-6)
_SMALL, _BASE = dict(dim=384, depth=12, heads=6, mlp_dim=1536), dict(dim=768, depth=12, heads=12, mlp_dim=3072)
_DINOV2 = dict(img_size=518, patch_size=14, in_chans=3, num_classes=1000, ln_eps=1e-6, init_values=1e-5)
PRESETS = {
    # MNIST from scratch: 7x7 patches of 4 px (49 tokens + CLS), width 64, 6 blocks.
    "mnist": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, dim=64, depth=6,
                  heads=4, mlp_dim=128, ln_eps=1e-6),
    "vit-ti16": dict(_VIT16, dim=192, depth=12, heads=3, mlp_dim=768),
    "vit-s16": dict(_VIT16, **_SMALL),
    "vit-b16": dict(_VIT16, **_BASE),
    "vit-l16": dict(_VIT16, dim=1024, depth=24, heads=16, mlp_dim=4096),
    # the modern family, as timm's vit_small_patch14_dinov2, vit_base_patch16_clip_quickgelu_224,
    # vit_base_patch16_siglip_224 (with the original's and HF's tanh GELU; timm runs exact GELU) and
    # deit3_small_patch16_224 (with a 1000-class head where timm's backbone has none)
    "dinov2-s14": dict(_DINOV2, **_SMALL),
    "dinov2-b14": dict(_DINOV2, **_BASE),
    "clip-b16": dict(_VIT16, **_BASE, num_classes=512, ln_eps=1e-5, gelu="quick", pre_norm=True, patch_bias=False),
    "siglip-b16": dict(_VIT16, **_BASE, gelu="tanh", class_token=False, no_embed_class=True,
                       global_pool="map"),
    "deit3-s16": dict(_VIT16, **_SMALL, no_embed_class=True, init_values=1e-6),
}


def preset(name: str, **overrides) -> ViTConfig:
    """A named config (see PRESETS) with overrides."""
    if name not in PRESETS:
        raise TinyViTError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return ViTConfig(**{**PRESETS[name], **overrides})


def _block_shapes(cfg: ViTConfig) -> dict:
    """One block's parameters, named after 'blocks.{i}.'."""
    C, M = cfg.dim, cfg.mlp_dim
    s = {"norm1.weight": (C,), "norm1.bias": (C,), "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
         "attn.proj.weight": (C, C), "attn.proj.bias": (C,), "ls1.gamma": (C,),
         "norm2.weight": (C,), "norm2.bias": (C,), "mlp.fc1.weight": (M, C), "mlp.fc1.bias": (M,),
         "mlp.fc2.weight": (C, M), "mlp.fc2.bias": (C,), "ls2.gamma": (C,)}
    if not cfg.qkv_bias:
        del s["attn.qkv.bias"]
    if cfg.init_values is None:
        del s["ls1.gamma"], s["ls2.gamma"]
    return s


def param_shapes(cfg: ViTConfig) -> dict:
    """Every parameter's name (timm's) and shape (torch layout), in timm's order."""
    C, P, Cin, K = cfg.dim, cfg.patch_size, cfg.in_chans, cfg.num_classes
    shapes = {"cls_token": (1, 1, C)} if cfg.class_token else {}
    if cfg.distilled:
        shapes["dist_token"] = (1, 1, C)
    if cfg.reg_tokens:
        shapes["reg_token"] = (1, cfg.reg_tokens, C)
    shapes["pos_embed"] = (1, cfg.num_patches + (0 if cfg.no_embed_class else cfg.num_prefix_tokens), C)
    shapes["patch_embed.proj.weight"] = (C, Cin, P, P)
    if cfg.patch_bias:
        shapes["patch_embed.proj.bias"] = (C,)
    if cfg.pre_norm:
        shapes.update({"norm_pre.weight": (C,), "norm_pre.bias": (C,)})
    for i in range(cfg.depth):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in _block_shapes(cfg).items()})
    norm = "fc_norm" if cfg.use_fc_norm else "norm"
    if not cfg.use_fc_norm:
        shapes.update({"norm.weight": (C,), "norm.bias": (C,)})
    if cfg.global_pool == "map":  # timm's AttentionPoolLatent, with the model's heads and MLP width
        shapes.update({"attn_pool.latent": (1, 1, C), "attn_pool.q.weight": (C, C), "attn_pool.q.bias": (C,),
                       "attn_pool.kv.weight": (2 * C, C), "attn_pool.kv.bias": (2 * C,),
                       "attn_pool.proj.weight": (C, C), "attn_pool.proj.bias": (C,),
                       "attn_pool.norm.weight": (C,), "attn_pool.norm.bias": (C,),
                       "attn_pool.mlp.fc1.weight": (cfg.mlp_dim, C), "attn_pool.mlp.fc1.bias": (cfg.mlp_dim,),
                       "attn_pool.mlp.fc2.weight": (C, cfg.mlp_dim), "attn_pool.mlp.fc2.bias": (C,)})
    if cfg.use_fc_norm:
        shapes.update({f"{norm}.weight": (C,), f"{norm}.bias": (C,)})
    shapes.update({"head.weight": (K, cfg.head_dim), "head.bias": (K,)})
    if cfg.distilled:
        shapes.update({"head_dist.weight": (K, C), "head_dist.bias": (K,)})
    if cfg.lora is not None:
        shapes.update(adapter_shapes(cfg.lora, cfg.depth, C, cfg.mlp_dim))
    return shapes


def trunc_normal(rng, shape, std, a=-2.0, b=2.0):
    """Normal(0, std) truncated to [a, b] (absolute bounds, as timm's trunc_normal_), by redrawing."""
    x = rng.normal(0.0, std, size=shape)
    bad = (x < a) | (x > b)
    while bad.any():
        x[bad] = rng.normal(0.0, std, size=int(bad.sum()))
        bad = (x < a) | (x > b)
    return x


def _init(rng, name, shape, cfg, std):
    """One fresh parameter (float64) as timm inits it."""
    if name.endswith("bias"):
        return np.zeros(shape)
    if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight", "norm_pre.weight")):
        return np.ones(shape)
    if name.endswith("gamma"):
        return np.full(shape, cfg.init_values)
    if name in ("cls_token", "reg_token"):
        return rng.normal(0.0, 1e-6, size=shape)
    if name == "patch_embed.proj.weight":  # timm leaves the conv at torch's default init
        bound = 1.0 / math.sqrt(shape[1] * shape[2] * shape[3])  # U(+-1/sqrt(fan_in))
        return rng.uniform(-bound, bound, size=shape)
    if name in ("pos_embed", "dist_token"):
        return trunc_normal(rng, shape, 0.02)
    if name == "attn_pool.latent":
        return trunc_normal(rng, shape, cfg.dim ** -0.5)
    return trunc_normal(rng, shape, std)


def init_params(cfg: ViTConfig, seed: int = 0, dtype=np.float32, std: float = 0.02) -> dict:
    """Fresh params as timm inits them: trunc-normal(std) linears and pos_embed, zero biases.

    std = 0.02 is timm's; small models trained from scratch learn faster with a larger one.
    """
    rng = np.random.default_rng(seed)
    params = {name: _init(rng, name, shape, cfg, std).astype(dtype)
              for name, shape in param_shapes(cfg).items() if ".lora_" not in name}
    if cfg.lora is not None:
        params.update(init_adapters(params, cfg.lora, cfg.depth, cfg.dim, cfg.mlp_dim, seed))
    return params


def count_params(params: dict) -> int:
    """Total number of scalars in a params dict."""
    return int(sum(int(np.prod(v.shape)) for v in params.values()))
