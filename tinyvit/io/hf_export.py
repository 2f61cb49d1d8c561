"""The HF transformers layouts tinyvit writes, for the families an HF class computes exactly: ViT
(ViTForImageClassification), DeiT with its distillation head (DeiTForImageClassificationWithTeacher) and
DINOv2 with its classification head over the class token beside the patch mean, with or without registers
(Dinov2ForImageClassification, Dinov2WithRegistersForImageClassification; a DINOv2 head over the class
token alone is written as that head with zeros for the patch mean's half); the inverse of hf_layouts."""

import numpy as np

from ..errors import TinyViTError
from ..nn.config import ViTConfig

HF_ACT = {"erf": "gelu", "tanh": "gelu_pytorch_tanh", "quick": "quick_gelu"}  # transformers' ACT2FN names
KINDS = {"vit": ("ViTForImageClassification", "vit."), "deit": ("DeiTForImageClassificationWithTeacher", "deit."),
         "dinov2": ("Dinov2ForImageClassification", "dinov2."),
         "dinov2_with_registers": ("Dinov2WithRegistersForImageClassification", "dinov2_with_registers.")}
_VIT_BLOCK = (("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"),
              ("layernorm_before", "norm1"), ("layernorm_after", "norm2"))
_DINO_BLOCK = (("attention.output.dense", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
               ("norm1", "norm1"), ("norm2", "norm2"))


def hf_kind(cfg: ViTConfig, source="model"):
    """Which HF class computes cfg's model exactly, or one line saying there is none."""
    plain = cfg.class_token and not cfg.pre_norm and cfg.patch_bias and cfg.qkv_bias and cfg.gelu != "quick"
    if plain and cfg.global_pool == "token" and not cfg.use_fc_norm and not cfg.reg_tokens \
            and cfg.init_values is None and not cfg.no_embed_class:
        return "deit" if cfg.distilled else "vit"
    if plain and cfg.global_pool in ("token", "token_avg") and cfg.init_values is not None \
            and not cfg.use_fc_norm and not cfg.distilled:
        if not cfg.reg_tokens and not cfg.no_embed_class:
            return "dinov2"
        if cfg.reg_tokens and cfg.no_embed_class:
            return "dinov2_with_registers"
    raise TinyViTError(f"{source}: --to hf writes ViT, DeiT with its distillation head and DINOv2 with its "
                       f"classification head (class token beside the patch mean), the families an HF class "
                       f"computes exactly; this model is none of them: --to timm writes it")


def hf_state(p, cfg: ViTConfig, source="model"):
    """{HF name: array} of timm-named params p, for cfg's HF class (q, k, v are qkv's thirds)."""
    kind = hf_kind(cfg, source)
    pre, D = KINDS[kind][1], cfg.dim
    e = pre + "embeddings."
    out = {e + "cls_token": p["cls_token"], e + "position_embeddings": p["pos_embed"],
           e + "patch_embeddings.projection.weight": p["patch_embed.proj.weight"],
           e + "patch_embeddings.projection.bias": p["patch_embed.proj.bias"]}
    if kind == "deit":
        out[e + "distillation_token"] = p["dist_token"]
    if kind.startswith("dinov2"):
        out[e + "mask_token"] = np.zeros((1, D), p["pos_embed"].dtype)  # unused in classification
    if kind == "dinov2_with_registers":  # the class token's position row was folded into it: a zero row
        pos = p["pos_embed"]
        out[e + "position_embeddings"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
        out[e + "register_tokens"] = p["reg_token"]
    for i in range(cfg.depth):
        b, t = f"{pre}encoder.layer.{i}.", f"blocks.{i}."
        for wb in ("weight", "bias"):
            qkv = p[f"{t}attn.qkv.{wb}"]  # (3D, D) / (3D,): rows [q; k; v], heads contiguous in each
            for j, name in enumerate(("query", "key", "value")):
                out[f"{b}attention.attention.{name}.{wb}"] = qkv[j * D:(j + 1) * D]
            for theirs, ours in (_DINO_BLOCK if kind.startswith("dinov2") else _VIT_BLOCK):
                out[f"{b}{theirs}.{wb}"] = p[f"{t}{ours}.{wb}"]
        if kind.startswith("dinov2"):
            out[b + "layer_scale1.lambda1"], out[b + "layer_scale2.lambda1"] = p[t + "ls1.gamma"], p[t + "ls2.gamma"]
    heads = (("cls_classifier", "head"), ("distillation_classifier", "head_dist")) if kind == "deit" \
        else (("classifier", "head"),)
    for wb in ("weight", "bias"):
        out[f"{pre}layernorm.{wb}"] = p[f"norm.{wb}"]
        for theirs, ours in heads:
            out[f"{theirs}.{wb}"] = p[f"{ours}.{wb}"]
    if kind.startswith("dinov2") and cfg.global_pool == "token":  # HF's head reads [class token, patch mean]
        w = out["classifier.weight"]  # (K, D) -> (K, 2D), the mean's half zero: the same logits
        out["classifier.weight"] = np.concatenate([w, np.zeros_like(w)], axis=1)
    return out


def hf_config(cfg: ViTConfig, names, dtype="float32", source="model"):
    """config.json of cfg's HF class (its config class's field names)."""
    kind = hf_kind(cfg, source)
    id2label = {str(i): n for i, n in enumerate(names or [f"LABEL_{i}" for i in range(cfg.num_classes)])}
    label2id = {}
    for i, n in id2label.items():
        label2id.setdefault(n, int(i))  # a repeated name keeps its first index
    c = {"architectures": [KINDS[kind][0]], "model_type": kind, "hidden_size": cfg.dim,
         "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads, "hidden_act": HF_ACT[cfg.gelu],
         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
         "layer_norm_eps": float(cfg.ln_eps), "image_size": cfg.img_size, "patch_size": cfg.patch_size,
         "num_channels": cfg.in_chans, "qkv_bias": True, "id2label": id2label, "label2id": label2id,
         "torch_dtype": dtype}
    if kind.startswith("dinov2"):
        if cfg.mlp_dim % cfg.dim:  # Dinov2Config's mlp_ratio is an int
            raise TinyViTError(f"{source}: HF's Dinov2 sizes its MLP as a whole multiple of the width; "
                               f"{cfg.mlp_dim} is not one of {cfg.dim}")
        c.update(mlp_ratio=cfg.mlp_dim // cfg.dim, layerscale_value=1.0, drop_path_rate=0.0, use_swiglu_ffn=False,
                 apply_layernorm=True)
        if cfg.reg_tokens:
            c["num_register_tokens"] = cfg.reg_tokens
    else:
        c.update(intermediate_size=cfg.mlp_dim, encoder_stride=cfg.patch_size)
    return c
