"""What a repository's config files say is untrusted input: config.json and preprocessor_config.json read
only as JSON objects, and each value that shapes the model (sizes, head count, eps, activation, timm's
model_args) checked for type and range before use, its sizes bounded before anything is allocated from
them. A broken file or a bad value is one TinyViTError naming the file and the field."""
import json
import math
from pathlib import Path

from ..errors import TinyViTError

MAX_SIDE = 4096  # pixels: an img_size beyond it asks for a position embedding of (4096 / P)^2 rows and more
MAX_WIDTH, MAX_DEPTH, MAX_HEADS, MAX_TOKENS, MAX_CLASSES = 65536, 1024, 1024, 1024, 1_000_000


def read_json(path):
    """The JSON object in a config file; {} when the file does not exist; anything else is one line."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise TinyViTError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TinyViTError(f"{path}: is not JSON ({type(e).__name__}: {' '.join(str(e).split())[:80]}): "
                           f"fix or remove it (it states how the weights are used)") from None
    if not isinstance(d, dict):
        raise TinyViTError(f"{path}: holds a JSON {type(d).__name__}, not the object of settings a config file has")
    return d


def _whole(lo, hi):
    return lambda v: type(v) is int and lo <= v <= hi, f"a whole number from {lo} to {hi}"


def _number(lo, hi):
    return lambda v: type(v) in (int, float) and math.isfinite(v) and lo < v <= hi, f"a number above {lo}, at most {hi}"


def _side(v):
    """An image or patch side: an int, or timm's (h, w) of two equal ints."""
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1]:
        v = v[0]
    return type(v) is int and 1 <= v <= MAX_SIDE


_OPTIONAL_BOOL = (lambda v: v is None or type(v) is bool, "true, false or null")
_SIDE = (_side, f"a whole number from 1 to {MAX_SIDE} (or two equal ones)")
HF_FIELDS = {  # HF config.json (or a whole model's vision_config): the values a conversion reads
    "num_attention_heads": _whole(1, MAX_HEADS), "hidden_size": _whole(1, MAX_WIDTH),
    "num_hidden_layers": _whole(1, MAX_DEPTH), "intermediate_size": _whole(1, 4 * MAX_WIDTH),
    "image_size": _SIDE, "patch_size": _SIDE, "num_channels": _whole(1, 64),
    "num_register_tokens": _whole(0, MAX_TOKENS), "layer_norm_eps": _number(0, 0.1),
    "hidden_act": (lambda v: isinstance(v, str), "an activation's name"),
}
TIMM_ARGS = {  # timm's model_args: what timm.create_model would build from them
    "img_size": _SIDE, "patch_size": _SIDE, "in_chans": _whole(1, 64), "num_classes": _whole(0, MAX_CLASSES),
    "embed_dim": _whole(1, MAX_WIDTH), "depth": _whole(1, MAX_DEPTH), "num_heads": _whole(1, MAX_HEADS),
    "mlp_ratio": _number(0, 64), "reg_tokens": _whole(0, MAX_TOKENS), "global_pool": (
        lambda v: v in ("", "token", "avg", "map", "avgmax", "max"), "one of '', token, avg, map, avgmax, max"),
    "init_values": (lambda v: v is None or (type(v) in (int, float) and math.isfinite(v)), "a number or null"),
    "fc_norm": _OPTIONAL_BOOL, "class_token": _OPTIONAL_BOOL, "no_embed_class": _OPTIONAL_BOOL,
    "pre_norm": _OPTIONAL_BOOL, "qkv_bias": _OPTIONAL_BOOL, "act_layer": (lambda v: isinstance(v, str), "a name"),
    "dynamic_img_size": (lambda v: type(v) is bool, "true or false"),
}


def _check(d, fields, path, where):
    for k, (ok, want) in fields.items():
        if k in d and not ok(d[k]):
            raise TinyViTError(f"{path}: {where}{k} = {json.dumps(d[k])[:40]} is not {want}")


def check_hf_config(side, path):
    """HF config.json's values that shape the model (a whole CLIP or SigLIP model's: its vision_config's)
    -> the part that describes the vision tower, checked."""
    if "vision_config" in side and not isinstance(side["vision_config"], dict):
        raise TinyViTError(f"{path}: vision_config = {json.dumps(side['vision_config'])[:40]} is not an object")
    nested = isinstance(side.get("vision_config"), dict)
    c = side["vision_config"] if nested else side
    _check(c, HF_FIELDS, path, "vision_config's " if nested else "")
    return c


def check_timm_config(c, path):
    """timm's hub config.json: architecture a name, model_args an object of sane values -> c, checked."""
    if "architecture" in c and not isinstance(c["architecture"], str):
        raise TinyViTError(f"{path}: architecture = {json.dumps(c['architecture'])[:40]} is not a name")
    if "model_args" in c:
        if not isinstance(c["model_args"], dict):
            raise TinyViTError(f"{path}: model_args = {json.dumps(c['model_args'])[:40]} is not an object")
        _check(c["model_args"], TIMM_ARGS, path, "model_args ")
    return c
