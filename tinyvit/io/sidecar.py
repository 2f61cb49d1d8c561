"""What comes with public weights besides the tensors: class names, mean/std and the eval transform
(and architecture hints), from tinyvit's own timm export (the .safetensors __metadata__), a timm hub
config.json, or HF's config.json / preprocessor_config.json beside the weights file.

All of it is untrusted: a value of the wrong type is ignored (the defaults apply), never a traceback.
The eval transform record, checkpoint meta "eval_transform" (mean/std added by the reader):
{"resize": "shortest_edge" | "squash", "crop_pct": (0, 1], "interpolation": "bicubic" | "bilinear",
"mean": [...], "std": [...], and "invert": "auto" where gray levels are inverted as MNIST models do}.
shortest_edge: the shorter side resized to int(img_size / crop_pct), then a centre crop of img_size
(timm's eval; HF's ConvNext and Bit image processors); squash: the whole image resized to img_size x
img_size (HF's ViTImageProcessor; crop_pct 1).
"""
import json
import math
from pathlib import Path

from ..data.transform import INTERPOLATIONS, INVERTS, RESIZES
from ..errors import TinyViTError
from .untrusted import check_hf_config, check_timm_config, read_json

PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling codes, as HF stores `resample`
HF_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_python_tanh")  # HF's tanh-GELU names
CONVNEXT_SQUASH = 384  # ConvNextImageProcessor warps instead of cropping from this size on


def _json(text):
    """Parsed JSON, or None when it is not valid JSON text."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None


def _json_file(path):
    """A JSON object from a file, or {} when absent; a broken one is one line (tinyvit.io.untrusted)."""
    return read_json(path)


def _number(v):
    """v as a finite positive float, else None."""
    return float(v) if type(v) in (int, float) and math.isfinite(v) and v > 0 else None


def floats(v):
    """v as a non-empty list of finite floats, else None."""
    if isinstance(v, (list, tuple)) and v and all(type(x) in (int, float) and math.isfinite(x) for x in v):
        return [float(x) for x in v]
    return None


def transform(resize, crop_pct, interpolation):
    """The record's resize, crop_pct and interpolation when all are valid, else None."""
    crop = _number(crop_pct)
    if not isinstance(resize, str) or resize not in RESIZES or crop is None or crop > 1 \
            or not isinstance(interpolation, str) or interpolation not in INTERPOLATIONS:
        return None
    return {"resize": resize, "crop_pct": 1.0 if resize == "squash" else crop, "interpolation": interpolation}


def _stated(where, resize, crop_pct, interpolation):
    """{'transform': record} when valid, else a note that the default eval transform applies."""
    t = transform(resize, crop_pct, interpolation)
    if t:
        return {"transform": t}
    said = ", ".join(f"{k} {str(v)[:30]!r}" for k, v in
                     (("resize", resize), ("crop_pct", crop_pct), ("interpolation", interpolation)))
    return {"notes": [f"{where}: eval transform ({said}) is not one tinyvit applies; the default is used"]}


def _labels(v):
    """Class names as an id2label dict ({'0': name}) from a list or a dict, else None."""
    return {str(i): n for i, n in enumerate(v)} if isinstance(v, list) else v if isinstance(v, dict) else None


def hf_sidecar(path):
    """HF config.json / preprocessor_config.json beside the file, merged ({} for what is absent or unreadable)."""
    folder = Path(path).parent
    return {**_json_file(folder / "config.json"), **_json_file(folder / "preprocessor_config.json")}


def _bit_crop_pct(side):
    """A BitImageProcessor's shorter side R and centre crop S as the crop_pct c with int(S / c) == R."""
    edge, crop = (side.get(k) if isinstance(side.get(k), dict) else {} for k in ("size", "crop_size"))
    r, s = edge.get("shortest_edge"), crop.get("height")
    if type(r) is not int or type(s) is not int or not 0 < s <= r or crop.get("width") != s \
            or side.get("do_center_crop") is False:
        return None
    c = s / r
    while int(s / c) < r:  # s / r can round so that int(s / c) falls one short
        c = math.nextafter(c, 0.0)
    return c


def _hf_transform(side):
    """The resize of a ViTImageProcessor (squash), ConvNextImageProcessor (shortest_edge / crop_pct)
    or BitImageProcessor (shortest_edge, then a centre crop)."""
    kind = side.get("image_processor_type") or side.get("feature_extractor_type")
    kind = kind.removesuffix("Fast").removesuffix("Pil") if isinstance(kind, str) else None
    if side.get("do_resize") is False or kind not in ("ViTImageProcessor", "ViTFeatureExtractor", "BitImageProcessor",
                                                      "ConvNextImageProcessor", "ConvNextFeatureExtractor",
                                                      "CLIPImageProcessor", "SiglipImageProcessor"):
        return {}
    resample = side.get("resample", 2 if kind.startswith("ViT") else 3)
    interpolation = PIL_RESAMPLE.get(resample) if type(resample) is int else None
    edge = side.get("size", {}).get("shortest_edge") if isinstance(side.get("size"), dict) else None
    if kind == "SiglipImageProcessor":  # resized to size x size, no crop
        return _stated("preprocessor_config.json", "squash", 1.0, interpolation)
    if kind in ("BitImageProcessor", "CLIPImageProcessor"):  # the shorter side, then a centre crop
        return _stated("preprocessor_config.json", "shortest_edge", _bit_crop_pct(side), interpolation)
    if kind.startswith("ViT") or (type(edge) is int and edge >= CONVNEXT_SQUASH):
        return _stated("preprocessor_config.json", "squash", 1.0, interpolation)
    return _stated("preprocessor_config.json", "shortest_edge", side.get("crop_pct", 224 / 256), interpolation)


HF_TYPES = {"vit", "deit", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model", "siglip",
            "siglip_vision_model"}  # the model types whose vision tower tinyvit reads
HF_ACTS = {"gelu": "erf", "gelu_python": "erf", "quick_gelu": "quick", **{a: "tanh" for a in HF_TANH}}


def from_hf(src):
    """What HF's config.json and preprocessor_config.json beside src state (a whole CLIP or SigLIP model:
    its vision_config; for another model_type: nothing)."""
    side = hf_sidecar(src)
    if side.get("model_type", "vit") not in HF_TYPES:
        return {}
    c = check_hf_config(side, Path(src).parent / "config.json")  # the vision tower's part, its values checked
    act = c.get("hidden_act", "gelu")
    if act not in HF_ACTS:  # anything else would run as GELU with wrong logits
        raise TinyViTError(f"{src}: config.json's hidden_act {str(act)[:40]!r} is not an activation tinyvit has "
                           f"({', '.join(sorted(HF_ACTS))})")
    if c.get("use_swiglu_ffn"):
        raise TinyViTError(f"{src}: config.json's use_swiglu_ffn: this model needs SwiGLU, which tinyvit does not have")
    heads = c.get("num_attention_heads")
    return {"where": "config.json", "heads": heads if type(heads) is int and heads > 0 else None,
            "ln_eps": _number(c.get("layer_norm_eps")), "gelu": HF_ACTS[act],
            "labels": _labels(side.get("id2label")), "mean": floats(side.get("image_mean")),
            "std": floats(side.get("image_std")), **_hf_transform(side)}


def from_timm_config(src):
    """What a timm hub config.json beside src states: label_names and pretrained_cfg's mean, std,
    crop_pct, interpolation and crop_mode (timm's defaults for those left out). HF's has model_type."""
    c = _json_file(Path(src).parent / "config.json")
    if "model_type" in c or not ("architecture" in c or "pretrained_cfg" in c):
        return {}
    check_timm_config(c, Path(src).parent / "config.json")
    p = c["pretrained_cfg"] if isinstance(c.get("pretrained_cfg"), dict) else {}
    out = {"labels": _labels(c.get("label_names")), "mean": floats(p.get("mean")), "std": floats(p.get("std")),
           "arch": c["architecture"] if isinstance(c.get("architecture"), str) else None,
           "model_args": c["model_args"] if isinstance(c.get("model_args"), dict) else {}}
    if p:
        mode, crop = p.get("crop_mode", "center"), p.get("crop_pct", 0.875)
        resize = ("shortest_edge" if mode == "center" else "squash" if mode == "squash" and crop == 1
                  else f"crop_mode {mode!r}")  # squash then crop, or border: not a tinyvit resize
        out.update(_stated("config.json", resize, crop, p.get("interpolation", "bicubic")))
    return out


def from_tinyvit(md):
    """What tinyvit's timm export wrote into a safetensors __metadata__ ({} when it is not ours)."""
    if "tinyvit_config" not in md:
        return {}
    c, t = _json(md["tinyvit_config"]), _json(md.get("eval_transform"))
    c = c if isinstance(c, dict) else {}
    out = {"where": "the file's metadata", "labels": _labels(_json(md.get("class_names"))),
           "mean": floats(_json(md.get("mean"))), "std": floats(_json(md.get("std"))),
           "heads": c["heads"] if type(c.get("heads")) is int and c["heads"] > 0 else None,
           "ln_eps": _number(c.get("ln_eps")), "gelu": c.get("gelu") if c.get("gelu") in ("erf", "tanh", "quick") else None,
           "config_fields": {k: c[k] for k, ok in (("global_pool", str), ("fc_norm", (bool, type(None))),
                                                   ("no_embed_class", bool), ("dynamic_img_size", bool),
                                                   ("init_values", (float, type(None)))) if k in c and isinstance(c[k], ok)}}
    if isinstance(t, dict):
        out.update(_stated("the file's __metadata__", t.get("resize"), t.get("crop_pct"), t.get("interpolation")))
        if "transform" in out and t.get("invert") in INVERTS[1:]:  # MNIST's auto inversion comes along
            out["transform"]["invert"] = t["invert"]
    return out


def stated(src, fmt, file_metadata):
    """What src's own metadata, else the files beside it, state about using it: any of heads, where
    (whose heads), ln_eps, gelu, labels (id2label), mean, std, transform, notes."""
    if "tinyvit_config" in file_metadata:
        return from_tinyvit(file_metadata)
    return from_hf(src) if fmt == "hf" else from_timm_config(src) if fmt == "timm" else {}
