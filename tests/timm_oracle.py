"""timm itself as the oracle for the modern ViT family: a timm model built from a tinyvit config (its own
mapping, written from timm's VisionTransformer arguments, not tinyvit's exporter), with every parameter
perturbed. Importing this module skips the caller's tests when timm is not installed."""
import functools

import numpy as np
import pytest
import torch
from family_configs import FAMILIES  # noqa: F401  (re-exported for the family tests)

from tinyvit import ViTConfig

# (conftest's pytest_configure has made torchvision importable beside the CPU torch wheel)
timm = pytest.importorskip("timm", reason="timm is not installed (pip install --no-deps timm torchvision==0.28.0)")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

ACT = {"erf": "gelu", "tanh": "gelu_tanh", "quick": "quick_gelu"}

def timm_kwargs(cfg: ViTConfig) -> dict:
    """timm VisionTransformer arguments for cfg."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                num_classes=cfg.num_classes, global_pool=cfg.global_pool, embed_dim=cfg.dim, depth=cfg.depth,
                num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.dim, qkv_bias=cfg.qkv_bias,
                init_values=cfg.init_values, class_token=cfg.class_token, no_embed_class=cfg.no_embed_class,
                reg_tokens=cfg.reg_tokens, pre_norm=cfg.pre_norm, fc_norm=cfg.fc_norm,
                drop_path_rate=cfg.drop_path, act_layer=ACT[cfg.gelu], dynamic_img_size=cfg.dynamic_img_size,
                norm_layer=functools.partial(torch.nn.LayerNorm, eps=cfg.ln_eps))


def timm_model(cfg: ViTConfig, seed=0, dtype=torch.float64):
    """The timm model of cfg, every parameter perturbed (LayerScale far from its init), in eval mode."""
    kw = timm_kwargs(cfg)
    model = VisionTransformerDistilled(**kw) if cfg.distilled else VisionTransformer(**kw)
    assert model.patch_embed.proj.bias is not None or not cfg.patch_bias  # timm ties the bias to pre_norm
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(dtype).eval()


def params_of(model, dtype=np.float64) -> dict:
    """The timm model's state dict as a tinyvit params dict (the same names)."""
    return {k: v.detach().numpy().astype(dtype) for k, v in model.state_dict().items()}
