"""End-to-end runs of the CIFAR fine-tuning and benchmark scripts on tiny settings."""
import json
from pathlib import Path

import pytest
from helpers import run_script

from tinyvit.io.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("mode", ["head", "progressive"])
def test_finetune_cifar_smoke(tmp_path, mode, cifar_root, ti16):
    """Real ViT-Ti/16 weights at 32 px on a few hundred CIFAR images: runs, learns, checkpoint works."""
    extra = ["--epochs", "20"] if mode == "head" else ["--epochs", "2", "--batch-size", "32", "--grad-accum", "2"]
    r = run_script("finetune_cifar.py", "--weights", ti16, "--mode", mode, "--img-size", "32",
                   "--limit-train", "512", "--limit-test", "200", "--out", tmp_path, "--json", "--quiet",
                   "--data-dir", cifar_root, *extra)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if mode == "head":  # progressive's 2 short epochs at lr 5e-5 only prove it runs
        assert out["test_accuracy"] > 0.15, out  # chance is 0.10
    params, cfg, meta = load_checkpoint(out["checkpoint"])
    assert cfg.num_classes == 10 and cfg.img_size == 32 and meta["class_names"][0] == "airplane"
    ev = run_script("evaluate.py", out["checkpoint"], "--limit", "200", "--json", "--data-dir", cifar_root)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout.strip().splitlines()[-1])["test_accuracy"] == out["test_accuracy"]


def test_finetune_cifar_bad_weights_is_one_line(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x00" * 5)
    r = run_script("finetune_cifar.py", "--weights", bad, "--out", tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "w.safetensors" in r.stderr
    assert "Traceback" not in r.stderr


def test_benchmark_vs_torch_smoke():
    r = run_script("benchmark.py", "--preset", "mnist", "--batch", "4", "--reps", "1", "--rounds", "1",
                   "--vs-torch", "--json")
    assert r.returncode == 0, r.stderr
    case = json.loads(r.stdout.strip().splitlines()[-1])["cases"][0]
    for what in ("forward", "forward_backward", "train_step"):
        assert case[what]["tinyvit_ms"] > 0 and case[what]["torch_ms"] > 0 and case[what]["ratio"] > 0
    assert case["torch_matmul_peak_gflops"] > 0 and case["matmul_peak_gflops"] > 0
    assert 1 <= case["tinyvit_shards"] <= 4  # batch 4: at most one image per shard


def test_benchmark_freeze_times_the_step_with_and_without():
    r = run_script("benchmark.py", "--preset", "mnist", "--batch", "4", "--reps", "1", "--rounds", "1",
                   "--freeze", "patch_embed.*,cls_token,pos_embed,blocks.[0-4].*", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["full_step_ms"] > 0 and out["frozen_step_ms"] > 0 and out["ratio"] > 0
    assert 0 < out["trained_params"] < out["params"]
    from tinyvit.cpu import features  # which CPU and BLAS ran the figure
    assert out["hardware"]["features"] == features.cpu_features() and out["hardware"]["cpu"] == features.cpu_name()
    r = run_script("benchmark.py", "--preset", "mnist", "--freeze", "blocks.9.*")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--freeze 'blocks.9.*' matches no parameter" in r.stderr


def test_benchmark_memory_table_parses_and_tinyvits_peak_grows_with_batch():
    r = run_script("benchmark.py", "--memory", "tinyvit", "--preset", "mnist", "--batch", "4,128", "--json")
    res = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else r.stderr
    small, big = res["memory"]
    assert (small["batch"], big["batch"]) == (4, 128) and set(small) == {"preset", "batch", "tinyvit", "tinyvit_ckpt"}
    assert all(row["tinyvit"]["peak_mib"] > row["tinyvit"]["step_mib"] > 0 for row in (small, big))
    assert big["tinyvit"]["peak_mib"] > small["tinyvit"]["peak_mib"] + 10  # 124 more images' activations
    assert "peak_mib" in small["tinyvit_ckpt"] or small["tinyvit_ckpt"]["error"].startswith("not available")
    fit = next(f for f in res["fits"] if f["side"] == "tinyvit")
    assert fit["measured_batches"] == [4, 128] and fit["largest_batch_16gib"] > fit["largest_batch_8gib"] > 128
    table = run_script("benchmark.py", "--memory", "tinyvit", "--preset", "mnist", "--batch", "4").stdout
    assert table.splitlines()[1].split() == ["preset", "batch", "tinyvit", "tinyvit_ckpt"]
    assert float(table.splitlines()[2].split()[2]) > 0


# --- evaluate.py on a folder of some of the model's classes ------------------------------------

NAMES = ["cat", "dog", "owl"]
SUBSETS = {  # --data layout -> (class folders to write, the classes evaluated)
    "flat": ({"": ["cat", "owl"]}, ["cat", "owl"]),
    "train-and-val": ({"train": ["cat", "owl"], "val": ["cat", "owl"]}, ["cat", "owl"]),
    "val-lacks-one": ({"train": NAMES, "val": ["cat", "owl"]}, ["cat", "owl"]),
    "val-not-train": ({"train": ["dog"], "val": ["cat", "owl"]}, ["cat", "owl"]),  # train/ plays no part
    "one-class": ({"": ["owl"]}, ["owl"]),
}


def _folder_model(tmp_path, data):
    """A 3-class model as finetune.py records one trained on a folder, its head the nearest class
    centroid of data's images (so its answers follow the image's class), and its eval transform."""
    import numpy as np

    from tinyvit import init_params
    from tinyvit.data.decode import load_image
    from tinyvit.data.transform import EvalTransform
    from tinyvit.io.checkpoint import save_checkpoint
    from tinyvit.nn.model import ViTConfig, vit_features

    cfg = ViTConfig(img_size=16, patch_size=8, in_chans=3, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64)
    t = EvalTransform((0.5,) * 3, (0.25,) * 3, crop_pct=1.0)
    params = init_params(cfg, seed=4)
    w, b = np.zeros((3, cfg.dim), np.float32), np.full(3, -1e3, np.float32)
    for k, c in enumerate(NAMES):
        files = sorted(data.rglob(f"{c}/*.png"))
        if files:
            mu = vit_features(params, np.concatenate([load_image(f, cfg, t) for f in files]), cfg).mean(0)
            w[k], b[k] = mu, -0.5 * float(mu @ mu)
    params.update({"head.weight": w, "head.bias": b})
    meta = {"class_names": NAMES, "dataset": "folder", "data": str(tmp_path / "trained_on"), "val_split": 0.5,
            "split_seed": 0, "mean": list(t.mean), "std": list(t.std), "eval_transform": t.to_dict()}
    return save_checkpoint(tmp_path / "model.npz", params, cfg, meta), cfg, t


def _class_folders(root, layout):
    """Four 20x20 PNGs per class folder, each class its own colour under noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                a = rng.integers(0, 100, (20, 20, 3), dtype=np.uint8)
                a[..., NAMES.index(c)] += 150
                Image.fromarray(a).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("layout", sorted(SUBSETS))
def test_evaluate_a_folder_of_some_of_the_models_classes(tmp_path, layout):
    """One rule for every layout: the classes present are evaluated, each image scored over all the
    model's classes with its class folder matched by name, and one line says so."""
    import numpy as np

    from tinyvit.data.decode import load_image
    from tinyvit.data.folders import folder_splits
    from tinyvit.nn.model import vit_forward

    folders, present = SUBSETS[layout]
    data = _class_folders(tmp_path / "data", folders)
    ckpt, cfg, t = _folder_model(tmp_path, data)
    r = run_script("evaluate.py", ckpt, "--data", data, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    files = (sorted(map(str, (data / "val").glob("*/*.png"))) if "val" in folders else
             folder_splits(data, 0.5, 0, min_classes=1)[1].paths)  # the checkpoint's val_split and seed
    assert r.stderr == (f"note: {data}: {len(present)} of the model's 3 classes ({', '.join(present)}): evaluated on "
                        f"their {len(files)} images, each scored over all 3 classes\n")
    params = load_checkpoint(ckpt)[0]
    hits = [int(np.argmax(vit_forward(params, load_image(f, cfg, t), cfg, keep_cache=False)[0][0]))
            == NAMES.index(Path(f).parent.name) for f in files]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["images"] == len(files) and abs(out["test_accuracy"] - np.mean(hits)) < 1e-12
    assert np.mean(hits) == 1.0  # each class folder scored as its own class of the model's, not by position


def test_evaluate_refuses_a_class_the_model_does_not_know(tmp_path):
    data = _class_folders(tmp_path / "data", {"": ["cat", "dog"]})
    ckpt, _, _ = _folder_model(tmp_path, data)
    (data / "dog").rename(data / "emu")
    r = run_script("evaluate.py", ckpt, "--data", data, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr == (f"error: {data}: class folder 'emu' is not one of the model's 3 classes (cat, dog, owl); "
                        f"a folder of some of its classes is evaluated on those\n")
