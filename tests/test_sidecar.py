"""What comes with public weights (tinyvit.io.sidecar): a timm hub config.json, HF's preprocessor_config.json,
tinyvit's own export metadata, read through convert() and scripts/convert_weights.py; bad values ignored."""
import json

import numpy as np
import pytest
from helpers import run_script

from tinyvit import TinyViTError, ViTConfig, init_params
from tinyvit.io.checkpoint import load_checkpoint
from tinyvit.io.convert import convert
from tinyvit.io.safetensors import write_safetensors

save_file = pytest.importorskip("safetensors.numpy").save_file  # timm's and HF's writer (transformers needs it)
CFG = ViTConfig(img_size=32, patch_size=16, in_chans=3, num_classes=3, dim=64, depth=1, heads=1, mlp_dim=64)
NAMES = ["tabby", "tiger", "lynx"]
TIMM_CONFIG = {  # as timm's push_to_hf_hub writes it (timm/models/_hub.py save_config)
    "architecture": "vit_tiny_patch16_224", "num_classes": 3, "num_features": 64, "global_pool": "token",
    "label_names": NAMES, "model_args": {"img_size": 32, "embed_dim": 64, "depth": 1, "num_heads": 1, "mlp_ratio": 1.0},
    "pretrained_cfg": {"tag": "augreg_in21k_ft_in1k", "input_size": [3, 32, 32], "interpolation": "bilinear",
                       "crop_pct": 0.95, "crop_mode": "center", "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3],
                       "num_classes": 3, "first_conv": "patch_embed.proj", "classifier": "head"},
}


def _timm_folder(tmp_path, config=None, preprocessor=None, hf=False):
    """model.safetensors (the safetensors package's writer) with config.json / preprocessor_config.json beside it."""
    params = init_params(CFG, seed=1)
    if hf:  # HF names: the converter's inverse lives in tinyvit.io.export
        from tinyvit.io.export import hf_state

        params = hf_state(params, CFG)  # timm-named params in, HF names out
    save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(tmp_path / "model.safetensors"),
              {"format": "pt"})
    for name, d in (("config.json", config), ("preprocessor_config.json", preprocessor)):
        if d is not None:
            (tmp_path / name).write_text(d if isinstance(d, str) else json.dumps(d))
    return tmp_path / "model.safetensors"


@pytest.mark.e2e
def test_timm_config_sets_names_mean_std_and_transform(tmp_path):
    src = _timm_folder(tmp_path, TIMM_CONFIG)
    _, cfg, meta = convert(src)
    assert meta["format"] == "timm" and cfg == CFG
    assert meta["class_names"] == NAMES and (meta["mean"], meta["std"]) == ([0.4, 0.45, 0.5], [0.2, 0.25, 0.3])
    assert meta["eval_transform"] == {"resize": "shortest_edge", "crop_pct": 0.95, "interpolation": "bilinear",
                                      "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]}
    r = run_script("convert_weights.py", src, "--out", tmp_path / "m.npz", "--img-size", "64", timeout=120)
    assert r.returncode == 0, r.stderr
    _, cfg2, meta2 = load_checkpoint(tmp_path / "m.npz")
    assert cfg2.img_size == 64 and meta2["eval_transform"] == meta["eval_transform"] and meta2["class_names"] == NAMES


def test_timm_config_defaults_and_label_dict(tmp_path):
    """timm's defaults for what pretrained_cfg leaves out (centre crop 0.875, bicubic); names as {id: name}."""
    conf = {"architecture": "vit_x", "label_names": {"0": "a", "1": "b", "2": "c"},
            "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    _, _, meta = convert(_timm_folder(tmp_path, conf))
    assert meta["class_names"] == ["a", "b", "c"]
    assert meta["eval_transform"] == {"resize": "shortest_edge", "crop_pct": 0.875, "interpolation": "bicubic",
                                      "mean": [0.5] * 3, "std": [0.5] * 3}
    _, _, meta = convert(_timm_folder(tmp_path, {"architecture": "vit_x"}))  # no pretrained_cfg: nothing stated
    assert "eval_transform" not in meta and meta["class_names"] == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("pcfg,note", [
    ({"crop_mode": "squash", "crop_pct": 1.0}, None),
    ({"crop_mode": "squash", "crop_pct": 0.9}, "crop_mode 'squash'"),  # squash then crop: no tinyvit resize
    ({"crop_mode": "border"}, "crop_mode 'border'"),
    ({"interpolation": "lanczos"}, "'lanczos'"),
])
def test_timm_config_transforms_tinyvit_lacks_are_noted(tmp_path, pcfg, note):
    _, _, meta = convert(_timm_folder(tmp_path, {"architecture": "vit_x", "pretrained_cfg": pcfg}))
    if note is None:
        assert meta["eval_transform"]["resize"] == "squash" and meta["eval_transform"]["crop_pct"] == 1.0
    else:
        assert "eval_transform" not in meta and any(note in n and "default" in n for n in meta["notes"]), meta["notes"]


@pytest.mark.parametrize("prep,want", [
    ({"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}, "resample": 3},
     {"resize": "squash", "crop_pct": 1.0, "interpolation": "bicubic"}),
    ({"image_processor_type": "ViTImageProcessor"}, {"resize": "squash", "crop_pct": 1.0, "interpolation": "bilinear"}),
    ({"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}, "crop_pct": 0.9, "resample": 2},
     {"resize": "shortest_edge", "crop_pct": 0.9, "interpolation": "bilinear"}),
    ({"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 384}, "crop_pct": 0.9},
     {"resize": "squash", "crop_pct": 1.0, "interpolation": "bicubic"}),  # HF warps from 384 px on
    ({"image_processor_type": "ViTImageProcessor", "do_resize": False}, None),
    ({"image_processor_type": "BeitImageProcessor"}, None),
])
def test_hf_preprocessor_transform(tmp_path, prep, want):
    conf = {"model_type": "vit", "id2label": {str(i): n for i, n in enumerate(NAMES)}}
    prep = {**prep, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1]}
    _, _, meta = convert(_timm_folder(tmp_path, conf, prep, hf=True))
    assert meta["format"] == "hf" and meta["class_names"] == NAMES and meta["mean"] == [0.1, 0.2, 0.3]
    assert meta.get("eval_transform") == (want and dict(want, mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1]))


BAD_TIMM = [  # each value of the wrong type or out of range, or no JSON object at all
    {"architecture": "vit_x", "label_names": 7, "pretrained_cfg": {"mean": "abc", "std": [0, 0, 0], "crop_pct": "0.9",
                                                                   "interpolation": 5, "crop_mode": ["center"]}},
    {"architecture": "vit_x", "label_names": ["a"], "pretrained_cfg": {"mean": [1e999, 0, 0], "crop_pct": 2.0}},
    {"architecture": "vit_x", "pretrained_cfg": [1, 2]},
    {"architecture": "vit_x", "pretrained_cfg": {"crop_pct": True, "interpolation": {"a": 1}}},
]  # a file that is no JSON object, and values that shape the model: one line each (tests/test_untrusted.py)


@pytest.mark.parametrize("conf", BAD_TIMM)
def test_untrusted_timm_config_values_are_ignored(tmp_path, conf):
    _, _, meta = convert(_timm_folder(tmp_path, conf))
    assert meta["class_names"] == ["class_0", "class_1", "class_2"] and meta["mean"] == meta["std"] == [0.5] * 3
    assert "eval_transform" not in meta


@pytest.mark.parametrize("prep", [
    {"image_processor_type": "ViTImageProcessor", "resample": [3], "image_mean": "x", "image_std": None},
    {"image_processor_type": ["ViTImageProcessor"], "size": 7},
    {"image_processor_type": "ConvNextImageProcessor", "size": [224], "crop_pct": -1, "resample": "bicubic"},
    {"image_processor_type": 3, "image_mean": [0.1, 0.2], "image_std": [0.1, 0.2]},  # 2 values for 3 channels
])
def test_untrusted_hf_preprocessor_values_are_ignored(tmp_path, prep):
    conf = {"model_type": "vit", "id2label": [1]}  # (a bad num_attention_heads is one line: tests/test_untrusted.py)
    _, cfg, meta = convert(_timm_folder(tmp_path, conf, prep, hf=True))
    assert cfg.heads == 1 and cfg.ln_eps == 1e-12 and meta["mean"] == [0.5] * 3
    assert "eval_transform" not in meta


def test_untrusted_tinyvit_metadata_is_ignored(tmp_path):
    params = init_params(CFG, seed=1)
    md = {"format": "pt", "tinyvit_config": "{bad json", "class_names": "[1, 2", "mean": "[0.1]", "std": "7",
          "eval_transform": json.dumps({"resize": "zoom", "crop_pct": 0.9, "interpolation": "bicubic"})}
    write_safetensors(tmp_path / "m.safetensors", params, md)
    _, cfg, meta = convert(tmp_path / "m.safetensors")
    assert cfg == CFG and meta["mean"] == [0.5] * 3 and "eval_transform" not in meta
    assert any("'zoom'" in n for n in meta["notes"])
    write_safetensors(tmp_path / "m.safetensors", params, dict(md, tinyvit_config=json.dumps({"heads": 3})))
    with pytest.raises(TinyViTError, match=r"m\.safetensors.*: dim 64 is not divisible by heads 3$"):  # one line
        convert(tmp_path / "m.safetensors")
