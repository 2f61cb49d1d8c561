"""Weights by Hub name (tinyvit.io.hub): real downloads through huggingface_hub from a Hub stand-in on
127.0.0.1 (tests/hub_standin.py) holding a timm repository written by timm's save_for_hf and transformers
repositories written by save_pretrained; the named model against the local folder, the cache reused with
the server gone, and each failure one line. Each test has its own HF_HOME."""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SCRIPTS, run_python, run_script
from hub_standin import HubStandin
from timm_oracle import timm

from tinyvit import TinyViTError, ViTConfig, init_params, load_model, save_checkpoint, vit_forward
from tinyvit.io import hub as hubmod
from tinyvit.io.convert import convert
from tinyvit.io.hub import hub_name

huggingface_hub = pytest.importorskip("huggingface_hub")
transformers = pytest.importorskip("transformers")
save_for_hf = pytest.importorskip("timm.models._hub").save_for_hf
HF_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT")
TIMM, HF, SHARDED = "timm/vit_tiny_test.dino", "facebook/dinov2-tiny-test", "org/sharded-vit"


def _perturbed(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Local folders as timm and transformers write them: {repo id: folder}."""
    root = tmp_path_factory.mktemp("repos")
    args = dict(embed_dim=32, depth=2, num_heads=4, img_size=28, num_classes=5)
    model = _perturbed(timm.create_model("vit_small_patch14_dinov2", pretrained=False, **args))
    save_for_hf(model, root / "timm", model_args=args, safe_serialization="both")  # .safetensors and .bin
    (root / "timm" / "README.md").write_text("# a model card tinyvit does not download\n")
    t = transformers
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=28,
                 patch_size=14, num_labels=3)
    hf = _perturbed(t.Dinov2ForImageClassification(t.Dinov2Config(**small)), seed=1)
    hf.save_pretrained(root / "hf")
    t.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(root / "hf")
    vit = _perturbed(t.ViTForImageClassification(t.ViTConfig(**small)), seed=2)
    vit.save_pretrained(root / "sharded", max_shard_size="40KB")
    (root / "empty").mkdir()
    (root / "empty" / "README.md").write_text("no weights here\n")
    return {TIMM: root / "timm", HF: root / "hf", SHARDED: root / "sharded", "org/no-weights": root / "empty",
            "org/gated-vit": root / "timm"}


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    """The stand-in serving the repositories, HF_ENDPOINT pointing at it, HF_HOME empty in tmp_path."""
    for v in HF_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with HubStandin() as h:
        for name, folder in repos.items():
            h.add(name, folder, revisions=("main", "v1.0"), gated=name == "org/gated-vit")
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def _logits(params, cfg):
    x = np.random.default_rng(0).normal(size=(2, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    return vit_forward(params, x, cfg, keep_cache=False)[0]


def _blobs(tmp_path):
    return sorted(p.name for p in (tmp_path / "hf-home" / "hub").rglob("blobs/*"))


# --- names ---------------------------------------------------------------------------------------


def test_hub_names_are_told_from_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert hub_name("timm/vit_small_patch14_dinov2.lvd142m") == ("timm/vit_small_patch14_dinov2.lvd142m", None)
    assert hub_name("facebook/dinov2-small@v1.0") == ("facebook/dinov2-small", "v1.0")
    assert hub_name("hf-hub:runs/model") == ("runs/model", None)  # the prefix names a repository always
    for local in ("runs/model", "weights/vit.npz", "model.npz", "a/b/c", str(tmp_path / "x")):
        assert hub_name(local) is None, local
    with pytest.raises(TinyViTError, match="not a Hub name"):
        hub_name("hf-hub:no-slash")


def test_a_bare_file_name_is_read_from_tinyvit_weights(tmp_path, monkeypatch, capsys):
    cfg = ViTConfig(img_size=16, patch_size=8, num_classes=3, dim=16, depth=1, heads=2, mlp_dim=32)
    (tmp_path / "w").mkdir()
    save_checkpoint(tmp_path / "w" / "tiny.npz", init_params(cfg, seed=0), cfg)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINYVIT_WEIGHTS", str(tmp_path / "w"))
    params, got, _ = load_model("tiny.npz")
    assert got == cfg
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TINYVIT_WEIGHTS" in err[0] and str(tmp_path / "w" / "tiny.npz") in err[0], err
    monkeypatch.delenv("TINYVIT_WEIGHTS")
    with pytest.raises(TinyViTError, match="tiny.npz: no such model file"):
        load_model("tiny.npz")


@pytest.mark.e2e
def test_predict_reads_a_bare_checkpoint_name_from_tinyvit_weights(tmp_path):
    cfg = ViTConfig(img_size=16, patch_size=8, num_classes=3, dim=16, depth=1, heads=2, mlp_dim=32)
    (tmp_path / "w").mkdir()
    save_checkpoint(tmp_path / "w" / "tiny.npz", init_params(cfg, seed=0), cfg)
    from PIL import Image
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    r = run_script(SCRIPTS / "predict.py", "tiny.npz", tmp_path / "x.png", "--json", cwd=tmp_path,
                   extra_env={"TINYVIT_WEIGHTS": str(tmp_path / "w")})
    assert r.returncode == 0 and r.stderr.count("TINYVIT_WEIGHTS") == 1, r.stderr


# --- downloads -----------------------------------------------------------------------------------


def test_timm_name_gives_the_local_folders_logits_and_downloads_only_what_conversion_reads(hub, repos, tmp_path):
    params, cfg, meta = load_model(TIMM)
    want, wcfg, _ = load_model(repos[TIMM])
    assert cfg == wcfg and np.array_equal(_logits(params, cfg), _logits(want, wcfg))
    asked = {p.split("/")[-1].split("?")[0] for _, p, _ in hub.requests if "/resolve/" in p}
    assert asked == {"config.json", "model.safetensors"}, asked  # no .bin, no README
    data = (repos[TIMM] / "model.safetensors").read_bytes()
    assert meta["origin"]["repo"] == TIMM and meta["origin"]["commit"] == hub.repos[TIMM].sha
    assert meta["origin"]["files"]["model.safetensors"] == hashlib.sha256(data).hexdigest()


def test_transformers_name_at_a_revision_with_its_preprocessor(hub, repos):
    params, cfg, meta = load_model(f"hf-hub:{HF}@v1.0")
    want, wcfg, wmeta = load_model(repos[HF])
    assert cfg == wcfg and np.array_equal(_logits(params, cfg), _logits(want, wcfg))
    assert meta["eval_transform"] == wmeta["eval_transform"] and meta["eval_transform"]["resize"] == "shortest_edge"
    assert meta["origin"]["revision"] == "v1.0" and set(meta["origin"]["files"]) == {
        "config.json", "preprocessor_config.json", "model.safetensors"}


def test_sharded_safetensors_are_fetched_and_merged(hub, repos):
    files = sorted(p.name for p in repos[SHARDED].glob("*.safetensors"))
    assert len(files) > 1, files  # save_pretrained did shard it
    params, cfg, meta = convert(SHARDED)
    want, wcfg, _ = convert(repos[SHARDED])
    assert cfg == wcfg and np.array_equal(_logits(params, cfg), _logits(want, wcfg))
    assert set(files) < set(meta["origin"]["files"])


def test_the_second_run_uses_the_cache_with_the_server_stopped(hub, capsys):
    first = load_model(TIMM)
    hub.stop()
    params, cfg, meta = load_model(TIMM)
    assert np.array_equal(_logits(params, cfg), _logits(*first[:2])) and meta["origin"] == first[2]["origin"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be reached" in err[0] and "from the cache" in err[0], err
    os.environ["HF_HUB_OFFLINE"] = "1"  # (the fixture's monkeypatch restores the environment)
    assert load_model(TIMM)[1] == cfg


# --- failures: one line each ---------------------------------------------------------------------


@pytest.mark.parametrize("name,says", [
    ("org/missing", "no such repository"),
    (f"{TIMM}@no-such-tag", "has no revision 'no-such-tag'"),
    ("org/gated-vit", "gated repository.*HF_TOKEN"),
    ("org/no-weights", "holds no weights tinyvit reads.*README.md"),
])
def test_hub_refusals_are_one_line(hub, name, says):
    with pytest.raises(TinyViTError, match=says) as e:
        load_model(name)
    assert "\n" not in str(e.value)


def test_a_gated_repository_downloads_with_the_token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert load_model("org/gated-vit")[1].num_classes == 5


def test_no_network_and_offline_with_an_empty_cache_are_one_line(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TinyViTError, match=r"HF_HUB_OFFLINE is set.*no complete download.*downloaded folder") as e:
        load_model(TIMM)
    assert "\n" not in str(e.value) and not hub.requests
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.stop()
    with pytest.raises(TinyViTError, match=r"cannot be reached.*HF_HUB_OFFLINE.*downloaded folder"):
        load_model(TIMM)


def test_a_download_cut_mid_file_is_one_line_and_leaves_no_corrupt_file(hub, tmp_path, monkeypatch):
    import huggingface_hub.file_download as fd
    monkeypatch.setattr(fd.time, "sleep", lambda s: None)  # huggingface_hub's pauses between its resumes
    hub.cut["model.safetensors"] = 300  # every transfer of it drops after 300 bytes
    with pytest.raises(TinyViTError, match=r"download of model.safetensors failed.*nothing half-written") as e:
        load_model(TIMM)
    assert "\n" not in str(e.value)
    weights_sha = hashlib.sha256(hub.repos[TIMM].files["model.safetensors"]).hexdigest()
    assert weights_sha not in _blobs(tmp_path) and not any(b.endswith(".incomplete") for b in _blobs(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the half download is not taken for a cached one
    with pytest.raises(TinyViTError, match="no complete download"):
        load_model(TIMM)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.cut.clear()
    assert load_model(TIMM)[2]["origin"]["files"]["model.safetensors"] == weights_sha


def test_a_download_cut_once_resumes_with_a_range_request(hub, tmp_path, monkeypatch):
    import huggingface_hub.file_download as fd
    monkeypatch.setattr(fd.time, "sleep", lambda s: None)
    monkeypatch.setattr(fd.constants, "DOWNLOAD_CHUNK_SIZE", 100)  # what it keeps of a cut transfer: whole chunks
    hub.cut_once["model.safetensors"] = 300
    _, _, meta = load_model(TIMM)
    assert [r for _, _, r in hub.requests if r] == ["bytes=300-"], hub.requests
    want = hashlib.sha256(hub.repos[TIMM].files["model.safetensors"]).hexdigest()
    assert meta["origin"]["files"]["model.safetensors"] == want


def test_a_corrupt_cached_blob_is_refused_by_its_hash(hub, tmp_path):
    load_model(TIMM)
    blob = next(p for p in (tmp_path / "hf-home" / "hub").rglob("blobs/*") if len(p.name) == 64)
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(TinyViTError, match="cached file is corrupt.*delete"):
        load_model(TIMM)


# --- the scripts ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_convert_weights_by_name_online_then_from_the_cache_then_offline(hub, repos, tmp_path):
    env = {k: os.environ[k] for k in ("HF_HOME", "HF_ENDPOINT", "HF_HUB_DISABLE_PROGRESS_BARS")}
    r = run_script(SCRIPTS / "convert_weights.py", f"hf-hub:{TIMM}", "--out", tmp_path / "a.npz", extra_env=env)
    assert r.returncode == 0, r.stderr
    params, cfg, meta = load_model(tmp_path / "a.npz")
    want, wcfg, _ = load_model(repos[TIMM])
    assert np.array_equal(_logits(params, cfg), _logits(want, wcfg)) and meta["origin"]["repo"] == TIMM
    hub.stop()
    r = run_script(SCRIPTS / "convert_weights.py", TIMM, "--out", tmp_path / "b.npz", extra_env=env)
    assert r.returncode == 0 and "from the cache" in r.stderr, r.stderr
    r = run_script(SCRIPTS / "convert_weights.py", TIMM, "--out", tmp_path / "c.npz",
                   extra_env=dict(env, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-home")))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "HF_HUB_OFFLINE" in lines[0], r.stderr


@pytest.mark.e2e
def test_predict_with_a_missing_repository_is_one_line(hub, tmp_path):
    env = {k: os.environ[k] for k in ("HF_HOME", "HF_ENDPOINT")}
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (28, 28)).save(img)
    r = run_script(SCRIPTS / "predict.py", "org/missing", img, extra_env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no such repository" in lines[0], r.stderr
    r = run_script(SCRIPTS / "predict.py", TIMM, img, "--json", extra_env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["predictions"][0]["top_k"], r.stdout


def test_the_cache_layout_is_huggingface_hubs(hub, tmp_path):
    """A folder huggingface_hub itself finds offline: what tinyvit fetched is an ordinary cache entry."""
    load_model(TIMM)
    p = huggingface_hub.try_to_load_from_cache(TIMM, "model.safetensors", cache_dir=str(tmp_path / "hf-home" / "hub"))
    assert isinstance(p, str) and Path(p).is_file()
    assert hubmod.sha256(p) == hashlib.sha256(hub.repos[TIMM].files["model.safetensors"]).hexdigest()


@pytest.mark.e2e
def test_importing_tinyvit_leaves_huggingface_hub_unloaded():
    r = run_python("import sys, tinyvit, tinyvit.io.convert; print('huggingface_hub' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_the_provenance_stays_with_the_checkpoint_and_its_exports(hub, tmp_path):
    from tinyvit.io.export import export
    from tinyvit.io.safetensors import read_safetensors
    params, cfg, meta = convert(SHARDED)
    save_checkpoint(tmp_path / "c.npz", params, cfg, meta)
    origin = load_model(tmp_path / "c.npz")[2]["origin"]
    assert origin == meta["origin"] and origin["commit"] == hub.repos[SHARDED].sha
    export(tmp_path / "c.npz", "timm", tmp_path / "t.safetensors")
    export(tmp_path / "c.npz", "hf", tmp_path / "hf")
    for f in (tmp_path / "t.safetensors", tmp_path / "hf" / "model.safetensors"):
        assert json.loads(read_safetensors(f)[1]["tinyvit_origin"]) == origin, f
    onnx = pytest.importorskip("onnx")
    export(tmp_path / "c.npz", "onnx", tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["tinyvit_origin"]) == origin


# --- finetune_cifar.py's default weights ---------------------------------------------------------

CIFAR_DEFAULT = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"


@pytest.fixture
def vit_b16_standin(hub, tmp_path):
    """A tiny timm ViT served under the name finetune_cifar.py fetches by default."""
    args = dict(embed_dim=32, depth=2, num_heads=4, img_size=32)
    model = _perturbed(timm.create_model("vit_base_patch16_224", pretrained=False, **args))
    save_for_hf(model, tmp_path / "b16", model_args=args, safe_serialization=True)
    hub.add(CIFAR_DEFAULT, tmp_path / "b16")
    return hub


@pytest.mark.e2e
def test_bare_finetune_cifar_fetches_its_vit_b16_by_name(vit_b16_standin, cifar_root, tmp_path):
    env = {k: os.environ[k] for k in ("HF_HOME", "HF_ENDPOINT", "HF_HUB_DISABLE_PROGRESS_BARS")}
    r = run_script(SCRIPTS / "finetune_cifar.py", "--data-dir", cifar_root, "--limit-train", 20, "--limit-test", 10,
                   "--out", tmp_path / "run", "--quiet", "--json", extra_env=env)
    assert r.returncode == 0, r.stderr
    assert f"no --weights: fine-tuning {CIFAR_DEFAULT}" in r.stderr and "4.5 h" in r.stderr, r.stderr
    meta = load_model(tmp_path / "run" / "model.npz")[2]
    assert meta["mode"] == "head" and meta["source_weights"] == CIFAR_DEFAULT
    assert meta["source_origin"]["commit"] == vit_b16_standin.repos[CIFAR_DEFAULT].sha


@pytest.mark.e2e
def test_bare_finetune_cifar_without_the_hub_names_weights_file(hub, tmp_path):
    r = run_script(SCRIPTS / "finetune_cifar.py", "--out", tmp_path / "run",
                   extra_env={"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    err = [s for s in r.stderr.strip().splitlines() if not s.startswith("no --weights")]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith("error: ") and "HF_HUB_OFFLINE" in err[0] and "--weights FILE" in err[0], r.stderr


def test_without_huggingface_hub_a_name_is_one_line_with_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as when not installed
    with pytest.raises(TinyViTError, match="pip install huggingface_hub"):
        load_model(TIMM)
