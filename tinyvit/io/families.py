"""Which ViT a timm-named state dict holds: the structure read from its keys (prefix tokens, LayerScale,
norm_pre, biases, pooling), what an architecture name (tinyvit.io.archs: --arch, a timm config.json's, or
what a layout names) and its model_args add (activation, eps, heads, the pooling the keys cannot tell, the
preprocessing), a contradiction between the two as one line, and the families that need what tinyvit
lacks, refused by name."""
import math
import re

from ..errors import TinyViTError
from .archs import named_by_layout, timm_arch, torchvision_arch
from .openclip import PREPROCESSING as OPENCLIP_PREPROCESSING

# (pattern in an architecture name or a key, what tinyvit lacks)
LACKS_BY_NAME = [(r"eva|rope|dinov3|(^|_)pe_|perception", "rotary position embeddings"),
                 (r"beit", "relative position bias"), (r"aimv2", "SwiGLU and RMSNorm"),
                 (r"giant.*dinov2|dinov2.*giant|_g14|swiglu", "SwiGLU")]
LACKS_BY_KEY = [(r"rope|freqs", "rotary position embeddings"), (r"relative_position", "relative position bias"),
                (r"mlp\.(w12|w3|weights_in|fc1_g|fc1_x)", "SwiGLU"), (r"\.(q_norm|k_norm)\.", "qk normalisation")]
ACT = {"gelu": "erf", "gelu_tanh": "tanh", "quick_gelu": "quick"}  # timm's act_layer names
# model_args naming one of our fields (timm name -> ours); others listed in _IGNORED change nothing we compute
_ARGS = {"img_size": "img_size", "patch_size": "patch_size", "in_chans": "in_chans", "num_classes": "num_classes",
         "embed_dim": "dim", "depth": "depth", "num_heads": "heads", "global_pool": "global_pool",
         "fc_norm": "fc_norm", "class_token": "class_token", "no_embed_class": "no_embed_class",
         "reg_tokens": "reg_tokens", "pre_norm": "pre_norm", "qkv_bias": "qkv_bias", "init_values": "init_values",
         "dynamic_img_size": "dynamic_img_size"}
_IGNORED = {"dynamic_img_pad", "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate",
            "attn_drop_rate", "drop_path_rate", "weight_init", "fix_init", "mlp_ratio", "act_layer", "norm_layer"}
STRUCTURE = ("class_token", "reg_tokens", "distilled", "no_embed_class", "pre_norm", "patch_bias", "qkv_bias",
             "global_pool", "fc_norm", "depth", "dim", "patch_size", "in_chans", "mlp_dim")


def refuse_lacking(arch, keys, source):
    """One line naming what tinyvit lacks, when the architecture name or a key needs it."""
    for pattern, lack in LACKS_BY_NAME:
        if arch and re.search(pattern, arch):
            raise TinyViTError(f"{source}: {arch} needs {lack}, which tinyvit does not have")
    for pattern, lack in LACKS_BY_KEY:
        hit = next((k for k in keys if re.search(pattern, k)), None)
        if hit:
            raise TinyViTError(f"{source}: the weights hold {hit}: this model needs {lack}, which tinyvit does not have")


def from_arch(arch, model_args=None, source="weights"):
    """ViTConfig fields a timm architecture name and its model_args state: a name tinyvit's table holds
    (tinyvit.io.archs) brings every setting as timm's definition builds it; another name only what it
    says (registers, distillation, CLIP's eps 1e-5, QuickGELU for *_quickgelu). model_args win."""
    arch, model_args = arch or "", dict(model_args or {})
    known = timm_arch(arch)
    out = dict(known[0]) if known else {}
    if arch and not known:  # what timm's ViT names say of the structure: registers, distillation
        reg = re.search(r"reg(\d+)", arch)
        out.update(reg_tokens=int(reg.group(1)) if reg else 0, distilled="distilled" in arch)
        if "clip" in arch:
            out["ln_eps"] = 1e-5
        if "quickgelu" in arch:
            out["gelu"] = "quick"
    for k, v in model_args.items():
        if k in ("img_size", "patch_size") and isinstance(v, (list, tuple)):  # timm writes (h, w)
            if len(v) != 2 or v[0] != v[1]:
                raise TinyViTError(f"{source}: model_args {k}={v} is not square, which tinyvit needs")
            v = v[0]
        if k in _ARGS:
            out[_ARGS[k]] = v
        elif k == "act_layer":
            if v not in ACT:
                raise TinyViTError(f"{source}: model_args act_layer {str(v)[:30]!r} is not one tinyvit has "
                                   f"({', '.join(ACT)})")
            out["gelu"] = ACT[v]
        elif k not in _IGNORED:
            raise TinyViTError(f"{source}: model_args {k}={str(v)[:30]} is not a setting tinyvit has")
    if "pre_norm" in model_args and known:  # timm builds the patch bias exactly when there is no norm_pre
        out["patch_bias"] = not out["pre_norm"]
    ratio = model_args.get("mlp_ratio", known[0]["mlp_dim"] / known[0]["dim"] if known else None)
    if type(ratio) in (int, float) and type(out.get("dim")) is int and ("embed_dim" in model_args or "mlp_ratio" in model_args):
        out["mlp_dim"] = int(out["dim"] * ratio)  # as timm sizes its Mlp
    return out


def from_keys(params, source="weights", no_embed_class=None):
    """The structure of a timm-named params dict: which tokens, norms, biases and pooling it has.
    no_embed_class (what an architecture states) settles tiny grids where both readings fit."""
    def has(k):
        return k in params

    D = int(params["patch_embed.proj.weight"].shape[0])
    head = params.get("head.weight")
    s = {"class_token": has("cls_token"), "distilled": has("dist_token") or has("head_dist.weight"),
         "reg_tokens": int(params["reg_token"].shape[1]) if has("reg_token") else 0, "pre_norm": has("norm_pre.weight"),
         "patch_bias": has("patch_embed.proj.bias"), "qkv_bias": has("blocks.0.attn.qkv.bias"),
         "layer_scale": has("blocks.0.ls1.gamma"), "dim": D, "patch_size": int(params["patch_embed.proj.weight"].shape[2]),
         "in_chans": int(params["patch_embed.proj.weight"].shape[1]), "mlp_dim": int(params["blocks.0.mlp.fc1.weight"].shape[0]),
         "depth": 1 + max((int(m.group(1)) for k in params for m in [re.match(r"blocks\.(\d+)\.", k)] if m), default=-1)}
    if has("attn_pool.latent"):
        s["global_pool"], s["fc_norm"] = "map", None
    elif has("fc_norm.weight"):
        s["global_pool"], s["fc_norm"] = "avg", None
    elif not s["class_token"]:
        s["global_pool"], s["fc_norm"] = "avg", False  # SigLIP's gap models: the norm, then the mean
    elif head is not None and head.ndim == 2 and head.shape[1] == 2 * D:
        s["global_pool"], s["fc_norm"] = "token_avg", None  # DINOv2's linear probe: class token and patch mean
    else:
        s["global_pool"], s["fc_norm"] = "token", None
    prefix = s["class_token"] + s["distilled"] + s["reg_tokens"]
    rows = int(params["pos_embed"].shape[1]) if params["pos_embed"].ndim == 3 else -1
    grid_all, grid_patches = _square(rows - prefix), _square(rows)
    if prefix and grid_all and grid_patches:  # both fit (tiny grids): as stated, else registers carry no position,
        if no_embed_class if no_embed_class is not None else s["reg_tokens"]:  # as in timm's and HF's models
            grid_all = 0
        else:
            grid_patches = 0
    if prefix and grid_all:
        s["no_embed_class"], g = False, grid_all
    elif grid_patches:
        s["no_embed_class"], g = True, grid_patches  # the embedding covers the patches alone
    else:
        raise TinyViTError(f"{source}: pos_embed has shape {tuple(params['pos_embed'].shape)}: neither {prefix} "
                           f"prefix rows and a square grid nor a square grid alone")
    s["grid"] = g
    return s


def _square(n):
    """The side of an n-cell square grid, or 0."""
    g = math.isqrt(max(n, 0))
    return g if n > 0 and g * g == n else 0


def check_agrees(keys_say, stated, where, source):
    """One line when a stated structural setting contradicts what the weights' keys hold."""
    for k in STRUCTURE:
        if k in stated and k in keys_say and stated[k] is not None and keys_say[k] is not None:
            same = stated[k] == keys_say[k] or (k == "no_embed_class" and not (
                keys_say["class_token"] or keys_say["reg_tokens"] or keys_say["distilled"]))
            if k == "global_pool" and stated[k] in ("avg", "token") and keys_say[k] in ("avg", "token") \
                    and keys_say.get("fc_norm") is None and keys_say["class_token"]:
                same = True  # a class token and the final norm: either pooling; the stated one wins
            if not same:
                raise TinyViTError(f"{source}: {where} says {k}={stated[k]!r} but the weights hold {k}={keys_say[k]!r}")


def architecture(arch, side, state, fmt, source):
    """(config fields an architecture states, where it was named, its eval transform record or None, notes):
    --arch, else the timm config.json's, else what the layout names (tinyvit.io.archs.named_by_layout)."""
    name = arch or side.get("arch")
    where = "--arch" if arch else "config.json's architecture"
    pre, notes = None, []
    if not name:
        name, where = named_by_layout(state, fmt)
        if where and not name:  # an original DINOv2 file of another width: its preprocessing alone
            pre = timm_arch("vit_small_patch14_dinov2")[1]
    tv = torchvision_arch(name=name) if name else None
    if tv:
        pos = state.get("encoder.pos_embedding")
        grid = math.isqrt(pos.shape[1] - 1) if pos is not None and pos.ndim == 3 and pos.shape[1] else 0
        tv = torchvision_arch(name=name, img_size=grid * tv[1]["patch_size"])
        return dict(tv[1], arch=name), where, tv[2], notes
    stated = from_arch(name, side.get("model_args") if not arch or arch == side.get("arch") else None, source)
    stated.update(side.get("config_fields", {}))  # tinyvit's own export states its config
    known = timm_arch(name)
    if known:
        pre = known[1]
        base, _, tag = name.partition(".")
        if tag and tag != known[2]:
            notes.append(f"{where} {name}: the preprocessing is that of timm's default tag {base}.{known[2]}")
    elif name:
        notes.append(f"{where} {name} is not an architecture tinyvit knows (tinyvit.io.archs): what the weights "
                     f"cannot tell is read from the name alone")
    if fmt == "openclip":  # the layout's own preprocessing, whichever timm tag the name's default is
        pre = OPENCLIP_PREPROCESSING
        if "gelu" not in stated:
            notes.append("OpenCLIP's layout does not say its activation: exact GELU assumed (OpenAI's CLIP weights "
                         "need QuickGELU: --arch vit_base_patch16_clip_quickgelu_224 or the like)")
    return dict(stated, arch=name) if name else stated, where, pre, notes
