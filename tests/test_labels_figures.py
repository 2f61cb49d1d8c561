"""ImageNet class names (file, conversion, predict's output) and the figures: show_patches and attention maps."""
import json

import numpy as np
import pytest
from helpers import load_script, run_script
from PIL import Image

from tinyvit import init_params
from tinyvit.data.decode import crop_box, load_image
from tinyvit.data.transform import EvalTransform
from tinyvit.io.checkpoint import load_checkpoint, save_checkpoint
from tinyvit.io.convert import convert
from tinyvit.io.labels import class_names_for, imagenet_classes
from tinyvit.nn.model import ViTConfig
from tinyvit.viz import BICUBIC, attention_figure, attention_layout, colormap, input_view, model_view, normalise_heat, panel_size

TINY1K = ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=1000, dim=32, depth=1, heads=2, mlp_dim=64)
RGB = ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=3, dim=32, depth=2, heads=2, mlp_dim=64)
# indices confirmed against a second source: timm's imagenet_synsets.txt + imagenet_synset_to_lemma.txt
SPOT = {0: "tench", 1: "goldfish", 134: "crane bird", 207: "golden retriever", 285: "Egyptian cat",
        409: "analog clock", 517: "crane", 639: "maillot tank suit", 817: "sports car", 948: "Granny Smith",
        999: "toilet tissue"}


def _script(name, *args, timeout=120):
    return run_script(name, *args, timeout=timeout)


def _show_patches_module():
    return load_script("show_patches.py")


def _photo(path, size=(50, 40), seed=0, mode="RGB"):
    """A random-content image file (smooth enough that bicubic resizing matters)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(a, mode="RGB").convert(mode).save(path)
    return path


# --- labels -------------------------------------------------------------------------------------


def test_imagenet_classes_file():
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert all(n and n == n.strip() and "," not in n for n in names)
    for i, want in SPOT.items():
        assert names[i] == want, (i, names[i], want)


def test_imagenet_classes_cached_and_fresh():
    a, b = imagenet_classes(), imagenet_classes()
    assert a == b and a is not b
    a[0] = "changed"
    assert imagenet_classes()[0] == "tench"


@pytest.mark.parametrize("case", ["real-id2label", "hf-placeholders", "no-labels", "untrained", "ten"])
def test_class_names_rules(case):
    real = {str(i): f"thing {i}" for i in range(1000)}
    if case == "real-id2label":
        assert class_names_for(real, 1000)[5] == "thing 5"  # the file's own names win
    elif case == "hf-placeholders":
        assert class_names_for({str(i): f"LABEL_{i}" for i in range(1000)}, 1000) == imagenet_classes()
    elif case == "no-labels":
        assert class_names_for(None, 1000) == imagenet_classes()
    elif case == "untrained":
        assert class_names_for(real, 1000, trained_head=False)[285] == "class_285"
    else:
        assert class_names_for(None, 10) == [f"class_{i}" for i in range(10)]


def test_convert_1000_class_timm_file_gets_imagenet_names(tmp_path):
    src = tmp_path / "tiny_timm.npz"
    np.savez(src, **init_params(TINY1K, seed=0))
    params, cfg, meta = convert(src, heads=2)
    assert cfg.num_classes == 1000 and meta["class_names"] == imagenet_classes()


@pytest.mark.e2e
def test_real_ti16_converted_and_predicted_with_names(tmp_path, ti16):
    out = tmp_path / "ti16.npz"
    r = _script("convert_weights.py", ti16, "--out", out)
    assert r.returncode == 0, r.stderr
    _, cfg, meta = load_checkpoint(out)
    assert cfg.num_classes == 1000 and meta["class_names"] == imagenet_classes()
    img = tmp_path / "orange.png"
    Image.new("RGB", (240, 200), (240, 140, 20)).save(img)
    r = _script("predict.py", out, img, "--top-k", "3")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith(f"{img}: ") and line.count("%") == 3 and "class_" not in line
    r = _script("predict.py", out, img, "--top-k", "3", "--json")
    tops = json.loads(r.stdout)["predictions"][0]["top_k"]
    names = imagenet_classes()
    assert all(t["class"] == names[t["index"]] for t in tops)
    assert f"{tops[0]['class']} ({tops[0]['probability'] * 100:.1f}%)" in line


# --- show_patches -------------------------------------------------------------------------------


def _expected_view(path, size):
    """The model's view, computed here with Pillow directly: centre square, bicubic, RGB."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        return np.asarray(im.resize((size, size), BICUBIC, box=crop_box(*im.size), reducing_gap=3.0))


@pytest.mark.e2e
@pytest.mark.parametrize("size,patch,scale,columns", [(32, 8, 1, 5), (48, 16, 3, None), (224, 16, None, None)])
def test_show_patches_tiles_are_the_patches(tmp_path, size, patch, scale, columns):
    src = _photo(tmp_path / "photo.png", (70, 45))
    out = tmp_path / "figs" / "patches.png"
    extra = (["--scale", scale] if scale else []) + (["--columns", columns] if columns else [])
    r = _script("show_patches.py", src, "--patch", patch, "--size", size, "--out", out, *extra)
    assert r.returncode == 0, r.stderr
    sp = _show_patches_module()
    g = size // patch
    s = scale or sp.auto_scale(size, patch)
    lay = sp.layout(size, patch, s, columns or min(g * g, 2 * g))
    fig = np.asarray(Image.open(out).convert("RGB"))
    assert (fig.shape[1], fig.shape[0]) == lay["size"]
    view = _expected_view(src, size)
    np.testing.assert_array_equal(view, model_view(Image.open(src), size))
    t = patch * s
    assert len(lay["tiles"]) == g * g
    for k, (x, y) in enumerate(lay["tiles"]):
        i, j = divmod(k, g)
        want = np.repeat(np.repeat(view[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch], s, 0), s, 1)
        np.testing.assert_array_equal(fig[y:y + t, x:x + t], want, err_msg=f"tile {k}")
    x0, y0 = lay["image"]
    left = fig[y0:y0 + size * s, x0:x0 + size * s]
    inside = np.ones((size * s, size * s), bool)
    inside[::t] = inside[:, ::t] = False  # the gridlines
    big = np.repeat(np.repeat(view, s, 0), s, 1)
    np.testing.assert_array_equal(left[inside], big[inside])
    assert np.abs(left[~inside].astype(int) - big[~inside]).mean() > 5  # lines drawn


@pytest.mark.e2e
def test_show_patches_json_is_one_line_describing_the_figure(tmp_path):
    out = tmp_path / "p.png"
    r = _script("show_patches.py", _photo(tmp_path / "photo.png", (40, 30)), "--patch", 8, "--size", 32, "--out", out,
                "--json")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1
    got = json.loads(r.stdout)
    with Image.open(out) as im:
        assert (got["width"], got["height"]) == im.size
    assert got == {**got, "out": str(out), "size": 32, "patch": 8, "patches": 16, "columns": 8}


@pytest.mark.e2e
def test_show_patches_help():
    r = _script("show_patches.py", "--help")
    assert r.returncode == 0 and "--patch" in r.stdout and "--size" in r.stdout and "--out" in r.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "size-not-multiple", "out-under-file"])
def test_show_patches_errors_are_one_line(tmp_path, case):
    img, args = tmp_path / f"bad_{case}.png", []
    if case == "empty":
        img.write_bytes(b"")
    elif case == "text":
        img.write_text("not an image\n")
    elif case == "truncated":
        _photo(img, (64, 64))
        img.write_bytes(img.read_bytes()[:3000])
    elif case in ("size-not-multiple", "out-under-file"):
        _photo(img)
    if case == "size-not-multiple":
        args, name = ["--size", "225"], "--size 225"
    elif case == "out-under-file":
        (tmp_path / "file").write_text("x")
        args, name = ["--out", tmp_path / "file" / "p.png"], "file"
    else:
        name = img.name
    r = _script("show_patches.py", img, "--out", tmp_path / "p.png", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and name in r.stderr
    assert "Traceback" not in r.stderr


# --- attention figure ---------------------------------------------------------------------------


def _nearest_in_colormap(rgb):
    """Distance of each RGB pixel (N, 3) to the closest of 4096 colour-map samples."""
    lut = colormap(np.linspace(0.0, 1.0, 4096)).astype(np.int32)  # (4096, 3)
    d = np.abs(rgb.astype(np.int32)[:, None, :] - lut[None]).max(-1)  # (N, 4096)
    return d.min(1)


def test_normalise_heat():
    h = np.linspace(0.0, 1.0, 196).reshape(14, 14)  # ViT-B/16's grid
    h[13, 13] = 100.0  # one outlier patch
    v = normalise_heat(h)
    assert v.min() == 0.0 and v.max() == 1.0 and np.percentile(v, 80) > 0.5  # the rest is not flattened
    np.testing.assert_array_equal(normalise_heat(np.full((3, 3), 0.2)), 0.0)


def test_attention_figure_panels():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 90, 3)).astype(np.uint8), mode="RGB")
    heat = np.zeros((4, 4))
    heat[0, 0], heat[3, 3] = 1.0, -1.0  # hot top left, cold bottom right
    heat[1:3, 1:3] = np.arange(4).reshape(2, 2) / 8
    view = model_view(img, 32)
    fig = attention_figure(view, heat, title="x")
    lay = attention_layout(32)
    assert fig.size == lay["size"] and fig.mode == "RGB"
    a = np.asarray(fig)
    p = panel_size(32)
    assert p == 224
    crop = {k: a[b[1]:b[3], b[0]:b[2]] for k, b in lay.items() if k != "size"}
    assert all(crop[k].shape == (p, p, 3) for k in ("image", "heat", "overlay"))
    np.testing.assert_array_equal(crop["image"], np.repeat(np.repeat(view, 7, 0), 7, 1))
    hp = crop["heat"]
    assert _nearest_in_colormap(hp.reshape(-1, 3)[::7]).max() <= 2  # colours come from the map
    assert len(np.unique(hp.reshape(-1, 3), axis=0)) > 50 and hp.std() > 20  # and vary
    np.testing.assert_array_equal(hp[0, 0], colormap(1.0))  # hot corner
    np.testing.assert_array_equal(hp[-1, -1], colormap(0.0))  # cold corner
    ov = crop["overlay"].astype(int)
    assert np.abs(ov - hp).mean() > 10 and np.abs(ov - crop["image"]).mean() > 10
    bar = crop["bar"]
    assert bar.shape[0] > 150 and _nearest_in_colormap(bar[:, bar.shape[1] // 2]).max() <= 2
    np.testing.assert_array_equal(bar[0, 2], colormap(1.0))  # high on top
    np.testing.assert_array_equal(bar[-1, 2], colormap(0.0))


@pytest.mark.e2e
def test_predict_attention_figure(tmp_path):
    ckpt = save_checkpoint(tmp_path / "rgb.npz", init_params(RGB, seed=2), RGB,
                           meta={"class_names": ["cat", "dog", "bird"], "mean": [0.5] * 3, "std": [0.5] * 3,
                                 "eval_transform": EvalTransform([0.5] * 3, [0.5] * 3, crop_pct=1.0).to_dict()})
    src = _photo(tmp_path / "wide.jpg", (90, 40))
    out = tmp_path / "att.png"
    r = _script("predict.py", ckpt, src, "--attention-map", out)
    assert r.returncode == 0, r.stderr
    lay = attention_layout(32)
    a = np.asarray(Image.open(out).convert("RGB"))
    assert (a.shape[1], a.shape[0]) == lay["size"]
    x0, y0, x1, y1 = lay["heat"]
    hp = a[y0:y1, x0:x1].reshape(-1, 3)
    assert _nearest_in_colormap(hp[::11]).max() <= 2 and hp.std() > 10
    x0, y0, x1, y1 = lay["image"]  # exactly the (un-normalised) model input, magnified 7x
    seen = input_view(load_image(src, RGB, EvalTransform([0.5] * 3, [0.5] * 3, crop_pct=1.0))[0], [0.5] * 3, [0.5] * 3)
    np.testing.assert_array_equal(a[y0:y1, x0:x1], np.repeat(np.repeat(seen, 7, 0), 7, 1))
    assert np.abs(seen.astype(int) - model_view(Image.open(src), 32)).max() <= 1


@pytest.mark.e2e
def test_predict_attention_figure_shows_inverted_mnist_input(tmp_path):
    """An MNIST model inverts dark ink on white paper: the figure shows the white-on-black it saw."""
    cfg = ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64)
    ckpt = save_checkpoint(tmp_path / "m.npz", init_params(cfg, seed=1), cfg,
                           meta={"class_names": [str(i) for i in range(10)], "dataset": "mnist"})
    paper = Image.new("L", (56, 56), 255)
    paper.paste(0, (20, 10, 36, 46))
    paper.save(tmp_path / "digit.png")
    r = _script("predict.py", ckpt, tmp_path / "digit.png", "--attention-map", tmp_path / "att.png")
    assert r.returncode == 0, r.stderr
    lay = attention_layout(28)
    a = np.asarray(Image.open(tmp_path / "att.png").convert("RGB"))
    assert (a.shape[1], a.shape[0]) == lay["size"]
    x0, y0, x1, y1 = lay["image"]
    panel = a[y0:y1, x0:x1]
    assert panel[:8, :8].max() == 0 and panel[112, 112].min() == 255  # black paper, white ink
