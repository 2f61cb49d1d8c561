"""tinyvit.data.transform: one eval transform per checkpoint, recorded by fine-tuning and used by
predict.py and evaluate.py alike (they agreed on no photo before: centre square vs crop_pct)."""
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_script
from PIL import Image

from tinyvit import TinyViTError
from tinyvit.data.decode import InputSize, model_pixels
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


@pytest.mark.parametrize("resize,crop_mode,crop_pct", [("shortest_edge", "center", 0.875), ("shortest_edge", "center", 1.0),
                                                       ("squash", "squash", 1.0)])
@pytest.mark.parametrize("hw", [(42, 28), (28, 70), (56, 56)])
@pytest.mark.parametrize("image", [(61, 97), (120, 45)])  # Pillow's (w, h): tall, wide
def test_an_any_size_model_sees_timms_pixels(resize, crop_mode, hw, crop_pct, image):
    """--img-size H,W: timm's eval transform of that input_size (a rectangle too), pixel for pixel (squash:
    the whole image, as tinyvit's square squash, which is timm's at crop_pct 1)."""
    timm_data = pytest.importorskip("timm.data")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (image[1], image[0], 3), dtype=np.uint8))
    t = timm_data.create_transform(input_size=(3,) + hw, crop_pct=crop_pct, interpolation="bicubic",
                                   crop_mode=crop_mode, mean=(0, 0, 0), std=(1, 1, 1))
    want = t(img).numpy().transpose(1, 2, 0)  # (H, W, 3)
    got = model_pixels(img, InputSize(28, 14, hw=hw), 3, resize=resize, crop_pct=crop_pct, interpolation="bicubic")
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-6


def test_keep_aspect_gives_each_image_whole():
    """--keep-aspect: the shorter side to the model's size, the longer in proportion to the nearest multiple
    of the patch, nothing cropped."""
    size = InputSize(224, 16, keep_aspect=True)
    assert size.for_image(640, 480) == (224, 304)  # 298.7 -> 304
    assert size.for_image(480, 640) == (304, 224)
    assert size.for_image(300, 300) == (224, 224)
    assert size.for_image(5000, 10) == (224, 112000)  # shapes as they come: the pixel limit bounds the file
    img = Image.new("RGB", (640, 480), (10, 200, 30))
    assert model_pixels(img, size, 3).shape == (224, 304, 3)
