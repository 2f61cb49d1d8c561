"""Small configs of each family of the modern ViT (tinyvit's terms), shared by the family tests."""
from tinyvit import ViTConfig

_SMALL = dict(img_size=28, patch_size=14, in_chans=3, num_classes=5, dim=32, depth=2, heads=4, mlp_dim=64)
FAMILIES = {  # small configs of each family, in tinyvit's terms
    "dinov2": ViTConfig(**_SMALL, init_values=1e-5),
    "dinov2_reg": ViTConfig(**_SMALL, init_values=1e-5, reg_tokens=4),
    "clip": ViTConfig(**dict(_SMALL, patch_size=7), ln_eps=1e-5, gelu="quick", pre_norm=True, patch_bias=False),
    "siglip": ViTConfig(**_SMALL, gelu="tanh", class_token=False, no_embed_class=True, global_pool="map"),
    "siglip_gap": ViTConfig(**_SMALL, gelu="tanh", class_token=False, no_embed_class=True, global_pool="avg",
                            fc_norm=False),
    "deit3": ViTConfig(**dict(_SMALL, patch_size=7), no_embed_class=True, init_values=1e-6),
    "deit_distilled": ViTConfig(**_SMALL, distilled=True),
    "mae_avg": ViTConfig(**_SMALL, global_pool="avg"),
    "reg4_gap": ViTConfig(**_SMALL, class_token=False, reg_tokens=4, no_embed_class=True, global_pool="avg"),
    "no_qkv_bias": ViTConfig(**dict(_SMALL, in_chans=1), qkv_bias=False, gelu="tanh"),
}
