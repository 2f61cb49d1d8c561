"""PEFT's LoRA/DoRA adapter folders (adapter_config.json, adapter_model.safetensors), written for the HF
class --to hf writes and read back from HF's names (transformers 5's and 4's) or timm's.

Written: keys `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector` for
the modules of the HF class as the installed transformers names them (transformers 5: vit.layers.{i}.
attention.q_proj, ..., o_proj, mlp.fc1, mlp.fc2; dinov2.encoder.layer.{i}...; 4: vit.encoder.layer.{i}.
attention.attention.query, ...), tinyvit's fused qkv adapter as q_proj, k_proj and v_proj sharing A (the
same product B A, row by row), and the head as modules_to_save (trained in full).
"""
import dataclasses
import json
import math
import re
from importlib import metadata
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..errors import TinyViTError
from ..nn.config import ViTConfig, param_shapes
from ..nn.lora import A, B, LoraConfig, M, adapter_name, base_weight
from .files import atomic_write
from .hf_export import KINDS, hf_kind, hf_state
from .safetensors import read_safetensors, write_safetensors
from .untrusted import read_json

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_V5 = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "proj": "attention.o_proj",
       "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_V4 = {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
       "proj": "attention.output.dense", "fc1": "intermediate.dense", "fc2": "output.dense"}
_V4_DINO = dict(_V4, fc1="mlp.fc1", fc2="mlp.fc2")
_TIMM = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_KEY = re.compile(r"(?:(?:vit|deit|dinov2|dinov2_with_registers)\.)?(?:encoder\.layer|layers|blocks)\.(\d+)\."
                  r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")


def transformers_major():
    """The installed transformers' major version (5 when it is not installed: what it installs today)."""
    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 5


def _block_prefix(kind, i, major):
    """An HF class's block i, as transformers `major` names it."""
    pre = KINDS[kind][1]
    return f"{pre}layers.{i}." if major >= 5 and kind in ("vit", "deit") else f"{pre}encoder.layer.{i}."


def peft_tensors(params, cfg: ViTConfig, source="model", major=None):
    """{PEFT key: array} of cfg's adapters and head for the HF class, and the target module names."""
    kind, major = hf_kind(cfg, source), major or transformers_major()
    names = _V5 if major >= 5 else (_V4_DINO if kind.startswith("dinov2") else _V4)
    out, targets = {}, set()
    for i in range(cfg.depth):
        for t in cfg.lora.targets:
            name = adapter_name(i, t)
            a, b, m = params[f"{name}.{A}"], params[f"{name}.{B}"], params.get(f"{name}.{M}")
            parts = [(s, b[j * cfg.dim:(j + 1) * cfg.dim], None if m is None else m[j * cfg.dim:(j + 1) * cfg.dim])
                     for j, s in enumerate("qkv")] if t == "qkv" else [(t, b, m)]
            for s, bs, ms in parts:
                key = PREFIX + _block_prefix(kind, i, major) + names[s]
                out[f"{key}.{A}"], out[f"{key}.{B}"] = a, bs
                if ms is not None:
                    out[f"{key}.{M}"] = ms
                targets.add(names[s])
    plain = {k: v for k, v in params.items() if ".lora_" not in k}
    heads = {k: v for k, v in hf_state(plain, dataclasses.replace(cfg, lora=None), source).items()
             if k.startswith(("classifier.", "cls_classifier.", "distillation_classifier."))}
    out.update({PREFIX + k: v for k, v in heads.items()})
    return {k: np.ascontiguousarray(to_numpy(v)) for k, v in out.items()}, targets, sorted({k.split(".")[0] for k in heads})


def export_peft(out, params, cfg: ViTConfig, meta=None, source="model"):
    """Write PEFT's adapter folder of a checkpoint with adapters -> summary dict."""
    out, meta = Path(out), meta or {}
    if cfg.lora is None:
        raise TinyViTError(f"{source}: holds no LoRA/DoRA adapters: --to peft writes adapters (--to hf the model)")
    if out.exists() and not out.is_dir():
        raise TinyViTError(f"{out}: exists and is not a folder; --to peft writes a folder ({CONFIG}, {WEIGHTS})")
    major = transformers_major()
    tensors, targets, heads = peft_tensors(params, cfg, source, major)
    lo = cfg.lora
    alpha = lo.rank if lo.alpha is None else lo.alpha
    config = {"peft_type": "LORA", "task_type": None, "r": lo.rank,
              "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": lo.dropout,
              "target_modules": sorted(t.rsplit(".", 1)[-1] if major >= 5 else t for t in targets),
              "modules_to_save": heads, "use_dora": lo.dora, "use_rslora": lo.rslora, "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "base_model_name_or_path": meta["source"] if isinstance(meta.get("source"), str) else None,
              "auto_mapping": {"base_model_class": KINDS[hf_kind(cfg, source)][0]}}
    if major < 5:  # transformers 4's names repeat 'dense' across modules: a pattern picks the right ones
        config["target_modules"] = r".*\.(" + "|".join(re.escape(t) for t in sorted(targets)) + ")"
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS, tensors, {"format": "pt"})
    text = (json.dumps(config, indent=2) + "\n").encode()
    atomic_write(out / CONFIG, lambda f: f.write(text))
    return dict(target="peft", out=str(out), files=[str(out / CONFIG), str(out / WEIGHTS)], tensors=len(tensors),
                params=int(sum(v.size for v in tensors.values())), dtype=str(next(iter(tensors.values())).dtype),
                config=cfg.to_dict())


# --- reading an adapter folder -----------------------------------------------------------------------


def _field(c, k, ok, want, path, default):
    """c[k] checked (default when absent), else one line naming the file and the field."""
    v = c.get(k, default)
    if not ok(v):
        raise TinyViTError(f"{path}: {k} = {json.dumps(v)[:40]} is not {want}")
    return v


def _num(v):
    return type(v) in (int, float) and math.isfinite(v)


def _names(v):
    return v is None or (isinstance(v, list) and len(v) <= 64 and all(isinstance(s, str) for s in v))


def read_adapter_config(path) -> dict:
    """adapter_config.json's values that shape the adapters, each checked (untrusted input)."""
    c = read_json(path)
    if not c:
        raise TinyViTError(f"{path}: missing or empty; a PEFT adapter folder holds {CONFIG} and {WEIGHTS}")
    _field(c, "peft_type", lambda v: v == "LORA", "LORA (tinyvit reads LoRA and DoRA adapters)", path, None)
    d = dict(r=_field(c, "r", lambda v: type(v) is int and 1 <= v <= 65536, "a whole number from 1 to 65536", path, 8))
    d["lora_alpha"] = _field(c, "lora_alpha", lambda v: _num(v) and 0 < v <= 1e6, "a number above 0, at most 1e6",
                             path, 8)
    d["lora_dropout"] = _field(c, "lora_dropout", lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)", path, 0.0)
    for k in ("use_dora", "use_rslora"):
        d[k] = bool(_field(c, k, lambda v: v is None or type(v) is bool, "true, false or null", path, False))
    for k in ("rank_pattern", "alpha_pattern"):
        _field(c, k, lambda v: not v, "empty (tinyvit's adapters share one rank and alpha)", path, {})
    _field(c, "bias", lambda v: v in (None, "none"), "none (tinyvit's adapters train no biases)", path, "none")
    _field(c, "fan_in_fan_out", lambda v: not v, "false", path, False)
    _field(c, "layers_to_transform", lambda v: v is None, "null (adapters on every block)", path, None)
    d["modules_to_save"] = _field(c, "modules_to_save", _names, "null or a list of names", path, None) or []
    _field(c, "target_modules", lambda v: isinstance(v, str) or _names(v), "a name pattern or a list of names", path, None)
    return d


def _target(module, path):
    """tinyvit's target for a module name in a block (HF's, either version, or timm's)."""
    for names in (_V5, _V4, _V4_DINO, _TIMM):
        for t, n in names.items():
            if module == n:
                return t
    raise TinyViTError(f"{path}: adapter on {module!r}, not a linear tinyvit adapts ({', '.join(sorted(_V5.values()))}, "
                       f"or timm's {', '.join(_TIMM.values())})")


_HEADS = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist", "head": "head",
          "head_dist": "head_dist"}


def _head_tensor(name, v, params, cfg, path):
    """A saved head's tensor (modules_to_save) as tinyvit's; HF's Dinov2 head over [class token, patch mean]
    becomes the class token's alone when cfg pools that token (its other half zero)."""
    if name == "head.weight" and cfg.global_pool == "token" and v.ndim == 2 and v.shape[1] == 2 * cfg.dim:
        if v[:, cfg.dim:].any():
            raise TinyViTError(f"{path}: its classifier reads the patch mean beside the class token, which "
                               f"this base's head does not")
        v = v[:, :cfg.dim]
    want = params[name].shape  # the class count may differ (the adapter's head replaces the base's), the width not
    if v.ndim != len(want) or (v.ndim == 2 and v.shape[1] != want[1]):
        raise TinyViTError(f"{path}: {name} has shape {tuple(v.shape)}, the base's is {tuple(want)}")
    return v


def _split(tensors, depth, path):
    """{(block, target): {part: array}} and {head name: array} from an adapter file's keys."""
    adapters, heads = {}, {}
    for k, v in tensors.items():
        k0 = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if v.dtype.kind != "f" or not np.isfinite(v).all():
            raise TinyViTError(f"{path}: {k} is not finite floating-point values")
        hit = _KEY.fullmatch(k0)
        if hit:
            i = int(hit.group(1))
            if i >= depth:
                raise TinyViTError(f"{path}: {k} is on block {i}; the base has {depth} blocks")
            adapters.setdefault((i, _target(hit.group(2), path)), {})[hit.group(3)] = v
            continue
        module, _, wb = k0.rpartition(".")
        module = module.split(".", 1)[1] if module.startswith(("vit.", "deit.", "dinov2")) else module
        if module not in _HEADS or wb not in ("weight", "bias"):
            raise TinyViTError(f"{path}: {k} is neither a LoRA/DoRA tensor nor a head tinyvit has")
        heads[f"{_HEADS[module]}.{wb}"] = v
    return adapters, heads


def apply_adapter(folder, params, cfg: ViTConfig):
    """A PEFT adapter folder (HF's names, either transformers version, or timm's; LoRA or DoRA) on a base
    model -> (params with the adapters and any saved head, cfg with its lora, notes)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TinyViTError(f"{folder}: not a folder; --adapter takes PEFT's adapter folder ({CONFIG}, {WEIGHTS})")
    c = read_adapter_config(folder / CONFIG)
    path = folder / WEIGHTS
    if not path.is_file():
        other = " (adapter_model.bin is a torch pickle, which tinyvit does not run: save with safe_serialization)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise TinyViTError(f"{path}: missing{other}")
    if cfg.lora is not None:
        raise TinyViTError(f"{folder}: the base already holds adapters; merge them first (convert_weights.py)")
    adapters, heads = _split(read_safetensors(path)[0], cfg.depth, path)
    if not adapters:
        raise TinyViTError(f"{path}: holds no LoRA/DoRA tensors")
    targets = tuple(t for t in ("qkv", "q", "k", "v", "proj", "fc1", "fc2") if any(t == k[1] for k in adapters))
    try:
        lora = LoraConfig(rank=c["r"], alpha=c["lora_alpha"], dropout=c["lora_dropout"], targets=targets,
                          rslora=c["use_rslora"], dora=c["use_dora"])
    except TinyViTError as e:
        raise TinyViTError(f"{folder / CONFIG}: {e}") from None
    out, notes, dtype = dict(params), [], params["pos_embed"].dtype
    for k, v in heads.items():
        out[k] = _head_tensor(k, v, params, cfg, path).astype(dtype)
    K = out["head.weight"].shape[0]
    if "head.bias" in out and out["head.bias"].shape != (K,):
        raise TinyViTError(f"{path}: head.bias has {out['head.bias'].shape[0]} classes, head.weight {K}")
    if K != cfg.num_classes:
        notes.append(f"head replaced by the adapter's {K}-class one (modules_to_save)")
    new = dataclasses.replace(cfg, num_classes=K, lora=lora)
    shapes = param_shapes(new)
    missing = 0
    for i in range(cfg.depth):
        for t in targets:
            parts, name = adapters.get((i, t), {}), adapter_name(i, t)
            if not parts:
                missing += 1
            for part, key in ((A, "lora_A.weight"), (B, "lora_B.weight"), (M, "lora_magnitude_vector")):
                full = f"{name}.{part}"
                if full not in shapes:
                    if key in parts:
                        raise TinyViTError(f"{path}: {key} on block {i}'s {t}, but {CONFIG} says use_dora false")
                    continue
                v = parts.get(key)
                if v is None and parts:
                    raise TinyViTError(f"{path}: block {i}'s {t} adapter lacks {key}")
                if v is None:  # a block the adapter left alone: B = 0 (and m = ||W||) is no change, exactly
                    w = base_weight(out, name)
                    v = np.sqrt((w * w).sum(axis=1)) if part == M else np.zeros(shapes[full])
                if tuple(v.shape) != shapes[full]:
                    raise TinyViTError(f"{path}: block {i}'s {t} {key} has shape {tuple(v.shape)}, expected "
                                       f"{shapes[full]} (r = {lora.rank})")
                out[full] = np.asarray(v, dtype)
    if missing:
        notes.append(f"{missing} block linears the adapter leaves alone get a zero adapter (no change)")
    return out, new, notes
