"""OpenCLIP's layout onto timm's names, as timm's own converter maps it (timm.models.vision_transformer.
_convert_openai_clip): the vision tower under `visual.` (conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks.i, ln_post, proj as a bias-free head); the text tower (token_embedding, transformer,
ln_final, text_projection, logit_scale) dropped. What the layout always is: torch's LayerNorm eps 1e-5, and
OpenCLIP's preprocessing (OpenAI's mean/std, the shorter side to the input size, bicubic, a centre crop)."""
import numpy as np

from .archs import OPENAI, pretrained_record

PREPROCESSING = pretrained_record(OPENAI, 1.0)
STATED = dict(ln_eps=1e-5)  # open_clip's LayerNorm is torch's, at its default eps
_SWAPS = (("conv1", "patch_embed.proj"), ("positional_embedding", "pos_embed"), ("transformer.resblocks.", "blocks."),
          ("ln_pre", "norm_pre"), ("ln_post", "norm"), ("ln_", "norm"), ("in_proj_", "qkv."), ("out_proj", "proj"),
          ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"), ("ls_1.", "ls1."), ("ls_2.", "ls2."))


def is_openclip(keys):
    """Whether the key names are OpenCLIP's (a vision tower under `visual.` in OpenAI's CLIP layout)."""
    return any(k.startswith(("visual.conv1.", "visual.transformer.resblocks.")) for k in keys)


def from_openclip(state, source, mapper):
    """An OpenCLIP state dict -> (params, leftover keys, dropped notes, heads None) through a convert._Mapper."""
    m = mapper({}, source)
    for k, v in state.items():
        if not k.startswith("visual."):
            m.dropped.append(f"{k} (the text tower: tinyvit keeps the vision tower)")
            continue
        name = k[len("visual."):]
        for theirs, ours in _SWAPS:
            name = name.replace(theirs, ours)
        m.src[k] = v
        if name == "proj":  # (D, E): the projection as a bias-free head
            m.mv(k, "head.weight", np.transpose)
            m.out["head.bias"] = np.zeros(v.shape[-1], v.dtype)
        elif name == "class_embedding":
            m.mv(k, "cls_token", lambda x: x.reshape(1, 1, -1))
        elif name == "pos_embed":
            m.mv(k, "pos_embed", lambda x: x[None])
        else:
            m.mv(k, name)
    return (*m.result(), None)
