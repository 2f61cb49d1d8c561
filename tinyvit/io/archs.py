"""The architectures tinyvit knows by name, and what each brings: timm's ViTs that tinyvit computes, each with
its settings as timm's own definition of the name builds them and the preprocessing of its default pretrained
tag (timm's pretrained_cfg: mean, std, crop_pct, interpolation, crop mode), and torchvision's ViTs with their
weights' transforms. tests/test_archs.py checks every entry against timm and torchvision."""
import dataclasses
import math

from ..nn.config import ViTConfig
from .sidecar import transform

HALF, UNIT = ((0.5,) * 3, (0.5,) * 3), ((0.0,) * 3, (1.0,) * 3)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # OpenAI CLIP's
_ = {}
CLIP = dict(ln_eps=1e-05, pre_norm=True, patch_bias=False)
CLIP_QUICK = dict(CLIP, gelu="quick")
SIGLIP, SIGLIP_GAP = dict(class_token=False, global_pool="map"), dict(class_token=False, global_pool="avg", fc_norm=False)
SIGLIP2, SIGLIP2_GAP = dict(SIGLIP, gelu="tanh"), dict(SIGLIP_GAP, gelu="tanh")
DINOV2 = dict(init_values=1e-05)
DINOV2_REG4 = dict(DINOV2, reg_tokens=4, no_embed_class=True)
REG4_GAP = dict(DINOV2_REG4, class_token=False, global_pool="avg")
REG1_GAP = dict(REG4_GAP, reg_tokens=1)
DEIT3 = dict(no_embed_class=True, init_values=1e-06)
DISTILLED = dict(distilled=True)
SIZE = ("img_size", "patch_size", "dim", "depth", "heads", "mlp_dim")
# name: (img_size, patch_size, dim, depth, heads, mlp_dim, the other settings where they differ from ViTConfig's
#        defaults, (the default pretrained tag, (mean, std), crop_pct[, interpolation, crop_mode]))
TIMM = {
    "deit3_base_patch16_224": (224, 16, 768, 12, 12, 3072, DEIT3, ("fb_in1k", IMAGENET, 0.9)),
    "deit3_base_patch16_384": (384, 16, 768, 12, 12, 3072, DEIT3, ("fb_in1k", IMAGENET, 1.0)),
    "deit3_huge_patch14_224": (224, 14, 1280, 32, 16, 5120, DEIT3, ("fb_in1k", IMAGENET, 0.9)),
    "deit3_large_patch16_224": (224, 16, 1024, 24, 16, 4096, DEIT3, ("fb_in1k", IMAGENET, 0.9)),
    "deit3_large_patch16_384": (384, 16, 1024, 24, 16, 4096, DEIT3, ("fb_in1k", IMAGENET, 1.0)),
    "deit3_medium_patch16_224": (224, 16, 512, 12, 8, 2048, DEIT3, ("fb_in1k", IMAGENET, 0.9)),
    "deit3_small_patch16_224": (224, 16, 384, 12, 6, 1536, DEIT3, ("fb_in1k", IMAGENET, 0.9)),
    "deit3_small_patch16_384": (384, 16, 384, 12, 6, 1536, DEIT3, ("fb_in1k", IMAGENET, 1.0)),
    "deit_base_distilled_patch16_224": (224, 16, 768, 12, 12, 3072, DISTILLED, ("fb_in1k", IMAGENET, 0.9)),
    "deit_base_distilled_patch16_384": (384, 16, 768, 12, 12, 3072, DISTILLED, ("fb_in1k", IMAGENET, 1.0)),
    "deit_base_patch16_224": (224, 16, 768, 12, 12, 3072, _, ("fb_in1k", IMAGENET, 0.9)),
    "deit_base_patch16_384": (384, 16, 768, 12, 12, 3072, _, ("fb_in1k", IMAGENET, 1.0)),
    "deit_small_distilled_patch16_224": (224, 16, 384, 12, 6, 1536, DISTILLED, ("fb_in1k", IMAGENET, 0.9)),
    "deit_small_patch16_224": (224, 16, 384, 12, 6, 1536, _, ("fb_in1k", IMAGENET, 0.9)),
    "deit_tiny_distilled_patch16_224": (224, 16, 192, 12, 3, 768, DISTILLED, ("fb_in1k", IMAGENET, 0.9)),
    "deit_tiny_patch16_224": (224, 16, 192, 12, 3, 768, _, ("fb_in1k", IMAGENET, 0.9)),
    "vit_base_patch14_dinov2": (518, 14, 768, 12, 12, 3072, DINOV2, ("lvd142m", IMAGENET, 1.0)),
    "vit_base_patch14_reg4_dinov2": (518, 14, 768, 12, 12, 3072, DINOV2_REG4, ("lvd142m", IMAGENET, 1.0)),
    "vit_base_patch16_224": (224, 16, 768, 12, 12, 3072, _, ("augreg2_in21k_ft_in1k", HALF, 0.9)),
    "vit_base_patch16_224_miil": (224, 16, 768, 12, 12, 3072, dict(qkv_bias=False), ("in21k", UNIT, 0.875, "bilinear", "center")),
    "vit_base_patch16_384": (384, 16, 768, 12, 12, 3072, _, ("augreg_in21k_ft_in1k", HALF, 1.0)),
    "vit_base_patch16_clip_224": (224, 16, 768, 12, 12, 3072, CLIP, ("laion2b_ft_in12k_in1k", OPENAI, 0.95)),
    "vit_base_patch16_clip_384": (384, 16, 768, 12, 12, 3072, CLIP, ("laion2b_ft_in12k_in1k", OPENAI, 1.0, "bicubic", "squash")),
    "vit_base_patch16_clip_quickgelu_224": (224, 16, 768, 12, 12, 3072, CLIP_QUICK, ("metaclip_2pt5b", OPENAI, 1.0)),
    "vit_base_patch16_gap_224": (224, 16, 768, 12, 16, 3072, SIGLIP_GAP, ("untrained", HALF, 0.9)),
    "vit_base_patch16_plus_240": (240, 16, 896, 12, 14, 3584, DINOV2, ("untrained", HALF, 0.95)),
    "vit_base_patch16_plus_clip_240": (240, 16, 896, 12, 14, 3584, CLIP, ("laion400m_e32", OPENAI, 1.0)),
    "vit_base_patch16_reg4_gap_256": (256, 16, 768, 12, 12, 3072, dict(class_token=False, reg_tokens=4, no_embed_class=True, global_pool="avg"), ("untrained", HALF, 0.9)),
    "vit_base_patch16_siglip_224": (224, 16, 768, 12, 12, 3072, SIGLIP, ("v2_webli", HALF, 0.9)),
    "vit_base_patch16_siglip_256": (256, 16, 768, 12, 12, 3072, SIGLIP, ("v2_webli", HALF, 0.9)),
    "vit_base_patch16_siglip_384": (384, 16, 768, 12, 12, 3072, SIGLIP, ("v2_webli", HALF, 0.9)),
    "vit_base_patch16_siglip_512": (512, 16, 768, 12, 12, 3072, SIGLIP, ("v2_webli", HALF, 0.9)),
    "vit_base_patch16_siglip_gap_224": (224, 16, 768, 12, 12, 3072, SIGLIP_GAP, ("v2_webli", HALF, 0.9)),
    "vit_base_patch16_siglip_gap_256": (256, 16, 768, 12, 12, 3072, SIGLIP_GAP, ("v2_webli", HALF, 0.9)),
    "vit_base_patch16_siglip_gap_384": (384, 16, 768, 12, 12, 3072, SIGLIP_GAP, ("v2_webli", HALF, 0.9)),
    "vit_base_patch16_siglip_gap_512": (512, 16, 768, 12, 12, 3072, SIGLIP_GAP, ("v2_webli", HALF, 0.9)),
    "vit_base_patch32_224": (224, 32, 768, 12, 12, 3072, _, ("augreg_in21k_ft_in1k", HALF, 0.9)),
    "vit_base_patch32_384": (384, 32, 768, 12, 12, 3072, _, ("augreg_in21k_ft_in1k", HALF, 1.0)),
    "vit_base_patch32_clip_224": (224, 32, 768, 12, 12, 3072, CLIP, ("laion2b_ft_in12k_in1k", OPENAI, 0.9)),
    "vit_base_patch32_clip_256": (256, 32, 768, 12, 12, 3072, CLIP, ("datacompxl", OPENAI, 1.0)),
    "vit_base_patch32_clip_384": (384, 32, 768, 12, 12, 3072, CLIP, ("laion2b_ft_in12k_in1k", OPENAI, 1.0)),
    "vit_base_patch32_clip_448": (448, 32, 768, 12, 12, 3072, CLIP, ("laion2b_ft_in12k_in1k", OPENAI, 1.0)),
    "vit_base_patch32_clip_quickgelu_224": (224, 32, 768, 12, 12, 3072, CLIP_QUICK, ("laion400m_e32", OPENAI, 0.9)),
    "vit_base_patch32_plus_256": (256, 32, 896, 12, 14, 3584, DINOV2, ("untrained", HALF, 0.95)),
    "vit_base_patch32_siglip_256": (256, 32, 768, 12, 12, 3072, SIGLIP2, ("v2_webli", HALF, 0.9)),
    "vit_base_patch32_siglip_gap_256": (256, 32, 768, 12, 12, 3072, SIGLIP2_GAP, ("v2_webli", HALF, 0.9)),
    "vit_base_patch8_224": (224, 8, 768, 12, 12, 3072, _, ("augreg2_in21k_ft_in1k", HALF, 0.9)),
    "vit_betwixt_patch16_gap_256": (256, 16, 640, 12, 10, 2560, dict(class_token=False, qkv_bias=False, init_values=1e-06, global_pool="avg", fc_norm=False), ("untrained", HALF, 0.95)),
    "vit_betwixt_patch16_reg1_gap_256": (256, 16, 640, 12, 10, 2560, REG1_GAP, ("sbb_in1k", HALF, 0.95)),
    "vit_betwixt_patch16_reg4_gap_256": (256, 16, 640, 12, 10, 2560, REG4_GAP, ("sbb2_e200_in12k_ft_in1k", HALF, 0.95)),
    "vit_betwixt_patch16_reg4_gap_384": (384, 16, 640, 12, 10, 2560, REG4_GAP, ("sbb2_e200_in12k_ft_in1k", HALF, 1.0)),
    "vit_betwixt_patch32_clip_224": (224, 32, 640, 12, 10, 2560, CLIP, ("tinyclip_laion400m", OPENAI, 0.9)),
    "vit_giant_patch14_224": (224, 14, 1408, 40, 16, 6144, _, ("untrained", HALF, 0.9)),
    "vit_giant_patch14_clip_224": (224, 14, 1408, 40, 16, 6144, CLIP, ("laion2b", OPENAI, 1.0)),
    "vit_giant_patch16_gap_224": (224, 16, 1408, 40, 16, 6144, SIGLIP_GAP, ("in22k_ijepa", IMAGENET, 0.9)),
    "vit_giantopt_patch16_siglip_256": (256, 16, 1536, 40, 16, 6144, SIGLIP2, ("v2_webli", HALF, 0.9)),
    "vit_giantopt_patch16_siglip_384": (384, 16, 1536, 40, 16, 6144, SIGLIP2, ("v2_webli", HALF, 0.9)),
    "vit_giantopt_patch16_siglip_gap_256": (256, 16, 1536, 40, 16, 6144, SIGLIP2_GAP, ("v2_webli", HALF, 0.9)),
    "vit_giantopt_patch16_siglip_gap_384": (384, 16, 1536, 40, 16, 6144, SIGLIP2_GAP, ("v2_webli", HALF, 0.9)),
    "vit_gigantic_patch14_224": (224, 14, 1664, 48, 16, 8192, _, ("untrained", HALF, 0.9)),
    "vit_gigantic_patch14_clip_224": (224, 14, 1664, 48, 16, 8192, CLIP, ("laion2b", OPENAI, 1.0)),
    "vit_gigantic_patch14_clip_378": (378, 14, 1664, 48, 16, 8192, CLIP, ("metaclip2_worldwide", OPENAI, 1.0, "bicubic", "squash")),
    "vit_gigantic_patch14_clip_quickgelu_224": (224, 14, 1664, 48, 16, 8192, CLIP_QUICK, ("metaclip_2pt5b", OPENAI, 1.0)),
    "vit_huge_patch14_224": (224, 14, 1280, 32, 16, 5120, _, ("orig_in21k", HALF, 0.9)),
    "vit_huge_patch14_clip_224": (224, 14, 1280, 32, 16, 5120, CLIP, ("laion2b_ft_in12k_in1k", OPENAI, 1.0)),
    "vit_huge_patch14_clip_336": (336, 14, 1280, 32, 16, 5120, CLIP, ("laion2b_ft_in12k_in1k", OPENAI, 1.0, "bicubic", "squash")),
    "vit_huge_patch14_clip_378": (378, 14, 1280, 32, 16, 5120, CLIP, ("dfn5b", OPENAI, 1.0)),
    "vit_huge_patch14_clip_quickgelu_224": (224, 14, 1280, 32, 16, 5120, CLIP_QUICK, ("dfn5b", OPENAI, 1.0)),
    "vit_huge_patch14_clip_quickgelu_378": (378, 14, 1280, 32, 16, 5120, CLIP_QUICK, ("dfn5b", OPENAI, 1.0)),
    "vit_huge_patch14_gap_224": (224, 14, 1280, 32, 16, 5120, SIGLIP_GAP, ("in1k_ijepa", IMAGENET, 0.9)),
    "vit_huge_patch16_gap_448": (448, 16, 1280, 32, 16, 5120, SIGLIP_GAP, ("in1k_ijepa", IMAGENET, 1.0)),
    "vit_large_patch14_224": (224, 14, 1024, 24, 16, 4096, _, ("untrained", HALF, 0.9)),
    "vit_large_patch14_clip_224": (224, 14, 1024, 24, 16, 4096, CLIP, ("laion2b_ft_in12k_in1k", HALF, 1.0)),
    "vit_large_patch14_clip_336": (336, 14, 1024, 24, 16, 4096, CLIP, ("laion2b_ft_in12k_in1k", HALF, 1.0, "bicubic", "squash")),
    "vit_large_patch14_clip_quickgelu_224": (224, 14, 1024, 24, 16, 4096, CLIP_QUICK, ("dfn2b", OPENAI, 1.0)),
    "vit_large_patch14_clip_quickgelu_336": (336, 14, 1024, 24, 16, 4096, CLIP_QUICK, ("openai", OPENAI, 1.0)),
    "vit_large_patch14_dinov2": (518, 14, 1024, 24, 16, 4096, DINOV2, ("lvd142m", IMAGENET, 1.0)),
    "vit_large_patch14_reg4_dinov2": (518, 14, 1024, 24, 16, 4096, DINOV2_REG4, ("lvd142m", IMAGENET, 1.0)),
    "vit_large_patch16_224": (224, 16, 1024, 24, 16, 4096, _, ("augreg_in21k_ft_in1k", HALF, 0.9)),
    "vit_large_patch16_384": (384, 16, 1024, 24, 16, 4096, _, ("augreg_in21k_ft_in1k", HALF, 1.0)),
    "vit_large_patch16_siglip_256": (256, 16, 1024, 24, 16, 4096, SIGLIP, ("v2_webli", HALF, 0.9)),
    "vit_large_patch16_siglip_384": (384, 16, 1024, 24, 16, 4096, SIGLIP, ("v2_webli", HALF, 0.9)),
    "vit_large_patch16_siglip_512": (512, 16, 1024, 24, 16, 4096, SIGLIP2, ("v2_webli", HALF, 0.9)),
    "vit_large_patch16_siglip_gap_256": (256, 16, 1024, 24, 16, 4096, SIGLIP_GAP, ("v2_webli", HALF, 0.9)),
    "vit_large_patch16_siglip_gap_384": (384, 16, 1024, 24, 16, 4096, SIGLIP_GAP, ("v2_webli", HALF, 0.9)),
    "vit_large_patch16_siglip_gap_512": (512, 16, 1024, 24, 16, 4096, SIGLIP2_GAP, ("v2_webli", HALF, 0.9)),
    "vit_large_patch32_224": (224, 32, 1024, 24, 16, 4096, _, ("orig_in21k", HALF, 0.9)),
    "vit_large_patch32_384": (384, 32, 1024, 24, 16, 4096, _, ("orig_in21k_ft_in1k", HALF, 1.0)),
    "vit_little_patch16_reg1_gap_256": (256, 16, 320, 14, 5, 1792, REG1_GAP, ("sbb_in12k_ft_in1k", HALF, 0.95)),
    "vit_little_patch16_reg4_gap_256": (256, 16, 320, 14, 5, 1792, REG4_GAP, ("sbb_in1k", HALF, 0.95)),
    "vit_medium_patch16_clip_224": (224, 16, 512, 12, 8, 2048, CLIP, ("tinyclip_yfcc15m", OPENAI, 0.9)),
    "vit_medium_patch16_gap_240": (240, 16, 512, 12, 8, 2048, dict(class_token=False, qkv_bias=False, init_values=1e-06, global_pool="avg", fc_norm=False), ("sw_in12k", HALF, 0.95)),
    "vit_medium_patch16_gap_256": (256, 16, 512, 12, 8, 2048, dict(class_token=False, qkv_bias=False, init_values=1e-06, global_pool="avg", fc_norm=False), ("sw_in12k_ft_in1k", HALF, 0.95)),
    "vit_medium_patch16_gap_384": (384, 16, 512, 12, 8, 2048, dict(class_token=False, qkv_bias=False, init_values=1e-06, global_pool="avg", fc_norm=False), ("sw_in12k_ft_in1k", HALF, 0.95, "bicubic", "squash")),
    "vit_medium_patch16_reg1_gap_256": (256, 16, 512, 12, 8, 2048, REG1_GAP, ("sbb_in1k", HALF, 0.95)),
    "vit_medium_patch16_reg4_gap_256": (256, 16, 512, 12, 8, 2048, REG4_GAP, ("sbb_in12k_ft_in1k", HALF, 0.95)),
    "vit_medium_patch32_clip_224": (224, 32, 512, 12, 8, 2048, CLIP, ("tinyclip_laion400m", OPENAI, 0.9)),
    "vit_mediumd_patch16_reg4_gap_256": (256, 16, 512, 20, 8, 2048, REG4_GAP, ("sbb2_e200_in12k_ft_in1k", HALF, 0.95)),
    "vit_mediumd_patch16_reg4_gap_384": (384, 16, 512, 20, 8, 2048, REG4_GAP, ("sbb2_e200_in12k_ft_in1k", HALF, 1.0)),
    "vit_small_patch14_dinov2": (518, 14, 384, 12, 6, 1536, DINOV2, ("lvd142m", IMAGENET, 1.0)),
    "vit_small_patch14_reg4_dinov2": (518, 14, 384, 12, 6, 1536, DINOV2_REG4, ("lvd142m", IMAGENET, 1.0)),
    "vit_small_patch16_224": (224, 16, 384, 12, 6, 1536, _, ("augreg_in21k_ft_in1k", HALF, 0.9)),
    "vit_small_patch16_36x1_224": (224, 16, 384, 36, 6, 1536, DINOV2, ("untrained", HALF, 0.9)),
    "vit_small_patch16_384": (384, 16, 384, 12, 6, 1536, _, ("augreg_in21k_ft_in1k", HALF, 1.0)),
    "vit_small_patch32_224": (224, 32, 384, 12, 6, 1536, _, ("augreg_in21k_ft_in1k", HALF, 0.9)),
    "vit_small_patch32_384": (384, 32, 384, 12, 6, 1536, _, ("augreg_in21k_ft_in1k", HALF, 1.0)),
    "vit_small_patch8_224": (224, 8, 384, 12, 6, 1536, _, ("dino", IMAGENET, 0.9)),
    "vit_so150m2_patch16_reg1_gap_256": (256, 16, 832, 21, 13, 2176, dict(class_token=False, reg_tokens=1, qkv_bias=False, init_values=1e-05, global_pool="avg"), ("sbb_e200_in12k_ft_in1k", HALF, 1.0)),
    "vit_so150m2_patch16_reg1_gap_384": (384, 16, 832, 21, 13, 2176, dict(class_token=False, reg_tokens=1, qkv_bias=False, init_values=1e-05, global_pool="avg"), ("sbb_e200_in12k_ft_in1k", HALF, 1.0)),
    "vit_so150m2_patch16_reg1_gap_448": (448, 16, 832, 21, 13, 2176, dict(class_token=False, reg_tokens=1, qkv_bias=False, init_values=1e-05, global_pool="avg"), ("sbb_e200_in12k_ft_in1k", HALF, 1.0, "bicubic", "squash")),
    "vit_so150m_patch16_reg4_gap_256": (256, 16, 896, 18, 14, 2304, dict(class_token=False, reg_tokens=4, global_pool="avg", fc_norm=False), ("sbb_e250_in12k_ft_in1k", HALF, 0.95)),
    "vit_so150m_patch16_reg4_gap_384": (384, 16, 896, 18, 14, 2304, dict(class_token=False, reg_tokens=4, global_pool="avg", fc_norm=False), ("sbb_e250_in12k_ft_in1k", HALF, 1.0)),
    "vit_so150m_patch16_reg4_map_256": (256, 16, 896, 18, 14, 2304, dict(class_token=False, reg_tokens=4, global_pool="map"), ("untrained", HALF, 0.9)),
    "vit_so400m_patch14_siglip_224": (224, 14, 1152, 27, 16, 4304, SIGLIP, ("v2_webli", HALF, 0.9)),
    "vit_so400m_patch14_siglip_378": (378, 14, 1152, 27, 16, 4304, SIGLIP, ("v2_webli", HALF, 0.9)),
    "vit_so400m_patch14_siglip_384": (384, 14, 1152, 27, 16, 4304, SIGLIP, ("webli", HALF, 0.9)),
    "vit_so400m_patch14_siglip_gap_224": (224, 14, 1152, 27, 16, 4304, SIGLIP_GAP, ("v2_webli", HALF, 0.9)),
    "vit_so400m_patch14_siglip_gap_378": (378, 14, 1152, 27, 16, 4304, SIGLIP_GAP, ("v2_webli", HALF, 0.9)),
    "vit_so400m_patch14_siglip_gap_384": (384, 14, 1152, 27, 16, 4304, SIGLIP_GAP, ("webli", HALF, 1.0)),
    "vit_so400m_patch14_siglip_gap_448": (448, 14, 1152, 27, 16, 4304, SIGLIP_GAP, ("pali_mix", HALF, 1.0)),
    "vit_so400m_patch14_siglip_gap_896": (896, 14, 1152, 27, 16, 4304, SIGLIP_GAP, ("pali_pt", HALF, 1.0)),
    "vit_so400m_patch16_siglip_256": (256, 16, 1152, 27, 16, 4304, SIGLIP2, ("v2_webli", HALF, 0.9)),
    "vit_so400m_patch16_siglip_384": (384, 16, 1152, 27, 16, 4304, SIGLIP2, ("v2_webli", HALF, 0.9)),
    "vit_so400m_patch16_siglip_512": (512, 16, 1152, 27, 16, 4304, SIGLIP2, ("v2_webli", HALF, 0.9)),
    "vit_so400m_patch16_siglip_gap_256": (256, 16, 1152, 27, 16, 4304, SIGLIP2_GAP, ("v2_webli", HALF, 0.9)),
    "vit_so400m_patch16_siglip_gap_384": (384, 16, 1152, 27, 16, 4304, SIGLIP2_GAP, ("v2_webli", HALF, 0.9)),
    "vit_so400m_patch16_siglip_gap_512": (512, 16, 1152, 27, 16, 4304, SIGLIP2_GAP, ("v2_webli", HALF, 0.9)),
    "vit_tiny_patch16_224": (224, 16, 192, 12, 3, 768, _, ("augreg_in21k_ft_in1k", HALF, 0.9)),
    "vit_tiny_patch16_384": (384, 16, 192, 12, 3, 768, _, ("augreg_in21k_ft_in1k", HALF, 1.0)),
    "vit_wee_patch16_reg1_gap_256": (256, 16, 256, 14, 4, 1280, REG1_GAP, ("sbb_in1k", HALF, 0.95)),
    "vit_xsmall_patch16_clip_224": (224, 16, 256, 10, 4, 1024, CLIP, ("tinyclip_yfcc15m", OPENAI, 0.9)),
}
# torchvision name: (patch_size, dim, depth, heads, mlp_dim, its weights' transforms as (crop size, resize
# size, interpolation), the default weights first); every one normalises with ImageNet's mean and std
TORCHVISION = {
    "vit_b_16": (16, 768, 12, 12, 3072, ((224, 256, "bilinear"), (384, 384, "bicubic"), (224, 224, "bicubic"))),
    "vit_b_32": (32, 768, 12, 12, 3072, ((224, 256, "bilinear"),)),
    "vit_l_16": (16, 1024, 24, 16, 4096, ((224, 242, "bilinear"), (512, 512, "bicubic"), (224, 224, "bicubic"))),
    "vit_l_32": (32, 1024, 24, 16, 4096, ((224, 256, "bilinear"),)),
    "vit_h_14": (14, 1280, 32, 16, 5120, ((518, 518, "bicubic"), (224, 224, "bicubic"))),
}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ViTConfig)}
SETTINGS = SIZE + ("in_chans", "ln_eps", "gelu", "class_token", "reg_tokens", "distilled", "no_embed_class",
                   "pre_norm", "patch_bias", "qkv_bias", "init_values", "global_pool", "fc_norm")


def crop_pct_of(crop, resize):
    """The crop_pct c with int(crop / c) == resize (crop / resize can round one short)."""
    c = crop / resize
    while int(crop / c) < resize:
        c = math.nextafter(c, 0.0)
    return c


def pretrained_record(mean_std, crop_pct, interpolation="bicubic", crop_mode="center"):
    """The eval transform record (tinyvit.io.sidecar) of a pretrained_cfg, or None when tinyvit has no such resize."""
    resize = "shortest_edge" if crop_mode == "center" else "squash" if crop_mode == "squash" and crop_pct == 1 else None
    t = transform(resize, crop_pct, interpolation) if resize else None
    return dict(t, mean=list(mean_std[0]), std=list(mean_std[1])) if t else None


def timm_arch(name):
    """(settings, eval transform record or None, default tag) of a timm architecture name ('name.tag' reads
    as name), or None when tinyvit's table does not hold it."""
    entry = TIMM.get((name or "").split(".")[0])
    if entry is None:
        return None
    settings = {k: DEFAULTS[k] for k in SETTINGS}
    settings.update(zip(SIZE, entry[:6]), **entry[6])
    tag, mean_std, *pre = entry[7]
    return settings, pretrained_record(mean_std, *pre), tag


def torchvision_arch(name=None, patch_size=None, dim=None, depth=None, img_size=None):
    """(name, settings, eval transform record) of a torchvision ViT by name, else by its sizes; None when
    none fits. The transform: the first of its weights at img_size, else its default weights'."""
    if name is None:
        name = next((n for n, e in TORCHVISION.items() if e[:3] == (patch_size, dim, depth)), None)
    if name not in TORCHVISION:
        return None
    P, D, L, H, M, weights = TORCHVISION[name]
    crop, resize, interpolation = next((w for w in weights if w[0] == img_size), weights[0])
    settings = {k: DEFAULTS[k] for k in SETTINGS}
    settings.update(patch_size=P, dim=D, depth=L, heads=H, mlp_dim=M)
    del settings["img_size"]  # torchvision builds any size: the weights' own stands
    return name, settings, pretrained_record(IMAGENET, crop_pct_of(crop, resize), interpolation)


def _block_count(state, prefix, norm="norm1"):
    """How many blocks hold a first norm's weight under prefix (the original DINOv2 files chunk them)."""
    return sum(k.startswith(prefix) and k.endswith(f".{norm}.weight") for k in state)


def named_by_layout(state, fmt):
    """(architecture name, where) a layout names by itself: torchvision's ViTs by their sizes, an original
    DINOv2 file (its mask token) by its width, registers and depth; (None, None) else."""
    w = state.get("conv_proj.weight" if fmt == "torchvision" else "patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        return None, None
    if fmt == "torchvision":
        tv = torchvision_arch(patch_size=int(w.shape[2]), dim=int(w.shape[0]),
                              depth=_block_count(state, "encoder.layers.", "ln_1"))
        return (tv[0], f"torchvision's {tv[0]} (its sizes)") if tv else (None, None)
    if fmt == "timm" and "mask_token" in state:  # timm's own ViTs have none
        size = {384: "small", 768: "base", 1024: "large"}.get(int(w.shape[0]), "small")
        name = f"vit_{size}_patch14_{'reg4_' if 'register_tokens' in state else ''}dinov2"
        known = timm_arch(name)
        fits = (known[0]["dim"], known[0]["depth"]) == (int(w.shape[0]), _block_count(state, "blocks."))
        return name if fits else None, f"the original DINOv2 layout ({name})"
    return None, None


def preprocessing(side, pre, fmt, in_chans):
    """(mean, std, eval transform record or None, notes): what the files state, else the architecture's
    (pre), else the default, said in one line."""
    def fits(m, s):
        return bool(m and s and len(m) == len(s) == in_chans and min(s) > 0)

    mean, std, t = side.get("mean"), side.get("std"), side.get("transform")
    if not fits(mean, std) and pre and fits(pre["mean"], pre["std"]):
        mean, std = pre["mean"], pre["std"]
    if t is None and pre and not any("eval transform" in n for n in side.get("notes", [])):
        t = {k: pre[k] for k in ("resize", "crop_pct", "interpolation")}
    said = []
    if not fits(mean, std):
        mean, std = IMAGENET if fmt == "torchvision" else ((0.5,) * in_chans,) * 2
        said.append("ImageNet's mean/std" if fmt == "torchvision" else "mean/std 0.5")
    if t is None:
        said.append("timm's default eval transform (the shorter side to img_size / 0.875, bicubic, centre crop)")
    notes = [f"nothing states the preprocessing: {' and '.join(said)} assumed "
             f"(--arch NAME brings an architecture's own)"] if said else []
    return mean, std, t, notes
