"""Convert public ViT weights (Google .npz, timm, torchvision, HF transformers, OpenCLIP) to tinyvit params.

Every format is mapped onto timm's names and torch layouts (each source's names: its mapper below),
the config is inferred from the shapes, and the full key set and every shape is checked. load_model
reads a tinyvit checkpoint as is and any of these converted, wherever a model is read.
"""
import dataclasses
import re
from pathlib import Path

import numpy as np

from ..errors import TinyViTError, input_file
from ..nn.model import ViTConfig, param_shapes
from .archs import preprocessing
from .checkpoint import check_params, load_checkpoint, read_npz
from .families import architecture, check_agrees, from_keys, refuse_lacking
from .filekind import file_kind
from .hf_layouts import DEFAULTS as HF_DEFAULTS
from .hf_layouts import family as hf_family
from .hf_layouts import from_hf
from .hub import find_local, hub_name, resolve
from .labels import class_names_for
from .openclip import STATED as OPENCLIP_STATED
from .openclip import from_openclip, is_openclip
from .posembed import adapt, resize_pos_embed  # noqa: F401  (re-exported: where they used to live)
from .safetensors import read_safetensors, read_sharded
from .sidecar import stated
from .torchzip import load_torch_zip

FORMATS = ("google", "timm", "torchvision", "hf", "openclip")
RESAMPLE = {"google": "bilinear", "timm": "bicubic", "torchvision": "bilinear", "hf": "bicubic",
            "openclip": "bicubic"}  # pos_embed, as timm resamples what it converts
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
    if path.name.endswith(".safetensors.index.json"):  # sharded safetensors: the index names the files beside it
        obj, metadata = read_sharded(path)
        return state_from_object(obj, path), metadata
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
    """'google' | 'timm' | 'torchvision' | 'hf' | 'openclip', from the key names."""
    keys = list(state)
    if any(k.startswith(("Transformer/", "embedding/")) for k in keys):
        return "google"
    if is_openclip(keys):
        return "openclip"
    if any(k.startswith(("conv_proj.", "encoder.layers.encoder_layer_")) or k == "class_token" for k in keys):
        return "torchvision"
    if any("embeddings.patch_embeddings." in k or "embeddings.patch_embedding." in k
           or k.startswith(("encoder.layer.", "vit.", "deit.", "dinov2.")) for k in keys):
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
    """timm VisionTransformer state dict: already our names and layouts. The original DINOv2 files (the
    torch-hub layout) differ in three ways, undone as timm's converter does: blocks in chunks
    (blocks.0.5. for blocks.5.), a mask token, and register tokens beside a class token whose position
    row is folded into it (the embedding then covers the patches alone)."""
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k) if re.match(r"^blocks\.\d+\.\d+\.", k) else k: v
             for k, v in state.items()}
    m = _Mapper(state, source)
    m.drop("mask_token", "masked-image-modelling token, unused for classification")
    if "register_tokens" in m.src and "cls_token" in m.src and m.src.get("pos_embed", np.zeros(0)).ndim == 3:
        pos = m.src.pop("pos_embed")
        m.src["cls_token"] = m.src["cls_token"] + pos[:, :1]  # the class token's position row, folded in
        m.src["pos_embed"] = pos[:, 1:]
        m.src["reg_token"] = m.src.pop("register_tokens")
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


def _from_hf(state, source):
    """HF transformers' ViT, DeiT, Dinov2, CLIP and SigLIP vision layouts -> timm (tinyvit.io.hf_layouts)."""
    return from_hf(state, source, _Mapper)


def _from_openclip(state, source):
    """OpenCLIP's vision tower -> timm, as timm's converter maps it (tinyvit.io.openclip)."""
    return from_openclip(state, source, _Mapper)


_MAPPERS = {"google": _from_google, "timm": _from_timm, "torchvision": _from_torchvision, "hf": _from_hf,
            "openclip": _from_openclip}


# --- config and conversion ----------------------------------------------------------------------


def infer_config(params, heads=None, ln_eps=1e-6, source="weights", stated=None, where="the architecture"):
    """ViTConfig from timm-named params: the structure from their keys and shapes (tinyvit.io.families),
    the rest from `stated` (an architecture's fields: gelu, ln_eps, heads, the pooling keys cannot tell),
    heads = given, else stated, else dim // 64 (the rule of timm's ViTs); a contradiction is one line."""
    need = ["patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight", "head.weight"]
    missing = [k for k in need if k not in params]
    if missing:
        raise TinyViTError(f"{source}: cannot infer the config: missing {missing}")
    w = params["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3] or 0 in w.shape:
        raise TinyViTError(f"{source}: patch_embed.proj.weight has shape {w.shape}, expected (D, C, P, P)")
    for k in ("head.weight", "blocks.0.mlp.fc1.weight"):
        if params[k].ndim != 2:
            raise TinyViTError(f"{source}: {k} has shape {params[k].shape}, expected 2-d (out, in)")
    stated = dict(stated or {})
    keys = from_keys(params, source, stated.get("no_embed_class"))
    check_agrees(keys, stated, where, source)
    if "init_values" in stated and (stated["init_values"] is not None) != keys["layer_scale"]:
        raise TinyViTError(f"{source}: {where} says init_values={stated['init_values']!r} but the weights "
                           f"{'hold' if keys['layer_scale'] else 'have no'} LayerScale gammas")
    fields = {k: keys[k] for k in ("class_token", "reg_tokens", "distilled", "no_embed_class", "pre_norm",
                                   "patch_bias", "qkv_bias", "global_pool", "fc_norm")}
    if keys["global_pool"] == "token" and stated.get("global_pool") == "avg":  # the keys cannot tell these apart
        fields.update(global_pool="avg", fc_norm=False)
    if stated.get("dynamic_img_size"):  # timm's model_args: the model takes any input size
        fields["dynamic_img_size"] = True
    D, C, P = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    heads = heads or stated.get("heads")
    if heads is None:
        if D % 64:
            raise TinyViTError(f"{source}: width {D} is not a multiple of 64; give the head count explicitly")
        heads = D // 64
    if type(heads) is not int or heads < 1:
        raise TinyViTError(f"{source}: heads must be a whole number of at least 1, got {heads!r}")
    try:
        return ViTConfig(img_size=keys["grid"] * P, patch_size=P, in_chans=C, num_classes=int(params["head.weight"].shape[0]),
                         dim=D, depth=keys["depth"], heads=heads, mlp_dim=int(params["blocks.0.mlp.fc1.weight"].shape[0]),
                         ln_eps=float(stated.get("ln_eps", ln_eps)), gelu=stated.get("gelu", "erf"),
                         init_values=(stated.get("init_values") or 1e-5) if keys["layer_scale"] else None, **fields)
    except TinyViTError as e:
        raise TinyViTError(f"{source}: {e}") from None


def from_foreign(state, fmt="auto", heads=None, ln_eps=None, source="weights", stated=None, where="the architecture",
                 num_classes=None):
    """Map a flat state dict to checked timm-named params -> (params, cfg, info) without copying
    more than the layout change needs; `stated`: config fields an architecture states (from_arch). A
    missing head becomes a zero-initialised one (num_classes, default 1000)."""
    fmt = detect_format(state, source) if fmt == "auto" else fmt
    if fmt not in _MAPPERS:
        raise TinyViTError(f"unknown format {fmt!r}: choose auto or one of {', '.join(FORMATS)}")
    stated = dict(HF_DEFAULTS[hf_family(state)] if fmt == "hf" else OPENCLIP_STATED if fmt == "openclip" else {},
                  **(stated or {}))
    refuse_lacking(stated.get("arch"), state, source)
    params, leftover, dropped, file_heads = _MAPPERS[fmt](state, source)
    notes = []
    w = params.get("patch_embed.proj.weight")
    if "head.weight" not in params and "head.bias" not in params and w is not None and w.ndim == 4:
        K = int(num_classes or 1000)
        params["head.weight"], params["head.bias"] = np.zeros((K, w.shape[0]), w.dtype), np.zeros(K, w.dtype)
        notes.append(f"the source has no classifier: head is zero-initialised with {K} classes")
    heads_from = "given" if heads else ("file" if file_heads else where if stated.get("heads") else "dim // 64")
    if ln_eps is not None:  # what the file's own config states wins over the architecture's default
        stated["ln_eps"] = ln_eps
    ln_eps = 1e-12 if fmt == "hf" else 1e-6
    where_fmt = f"{source} ({fmt} layout)"
    if leftover:  # names this layout does not have; list what is missing too when we can tell
        try:
            cfg = infer_config(params, heads or file_heads, ln_eps, where_fmt, stated, where)
            missing = sorted(set(param_shapes(cfg)) - set(params))
        except TinyViTError:
            missing = ["(too many to infer the config)"]
        raise TinyViTError(f"{where_fmt}: parameter names do not match the layout: "
                           f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                           f"unexpected {leftover[:6]}{'...' if len(leftover) > 6 else ''}")
    cfg = infer_config(params, heads or file_heads, ln_eps, where_fmt, stated, where)
    check_params(params, cfg, where_fmt)
    params = {k: params[k] for k in param_shapes(cfg)}
    if heads_from == "dim // 64":
        notes.append(f"nothing states the head count: {cfg.heads} heads guessed as width {cfg.dim} // 64 "
                     f"(--heads N, or --arch NAME for an architecture's own)")
    return params, cfg, dict(format=fmt, dropped=dropped, notes=notes, heads_from=heads_from)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def weights_in(folder):
    """The weights file of a timm or HF hub folder (model.safetensors, else pytorch_model.bin, ...)."""
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise TinyViTError(f"{folder}: is a folder without a weights file (looked for {', '.join(WEIGHT_FILES)})")


def convert(src, fmt="auto", heads=None, arch=None, num_classes=None):
    """Read public ViT weights (a file, or a timm or HF hub folder) -> (params, cfg, meta). arch: timm's or
    torchvision's architecture name, for what the weights cannot tell (heads, activation, eps, pooling,
    preprocessing: tinyvit.io.archs; a timm config.json names it, torchvision's sizes and the original
    DINOv2 files name theirs). Class names, mean/std and eval_transform: what the file or the files beside
    it state (tinyvit.io.sidecar), else the architecture's (OpenCLIP's for its layout), else mean/std
    ImageNet's for torchvision and 0.5 otherwise, eval_transform left out (timm's default crop 0.875
    applies). Every guess (heads, preprocessing, activation) is one line in meta["notes"]."""
    src, origin = resolve(src)  # a Hub name: its snapshot in huggingface_hub's cache (tinyvit.io.hub)
    if src.is_dir():
        src = weights_in(src)
    state, file_metadata = _load(src)
    fmt = detect_format(state, src) if fmt == "auto" else fmt
    side = stated(src, fmt, file_metadata)
    arch_fields, where, pre, arch_notes = architecture(arch, side, state, fmt, src)
    params, cfg, info = from_foreign(state, fmt, heads or side.get("heads"), side.get("ln_eps"), src, arch_fields,
                                     where, num_classes)
    if side.get("heads") and not heads:
        info["heads_from"] = side["where"]
    cfg = dataclasses.replace(cfg, gelu=side.get("gelu") or cfg.gelu)
    params = {k: np.ascontiguousarray(v, dtype=np.float32 if v.dtype == np.float16 else v.dtype)
              for k, v in params.items()}
    if arch_fields.get("img_size") and arch_fields["img_size"] != cfg.img_size:  # as timm builds it: resampled
        params, cfg = adapt(params, cfg, img_size=int(arch_fields["img_size"]), resample=RESAMPLE[fmt])
    mean, std, t, pre_notes = preprocessing(side, pre, fmt, cfg.in_chans)
    names = class_names_for(side.get("labels"), cfg.num_classes, trained_head=not any("zero-init" in n for n in info["notes"]))
    meta = dict(source=str(src), format=info["format"], mean=list(mean), std=list(std), class_names=names,
                dropped=info["dropped"], notes=info["notes"] + side.get("notes", []) + arch_notes + pre_notes,
                heads_from=info["heads_from"], resample=RESAMPLE[fmt])
    if t:
        meta["eval_transform"] = dict(t, mean=list(mean), std=list(std))
    if origin:
        meta["origin"] = origin
    return params, cfg, meta


def load_model(path, hint=None):
    """A tinyvit checkpoint as is, or any weights file or hub folder convert() reads, converted -> (params,
    cfg, meta). The file's first bytes (else its suffix) decide; an image is refused by name, `hint` (how the
    calling script takes its arguments) following. A Hub name (tinyvit.io.hub) is fetched and converted."""
    if hub_name(path) is not None:
        return convert(path)
    path = find_local(path)
    if path.is_dir():
        return convert(path)
    path = input_file(path, "model file")
    kind = file_kind(path)
    if kind == "image":
        raise TinyViTError(f"{path}: is an image, not a model" + (f": {hint}" if hint else ""))
    return load_checkpoint(path) if kind == "tinyvit" else convert(path)
