"""Convert public ViT weights (Google .npz, timm, torchvision, HF transformers) to tinyvit params.

Every format is mapped onto timm's names and torch layouts (each source's names: its mapper below),
the config is inferred from the shapes, and the full key set and every shape is checked. load_model
reads a tinyvit checkpoint as is and any of these converted, wherever a model is read.
"""
import dataclasses
import math
import re
from pathlib import Path

import numpy as np

from ..backend import get_array_module
from ..data.augment import bilinear_resize
from ..errors import TinyViTError, input_file
from ..nn.model import ViTConfig, param_shapes
from .checkpoint import check_params, load_checkpoint, read_npz
from .filekind import file_kind
from .labels import class_names_for
from .safetensors import read_safetensors
from .sidecar import stated
from .torchzip import load_torch_zip

FORMATS = ("google", "timm", "torchvision", "hf")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_NESTED = ("state_dict", "model", "module", "model_state_dict", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "model.", "_orig_mod.")


# --- reading ------------------------------------------------------------------------------------


def _flatten(obj, prefix, out, skipped):
    """Nested dicts -> one flat {dotted name: array}; non-array leaves are listed in skipped."""
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, name + ".", out, skipped)
        elif isinstance(v, np.ndarray):
            out[name] = v
        else:
            skipped.append(name)


def state_from_object(obj, source):
    """Find the state dict in a loaded object ({'state_dict': ...}, {'model': ...}, or itself),
    flatten it and strip a `module.` / `model.` / `_orig_mod.` prefix shared by all keys."""
    while isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        inner = next((obj[k] for k in _NESTED if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise TinyViTError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    state, skipped = {}, []
    _flatten(obj, "", state, skipped)
    if not state:
        raise TinyViTError(f"{source}: no tensors found (top-level keys: {sorted(map(str, obj))[:8]})")
    stripped = True
    while stripped:
        stripped = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in state):
                state, stripped = {k[len(p):]: v for k, v in state.items()}, True
    return state


def _load(path):
    """(flat state dict, the file's string metadata: a safetensors __metadata__, else {}), the reader
    chosen by the file's first bytes (else its suffix)."""
    path = input_file(path)
    kind, metadata = file_kind(path), {}
    if kind in ("npz", "tinyvit"):
        obj = read_npz(path, "weights")
    elif kind == "safetensors":
        obj, metadata = read_safetensors(path)
    elif kind == "torch":
        obj = load_torch_zip(path)
    elif kind == "image":
        raise TinyViTError(f"{path}: is an image, not model weights")
    else:
        raise TinyViTError(f"{path}: unknown weights file type {path.suffix.lower()!r} "
                           f"(use .npz, .safetensors, .pth, .pt, .bin or .ckpt)")
    return state_from_object(obj, path), metadata


def load_state(path):
    """A flat {name: NumPy array} state dict from .npz, .safetensors or torch .pth/.pt/.bin/.ckpt."""
    return _load(path)[0]


def detect_format(state, source="weights"):
    """'google' | 'timm' | 'torchvision' | 'hf', from the key names."""
    keys = list(state)
    if any(k.startswith(("Transformer/", "embedding/")) for k in keys):
        return "google"
    if any(k.startswith(("conv_proj.", "encoder.layers.encoder_layer_")) or k == "class_token" for k in keys):
        return "torchvision"
    if any("embeddings.patch_embeddings." in k or k.startswith(("encoder.layer.", "vit.")) for k in keys):
        return "hf"
    if any(k.startswith(("blocks.", "patch_embed.")) or k in ("cls_token", "pos_embed") for k in keys):
        return "timm"
    raise TinyViTError(f"{source}: cannot tell the weights' format from key names such as {sorted(keys)[:4]}")


# --- the four layouts ---------------------------------------------------------------------------


def _depth(state, pattern):
    """1 + the largest block index found by regex `pattern` (one group), 0 when none."""
    found = [int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m]
    return max(found) + 1 if found else 0


class _Mapper:
    """Moves keys from a source state into timm-named params; what is left is 'unexpected'."""

    def __init__(self, state, source):
        self.src, self.out, self.dropped, self.source = dict(state), {}, [], source

    def mv(self, key, name, f=None):
        """params[name] = f(state.pop(key)) when key exists; a bad shape names the key."""
        if key in self.src:
            x = self.src.pop(key)
            try:
                self.out[name] = f(x) if f else x
            except (ValueError, IndexError) as e:
                raise TinyViTError(f"{self.source}: {key} has unusable shape {x.shape} ({e})") from None

    def fuse(self, keys, name, f):
        """params[name] = concat(f(x) for the keys' arrays) when all exist (q, k, v -> qkv)."""
        if all(k in self.src for k in keys):
            xs = [self.src.pop(k) for k in keys]
            try:
                self.out[name] = np.concatenate([f(x) for x in xs])
            except (ValueError, IndexError) as e:
                raise TinyViTError(f"{self.source}: {keys[0]} etc. have unusable shapes "
                                   f"{[x.shape for x in xs]} ({e})") from None

    def drop(self, key, why):
        if key in self.src:
            self.src.pop(key)
            self.dropped.append(f"{key} ({why})")

    def result(self):
        """(params, leftover source keys, dropped notes)."""
        return self.out, sorted(self.src), self.dropped


def _from_google(state, source):
    """Google vision_transformer .npz (ViT-B_16.npz, AugReg) -> timm; heads from the kernels."""
    m, heads = _Mapper(state, source), None
    T = np.transpose
    m.mv("embedding/kernel", "patch_embed.proj.weight", lambda k: k.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    m.mv("embedding/bias", "patch_embed.proj.bias")
    m.mv("cls", "cls_token")
    m.mv("Transformer/posembed_input/pos_embedding", "pos_embed")
    for i in range(_depth(state, r"Transformer/encoderblock_(\d+)/")):
        b, p = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        a = b + "MultiHeadDotProductAttention_1/"
        q = m.src.get(a + "query/kernel")
        if q is not None and q.ndim == 3:
            heads = int(q.shape[1])  # (D, H, d)
        for ln, n in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            m.mv(b + ln + "/scale", p + n + ".weight")
            m.mv(b + ln + "/bias", p + n + ".bias")
        qkv = [a + t for t in ("query/", "key/", "value/")]
        m.fuse([k + "kernel" for k in qkv], p + "attn.qkv.weight", lambda k: k.reshape(k.shape[0], -1).T)
        m.fuse([k + "bias" for k in qkv], p + "attn.qkv.bias", lambda x: x.reshape(-1))
        m.mv(a + "out/kernel", p + "attn.proj.weight", lambda k: k.reshape(-1, k.shape[-1]).T)  # (H,d,D)
        m.mv(a + "out/bias", p + "attn.proj.bias")
        for j, fc in ((0, "fc1"), (1, "fc2")):
            m.mv(f"{b}MlpBlock_3/Dense_{j}/kernel", f"{p}mlp.{fc}.weight", T)
            m.mv(f"{b}MlpBlock_3/Dense_{j}/bias", f"{p}mlp.{fc}.bias")
    m.mv("Transformer/encoder_norm/scale", "norm.weight")
    m.mv("Transformer/encoder_norm/bias", "norm.bias")
    m.mv("head/kernel", "head.weight", T)
    m.mv("head/bias", "head.bias")
    for k in ("pre_logits/kernel", "pre_logits/bias"):
        m.drop(k, "pre-logits layer; fine-tuning replaces the head without it")
    return (*m.result(), heads)


def _from_timm(state, source):
    """timm VisionTransformer state dict: already our names and layouts."""
    m = _Mapper(state, source)
    for k in ("pre_logits.fc.weight", "pre_logits.fc.bias"):
        m.drop(k, "pre-logits layer; fine-tuning replaces the head without it")
    m.out, m.src = m.src, {}  # keep every name: check_params reports the unexpected ones
    return (*m.result(), None)


_TV_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.out_proj": "attn.proj",
             "mlp.0": "mlp.fc1", "mlp.linear_1": "mlp.fc1", "mlp.3": "mlp.fc2", "mlp.linear_2": "mlp.fc2"}


def _from_torchvision(state, source):
    """torchvision vit_b_16-style state dict -> timm (in_proj = qkv, out_proj = proj)."""
    m = _Mapper(state, source)
    for wb in ("weight", "bias"):
        m.mv(f"conv_proj.{wb}", f"patch_embed.proj.{wb}")
        m.mv(f"encoder.ln.{wb}", f"norm.{wb}")
        m.mv(f"heads.head.{wb}", f"head.{wb}")
        m.drop(f"heads.pre_logits.{wb}", "pre-logits layer; fine-tuning replaces the head without it")
    m.mv("class_token", "cls_token")
    m.mv("encoder.pos_embedding", "pos_embed")
    for i in range(_depth(state, r"encoder\.layers\.encoder_layer_(\d+)\.")):
        b, p = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        m.mv(b + "self_attention.in_proj_weight", p + "attn.qkv.weight")
        m.mv(b + "self_attention.in_proj_bias", p + "attn.qkv.bias")
        for theirs, ours in _TV_BLOCK.items():
            for wb in ("weight", "bias"):
                m.mv(f"{b}{theirs}.{wb}", f"{p}{ours}.{wb}")
    return (*m.result(), None)


_HF_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}


def _from_hf(state, source):
    """HF ViTForImageClassification (or bare ViTModel) -> timm, fusing query/key/value into qkv."""
    m = _Mapper({(k[4:] if k.startswith("vit.") else k): v for k, v in state.items()}, source)
    e = "embeddings."
    for wb in ("weight", "bias"):
        m.mv(f"{e}patch_embeddings.projection.{wb}", f"patch_embed.proj.{wb}")
        m.mv(f"layernorm.{wb}", f"norm.{wb}")
        m.mv(f"classifier.{wb}", f"head.{wb}")
        m.drop(f"pooler.dense.{wb}", "ViTModel pooler (dense + tanh); fine-tuning replaces the head without it")
    m.mv(e + "cls_token", "cls_token")
    m.mv(e + "position_embeddings", "pos_embed")
    m.drop(e + "mask_token", "masked-image-modelling token, unused for classification")
    for i in range(_depth(m.src, r"encoder\.layer\.(\d+)\.")):
        b, p = f"encoder.layer.{i}.", f"blocks.{i}."
        for wb in ("weight", "bias"):
            qkv = [f"{b}attention.attention.{t}.{wb}" for t in ("query", "key", "value")]
            m.fuse(qkv, f"{p}attn.qkv.{wb}", lambda x: x)
            for theirs, ours in _HF_BLOCK.items():
                m.mv(f"{b}{theirs}.{wb}", f"{p}{ours}.{wb}")
    return (*m.result(), None)


_MAPPERS = {"google": _from_google, "timm": _from_timm, "torchvision": _from_torchvision, "hf": _from_hf}


# --- config and conversion ----------------------------------------------------------------------


def infer_config(params, heads=None, ln_eps=1e-6, source="weights"):
    """ViTConfig from timm-named params' shapes; heads = given, else dim // 64 (Ti/S/B/L's rule)."""
    need = ["patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight", "head.weight"]
    missing = [k for k in need if k not in params]
    if missing:
        raise TinyViTError(f"{source}: cannot infer the config: missing {missing}")
    w, pos = params["patch_embed.proj.weight"], params["pos_embed"]
    if w.ndim != 4 or w.shape[2] != w.shape[3] or 0 in w.shape:
        raise TinyViTError(f"{source}: patch_embed.proj.weight has shape {w.shape}, expected (D, C, P, P)")
    for k in ("head.weight", "blocks.0.mlp.fc1.weight"):
        if params[k].ndim != 2:
            raise TinyViTError(f"{source}: {k} has shape {params[k].shape}, expected 2-d (out, in)")
    D, C, P = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    n = pos.shape[1] - 1 if pos.ndim == 3 else -1
    g = math.isqrt(max(n, 0))
    if n < 1 or g * g != n:
        raise TinyViTError(f"{source}: pos_embed has shape {pos.shape}: expected (1, 1 + G*G, D) "
                           f"for a square grid with a class token")
    if heads is None:
        if D % 64:
            raise TinyViTError(f"{source}: width {D} is not a multiple of 64; give the head count explicitly")
        heads = D // 64
    if int(heads) < 1:
        raise TinyViTError(f"{source}: heads must be at least 1, got {heads}")
    try:
        return ViTConfig(img_size=g * P, patch_size=P, in_chans=C, num_classes=int(params["head.weight"].shape[0]),
                         dim=D, depth=_depth(params, r"blocks\.(\d+)\."), heads=int(heads),
                         mlp_dim=int(params["blocks.0.mlp.fc1.weight"].shape[0]), ln_eps=float(ln_eps))
    except TinyViTError as e:
        raise TinyViTError(f"{source}: {e}") from None


def from_foreign(state, fmt="auto", heads=None, ln_eps=None, source="weights"):
    """Map a flat state dict to checked timm-named params -> (params, cfg, info) without copying
    more than the layout change needs; a missing head becomes a zero-initialised 1000-class one."""
    fmt = detect_format(state, source) if fmt == "auto" else fmt
    if fmt not in _MAPPERS:
        raise TinyViTError(f"unknown format {fmt!r}: choose auto or one of {', '.join(FORMATS)}")
    params, leftover, dropped, file_heads = _MAPPERS[fmt](state, source)
    notes = []
    if "head.weight" not in params and "head.bias" not in params and "norm.weight" in params:
        D = params["norm.weight"].shape[0]
        params["head.weight"] = np.zeros((1000, D), params["norm.weight"].dtype)
        params["head.bias"] = np.zeros(1000, params["norm.weight"].dtype)
        notes.append("the source has no classifier: head is zero-initialised with 1000 classes")
    heads_from = "given" if heads else ("file" if file_heads else "dim // 64")
    ln_eps = ln_eps if ln_eps is not None else (1e-12 if fmt == "hf" else 1e-6)
    where = f"{source} ({fmt} layout)"
    if leftover:  # names this layout does not have; list what is missing too when we can tell
        try:
            cfg = infer_config(params, heads or file_heads, ln_eps, where)
            missing = sorted(set(param_shapes(cfg)) - set(params))
        except TinyViTError:
            missing = ["(too many to infer the config)"]
        raise TinyViTError(f"{where}: parameter names do not match the layout: "
                           f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                           f"unexpected {leftover[:6]}{'...' if len(leftover) > 6 else ''}")
    cfg = infer_config(params, heads or file_heads, ln_eps, where)
    check_params(params, cfg, where)
    params = {k: params[k] for k in param_shapes(cfg)}
    return params, cfg, dict(format=fmt, dropped=dropped, notes=notes, heads_from=heads_from)


def convert(src, fmt="auto", heads=None):
    """Read public ViT weights -> (params, cfg, meta). Class names, mean/std and eval_transform: what the
    file or the files beside it state (tinyvit.io.sidecar); unstated, mean/std are ImageNet's for torchvision,
    0.5 for Google, timm and HF (Google's ViTs map pixels to [-1, 1]; DeiT-style timm files without a
    config.json want ImageNet's: set it in meta yourself), and eval_transform is left out."""
    src = Path(src)
    state, file_metadata = _load(src)
    fmt = detect_format(state, src) if fmt == "auto" else fmt
    side = stated(src, fmt, file_metadata)
    params, cfg, info = from_foreign(state, fmt, heads or side.get("heads"), side.get("ln_eps"), src)
    if side.get("heads") and not heads:
        info["heads_from"] = side["where"]
    cfg = dataclasses.replace(cfg, gelu=side.get("gelu") or cfg.gelu)
    params = {k: np.ascontiguousarray(v, dtype=np.float32 if v.dtype == np.float16 else v.dtype)
              for k, v in params.items()}
    mean, std = side.get("mean"), side.get("std")
    if not (mean and std and len(mean) == len(std) == cfg.in_chans and min(std) > 0):
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if fmt == "torchvision" else ((0.5,) * cfg.in_chans,) * 2
    names = class_names_for(side.get("labels"), cfg.num_classes, trained_head=not info["notes"])
    meta = dict(source=str(src), format=info["format"], mean=list(mean), std=list(std), class_names=names,
                dropped=info["dropped"], notes=info["notes"] + side.get("notes", []), heads_from=info["heads_from"])
    if side.get("transform"):
        meta["eval_transform"] = dict(side["transform"], mean=list(mean), std=list(std))
    return params, cfg, meta


def load_model(path, hint=None):
    """A tinyvit checkpoint as is, or any weights file convert() reads, converted -> (params, cfg, meta).
    The file's first bytes (else its suffix) decide; an image is refused by name, `hint` (how the
    calling script takes its arguments) following."""
    path = input_file(path, "model file")
    kind = file_kind(path)
    if kind == "image":
        raise TinyViTError(f"{path}: is an image, not a model" + (f": {hint}" if hint else ""))
    return load_checkpoint(path) if kind == "tinyvit" else convert(path)


# --- adapting to a new image size or class count ------------------------------------------------


def _grid(g):
    return (int(g), int(g)) if isinstance(g, (int, np.integer)) else tuple(int(v) for v in g)


def resize_pos_embed(pos_embed, new_grid, old_grid=None):
    """(1, 1 + h*w, D) position embeddings for a new patch grid: the CLS row kept, the grid resampled
    bilinearly with align_corners=False (exactly F.interpolate's rule; timm defaults to bicubic)."""
    xp = get_array_module(pos_embed)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise TinyViTError(f"pos_embed must be (1, 1 + N, D), got {tuple(pos_embed.shape)}")
    n, D = pos_embed.shape[1] - 1, pos_embed.shape[2]
    if old_grid is None:
        g = math.isqrt(max(n, 0))
        if g * g != n:
            raise TinyViTError(f"pos_embed has {n} grid rows, not a square; give old_grid")
        old_grid = g
    (oh, ow), (nh, nw) = _grid(old_grid), _grid(new_grid)
    if oh * ow != n or min(oh, ow, nh, nw) < 1:
        raise TinyViTError(f"cannot resize a {n}-row pos_embed from grid {(oh, ow)} to {(nh, nw)}")
    x = pos_embed[:, 1:].reshape(1, oh, ow, D).transpose(0, 3, 1, 2)  # (1, D, oh, ow)
    x = bilinear_resize(xp.ascontiguousarray(x), (nh, nw))  # (1, D, nh, nw)
    x = x.transpose(0, 2, 3, 1).reshape(1, nh * nw, D)
    return xp.concatenate([pos_embed[:, :1], x.astype(pos_embed.dtype, copy=False)], axis=1)


def adapt(params, cfg: ViTConfig, img_size=None, num_classes=None):
    """(params, cfg) for a new image size (pos_embed resized) and/or class count (zero head);
    the input dict is not modified, and an unchanged setting leaves its arrays as they are."""
    params = dict(params)
    if img_size is not None and img_size != cfg.img_size:
        P = cfg.patch_size
        if img_size < P or img_size % P:
            raise TinyViTError(f"img_size {img_size} is not a positive multiple of the patch size {P}")
        params["pos_embed"] = resize_pos_embed(params["pos_embed"], img_size // P, cfg.img_size // P)
        cfg = dataclasses.replace(cfg, img_size=int(img_size))
    if num_classes is not None and num_classes != cfg.num_classes:
        if num_classes < 1:
            raise TinyViTError(f"num_classes must be at least 1, got {num_classes}")
        w = params["head.weight"]
        xp = get_array_module(w)
        params["head.weight"] = xp.zeros((num_classes, cfg.dim), w.dtype)
        params["head.bias"] = xp.zeros((num_classes,), params["head.bias"].dtype)
        cfg = dataclasses.replace(cfg, num_classes=int(num_classes))
    return params, cfg
