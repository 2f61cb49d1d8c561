"""ONNX export (tinyvit.io.onnx_export): onnx.checker's full check, then onnxruntime at batch 1 and 3
against vit_forward for MNIST, the ViT sizes' shape and every family; bad input is one line, no file."""
import json

import numpy as np
import pytest
from family_configs import FAMILIES
from helpers import SCRIPTS, rel_err, run_script

from tinyvit import TinyViTError, ViTConfig, init_params, preset, vit_forward
from tinyvit.io.checkpoint import save_checkpoint
from tinyvit.io.export import export

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
CONFIGS = dict(FAMILIES, mnist=preset("mnist", depth=2),
               vit=ViTConfig(img_size=32, patch_size=16, num_classes=4, dim=48, depth=2, heads=3, mlp_dim=96,
                             gelu="tanh", ln_eps=1e-12))
# ORT against vit_forward in float32 measures 2.4e-7 to 1.1e-6 on these configs; an eps of 1e-6 in place of
# CLIP's 1e-5 gives 9.6e-5 and the erf GELU in place of the tanh form 2.8e-5 to 2.7e-4
PARITY = 5e-6


def _checkpoint(tmp_path, cfg, seed=0, scale_embed=1.0):
    rng = np.random.default_rng(seed)
    params = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in init_params(cfg).items()}
    for k in {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token"} & set(params):
        params[k] *= np.float32(scale_embed)
    names = [f"class {i}" for i in range(cfg.num_classes)]
    ckpt = save_checkpoint(tmp_path / "m.npz", params, cfg, dict(class_names=names, mean=[0.5] * cfg.in_chans,
                                                                  std=[0.25] * cfg.in_chans))
    return ckpt, params, names


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnxruntime_gives_vit_forwards_logits(tmp_path, name):
    cfg = CONFIGS[name]
    ckpt, params, names = _checkpoint(tmp_path, cfg)
    export(ckpt, "onnx", tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == names and json.loads(props["eval_transform"])["mean"] == [0.5] * cfg.in_chans
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"] and [o.name for o in sess.get_outputs()] == ["logits"]
    for B in (1, 3):
        x = np.random.default_rng(B).normal(size=(B, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
        got = sess.run(["logits"], {"pixel_values": x})[0]
        assert got.shape == (B, cfg.num_classes)
        assert rel_err(got, vit_forward(params, x, cfg, keep_cache=False)[0]) < PARITY, name


@pytest.mark.parametrize("gelu", ["erf", "tanh", "quick"])
@pytest.mark.parametrize("eps", [1e-12, 1e-6, 1e-5])
def test_each_eps_and_gelu_reach_the_graph(tmp_path, eps, gelu):
    """The patch embedding scaled down so the first LayerNorm sees a variance near eps: another eps in the
    graph (1e-6 for all) moves the logits by 0.1 to 0.26, far past PARITY; each GELU form is its own."""
    cfg = ViTConfig(img_size=14, patch_size=7, num_classes=4, dim=16, depth=1, heads=2, mlp_dim=32, ln_eps=eps,
                    gelu=gelu)
    ckpt, params, _ = _checkpoint(tmp_path, cfg, scale_embed=3e-4)
    export(ckpt, "onnx", tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(3, 3, 14, 14)).astype(np.float32)
    assert rel_err(sess.run(["logits"], {"pixel_values": x})[0], vit_forward(params, x, cfg, keep_cache=False)[0]) < PARITY


@pytest.mark.e2e
def test_cli_exports_onnx_and_refuses_bad_input_in_one_line(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path, CONFIGS["dinov2_reg"])
    r = run_script(SCRIPTS / "export_weights.py", str(ckpt), "--to", "onnx", "--out", str(tmp_path / "d.onnx"))
    assert r.returncode == 0 and (tmp_path / "d.onnx").is_file(), r.stderr
    for args, what in (((str(ckpt), "--to", "onnx", "--out", str(tmp_path / "m.npz" / "x.onnx")), "m.npz"),
                       ((str(ckpt), "--to", "onnx", "--out", str(tmp_path / "x.onx")), ".onnx"),
                       ((str(tmp_path / "missing.npz"), "--to", "onnx", "--out", str(tmp_path / "y.onnx")), "missing")):
        r = run_script(SCRIPTS / "export_weights.py", *args)
        assert r.returncode == 2 and what in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "m.npz"]  # no partial file


def test_past_two_gib_the_weights_go_beside_the_graph(tmp_path, monkeypatch):
    from tinyvit.io import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_PAST", 1000)  # this small model, as a large one would be written
    cfg = CONFIGS["siglip"]
    ckpt, params, _ = _checkpoint(tmp_path, cfg)
    summary = export(ckpt, "onnx", tmp_path / "big.onnx")
    assert summary["files"] == [str(tmp_path / "big.onnx"), str(tmp_path / "big.onnx.data")]
    onnx.checker.check_model(str(tmp_path / "big.onnx"), full_check=True)
    sess = ort.InferenceSession(str(tmp_path / "big.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 3, 28, 28)).astype(np.float32)
    assert rel_err(sess.run(["logits"], {"pixel_values": x})[0], vit_forward(params, x, cfg, keep_cache=False)[0]) < PARITY


def test_onnx_out_must_end_in_onnx(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path, CONFIGS["mnist"])
    with pytest.raises(TinyViTError, match=r"\.onnx"):
        export(ckpt, "onnx", tmp_path / "m.bin")


@pytest.mark.e2e
def test_readme_onnx_snippet_reads_the_shipped_mnist_digit_as_predict_does(tmp_path):
    """README's ONNX path on weights/mnist_vit.npz and docs/digit.png (dark ink on light paper): the
    export's metadata carries MNIST's inversion, so load_image gives predict.py's pixels and '7'."""
    from helpers import ROOT

    from tinyvit.data.decode import load_image
    from tinyvit.data.transform import eval_transform
    from tinyvit.io.checkpoint import load_checkpoint

    ckpt, digit = ROOT / "weights" / "mnist_vit.npz", ROOT / "docs" / "digit.png"
    r = run_script(SCRIPTS / "export_weights.py", str(ckpt), "--to", "onnx", "--out", str(tmp_path / "model.onnx"))
    assert r.returncode == 0, r.stderr
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    cfg = ViTConfig(**json.loads(meta["tinyvit_config"]))
    x = load_image(digit, cfg, {"eval_transform": json.loads(meta["eval_transform"])})  # README's line
    assert json.loads(meta["class_names"])[int(sess.run(["logits"], {"pixel_values": x})[0].argmax())] == "7"
    ckpt_meta = load_checkpoint(ckpt)[2]
    assert np.array_equal(x, load_image(digit, cfg, eval_transform(ckpt_meta, 1), dataset="mnist"))  # predict's
    r = run_script(SCRIPTS / "predict.py", str(ckpt), str(digit), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["predictions"][0]["top_k"][0]["class"] == "7", r.stderr
