"""Export to timm and HF transformers: strict loads into the torch ViT and logits vs vit_forward, the HF
folder converting back bit for bit, transformers itself when installed, bad input, and the script."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, SCRIPTS, load_script, rel_err, run_script
from PIL import Image
from torch_vit import TorchViT

from tinyvit import TinyViTError, ViTConfig, vit_forward
from tinyvit.data.decode import load_image
from tinyvit.data.transform import eval_transform, normalisation
from tinyvit.io.checkpoint import load_checkpoint, save_checkpoint
from tinyvit.io.convert import convert
from tinyvit.io.export import export, mlp_ratio
from tinyvit.io.safetensors import read_safetensors
from tinyvit.nn.model import init_params, param_shapes

try:
    import transformers
except ImportError:  # CI: pip install "transformers==5.24.0" (tested with torch 2.13; leaves torch alone)
    transformers = None

try:
    import onnx
except ImportError:
    onnx = None

SCRIPT = SCRIPTS / "export_weights.py"
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed (pip install transformers)")


def _need_transformers(what):
    """Skip the rest of a test (its torch-free checks passed) where transformers is missing: a skip, not a pass."""
    if transformers is None:
        pytest.skip(f"{what} needs transformers (pip install transformers); the checks before it passed")

CFGS = {  # exact GELU at timm's eps; tanh GELU, HF's eps, one channel and an MLP ratio m/d misses by an ulp
    "erf": ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=5, dim=32, depth=2, heads=4, mlp_dim=64),
    "tanh": ViTConfig(img_size=24, patch_size=4, in_chans=1, num_classes=3, dim=28, depth=3, heads=4, mlp_dim=61,
                      ln_eps=1e-12, gelu="tanh"),
}
NAMES = {"erf": ["cat", "dog", "ship", "frog", "truck"], "tanh": ["zero", "one", "two"]}
MEAN_STD = {"erf": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "tanh": ([0.25], [0.75])}
# --to hf takes 3-channel models (transformers feeds RGB): its tests run the tanh case with three
CFGS_HF = {"erf": CFGS["erf"], "tanh_rgb": dataclasses.replace(CFGS["tanh"], in_chans=3)}
NAMES["tanh_rgb"], MEAN_STD["tanh_rgb"] = NAMES["tanh"], ([0.25] * 3, [0.75] * 3)
HF_BLOCK = ["attention.attention.query", "attention.attention.key", "attention.attention.value",
            "attention.output.dense", "intermediate.dense", "output.dense", "layernorm_before", "layernorm_after"]


def _params(cfg, dtype=np.float64, seed=0):
    """Every tensor random (biases and norms too), so a swapped or misplaced slice changes the logits."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in init_params(cfg, seed, dtype=dtype).items():
        noise = rng.standard_normal(v.shape)
        out[k] = (1 + 0.1 * noise if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight"
                  else v + 0.05 * noise).astype(dtype)
    return out


def _checkpoint(tmp_path, name, dtype=np.float64, meta=True, seed=0):
    """A checkpoint of CFGS[name] (or CFGS_HF[name]) on disk -> (path, params, cfg)."""
    cfg = {**CFGS, **CFGS_HF}[name]
    params = _params(cfg, dtype, seed)
    m = dict(class_names=NAMES[name], mean=MEAN_STD[name][0], std=MEAN_STD[name][1]) if meta else {}
    path = save_checkpoint(tmp_path / f"{name}.npz", params, cfg, m)
    return path, params, cfg


def _images(cfg, n=3, dtype=np.float64, seed=1):
    return np.random.default_rng(seed).standard_normal((n, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype)


def _cfg_from_timm_metadata(md):
    """The ViTConfig that the file's __metadata__ alone describes (what a timm user builds)."""
    D = int(md["embed_dim"])
    return ViTConfig(img_size=int(md["img_size"]), patch_size=int(md["patch_size"]), in_chans=int(md["in_chans"]),
                     num_classes=int(md["num_classes"]), dim=D, depth=int(md["depth"]), heads=int(md["num_heads"]),
                     mlp_dim=int(D * float(md["mlp_ratio"])), ln_eps=float(md["norm_eps"]),
                     gelu={"gelu": "erf", "gelu_tanh": "tanh"}[md["act_layer"]])


def _torch_logits(cfg, state, x):
    """TorchViT (timm's module names) loaded strictly with a state dict; float64 logits."""
    model = TorchViT(cfg).to(torch.float64)
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# --- timm ---------------------------------------------------------------------------------------


def test_mlp_ratio_survives_timms_int_rounding():
    cfg = CFGS["tanh"]
    assert int(cfg.dim * (cfg.mlp_dim / cfg.dim)) != cfg.mlp_dim  # the case the nudge exists for
    assert int(cfg.dim * mlp_ratio(cfg)) == cfg.mlp_dim
    assert mlp_ratio(CFGS["erf"]) == 2.0


@pytest.mark.parametrize("name", list(CFGS))
def test_timm_export_loads_strictly_and_matches(tmp_path, name):
    ckpt, params, cfg = _checkpoint(tmp_path, name)
    summary = export(ckpt, "timm", tmp_path / "out" / "vit.safetensors")
    state, md = read_safetensors(summary["files"][0])
    assert sorted(state) == sorted(param_shapes(cfg)) and summary["tensors"] == len(state)
    assert all(state[k].dtype == params[k].dtype and np.array_equal(state[k], params[k]) for k in params)
    assert _cfg_from_timm_metadata(md) == cfg  # the metadata alone rebuilds the architecture
    assert (md["global_pool"], md["class_token"], md["fc_norm"], md["format"]) == ("token", "true", "false", "pt")
    assert json.loads(md["class_names"]) == NAMES[name]
    assert (json.loads(md["mean"]), json.loads(md["std"])) == MEAN_STD[name]
    assert ViTConfig.from_dict(json.loads(md["tinyvit_config"])) == cfg
    x = _images(cfg)
    ref = vit_forward(params, x, cfg, keep_cache=False)[0]
    assert rel_err(_torch_logits(_cfg_from_timm_metadata(md), state, x), ref) <= 1e-10


def test_timm_export_without_metadata_defaults(tmp_path):
    ckpt, _, cfg = _checkpoint(tmp_path, "tanh", np.float32, meta=False)
    state, md = read_safetensors(export(ckpt, "timm", tmp_path / "v.safetensors")["out"])
    assert json.loads(md["class_names"]) is None and state["head.weight"].dtype == np.float32
    assert tuple(json.loads(md["mean"])) == normalisation({}, cfg.in_chans)[0]  # tinyvit's own rule (MNIST's)


def test_real_vit_ti16_timm_export(tmp_path, ti16):
    params, cfg, meta = convert(ti16)
    ckpt = save_checkpoint(tmp_path / "ti16.npz", params, cfg, meta)
    state, md = read_safetensors(export(ckpt, "timm", tmp_path / "ti16.safetensors")["out"])
    assert list(state) == sorted(param_shapes(cfg)) and _cfg_from_timm_metadata(md) == cfg
    assert all(np.array_equal(state[k], params[k]) and state[k].dtype == np.float32 for k in params)
    x = _images(cfg, n=2)
    ref = vit_forward({k: v.astype(np.float64) for k, v in params.items()}, x, cfg, keep_cache=False)[0]
    assert rel_err(_torch_logits(cfg, state, x), ref) <= 1e-10


# --- Hugging Face -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CFGS_HF))
def test_hf_export_converts_back_bit_for_bit(tmp_path, name, dtype):
    ckpt, params, cfg = _checkpoint(tmp_path, name, dtype)
    folder = tmp_path / "hf"
    summary = export(ckpt, "hf", folder)
    assert sorted(Path(f).name for f in summary["files"]) == sorted(p.name for p in folder.iterdir())
    back, cfg2, meta2 = convert(folder / "model.safetensors", fmt="hf")
    assert cfg2 == cfg and list(back) == list(params)
    assert all(back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]) for k in params)
    assert meta2["class_names"] == NAMES[name] and (meta2["mean"], meta2["std"]) == MEAN_STD[name]
    assert convert(folder / "model.safetensors")[1] == cfg  # detected as HF without fmt


@pytest.mark.parametrize("name", list(CFGS_HF))
def test_hf_files_use_hfs_names(tmp_path, name):
    ckpt, params, cfg = _checkpoint(tmp_path, name)
    folder = tmp_path / "hf"
    export(ckpt, "hf", folder)
    state, md = read_safetensors(folder / "model.safetensors")
    want = {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "vit.layernorm.weight",
            "vit.layernorm.bias", "classifier.weight", "classifier.bias",
            "vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.patch_embeddings.projection.bias"}
    want |= {f"vit.encoder.layer.{i}.{m}.{wb}" for i in range(cfg.depth) for m in HF_BLOCK for wb in ("weight", "bias")}
    assert set(state) == want and md == {"format": "pt"}
    D, b = cfg.dim, "vit.encoder.layer.1."
    for j, t in enumerate(("query", "key", "value")):  # thirds of timm's qkv, in that order
        for wb in ("weight", "bias"):
            third = params[f"blocks.1.attn.qkv.{wb}"][j * D:(j + 1) * D]
            assert np.array_equal(state[f"{b}attention.attention.{t}.{wb}"], third)
    assert np.array_equal(state[b + "output.dense.weight"], params["blocks.1.mlp.fc2.weight"])
    assert np.array_equal(state[b + "layernorm_after.bias"], params["blocks.1.norm2.bias"])
    c = json.loads((folder / "config.json").read_text())
    assert (c["architectures"], c["model_type"], c["hidden_act"]) == (
        ["ViTForImageClassification"], "vit", {"erf": "gelu", "tanh": "gelu_pytorch_tanh"}[cfg.gelu])
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["intermediate_size"]) == (
        cfg.dim, cfg.depth, cfg.heads, cfg.mlp_dim)
    assert (c["image_size"], c["patch_size"], c["num_channels"], c["encoder_stride"], c["layer_norm_eps"]) == (
        cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.patch_size, cfg.ln_eps)
    assert c["qkv_bias"] is True and c["hidden_dropout_prob"] == c["attention_probs_dropout_prob"] == 0.0
    assert c["id2label"] == {str(i): n for i, n in enumerate(NAMES[name])}
    assert c["label2id"] == {n: i for i, n in enumerate(NAMES[name])} and c["torch_dtype"] == "float64"
    p = json.loads((folder / "preprocessor_config.json").read_text())
    # no transform recorded: the default predict.py also uses (timm's 0.875 centre crop, bicubic)
    assert p["image_processor_type"] == "ConvNextImageProcessor" and p["crop_pct"] == 0.875
    assert p["size"] == {"shortest_edge": cfg.img_size} and p["resample"] == 3
    assert p["do_resize"] and p["do_rescale"] and p["do_normalize"] and p["rescale_factor"] == 1 / 255
    assert (p["image_mean"], p["image_std"]) == MEAN_STD[name]


def test_hf_export_without_class_names(tmp_path):
    ckpt, _, cfg = _checkpoint(tmp_path, "erf", np.float32, meta=False)
    export(ckpt, "hf", tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert c["id2label"] == {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)} and c["torch_dtype"] == "float32"
    assert c["label2id"] == {f"LABEL_{i}": i for i in range(cfg.num_classes)}
    p = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert p["image_mean"] == p["image_std"] == [0.5] * 3


def _hf_logits(folder, x):
    """transformers' ViTForImageClassification from the local folder (no hub), float32 logits."""
    model, info = transformers.ViTForImageClassification.from_pretrained(
        str(folder), local_files_only=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x)).logits.numpy()


@needs_hf
@pytest.mark.parametrize("name", list(CFGS_HF))
def test_transformers_loads_the_folder(tmp_path, name):
    ckpt, params, cfg = _checkpoint(tmp_path, name, np.float32)
    folder = tmp_path / "hf"
    export(ckpt, "hf", folder)
    x = _images(cfg, dtype=np.float32)
    ref = vit_forward(params, x, cfg, keep_cache=False)[0]
    assert rel_err(_hf_logits(folder, x), ref) <= 1e-4
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    assert config.id2label == dict(enumerate(NAMES[name]))
    assert config.hidden_act == ("gelu" if name == "erf" else "gelu_pytorch_tanh")
    assert config.label2id == {n: i for i, n in enumerate(NAMES[name])}


# eval transforms a checkpoint may record: timm's default crop, AugReg's 0.9, HF's squash, a whole
# square (MNIST, CIFAR runs), and a 384 px model (BitImageProcessor there: ConvNext would warp)
EVAL_TRANSFORMS = [(32, {}), (32, {"crop_pct": 0.9}), (32, {"resize": "squash", "interpolation": "bilinear"}),
                   (32, {"crop_pct": 1.0, "interpolation": "bilinear"}), (384, {"crop_pct": 0.95})]


def _photos(folder, sizes=((61, 37), (40, 90), (500, 333))):
    """Non-square JPEG photos (smooth colour fields and noise) -> their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, paths = np.random.default_rng(5), []
    for w, h in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([xx * 255 / w, yy * 255 / h, 128 + 60 * np.sin(xx / 7.0)], -1) + rng.normal(0, 20, (h, w, 3))
        paths.append(folder / f"photo_{w}x{h}.jpg")
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(paths[-1], quality=92)
    return paths


@needs_hf
@pytest.mark.parametrize("size,t", EVAL_TRANSFORMS)
def test_transformers_image_processor_sees_what_load_image_sees(tmp_path, size, t):
    """The HF export's preprocessor gives the pixels tinyvit's eval transform gives, on non-square photos."""
    cfg = dataclasses.replace(CFGS["erf"], img_size=size)
    mean, std = MEAN_STD["erf"]
    meta = dict(mean=mean, std=std, eval_transform=dict({"resize": "shortest_edge", "crop_pct": 0.875,
                                                          "interpolation": "bicubic"}, **t, mean=mean, std=std))
    ckpt = save_checkpoint(tmp_path / "m.npz", _params(cfg, np.float32), cfg, meta)
    export(ckpt, "hf", tmp_path / "hf")
    # the PIL processor: with torchvision installed, transformers picks its "fast" one, which resizes
    # with torch's kernels (pixels within a few percent, not 1e-5)
    proc = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"), local_files_only=True, use_fast=False)
    for photo in _photos(tmp_path / "photos"):
        got = np.asarray(proc(images=Image.open(photo), return_tensors="np")["pixel_values"])[0]  # (3, S, S)
        want = load_image(photo, cfg, meta)[0]
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5, (photo.name, np.abs(got - want).max())


@pytest.mark.e2e
@needs_hf
def test_transformers_pipeline_on_the_hf_export_gives_predicts_probabilities(tmp_path):
    """pipeline('image-classification') on the exported folder vs predict.py on the checkpoint:
    the same probabilities for every class (1e-3) on non-square photos."""
    cfg = CFGS["erf"]
    mean, std = MEAN_STD["erf"]
    meta = dict(class_names=NAMES["erf"], mean=mean, std=std,
                eval_transform={"resize": "shortest_edge", "crop_pct": 0.9, "interpolation": "bicubic",
                                "mean": mean, "std": std})
    params = {k: v * 3 if k.startswith("head.") else v for k, v in _params(cfg, np.float32).items()}  # spread-out probabilities
    ckpt = save_checkpoint(tmp_path / "m.npz", params, cfg, meta)
    assert _run(ckpt, "--to", "hf", "--out", tmp_path / "hf").returncode == 0
    photos = _photos(tmp_path / "photos")
    r = run_script("predict.py", ckpt, *photos, "--top-k", "5", "--json", cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    ours = {Path(p["image"]).name: {t["class"]: t["probability"] for t in p["top_k"]}
            for p in json.loads(r.stdout)["predictions"]}
    classify = transformers.pipeline("image-classification", model=str(tmp_path / "hf"), device="cpu")
    # transformers' default image processor resizes with torchvision (pixels up to one gray level off);
    # its PIL one (backend="pil") gives tinyvit's pixels exactly, and the probabilities to float32 rounding
    pil = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"), backend="pil")
    classify_pil = transformers.pipeline("image-classification", model=str(tmp_path / "hf"), image_processor=pil,
                                         device="cpu")
    spread = 0.0
    for photo in photos:
        for clf, tol in ((classify, 1e-3), (classify_pil, 1e-5)):
            theirs = {d["label"]: d["score"] for d in clf(str(photo), top_k=cfg.num_classes)}
            assert set(theirs) == set(NAMES["erf"])
            gap = max(abs(theirs[c] - ours[photo.name][c]) for c in theirs)
            assert gap < tol, (photo.name, tol, theirs, ours[photo.name])
        spread = max(spread, max(theirs.values()) - min(theirs.values()))
    assert spread > 0.05  # the probabilities differ between classes: the comparison can fail


def test_real_vit_ti16_hf_export(tmp_path, ti16):
    params, cfg, meta = convert(ti16)
    ckpt = save_checkpoint(tmp_path / "ti16.npz", params, cfg, meta)
    folder = tmp_path / "hf"
    export(ckpt, "hf", folder)
    back, cfg2, meta2 = convert(folder / "model.safetensors")
    assert cfg2 == cfg and all(np.array_equal(back[k], params[k]) for k in params)
    assert meta2["class_names"] == meta["class_names"] and (meta2["mean"], meta2["std"]) == (meta["mean"], meta["std"])
    _need_transformers("the logits' check")
    x = _images(cfg, n=2, dtype=np.float32)
    assert rel_err(_hf_logits(folder, x), vit_forward(params, x, cfg, keep_cache=False)[0]) <= 1e-4


# --- bad input ----------------------------------------------------------------------------------


def _run(*args):
    return run_script(SCRIPT.name, *args, cwd=ROOT, timeout=120)


def _one_error_line(r, *needles):
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(str(n) in lines[0] for n in needles), lines[0]


@pytest.mark.e2e
@pytest.mark.parametrize("content", [b'{"not": "a checkpoint"}\n', b"PK\x03\x04 truncated zip", None])
def test_script_refuses_a_non_checkpoint(tmp_path, content):
    bad = tmp_path / "notes.npz"
    if content is not None:
        bad.write_bytes(content)
    else:  # a real .npz, but no tinyvit metadata
        np.savez(bad, x=np.zeros(3))
    for to in ("timm", "hf"):
        _one_error_line(_run(bad, "--to", to, "--out", tmp_path / f"o-{to}"), bad)
        assert not (tmp_path / f"o-{to}").exists()
    _one_error_line(_run(tmp_path / "missing.npz", "--to", "timm", "--out", tmp_path / "o"), tmp_path / "missing.npz")


@pytest.mark.e2e
def test_script_refuses_an_unusable_out(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path, "erf")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    _one_error_line(_run(ckpt, "--to", "hf", "--out", taken), taken, "not a folder")
    assert taken.read_bytes() == b"keep me"
    (tmp_path / "dir").mkdir()  # --to timm into a folder: timm's hub folder
    assert _run(ckpt, "--to", "timm", "--out", tmp_path / "dir").returncode == 0
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["config.json", "model.safetensors"]
    _one_error_line(_run(ckpt, "--to", "timm", "--out", tmp_path / "x.pth"), tmp_path / "x.pth", "writes safetensors")
    before = ckpt.read_bytes()
    _one_error_line(_run(ckpt, "--to", "timm", "--out", ckpt), ckpt)
    assert ckpt.read_bytes() == before


def test_inconsistent_metadata_is_refused(tmp_path):
    cfg = CFGS["erf"]
    for meta, what in ((dict(class_names=["a", "b"]), "class_names has 2 entries"),
                       (dict(class_names=[1, 2, 3, 4, 5]), "not a list of strings"),
                       (dict(mean=[0.5, 0.5], std=[0.5, 0.5]), "2/2 values")):
        ckpt = save_checkpoint(tmp_path / "m.npz", _params(cfg), cfg, meta)
        for to, name in (("timm", "o-timm"), ("hf", "o-hf"), ("onnx", "o.onnx")):
            with pytest.raises(TinyViTError, match=what) as e:
                export(ckpt, to, tmp_path / name)
            assert str(ckpt) in str(e.value) and "\n" not in str(e.value)
            assert not (tmp_path / name).exists()
    with pytest.raises(TinyViTError, match="unknown export target"):
        export(ckpt, "tflite", tmp_path / "o")


# --- the script end to end ----------------------------------------------------------------------


@pytest.mark.e2e
def test_script_exports_both_targets(tmp_path):
    ckpt, params, cfg = _checkpoint(tmp_path, "erf", np.float32)
    r = _run(ckpt, "--to", "timm", "--out", tmp_path / "t" / "vit.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)  # exactly one JSON line
    assert r.stdout.count("\n") == 1 and s["target"] == "timm" and s["params"] == sum(v.size for v in params.values())
    state, _ = read_safetensors(s["files"][0])
    assert all(np.array_equal(state[k], params[k]) for k in params)
    r = _run(ckpt, "--to", "hf", "--out", tmp_path / "h", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["target"] == "hf" and [Path(f).name for f in s["files"]] == ["model.safetensors", "config.json",
                                                                           "preprocessor_config.json"]
    back, cfg2, _ = convert(tmp_path / "h" / "model.safetensors", fmt="hf")
    assert cfg2 == cfg and all(np.array_equal(back[k], params[k]) for k in params)
    assert load_checkpoint(ckpt)[1] == cfg  # the source is untouched
    r = _run(ckpt, "--to", "hf", "--out", tmp_path / "h", "--overwrite")  # into the same folder again, plain line
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and str(tmp_path / "h") in r.stdout, r.stderr


@pytest.mark.e2e
def test_script_help_covers_every_flag():
    r = _run("--help")
    assert r.returncode == 0 and "--to" in r.stdout and "--json" in r.stdout
    assert all(a.help for a in load_script(SCRIPT.name).build_parser()._actions)


@pytest.mark.parametrize("act,gelu", [("gelu_fast", "tanh"), ("gelu_python_tanh", "tanh"), ("relu", None),
                                      ("quick_gelu", "quick"), ("silu", None)])
def test_hf_reader_maps_or_refuses_each_activation(tmp_path, act, gelu):
    """HF's other tanh-GELU names read as tanh; an activation tinyvit lacks is refused, not run as GELU."""
    folder = tmp_path / "hf"
    export(_checkpoint(tmp_path, "erf")[0], "hf", folder)
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(conf, hidden_act=act)))
    if gelu is None:
        with pytest.raises(TinyViTError, match=f"hidden_act '{act}' is not an activation tinyvit has"):
            convert(folder / "model.safetensors", fmt="hf")
    else:
        assert convert(folder / "model.safetensors", fmt="hf")[1].gelu == gelu


# --- round trips keep the metadata ----------------------------------------------------------------

TRANSFORMS = {"shortest_edge": {"resize": "shortest_edge", "crop_pct": 0.9, "interpolation": "bicubic"},
              "squash": {"resize": "squash", "crop_pct": 1.0, "interpolation": "bicubic"}}


def _stated_checkpoint(tmp_path, name, resize, dtype=np.float64):
    """A checkpoint of CFGS[name] with class names, mean/std and an eval transform -> (path, params, meta)."""
    cfg, params = CFGS[name], _params(CFGS[name], dtype)
    mean, std = MEAN_STD[name]
    meta = dict(class_names=NAMES[name], mean=mean, std=std,
                eval_transform=dict(TRANSFORMS[resize], mean=mean, std=std))
    return save_checkpoint(tmp_path / f"{name}.npz", params, cfg, meta), params, meta


def _convert_back(src, out, *extra):
    """scripts/convert_weights.py src --out out -> the checkpoint it wrote."""
    r = run_script("convert_weights.py", src, "--out", out, *extra, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return load_checkpoint(out)


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(CFGS))
def test_timm_export_and_convert_back_keep_metadata(tmp_path, name):
    ckpt, params, meta = _stated_checkpoint(tmp_path, name, "shortest_edge")
    r = _run(ckpt, "--to", "timm", "--out", tmp_path / "vit.safetensors")
    assert r.returncode == 0, r.stderr
    assert json.loads(read_safetensors(tmp_path / "vit.safetensors")[1]["eval_transform"]) == meta["eval_transform"]
    back, cfg, meta2 = _convert_back(tmp_path / "vit.safetensors", tmp_path / "back.npz")
    assert cfg == CFGS[name]  # heads, GELU and eps from the file's metadata too (not width // 64)
    assert all(back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]) for k in params)
    assert meta2["class_names"] == NAMES[name] and (meta2["mean"], meta2["std"]) == MEAN_STD[name]
    assert meta2["eval_transform"] == meta["eval_transform"] and meta2["heads_from"] == "the file's metadata"
    _, cfg2, meta3 = _convert_back(tmp_path / "vit.safetensors", tmp_path / "big.npz", "--img-size", 2 * cfg.img_size)
    assert cfg2.img_size == 2 * cfg.img_size and meta3["eval_transform"] == meta["eval_transform"]  # it is relative


@pytest.mark.e2e
@pytest.mark.parametrize("resize", list(TRANSFORMS))
def test_hf_export_and_convert_back_keep_metadata(tmp_path, resize):
    ckpt, params, meta = _stated_checkpoint(tmp_path, "erf", resize, np.float32)
    r = _run(ckpt, "--to", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    prep = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    want = {"shortest_edge": "ConvNextImageProcessor", "squash": "ViTImageProcessor"}[resize]
    assert prep["image_processor_type"] == want
    assert prep["resample"] == 3  # bicubic
    back, cfg, meta2 = _convert_back(tmp_path / "hf" / "model.safetensors", tmp_path / "back.npz")
    assert cfg == CFGS["erf"] and all(np.array_equal(back[k], params[k]) for k in params)
    assert meta2["class_names"] == NAMES["erf"] and (meta2["mean"], meta2["std"]) == MEAN_STD["erf"]
    assert meta2["eval_transform"] == meta["eval_transform"]
    _need_transformers("transformers reading the processor written")
    proc = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert type(proc).__name__.startswith(prep["image_processor_type"])
    from PIL import Image

    out = proc(images=Image.new("RGB", (50, 40)), return_tensors="np")["pixel_values"]
    assert out.shape == (1, 3, cfg.img_size, cfg.img_size)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["vit.pt", "vit.pth"])  # no suffix: the hub folder
def test_script_refuses_a_timm_out_that_is_not_safetensors(tmp_path, name):
    ckpt, _, _ = _checkpoint(tmp_path, "erf")
    out = tmp_path / "o" / name
    _one_error_line(_run(ckpt, "--to", "timm", "--out", out), out, "--to timm writes safetensors", ".safetensors")
    assert not (tmp_path / "o").exists()


# --- what every export carries, and what --to and --out refuse ------------------------------------


def test_mnist_inversion_rides_along_every_export(tmp_path):
    """A checkpoint of MNIST's (dataset mnist, a record without invert, as weights/mnist_vit.npz): the timm
    file, timm's hub folder and the ONNX file state invert 'auto', and converting back keeps it."""
    cfg = dataclasses.replace(CFGS["tanh"], ln_eps=1e-6)  # an eps timm's hub folder takes
    ckpt = save_checkpoint(tmp_path / "m.npz", _params(cfg, np.float32), cfg,
                           {"dataset": "mnist", "eval_transform": {"crop_pct": 1.0, "mean": [0.1], "std": [0.3]}})
    export(ckpt, "timm", tmp_path / "v.safetensors")
    export(ckpt, "timm", tmp_path / "hub")
    for f in (tmp_path / "v.safetensors", tmp_path / "hub" / "model.safetensors"):
        assert json.loads(read_safetensors(f)[1]["eval_transform"])["invert"] == "auto"
        assert eval_transform(convert(f)[2], 1) == eval_transform(load_checkpoint(ckpt)[2], 1)
    if onnx is not None:
        export(ckpt, "onnx", tmp_path / "m.onnx")
        props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
        assert json.loads(props["eval_transform"])["invert"] == "auto"


@pytest.mark.e2e
def test_script_refuses_hf_for_a_one_channel_model(tmp_path):
    """transformers' pipeline() feeds RGB: a 1-channel HF folder would raise there, so none is written."""
    ckpt, _, _ = _checkpoint(tmp_path, "tanh")
    _one_error_line(_run(ckpt, "--to", "hf", "--out", tmp_path / "hf"), ckpt, "3 channels", "--to onnx")
    assert not (tmp_path / "hf").exists()


@pytest.mark.e2e
def test_an_out_holding_files_needs_overwrite(tmp_path):
    """A data folder, an earlier export (an HF folder that timm's would leave half HF) and an existing file
    are refused without --overwrite, untouched; with it the export replaces them, whole."""
    ckpt, _, _ = _checkpoint(tmp_path, "erf", np.float32)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"keep me")
    _one_error_line(_run(ckpt, "--to", "timm", "--out", photos), photos, "holds files (cat.jpg)", "--overwrite")
    assert [p.name for p in photos.iterdir()] == ["cat.jpg"]
    assert _run(ckpt, "--to", "hf", "--out", tmp_path / "o").returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    _one_error_line(_run(ckpt, "--to", "timm", "--out", tmp_path / "o"), tmp_path / "o", "--overwrite")
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before
    assert _run(ckpt, "--to", "timm", "--out", tmp_path / "o", "--overwrite").returncode == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "model.safetensors"]
    assert "architecture" in json.loads((tmp_path / "o" / "config.json").read_text())  # timm's, whole
    for to, name in (("timm", "v.safetensors"), ("onnx", "v.onnx")):  # a file: the same rule
        (tmp_path / name).write_bytes(b"keep me")
        with pytest.raises(TinyViTError, match="exists; pass --overwrite"):
            export(ckpt, to, tmp_path / name)
        assert (tmp_path / name).read_bytes() == b"keep me"
        export(ckpt, to, tmp_path / name, overwrite=True)
        assert (tmp_path / name).read_bytes() != b"keep me"


@pytest.mark.e2e
def test_convert_refuses_its_source_as_out_and_a_name_that_is_not_npz(tmp_path):
    src = tmp_path / "vit.npz"
    np.savez(src, **_params(CFGS["erf"], np.float32))  # timm's names, as a user's np.savez of a state dict
    before = src.read_bytes()
    r = run_script("convert_weights.py", src, "--out", src, cwd=ROOT, timeout=120)
    _one_error_line(r, src, "is the source being converted")
    assert src.read_bytes() == before
    r = run_script("convert_weights.py", src, "--out", tmp_path / "x.safetensors", cwd=ROOT, timeout=120)
    _one_error_line(r, tmp_path / "x.safetensors", "ending in .npz", "export_weights.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.npz"]


@pytest.mark.e2e
def test_wrong_files_say_what_they_are_and_which_command_to_run(tmp_path):
    """convert_weights.py on a tinyvit checkpoint; export_weights.py on a timm hub folder, an HF one, a
    timm .npz (each as its library writes it) and a run's folder: what it is, and the command."""
    from timm_oracle import params_of, timm

    ckpt, _, cfg = _checkpoint(tmp_path, "erf", np.float32)
    r = run_script("convert_weights.py", ckpt, "--out", tmp_path / "c.npz", cwd=ROOT, timeout=120)
    _one_error_line(r, ckpt, "already a tinyvit checkpoint", f"scripts/export_weights.py {ckpt} --to")
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=4, num_classes=5)
    pytest.importorskip("timm.models._hub").save_for_hf(model, tmp_path / "timm-hub", safe_serialization=True)
    np.savez(tmp_path / "timm.npz", **params_of(model, np.float32))
    wrong = {tmp_path / "timm-hub": "is a timm hub folder", tmp_path / "timm.npz": "weights with timm's names"}
    if transformers is not None:
        export(ckpt, "hf", tmp_path / "hf-hub")
        transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf-hub")).save_pretrained(tmp_path / "hf")
        wrong[tmp_path / "hf"] = "is a Hugging Face hub folder"
    r = _run(tmp_path / "timm-hub", "--to", "onnx", "--out", tmp_path / "x.onnx")  # the script, once
    _one_error_line(r, tmp_path / "timm-hub", "is a timm hub folder", "scripts/convert_weights.py")
    for src, what in wrong.items():
        with pytest.raises(TinyViTError, match=what) as e:
            export(src, "onnx", tmp_path / "x.onnx")
        assert str(e.value).startswith(f"{src}: ") and f"python scripts/convert_weights.py {src} --out " in str(e.value)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.npz").write_bytes(ckpt.read_bytes())
    with pytest.raises(TinyViTError, match="a training run's folder: export its checkpoint"):
        export(tmp_path / "run", "onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
