"""Hugging Face transformers' ViT layouts onto timm's names: ViT and DeiT (with the distillation head),
Dinov2 (with registers, with the classification head), CLIP's vision tower (with its projection as a
bias-free head) and SigLIP's (with its attention-pool head), as save_pretrained writes them; a whole
CLIPModel or SiglipModel gives its vision tower, the text tower dropped."""
import re

import numpy as np

from ..errors import TinyViTError

TOWERS = ("vision_model.",)
_TEXT = ("text_model.", "text_projection.", "logit_scale", "logit_bias")
_PREFIXES = ("vit.", "deit.", "dinov2_with_registers.", "dinov2.")
_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2", "norm1": "norm1", "norm2": "norm2",
          "layer_norm1": "norm1", "layer_norm2": "norm2", "attention.output.dense": "attn.proj",
          "self_attn.out_proj": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_QKV = {"attention.attention.": ("query", "key", "value"), "self_attn.": ("q_proj", "k_proj", "v_proj")}
# what each family's config.json says when it is absent (transformers' defaults)
DEFAULTS = {"vit": dict(ln_eps=1e-12), "dinov2": dict(ln_eps=1e-6), "clip": dict(ln_eps=1e-5, gelu="quick"),
            "siglip": dict(ln_eps=1e-6, gelu="tanh")}


def family(state):
    """'clip', 'siglip', 'dinov2' or 'vit' (ViT, DeiT) from an HF state dict's keys."""
    keys = list(state)
    if any(k.endswith("embeddings.class_embedding") for k in keys):
        return "clip"
    if any(k.endswith("embeddings.position_embedding.weight") for k in keys):
        return "siglip"
    if any(k.endswith(("layer_scale1.lambda1", "embeddings.register_tokens")) for k in keys) or \
            any(k.startswith("dinov2.") for k in keys):
        return "dinov2"
    return "vit"


def _strip(state, dropped):
    """The vision tower's keys without their model prefix; a whole model's text tower dropped."""
    out = {}
    for k, v in state.items():
        if k.startswith(_TEXT):
            dropped.append(f"{k} (the text tower: tinyvit keeps the vision tower)")
            continue
        for p in TOWERS + _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _blocks(m, state):
    """Every encoder block (encoder.layer.i or encoder.layers.i) onto blocks.i."""
    found = {int(g.group(2)) for k in state for g in [re.match(r"encoder\.(layer|layers)\.(\d+)\.", k)] if g}
    for i in sorted(found):
        b = next(f"encoder.{w}.{i}." for w in ("layer", "layers") if any(k.startswith(f"encoder.{w}.{i}.") for k in state))
        p = f"blocks.{i}."
        for wb in ("weight", "bias"):
            for base, (q, k, v) in _QKV.items():
                m.fuse([f"{b}{base}{t}.{wb}" for t in (q, k, v)], f"{p}attn.qkv.{wb}", lambda x: x)
            for theirs, ours in _BLOCK.items():
                m.mv(f"{b}{theirs}.{wb}", f"{p}{ours}.{wb}")
        m.mv(b + "layer_scale1.lambda1", p + "ls1.gamma")
        m.mv(b + "layer_scale2.lambda1", p + "ls2.gamma")


def _embeddings(m):
    """The patch embedding, prefix tokens and position embedding of each family."""
    e = "embeddings."
    for wb in ("weight", "bias"):
        m.mv(f"{e}patch_embeddings.projection.{wb}", f"patch_embed.proj.{wb}")
        m.mv(f"{e}patch_embedding.{wb}", f"patch_embed.proj.{wb}")
    m.mv(e + "cls_token", "cls_token")
    m.mv(e + "class_embedding", "cls_token", lambda x: x.reshape(1, 1, -1))  # CLIP: (C,)
    m.mv(e + "distillation_token", "dist_token")
    m.mv(e + "position_embeddings", "pos_embed")
    m.mv(e + "position_embedding.weight", "pos_embed", lambda x: x[None])  # an nn.Embedding: (N, C)
    m.drop(e + "mask_token", "masked-image-modelling token, unused for classification")
    m.drop(e + "position_ids", "a buffer of 0..N-1")
    if e + "register_tokens" in m.src and "cls_token" in m.out and "pos_embed" in m.out:
        # registers carry no position: fold the class row into the class token, as timm's converter
        m.mv(e + "register_tokens", "reg_token")
        pos = m.out["pos_embed"]
        m.out["cls_token"] = m.out["cls_token"] + pos[:, :1]
        m.out["pos_embed"] = pos[:, 1:]


def _heads(m, source):
    """The final norm(s) and heads: classifier, DeiT's two, CLIP's projection, SigLIP's attention pool."""
    for wb in ("weight", "bias"):
        m.mv(f"layernorm.{wb}", f"norm.{wb}")  # ViT, DeiT, Dinov2
        m.mv(f"post_layernorm.{wb}", f"norm.{wb}")  # CLIP, SigLIP
        m.mv(f"pre_layrnorm.{wb}", f"norm_pre.{wb}")  # CLIP (sic)
        m.mv(f"classifier.{wb}", f"head.{wb}")
        m.mv(f"cls_classifier.{wb}", f"head.{wb}")
        m.mv(f"distillation_classifier.{wb}", f"head_dist.{wb}")
        m.drop(f"pooler.dense.{wb}", "ViTModel pooler (dense + tanh); fine-tuning replaces the head without it")
    if "dist_token" in m.out and "head.weight" in m.out and "head_dist.weight" not in m.out \
            and "distillation_classifier.weight" not in m.src:
        raise TinyViTError(f"{source}: a DeiT with a distillation token and one head (DeiTForImageClassification) "
                           f"is not a layout tinyvit has; DeiTForImageClassificationWithTeacher is")
    w, D = m.out.get("head.weight"), m.out["cls_token"].shape[-1] if "cls_token" in m.out else None
    if D and w is not None and w.ndim == 2 and w.shape[1] == 2 * D and w[:, :D].any() and not w[:, D:].any():
        m.out["head.weight"] = w[:, :D]  # a Dinov2 head with the patch mean's half zero: the class token's alone
    if "visual_projection.weight" in m.src:  # CLIPVisionModelWithProjection: the projection as a bias-free head
        w = m.src.pop("visual_projection.weight")
        m.out["head.weight"], m.out["head.bias"] = w, np.zeros(w.shape[0], w.dtype)
    h = "head."
    if h + "probe" in m.src:  # SigLIP's MultiheadAttentionPoolingHead is timm's AttentionPoolLatent
        m.mv(h + "probe", "attn_pool.latent")
        for wb, theirs in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            x = m.src.pop(h + "attention." + theirs, None)
            if x is not None:
                c = x.shape[0] // 3
                m.out[f"attn_pool.q.{wb}"], m.out[f"attn_pool.kv.{wb}"] = x[:c], x[c:]
            m.mv(f"{h}attention.out_proj.{wb}", f"attn_pool.proj.{wb}")
            m.mv(f"{h}layernorm.{wb}", f"attn_pool.norm.{wb}")
            m.mv(f"{h}mlp.fc1.{wb}", f"attn_pool.mlp.fc1.{wb}")
            m.mv(f"{h}mlp.fc2.{wb}", f"attn_pool.mlp.fc2.{wb}")


def from_hf(state, source, mapper):
    """An HF state dict -> (params, leftover keys, dropped notes, heads None) through a convert._Mapper."""
    dropped = []
    state = _strip(state, dropped)
    m = mapper(state, source)
    m.dropped.extend(dropped)
    _embeddings(m)
    _blocks(m, state)
    _heads(m, source)
    return (*m.result(), None)
