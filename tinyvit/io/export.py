"""Export a tinyvit model to timm (one .safetensors state dict) and to Hugging Face transformers (a folder).

timm: exactly the state dict of timm's VisionTransformer with a class token, global_pool='token', no
fc_norm and no pre-logits (our names and torch layouts already), with the architecture in the file's
__metadata__. HF: config.json, model.safetensors and preprocessor_config.json of a
ViTForImageClassification, the exact inverse of tinyvit.io.convert's HF reader (timm's fused qkv split
into query, key, value). Tensors keep the checkpoint's dtype and bits.
"""
import json
import math
import os
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..data.transform import EvalTransform, eval_transform
from ..errors import TinyViTError
from ..nn.lora import merged_model
from ..nn.model import ViTConfig, count_params, param_shapes
from .checkpoint import check_params, load_checkpoint
from .convert import detect_format
from .filekind import NAMES, file_kind, folder_kind, key_names
from .files import atomic_write
from .hf_export import HF_ACT, hf_config, hf_state  # noqa: F401  (re-exported)
from .labels import class_names
from .onnx_export import onnx_model, write_onnx
from .peft import export_peft
from .safetensors import write_safetensors
from .sidecar import CONVNEXT_SQUASH, PIL_RESAMPLE

TARGETS = ("timm", "hf", "onnx", "peft")
TIMM_ACT = {"erf": "gelu", "tanh": "gelu_tanh", "quick": "quick_gelu"}  # timm's get_act_layer names
# a registered timm architecture whose LayerNorm has this eps (model_args set everything else)
TIMM_ARCH = {1e-6: "vit_base_patch16_224", 1e-5: "vit_base_patch16_clip_224"}
TIMM_DISTILLED = "deit_base_distilled_patch16_224"  # VisionTransformerDistilled, eps 1e-6
PIL_CODES = {v: k for k, v in PIL_RESAMPLE.items()}  # interpolation -> PIL.Image.Resampling code
HF_FILES = ("model.safetensors", "config.json", "preprocessor_config.json")
LAYOUTS = {"google": "Google's", "timm": "timm's", "torchvision": "torchvision's", "hf": "Hugging Face's"}


# --- what the checkpoint's metadata says --------------------------------------------------------


def mlp_ratio(cfg: ViTConfig, source="model"):
    """A float r with int(dim * r) == mlp_dim, as timm sizes its MLP (m / d itself can fall an ulp short)."""
    r = cfg.mlp_dim / cfg.dim
    for c in (r, math.nextafter(r, math.inf), math.nextafter(math.nextafter(r, math.inf), math.inf)):
        if int(cfg.dim * c) == cfg.mlp_dim:
            return c
    raise TinyViTError(f"{source}: no float mlp_ratio gives timm an MLP of {cfg.mlp_dim} for width {cfg.dim}")


def _dtype_name(params):
    """The one dtype all tensors share, or the widest of them (HF's torch_dtype)."""
    return np.result_type(*[v.dtype for v in params.values()]).name


# --- timm -------------------------------------------------------------------------------------


def timm_state(params, cfg: ViTConfig, source="model"):
    """{timm name: NumPy array} in timm's order: checked, not copied (our names are timm's)."""
    params = {k: to_numpy(v) for k, v in params.items()}
    check_params(params, cfg, source)
    return {k: params[k] for k in param_shapes(cfg)}


def timm_model_args(cfg: ViTConfig, source="model"):
    """timm VisionTransformer keyword arguments that build cfg's model (its LayerNorm eps: the architecture's)."""
    if cfg.global_pool == "token_avg":
        raise TinyViTError(f"{source}: timm's VisionTransformer has no head over the class token beside the patch "
                           f"mean (it pools one or the other); --to hf writes it as Dinov2ForImageClassification, "
                           f"--to onnx as a graph")
    if cfg.patch_bias == cfg.pre_norm:  # timm: bias=not pre_norm
        raise TinyViTError(f"{source}: timm builds a patch-embedding bias exactly when there is no norm_pre; "
                           f"this model has {'both' if cfg.pre_norm else 'neither'}")
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=mlp_ratio(cfg, source),
                qkv_bias=cfg.qkv_bias, init_values=cfg.init_values, class_token=cfg.class_token,
                no_embed_class=cfg.no_embed_class, reg_tokens=cfg.reg_tokens, pre_norm=cfg.pre_norm,
                global_pool=cfg.global_pool, fc_norm=cfg.fc_norm, act_layer=TIMM_ACT[cfg.gelu],
                dynamic_img_size=cfg.dynamic_img_size)


def timm_architecture(cfg: ViTConfig, source="model"):
    """The registered timm architecture to build cfg's model from, by class and LayerNorm eps."""
    arch = TIMM_DISTILLED if cfg.distilled else TIMM_ARCH.get(float(cfg.ln_eps))
    if arch is None or (cfg.distilled and cfg.ln_eps != 1e-6):
        raise TinyViTError(f"{source}: timm's architectures build LayerNorm with eps 1e-6 (or 1e-5 as CLIP's), not "
                           f"{cfg.ln_eps:g}: export this model as one .safetensors file (--out X.safetensors)")
    return arch


def origin_metadata(meta):
    """{'tinyvit_origin': JSON} where the weights came from a Hub repository (repository, revision, commit,
    each file's sha256: tinyvit.io.hub), else {}; exports keep it in their files' metadata."""
    origin = meta.get("origin") or meta.get("source_origin")
    return {"tinyvit_origin": json.dumps(origin)} if isinstance(origin, dict) else {}


def timm_metadata(cfg: ViTConfig, names, mean, std, source="model", transform=None):
    """safetensors __metadata__ (str -> str): the VisionTransformer kwargs that rebuild the model, and
    tinyvit's class names, mean/std, config and eval transform (JSON)."""
    return {
        "format": "pt", "architecture": "vit", "library": "timm",
        "model_class": "VisionTransformerDistilled" if cfg.distilled else "VisionTransformer",
        "img_size": str(cfg.img_size), "patch_size": str(cfg.patch_size), "in_chans": str(cfg.in_chans),
        "num_classes": str(cfg.num_classes), "embed_dim": str(cfg.dim), "depth": str(cfg.depth),
        "num_heads": str(cfg.heads), "mlp_ratio": repr(mlp_ratio(cfg, source)), "mlp_hidden_dim": str(cfg.mlp_dim),
        "qkv_bias": json.dumps(cfg.qkv_bias), "class_token": json.dumps(cfg.class_token),
        "global_pool": cfg.global_pool, "fc_norm": json.dumps(cfg.use_fc_norm), "reg_tokens": str(cfg.reg_tokens),
        "no_embed_class": json.dumps(cfg.no_embed_class), "pre_norm": json.dumps(cfg.pre_norm),
        "init_values": json.dumps(cfg.init_values),
        "act_layer": TIMM_ACT[cfg.gelu], "norm_eps": repr(float(cfg.ln_eps)),
        "class_names": json.dumps(names), "mean": json.dumps(list(mean)), "std": json.dumps(list(std)),
        "tinyvit_config": json.dumps(cfg.to_dict()), "eval_transform": json.dumps(transform),
    }


def timm_hub_config(cfg: ViTConfig, names, t: EvalTransform, source="model"):
    """The config.json of timm's hub folder (as timm.models._hub.save_for_hf writes it): the architecture
    and model_args that timm.create_model('local-dir:DIR', pretrained=True) builds, the class names and
    the eval transform as pretrained_cfg."""
    arch = timm_architecture(cfg, source)
    model_args = timm_model_args(cfg, source)
    pretrained = {"input_size": [cfg.in_chans, cfg.img_size, cfg.img_size], "fixed_input_size": not cfg.dynamic_img_size,
                  "interpolation": t.interpolation, "crop_pct": t.crop_pct,
                  "crop_mode": "squash" if t.resize == "squash" else "center", "mean": list(t.mean),
                  "std": list(t.std), "num_classes": cfg.num_classes, "first_conv": "patch_embed.proj",
                  "classifier": ["head", "head_dist"] if cfg.distilled else "head"}
    return {"architecture": arch, "num_classes": cfg.num_classes, "num_features": cfg.dim,
            "global_pool": cfg.global_pool, "model_args": model_args, "pretrained_cfg": pretrained,
            "label_names": names}


def export_timm(out, params, cfg: ViTConfig, meta=None, source="model"):
    """Write a timm state dict as one .safetensors (atomically), or timm's hub folder (config.json and
    model.safetensors) when out is a folder or has no suffix -> summary dict."""
    out, meta = Path(out), meta or {}
    if out.is_dir() or not out.suffix:
        return export_timm_folder(out, params, cfg, meta, source)
    state = timm_state(params, cfg, source)
    timm_model_args(cfg, source)  # what timm's VisionTransformer cannot build is refused, as for the folder
    t = eval_transform(meta, cfg.in_chans, source)  # the one predict.py and evaluate.py use
    md = timm_metadata(cfg, class_names(meta, cfg.num_classes, source), t.mean, t.std, source, t.to_dict())
    md.update(origin_metadata(meta))
    if out.suffix.lower() != ".safetensors":  # torch.load and timm would take a .pt/.pth for a pickle
        raise TinyViTError(f"{out}: --to timm writes safetensors: give --out a .safetensors name "
                           f"(e.g. {out.with_suffix('.safetensors').name})")
    write_safetensors(out, state, md)
    return dict(target="timm", out=str(out), files=[str(out)], tensors=len(state),
                params=count_params(state), dtype=_dtype_name(state), config=cfg.to_dict())


def export_timm_folder(out, params, cfg: ViTConfig, meta, source="model"):
    """timm's hub folder: config.json (architecture, model_args, pretrained_cfg) and model.safetensors."""
    if out.exists() and not out.is_dir():
        raise TinyViTError(f"{out}: exists and is not a folder")
    state = timm_state(params, cfg, source)
    t = eval_transform(meta, cfg.in_chans, source)
    config = timm_hub_config(cfg, class_names(meta, cfg.num_classes, source), t, source)
    md = timm_metadata(cfg, config["label_names"], t.mean, t.std, source, t.to_dict())
    md.update(origin_metadata(meta))
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", state, md)
    _write_json(out / "config.json", config)
    return dict(target="timm", out=str(out), files=[str(out / "config.json"), str(out / "model.safetensors")],
                tensors=len(state), params=count_params(state), dtype=_dtype_name(state), config=cfg.to_dict())


# --- Hugging Face transformers ------------------------------------------------------------------


def hf_preprocessor(cfg: ViTConfig, t: EvalTransform):
    """preprocessor_config.json for the checkpoint's eval transform t: resize, x / 255, (x - mean) / std.
    shortest_edge: a ConvNextImageProcessor (crop_pct itself) below 384 px, where it warps instead, a
    BitImageProcessor (shorter side to int(S / crop_pct), centre S); squash: a ViTImageProcessor."""
    S = cfg.img_size
    if t.resize == "squash":
        resize = {"image_processor_type": "ViTImageProcessor", "size": {"height": S, "width": S}}
    elif S < CONVNEXT_SQUASH:
        resize = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": S}, "crop_pct": t.crop_pct}
    else:
        resize = {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": int(S / t.crop_pct)},
                  "do_center_crop": True, "crop_size": {"height": S, "width": S}}
    return {
        **resize, "do_resize": True, "resample": PIL_CODES[t.interpolation],
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [float(v) for v in t.mean], "image_std": [float(v) for v in t.std],
    }


def _write_json(path, obj):
    """Atomically write obj as indented JSON."""
    text = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(text))


def export_hf(out, params, cfg: ViTConfig, meta=None, source="model"):
    """Write an HF ViTForImageClassification folder (each file atomically) -> summary dict."""
    out, meta = Path(out), meta or {}
    if out.exists() and not out.is_dir():
        raise TinyViTError(f"{out}: exists and is not a folder; --to hf writes a folder (model.safetensors, "
                           f"config.json, preprocessor_config.json)")
    if cfg.in_chans != 3:  # transformers' image processors and pipeline() give the model RGB pixels
        raise TinyViTError(f"{source}: --to hf: transformers' pipeline() and image processors feed 3 channels (RGB); "
                           f"this model takes {cfg.in_chans}: --to onnx or --to timm writes it")
    names = class_names(meta, cfg.num_classes, source)
    state = hf_state(timm_state(params, cfg, source), cfg, source)
    prep = hf_preprocessor(cfg, eval_transform(meta, cfg.in_chans, source))
    config = hf_config(cfg, names, _dtype_name(state), source)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", state, {"format": "pt", **origin_metadata(meta)})  # transformers wants format=pt
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", prep)
    return dict(target="hf", out=str(out), files=[str(out / f) for f in HF_FILES], tensors=len(state),
                params=count_params(state), dtype=config["torch_dtype"], config=cfg.to_dict())


# --- ONNX -------------------------------------------------------------------------------------


def export_onnx(out, params, cfg: ViTConfig, meta=None, source="model"):
    """Write the model as one ONNX file (tinyvit.io.onnx_export) -> summary dict."""
    out, meta = Path(out), meta or {}
    if out.is_dir() or out.suffix.lower() != ".onnx":
        raise TinyViTError(f"{out}: --to onnx writes one .onnx file: give --out a name ending in .onnx")
    state = timm_state(params, cfg, source)
    t = eval_transform(meta, cfg.in_chans, source)
    names = class_names(meta, cfg.num_classes, source) or [str(i) for i in range(cfg.num_classes)]
    md = {"class_names": names, "eval_transform": t.to_dict(), "mean": list(t.mean), "std": list(t.std),
          "tinyvit_config": cfg.to_dict(), "input": "pixel_values (batch, C, S, S): the eval transform's pixels "
                                                    "(tinyvit.load_image with {'eval_transform': this eval_transform})"}
    model = onnx_model(state, cfg, dict(md, **origin_metadata(meta)))
    files = write_onnx(out, model, sum(v.size for v in state.values()) * 4)
    return dict(target="onnx", out=str(out), files=files, tensors=len(state), params=count_params(state),
                dtype="float32", config=cfg.to_dict())


# --- a checkpoint file --------------------------------------------------------------------------


def not_a_checkpoint(path):
    """None for a file that may be a tinyvit checkpoint; else one line saying what path is and what to run."""
    path = Path(path)
    npz = path.with_name(f"{path.stem if path.is_file() else path.name}-tinyvit.npz")
    convert = f"convert it first (python scripts/convert_weights.py {path} --out {npz}), then export {npz}"
    if path.is_dir():
        kind = folder_kind(path)
        if kind == "run":
            model = next(path / f for f in ("model.npz", "checkpoint.npz") if (path / f).is_file())
            return f"{path}: is a training run's folder: export its checkpoint, {model}"
        if kind in ("timm", "hf"):
            return f"{path}: is {'a timm' if kind == 'timm' else 'a Hugging Face'} hub folder, not a tinyvit " \
                   f"checkpoint: {convert}"
        return f"{path}: is a folder, not a tinyvit checkpoint (.npz)"
    if not path.is_file():
        return None  # the loader names a missing file
    kind = file_kind(path)
    keys = key_names(path, kind)
    if kind not in ("npz", "safetensors", "torch") or (kind != "torch" and not keys):
        return None  # not weights, or unreadable: the loader says which
    try:
        layout = f" (weights with {LAYOUTS[detect_format(dict.fromkeys(keys))]} names)"
    except TinyViTError:
        layout = "" if kind == "torch" else " (without tinyvit's metadata record)"
    return f"{path}: is {NAMES[kind]}{layout}, not a tinyvit checkpoint: {convert}"


def out_holds_files(out, to, overwrite=False):
    """Refuse an --out that holds files (an earlier export, a data folder) unless overwrite: one line."""
    out = Path(out)
    folder = to in ("hf", "peft") or (to == "timm" and (out.is_dir() or not out.suffix))
    if overwrite:
        return
    if out.is_file() and not folder:
        raise TinyViTError(f"{out}: exists; pass --overwrite to replace it, or give another --out")
    held = sorted(p.name for p in out.iterdir()) if folder and out.is_dir() else []
    if held:
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise TinyViTError(f"{out}: holds files ({', '.join(held[:3])}{more}); pass --overwrite to replace the "
                           f"export's files there, or give another --out")


def _drop_stale(summary, to):
    """After an export with --overwrite: remove another export's file that would contradict this one
    (an HF folder's preprocessor_config.json beside timm's config.json; a large model's .onnx.data)."""
    out = Path(summary["out"])
    stale = out / "preprocessor_config.json" if to == "timm" and out.is_dir() else \
        out.parent / (out.name + ".data") if to == "onnx" else None
    if stale is not None and stale.is_file() and str(stale) not in summary["files"]:
        stale.unlink()


def export(checkpoint, to, out, overwrite=False):
    """Export a tinyvit checkpoint to `to` ('timm' | 'hf' | 'onnx' | 'peft': its adapters) at out -> summary dict. An out holding
    files needs overwrite (the export's files replaced, another export's left-overs removed)."""
    if to not in TARGETS:
        raise TinyViTError(f"unknown export target {to!r}: choose one of {', '.join(TARGETS)}")
    checkpoint, out = Path(checkpoint), Path(out)
    if out.is_file() and checkpoint.is_file() and os.path.samefile(out, checkpoint):
        raise TinyViTError(f"{out}: is the checkpoint being exported; choose another --out")
    wrong = not_a_checkpoint(checkpoint)
    if wrong:
        raise TinyViTError(wrong)
    out_holds_files(out, to, overwrite)
    params, cfg, meta = load_checkpoint(checkpoint)
    if to != "peft":  # a checkpoint with adapters exports as the merged model: W + s B A (DoRA's magnitude applied)
        params, cfg = merged_model(params, cfg)
    write = {"timm": export_timm, "hf": export_hf, "onnx": export_onnx, "peft": export_peft}[to]
    summary = write(out, params, cfg, meta, source=checkpoint)
    _drop_stale(summary, to)
    summary["checkpoint"] = str(checkpoint)
    return summary
