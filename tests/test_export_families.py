"""Export of the modern family to timm's hub folder: timm.create_model('local-dir:DIR', pretrained=True)
builds it with tinyvit's logits, and the folder converts back to the same params and config."""
import dataclasses
import functools
import json
import re

import numpy as np
import pytest
import torch
from helpers import SCRIPTS, rel_err, run_script
from timm_oracle import FAMILIES, params_of, timm, timm_model

from tinyvit import TinyViTError, init_params, vit_forward
from tinyvit.io.checkpoint import save_checkpoint
from tinyvit.io.convert import convert
from tinyvit.io.export import export
from tinyvit.io.safetensors import read_safetensors

NAMES = ["a", "b", "c", "d", "e"]


def _checkpoint(tmp_path, family, dtype=np.float32):
    cfg = FAMILIES[family]
    params = params_of(timm_model(cfg, seed=3), dtype)
    meta = dict(class_names=NAMES, mean=[0.5] * cfg.in_chans, std=[0.25] * cfg.in_chans)
    return save_checkpoint(tmp_path / "m.npz", params, cfg, meta), params, cfg


@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_loads_the_hub_folder_with_our_logits(tmp_path, family):
    ckpt, params, cfg = _checkpoint(tmp_path, family)
    export(ckpt, "timm", tmp_path / "hub")
    model = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = np.random.default_rng(0).normal(size=(2, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.tensor(x)).numpy()
    assert rel_err(got, vit_forward(params, x, cfg, keep_cache=False)[0]) < 1e-5
    assert list(model.pretrained_cfg["mean"]) == [0.5] * cfg.in_chans
    back, cfg_back, meta = convert(tmp_path / "hub")
    assert dataclasses.replace(cfg_back, init_values=cfg.init_values) == cfg and meta["class_names"] == NAMES
    assert all(np.array_equal(back[k], params[k]) for k in params)


@pytest.mark.e2e
def test_cli_exports_a_folder_and_refuses_what_timm_cannot_build(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path, "dinov2_reg")
    r = run_script(SCRIPTS / "export_weights.py", str(ckpt), "--to", "timm", "--out", str(tmp_path / "hub"))
    assert r.returncode == 0 and (tmp_path / "hub" / "config.json").is_file(), r.stderr
    cfg = dataclasses.replace(FAMILIES["dinov2"], ln_eps=1e-12)
    save_checkpoint(tmp_path / "e.npz", params_of(timm_model(FAMILIES["dinov2"]), np.float32), cfg, {})
    r = run_script(SCRIPTS / "export_weights.py", str(tmp_path / "e.npz"), "--to", "timm", "--out", str(tmp_path / "h2"))
    assert r.returncode == 2 and "eps 1e-6" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "h2").exists()


def test_class_and_mean_head_is_refused_for_timm(tmp_path):
    cfg = dataclasses.replace(FAMILIES["dinov2"], global_pool="token_avg")
    save_checkpoint(tmp_path / "m.npz", init_params(cfg), cfg, {})
    for out in ("hub", "v.safetensors"):  # the folder and the one file alike
        with pytest.raises(TinyViTError, match="Dinov2ForImageClassification"):
            export(tmp_path / "m.npz", "timm", tmp_path / out)
        assert not (tmp_path / out).exists()


@functools.cache
def _safetensors_recipe():
    """(keys read with json.loads, keys read as names) as export_weights.py --help lists them."""
    text = " ".join(run_script(SCRIPTS / "export_weights.py", "--help").stdout.split())
    m = re.search(r"holds its arguments as JSON: (.*?); as names: (.*?); and norm_eps\.", text)
    assert m, text
    return [k.strip() for k in m.group(1).split(",")], [k.strip() for k in m.group(2).split(",")]


@pytest.mark.e2e
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_safetensors_recipe_in_the_help_builds_timms_model(tmp_path, family):
    """export_weights.py --help's recipe for one .safetensors file, followed as written, gives our logits."""
    as_json, as_names = _safetensors_recipe()
    ckpt, params, cfg = _checkpoint(tmp_path, family)
    out = export(ckpt, "timm", tmp_path / "vit.safetensors")["out"]
    load_file = pytest.importorskip("safetensors.torch").load_file
    md = read_safetensors(out)[1]
    kw = {k: json.loads(md[k]) for k in as_json} | {k: md[k] for k in as_names}
    cls = getattr(timm.models.deit if md["model_class"] == "VisionTransformerDistilled" else
                  timm.models.vision_transformer, md["model_class"])
    model = cls(**kw, norm_layer=functools.partial(torch.nn.LayerNorm, eps=float(md["norm_eps"])))
    model.load_state_dict(load_file(out), strict=True)
    x = np.random.default_rng(0).normal(size=(2, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
    with torch.no_grad():
        got = model.eval()(torch.tensor(x)).numpy()
    assert rel_err(got, vit_forward(params, x, cfg, keep_cache=False)[0]) < 1e-5


@pytest.mark.e2e
@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg"])
def test_token_pooled_dinov2_round_trips_hf_then_timm(tmp_path, family):
    """A DINOv2 backbone fine-tuned with a class-token head: --to hf (HF's class+mean head, the mean's half
    zero) loads in transformers with our logits, converts back to a class-token head, and --to timm then
    builds in timm with the same logits."""
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(FAMILIES[family], no_embed_class=family == "dinov2_reg")  # as timm's reg4 DINOv2s
    params = params_of(timm_model(cfg, seed=3), np.float32)
    ckpt = save_checkpoint(tmp_path / "m.npz", params, cfg, dict(class_names=NAMES))
    script = SCRIPTS / "export_weights.py"
    r = run_script(script, str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(0).normal(size=(2, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    want = vit_forward(params, x, cfg, keep_cache=False)[0]
    hf = transformers.AutoModelForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert rel_err(hf(pixel_values=torch.tensor(x)).logits.numpy(), want) < 1e-5
    r = run_script(SCRIPTS / "convert_weights.py", str(tmp_path / "hf"), "--out", str(tmp_path / "back.npz"))
    assert r.returncode == 0 and "pool token" in r.stdout, r.stderr
    r = run_script(script, str(tmp_path / "back.npz"), "--to", "timm", "--out", str(tmp_path / "hub"))
    assert r.returncode == 0, r.stderr
    model = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    with torch.no_grad():
        assert rel_err(model(torch.tensor(x)).numpy(), want) < 1e-5


@pytest.mark.e2e
def test_hfs_class_and_mean_head_exports_to_hf_and_onnx_not_timm(tmp_path):
    """Dinov2ForImageClassification as transformers writes it: --to timm is one line naming the targets
    that take it (timm pools the class token or the patch mean, not both side by side)."""
    transformers = pytest.importorskip("transformers")
    conf = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                                     patch_size=14, mlp_ratio=2, num_labels=3)
    transformers.Dinov2ForImageClassification(conf).eval().save_pretrained(tmp_path / "hf")
    r = run_script(SCRIPTS / "convert_weights.py", str(tmp_path / "hf"), "--out", str(tmp_path / "m.npz"))
    assert r.returncode == 0 and "pool token_avg" in r.stdout, r.stderr
    r = run_script(SCRIPTS / "export_weights.py", str(tmp_path / "m.npz"), "--to", "timm", "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--to hf" in r.stderr and "--to onnx" in r.stderr and not (tmp_path / "t").exists()
    for to, out in (("hf", "hf2"), ("onnx", "m.onnx")):
        r = run_script(SCRIPTS / "export_weights.py", str(tmp_path / "m.npz"), "--to", to, "--out", str(tmp_path / out))
        assert r.returncode == 0, r.stderr


def test_an_any_size_model_exports_to_timm_as_one(tmp_path):
    """dynamic_img_size goes into model_args: timm builds a model that takes a rectangle, with our logits,
    and the folder converts back to a model that takes any size."""
    cfg = dataclasses.replace(FAMILIES["dinov2_reg"], dynamic_img_size=True)
    params = params_of(timm_model(cfg, seed=4), np.float32)
    ckpt = save_checkpoint(tmp_path / "m.npz", params, cfg, dict(class_names=NAMES, mean=[0.5] * 3, std=[0.25] * 3))
    export(ckpt, "timm", tmp_path / "hub")
    hub = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert hub["model_args"]["dynamic_img_size"] is True and hub["pretrained_cfg"]["fixed_input_size"] is False
    model = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = np.random.default_rng(1).normal(size=(2, 3, 42, 28)).astype(np.float32)
    with torch.no_grad():
        got = model(torch.tensor(x)).numpy()
    assert rel_err(got, vit_forward(params, x, cfg, keep_cache=False)[0]) < 1e-5
    assert convert(tmp_path / "hub")[1].dynamic_img_size
