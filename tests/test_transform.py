"""tinyvit.data.transform: one eval transform per checkpoint, recorded by fine-tuning and used by
predict.py and evaluate.py alike (they agreed on no photo before: centre square vs crop_pct)."""
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_script
from PIL import Image

from tinyvit import TinyViTError
from tinyvit.data.transform import EvalTransform, eval_transform


def _script(name, *args):
    r = run_script(name, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _photos(root, n=10):
    """photos/train|val/<a|b>/*.png: non-square noisy pictures, red-ish (a) or blue-ish (b) at a random spot."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, c in enumerate("ab"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                w, h = rng.integers(30, 90, size=2)
                a = rng.normal(120, 50, (h, w, 3))
                y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
                a[y0:y0 + h // 2, x0:x0 + w // 2, 0 if k == 0 else 2] += 90
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.e2e
def test_predict_and_evaluate_see_the_checkpoints_one_transform(tmp_path):
    """Fine-tune on a folder with crop_pct 0.6 (far from predict's old centre square): evaluate.py's
    accuracy is exactly predict.py's top-1 over the same validation files."""
    data = _photos(tmp_path / "photos")
    out = json.loads(_script("finetune.py", "--data", data, "--preset", "vit-ti16", "--img-size", "32",
                             "--crop-pct", "0.6", "--epochs", "10", "--batch-size", "8",
                             "--out", tmp_path / "run", "--json", "--quiet").splitlines()[-1])
    ckpt = out["checkpoint"]
    from tinyvit.io.checkpoint import load_checkpoint

    t = load_checkpoint(ckpt)[2]["eval_transform"]
    assert t["crop_pct"] == 0.6 and t["resize"] == "shortest_edge"
    evaluated = json.loads(_script("evaluate.py", ckpt, "--json").splitlines()[-1])["test_accuracy"]
    files = sorted((data / "val").rglob("*.png"))
    preds = json.loads(_script("predict.py", ckpt, *files, "--top-k", "1", "--json"))["predictions"]
    right = [p["top_k"][0]["class"] == Path(p["image"]).parent.name for p in preds]
    assert evaluated == sum(right) / len(files) == out["test_accuracy"]


@pytest.mark.parametrize("meta,want", [
    ({}, EvalTransform((0.5,) * 3, (0.5,) * 3, "shortest_edge", 0.875, "bicubic")),  # timm's default
    ({"dataset": "cifar10"}, EvalTransform((0.5,) * 3, (0.5,) * 3, crop_pct=1.0)),  # whole images
    ({"dataset": "folder", "crop_pct": 0.9, "mean": [0.1] * 3, "std": [0.2] * 3},
     EvalTransform((0.1,) * 3, (0.2,) * 3, crop_pct=0.9)),  # what older folder runs recorded
    ({"eval_transform": {"resize": "squash", "crop_pct": 0.5, "interpolation": "bilinear", "mean": [0.3] * 3,
                         "std": [0.4] * 3}}, EvalTransform((0.3,) * 3, (0.4,) * 3, "squash", 1.0, "bilinear")),
    ({"dataset": "mnist", "eval_transform": {"crop_pct": 1.0}},  # MNIST runs: gray levels inverted as they need
     EvalTransform((0.5,) * 3, (0.5,) * 3, crop_pct=1.0, invert="auto")),
])
def test_eval_transform_from_metadata(meta, want):
    assert eval_transform(meta, 3) == want
    assert eval_transform({"eval_transform": want.to_dict()}, 3) == want  # the record round-trips


@pytest.mark.parametrize("record", [{"resize": "lanczos"}, {"interpolation": "nearest"}, {"crop_pct": 0},
                                    {"crop_pct": 1.5}, {"crop_pct": "0.9"}, "squash", {"invert": "yes"}])
def test_a_bad_record_is_one_line(record):
    with pytest.raises(TinyViTError, match="ckpt.npz: "):
        eval_transform({"eval_transform": record}, 3, "ckpt.npz")
