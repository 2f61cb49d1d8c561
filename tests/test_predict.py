"""Image loading (every Pillow mode, sizes, limits, bad files), attention rollout, and scripts/predict.py."""
import json
import struct
import time
import zlib

import numpy as np
import pytest
from helpers import ROOT, run_python, run_script
from PIL import Image

from tinyvit import TinyViTError, init_params, preset
from tinyvit.backend import to_numpy
from tinyvit.data.decode import InputSize, auto_invert, image_to_input, load_image, open_image
from tinyvit.data.transform import EvalTransform, eval_transform, normalisation
from tinyvit.io.checkpoint import load_checkpoint, save_checkpoint
from tinyvit.nn.model import ViTConfig, attention_maps, vit_forward
from tinyvit.viz import attention_layout, attention_rollout, colormap, overlay_attention, rollout_matrix

MNIST = preset("mnist", depth=1, patch_size=7, dim=32, heads=2, mlp_dim=64)
RGB = ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=3, dim=32, depth=2, heads=2, mlp_dim=64)
M_MEAN, M_STD = (0.1307,), (0.3081,)
R_MEAN, R_STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
RGB_NAMES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A 1-channel MNIST-style and a 3-channel 3-class checkpoint with metadata."""
    d = tmp_path_factory.mktemp("ckpt")
    m = save_checkpoint(d / "mnist.npz", init_params(MNIST, seed=1), MNIST,
                        meta={"class_names": [str(i) for i in range(10)], "mean": M_MEAN, "std": M_STD,
                              "dataset": "mnist"})
    r = save_checkpoint(d / "rgb.npz", init_params(RGB, seed=2), RGB,
                        meta={"class_names": RGB_NAMES, "mean": R_MEAN, "std": R_STD})
    return m, r


def _rng_array(shape, hi=256, dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, hi, size=shape).astype(dtype)


def _make(mode, size):
    """A random-content image of the given Pillow mode and (w, h) size."""
    w, h = size
    if mode in ("L", "RGB", "RGBA", "LA", "CMYK"):
        ch = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}[mode]
        a = _rng_array((h, w, ch) if ch > 1 else (h, w))
        return Image.fromarray(a, mode=mode)
    if mode == "1":
        return Image.fromarray(_rng_array((h, w), 2) * 255, mode="L").convert("1")
    if mode == "P":
        return Image.fromarray(_rng_array((h, w, 3)), mode="RGB").convert("P")
    if mode == "I;16":
        return Image.fromarray(_rng_array((h, w), 65536, np.uint16))
    if mode == "I":
        return Image.fromarray(_rng_array((h, w), 65536, np.int32), mode="I")
    if mode == "F":
        return Image.fromarray(np.random.default_rng(0).random((h, w), dtype=np.float32), mode="F")
    raise ValueError(mode)


FORMAT = {"CMYK": "jpg", "I": "tif", "F": "tif"}
MODES = ["RGBA", "LA", "P", "I;16", "I", "F", "L", "1", "CMYK", "RGB"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(5, 3), (300, 50), (40, 90)], ids=["tiny", "wide", "tall"])
@pytest.mark.parametrize("cfg", [MNIST, RGB], ids=["gray-model", "rgb-model"])
def test_every_mode_and_size(tmp_path, mode, size, cfg):
    p = tmp_path / f"img.{FORMAT.get(mode, 'png')}"
    _make(mode, size).save(p)
    mean, std = (M_MEAN, M_STD) if cfg.in_chans == 1 else (R_MEAN, R_STD)
    x = load_image(p, cfg, EvalTransform(mean, std, crop_pct=1.0))
    assert x.shape == (1, cfg.in_chans, cfg.img_size, cfg.img_size) and x.dtype == np.float32
    raw = x[0] * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]  # back to [0, 1]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5 and np.isfinite(x).all()


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_large_image_both_formats(tmp_path, fmt):
    """3000x2000: resized (JPEG via draft), quick; a flat image stays flat."""
    p = tmp_path / f"big.{fmt}"
    Image.new("RGB", (3000, 2000), (200, 100, 50)).save(p)
    t0 = time.process_time()  # CPU seconds: a loaded machine stretches the clock, not this (measured ~0.1 s)
    x = load_image(p, RGB, EvalTransform(R_MEAN, R_STD, crop_pct=1.0))
    assert time.process_time() - t0 < 5
    raw = x[0] * np.array(R_STD)[:, None, None] + np.array(R_MEAN)[:, None, None]
    np.testing.assert_allclose(raw.mean(axis=(1, 2)), np.array([200, 100, 50]) / 255, atol=2 / 255)


def test_constant_rgb_exact(tmp_path):
    p = tmp_path / "c.png"
    Image.new("RGB", (70, 30), (255, 0, 128)).save(p)
    x = load_image(p, RGB, EvalTransform(R_MEAN, R_STD, crop_pct=1.0))
    want = (np.array([255, 0, 128]) / 255 - np.array(R_MEAN)) / np.array(R_STD)
    np.testing.assert_allclose(x[0], np.broadcast_to(want[:, None, None], (3, 32, 32)), atol=1e-6)


def test_constant_gray_exact_and_replicated_into_rgb(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (9, 13), 77).save(p)
    x = load_image(p, MNIST, EvalTransform(M_MEAN, M_STD, crop_pct=1.0), invert=False)
    np.testing.assert_allclose(x, np.full((1, 1, 28, 28), (77 / 255 - 0.1307) / 0.3081), atol=1e-6)
    x3 = load_image(p, RGB, EvalTransform(R_MEAN, R_STD, crop_pct=1.0))
    np.testing.assert_allclose(x3[0, :, 0, 0], (77 / 255 - np.array(R_MEAN)) / np.array(R_STD), atol=1e-6)


def test_rgb_into_gray_model_uses_luma(tmp_path):
    p = tmp_path / "c.png"
    Image.new("RGB", (28, 28), (200, 40, 10)).save(p)
    x = load_image(p, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0))
    np.testing.assert_allclose(x, (200 * 0.299 + 40 * 0.587 + 10 * 0.114) / 255, atol=1 / 255)


@pytest.mark.parametrize("value", [300, 16384, 65535])
def test_16bit_png_scaled_with_full_precision(tmp_path, value):
    """I;16 is value/65535 (Pillow's own convert('L') would clip 300 to 255 -> 1.0)."""
    p = tmp_path / "d.png"
    Image.fromarray(np.full((20, 30), value, np.uint16)).save(p)
    assert Image.open(p).mode.startswith("I;16")
    x = load_image(p, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), invert=False)
    np.testing.assert_allclose(x, value / 65535, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value,want", [(200, 200 / 255), (30000, 30000 / 65535), (-5, 0.0), (90000, 1.0)])
def test_32bit_int_image_rule(tmp_path, value, want):
    p = tmp_path / "i.tif"
    Image.new("I", (8, 8), value).save(p)
    x = load_image(p, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), invert=False)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value,want", [(0.25, 0.25), (128.0, 128 / 255), (300.0, 1.0)])
def test_float_image_rule(tmp_path, value, want):
    p = tmp_path / "f.tif"
    Image.new("F", (8, 8), value).save(p)
    np.testing.assert_allclose(load_image(p, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), invert=False), want, rtol=1e-5)


def _with_alpha(kind, path):
    """A file whose alpha hides colours unlike white or black: RGBA, LA, or a palette PNG / GIF with
    transparency (several colours, two of them transparent)."""
    rng = np.random.default_rng(5)
    if kind in ("RGBA", "LA"):
        a = rng.integers(0, 256, (30, 40, len(kind)), dtype=np.uint8)
        a[:10, ..., -1] = 0  # a fully transparent band over coloured pixels
        Image.fromarray(a, kind).save(path)
        return path
    img = Image.fromarray(rng.integers(0, 4, (30, 40), dtype=np.uint8), "P")
    img.putpalette([200, 30, 90, 10, 250, 40, 60, 60, 200, 240, 240, 20] + [0] * 756)
    img.save(path, transparency=bytes([0, 255, 128, 255]) if kind == "P-png" else 1)  # tRNS bytes / a GIF index
    return path


ALPHA_KINDS = {"RGBA": "png", "LA": "png", "P-png": "png", "P-gif": "gif"}


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # Pillow's, on the libraries' convert
@pytest.mark.parametrize("kind", sorted(ALPHA_KINDS))
def test_alpha_is_dropped_as_pil_timm_and_transformers_load_files(tmp_path, kind):
    """The pixels are those of Pillow's convert("RGB"), which timm's ImageDataset and transformers'
    load_image (pipeline() given a file) apply: alpha dropped, the colour under it kept."""
    from tinyvit.data.decode import eval_resize, model_pixels

    (tmp_path / "c").mkdir()  # timm's ImageDataset reads class folders
    p = _with_alpha(kind, tmp_path / "c" / f"a.{ALPHA_KINDS[kind]}")
    ref = Image.open(p).convert("RGB")
    assert Image.open(p).mode in ("RGBA", "LA", "P") and len(np.unique(np.asarray(ref).reshape(-1, 3), axis=0)) > 2
    timm_data = pytest.importorskip("timm.data")
    image_utils = pytest.importorskip("transformers.image_utils")
    if ALPHA_KINDS[kind] != "gif":  # timm's folder reader lists .png, .jpg and .jpeg only
        assert np.array_equal(np.asarray(timm_data.ImageDataset(str(tmp_path))[0][0]), np.asarray(ref))
    assert np.array_equal(np.asarray(image_utils.load_image(str(p))), np.asarray(ref))
    for geometry in ({"resize": "squash"}, {"crop_pct": 0.9, "interpolation": "bilinear"}):
        np.testing.assert_array_equal(model_pixels(open_image(p), 24, 3, **geometry),
                                      np.asarray(eval_resize(ref, 24, **geometry), np.float32) / 255)
        np.testing.assert_array_equal(model_pixels(open_image(p), 24, 1, **geometry),  # luminance of the same
                                      np.asarray(eval_resize(ref.convert("L"), 24, **geometry), np.float32)[..., None] / 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_picture_only_in_the_alpha_channel_is_refused(tmp_path, mode):
    """Black strokes on a transparent black canvas (a drawing app's export) are blank without alpha."""
    img = Image.new(mode, (40, 40), (0,) * len(mode))
    img.paste((0,) * (len(mode) - 1) + (255,), (15, 5, 25, 35))
    img.save(tmp_path / "drawn.png")
    with pytest.raises(TinyViTError, match=r"drawn.png: the picture is only in the alpha channel .* flatten it"):
        load_image(tmp_path / "drawn.png", MNIST, EvalTransform(M_MEAN, M_STD, crop_pct=1.0))
    img.convert("RGB" if mode == "RGBA" else "L").save(tmp_path / "flat.png")  # flat colour, no alpha: no refusal
    assert load_image(tmp_path / "flat.png", MNIST, EvalTransform(M_MEAN, M_STD, crop_pct=1.0)).shape == (1, 1, 28, 28)


def test_inversion_rules(tmp_path):
    """Dark ink on white: auto inverts for mnist only; yes/no are obeyed; white-on-black is kept."""
    paper = Image.new("L", (56, 56), 255)
    paper.paste(0, (20, 10, 36, 46))
    p = tmp_path / "paper.png"
    paper.save(p)
    plain = load_image(p, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), invert=False)
    auto = load_image(p, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), invert=None, dataset="mnist")
    np.testing.assert_allclose(auto, 1 - plain, atol=1e-6)
    np.testing.assert_allclose(load_image(p, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), dataset="cifar10"), plain)
    np.testing.assert_allclose(load_image(p, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), invert=True), 1 - plain, atol=1e-6)
    digit = Image.new("L", (28, 28), 0)
    digit.paste(255, (10, 5, 18, 23))
    q = tmp_path / "digit.png"
    digit.save(q)
    assert not auto_invert(load_image(q, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), invert=False)[0].transpose(1, 2, 0))
    np.testing.assert_allclose(load_image(q, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), dataset="mnist"),
                               load_image(q, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), invert=False))


def test_non_square_is_centre_cropped(tmp_path):
    """Left and right thirds of a 3:1 image are cut off: only the middle colour is seen (the
    bicubic support blends in the neighbours at the very edge, as resize-then-crop would)."""
    img = Image.new("L", (300, 100), 0)
    img.paste(200, (100, 0, 200, 100))
    p = tmp_path / "w.png"
    img.save(p)
    x = load_image(p, MNIST, EvalTransform((0.0,), (1.0,), crop_pct=1.0), invert=False)
    np.testing.assert_allclose(x[..., 2:-2], 200 / 255, atol=1e-6)
    np.testing.assert_allclose(x, 200 / 255, atol=0.1)


def test_exif_orientation_applied(tmp_path):
    """A JPEG stored 40x20 with orientation 6 (rotate 90) is read upright, 20x40."""
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    upright = open_image(p)
    assert upright.size == (20, 40)
    x = np.asarray(upright, np.float32)
    assert x[:20].mean() > 200 and x[20:].mean() < 50  # white half now on top


def _png_header(w, h):
    """A PNG with a real IHDR claiming w x h, and no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_quickly(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header(30000, 30000))
    before = Image.MAX_IMAGE_PIXELS
    t0 = time.process_time()  # CPU seconds: the header alone is read (decoding 900M pixels would take many)
    with pytest.raises(TinyViTError, match=r"bomb\.png.*(limit|bomb)"):
        load_image(p, MNIST, EvalTransform(M_MEAN, M_STD, crop_pct=1.0))
    assert time.process_time() - t0 < 1
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global limit restored


@pytest.mark.parametrize("limit", [9000, 4000], ids=["own-check", "pillow-check"])
def test_max_pixels_lowered(tmp_path, limit):
    p = tmp_path / "small.png"
    Image.new("L", (100, 100), 3).save(p)
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(TinyViTError, match=r"small\.png.*limit"):
        load_image(p, MNIST, EvalTransform(M_MEAN, M_STD, crop_pct=1.0), max_pixels=limit)
    assert Image.MAX_IMAGE_PIXELS == before
    assert load_image(p, MNIST, EvalTransform(M_MEAN, M_STD, crop_pct=1.0), max_pixels=10000).shape == (1, 1, 28, 28)


def _truncated_png(p):
    Image.fromarray(_rng_array((64, 64, 3))).save(p)
    p.write_bytes(p.read_bytes()[:3000])


@pytest.mark.parametrize("kind,pattern", [
    ("missing", "no such image file"), ("empty", "file is empty"), ("text", "not an image"),
    ("truncated", "truncated or corrupt"), ("dir", "not a file"), ("header-only", "truncated or corrupt"),
])
def test_bad_files_name_the_file(tmp_path, kind, pattern):
    p = tmp_path / f"bad_{kind}.png"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("hello, not an image\n")
    elif kind == "truncated":
        _truncated_png(p)
    elif kind == "dir":
        p.mkdir()
    elif kind == "header-only":
        p.write_bytes(_png_header(10, 10))
    with pytest.raises(TinyViTError, match=pattern) as e:
        load_image(p, MNIST, EvalTransform(M_MEAN, M_STD, crop_pct=1.0))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_normalisation_fallbacks():
    assert normalisation({}, 1) == ((0.1307,), (0.3081,))
    assert normalisation({}, 3) == ((0.5,) * 3, (0.5,) * 3)
    assert normalisation({"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]}, 3) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    with pytest.raises(TinyViTError, match="3 channels"):
        normalisation({"mean": [0.1], "std": [1]}, 3)


# --- attention rollout --------------------------------------------------------------------------


def _random_maps(rng, blocks, B, H, T):
    """Row-stochastic attention maps (B, H, T, T) per block."""
    out = []
    for _ in range(blocks):
        a = rng.random((B, H, T, T)) + 0.05
        out.append(a / a.sum(-1, keepdims=True))
    return out


def test_rollout_rows_sum_to_one_and_shape():
    maps = _random_maps(np.random.default_rng(0), 3, 2, 4, 17)
    r = rollout_matrix(maps)
    assert r.shape == (2, 17, 17)
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-12)
    heat = attention_rollout(maps)
    assert heat.shape == (2, 4, 4) and (heat > 0).all() and (heat.sum((1, 2)) < 1).all()


def test_rollout_identity_and_uniform():
    T = 10
    eye = np.broadcast_to(np.eye(T), (1, 3, T, T))
    np.testing.assert_allclose(rollout_matrix([eye, eye]), np.eye(T)[None])
    np.testing.assert_allclose(attention_rollout([eye, eye]), 0.0)  # CLS attends only to itself
    uni = np.full((1, 2, T, T), 1 / T)
    heat = attention_rollout([uni, uni, uni])
    np.testing.assert_allclose(heat, heat[0, 0, 0])  # every patch alike
    assert 0 < heat[0, 0, 0] < 1 / 9


def test_rollout_two_blocks_by_hand():
    """Direct loops: head mean, +I, row-normalise, R = A2 A1, CLS row over patches on the 2x2 grid."""
    rng = np.random.default_rng(5)
    maps = _random_maps(rng, 2, 2, 3, 5)
    want = np.zeros((2, 2, 2))
    for b in range(2):
        ab = []
        for m in maps:
            a = np.zeros((5, 5))
            for i in range(5):
                for j in range(5):
                    a[i, j] = sum(m[b, h, i, j] for h in range(3)) / 3 + (i == j)
                a[i] /= a[i].sum()
            ab.append(a)
        for p in range(4):
            want[b, p // 2, p % 2] = sum(ab[1][0, k] * ab[0][k, 1 + p] for k in range(5))
    np.testing.assert_allclose(attention_rollout(maps), want, rtol=1e-12)


def test_rollout_accepts_backend_arrays(xp):
    maps = [xp.asarray(m) for m in _random_maps(np.random.default_rng(1), 2, 1, 2, 5)]
    heat = attention_rollout(maps)
    assert isinstance(heat, np.ndarray)
    np.testing.assert_allclose(heat, attention_rollout([to_numpy(m) for m in maps]))


def test_rollout_from_model_and_overlay():
    params = init_params(RGB, seed=3)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    _, cache = vit_forward(params, x, RGB, all_tokens=True)
    heat = attention_rollout(attention_maps(cache))
    assert heat.shape == (2, 4, 4) and np.isfinite(heat).all()
    img = Image.new("RGB", (90, 40), (10, 20, 30))
    out = overlay_attention(img, heat[0])
    assert out.size == (90, 40) and out.mode == "RGB"
    assert colormap(np.array([0.0, 1.0])).tolist() == [[0, 0, 4], [252, 255, 164]]


def test_rollout_bad_input():
    with pytest.raises(TinyViTError):
        attention_rollout([])
    with pytest.raises(TinyViTError, match="square grid"):
        attention_rollout([np.full((1, 1, 4, 4), 0.25)])


# --- the script ---------------------------------------------------------------------------------


def _predict(*args):
    return run_script("predict.py", *args, timeout=60)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    digit = Image.new("L", (60, 40), 255)
    digit.paste(0, (25, 8, 35, 32))
    digit.save(d / "digit.png")
    _make("RGB", (64, 48)).save(d / "photo.jpg")
    _make("RGBA", (33, 70)).save(d / "sticker.png")
    return d


@pytest.mark.e2e
def test_cli_text_output(ckpts, pictures):
    r = _predict(ckpts[0], pictures / "digit.png", pictures / "photo.jpg", "--top-k", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{pictures / 'digit.png'}: ")
    assert lines[0].count("%") == 3


@pytest.mark.e2e
def test_cli_json_and_attention_maps(ckpts, pictures, tmp_path):
    imgs = [pictures / "digit.png", pictures / "photo.jpg", pictures / "sticker.png"]
    out = tmp_path / "maps" / "out.png"
    r = _predict(ckpts[1], *imgs, "--json", "--top-k", "10", "--attention-map", out, "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout.strip().splitlines()[-1])["predictions"]
    assert [p["image"] for p in preds] == [str(i) for i in imgs]
    for p, img in zip(preds, imgs):
        tops = p["top_k"]
        assert len(tops) == 3  # clamped to the class count
        probs = [t["probability"] for t in tops]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
        assert {t["class"] for t in tops} == set(RGB_NAMES)
        assert all(RGB_NAMES[t["index"]] == t["class"] for t in tops)
        m = out.parent / f"out_{img.stem}.png"
        assert p["attention_map"] == str(m)
        with Image.open(m) as a:  # the four-panel figure (image, heat map, overlay, colour bar)
            assert a.size == attention_layout(RGB.img_size)["size"] and a.mode == "RGB"


@pytest.mark.e2e
def test_cli_single_attention_map_uses_out_name(ckpts, pictures, tmp_path):
    out = tmp_path / "att.png"
    r = _predict(ckpts[0], pictures / "digit.png", "--attention-map", out, "--invert", "yes")
    assert r.returncode == 0, r.stderr
    with Image.open(out) as a:
        assert a.size == attention_layout(MNIST.img_size)["size"]


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["missing-image", "bad-checkpoint", "bad-top-k"])
def test_cli_errors_are_one_line(ckpts, pictures, tmp_path, case):
    if case == "missing-image":
        args, name = [ckpts[0], pictures / "digit.png", tmp_path / "nope.png"], "nope.png"
    elif case == "bad-checkpoint":
        (tmp_path / "bad.npz").write_bytes(b"not a zip")
        args, name = [tmp_path / "bad.npz", pictures / "digit.png"], "bad.npz"
    else:
        args, name = [ckpts[0], pictures / "digit.png", "--top-k", "0"], "top-k"
    r = _predict(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and name in r.stderr
    assert "Traceback" not in r.stderr


# --- other weights files, and the attention map's format ---------------------------------------


@pytest.mark.e2e
def test_cli_takes_any_weights_file(pictures, tmp_path):
    """A timm .safetensors (the safetensors package's own writer) and a torch .pth, converted in memory."""
    save_file = pytest.importorskip("safetensors.numpy").save_file
    torch = pytest.importorskip("torch")
    cfg = ViTConfig(img_size=32, patch_size=16, in_chans=3, num_classes=4, dim=64, depth=1, heads=1, mlp_dim=64)
    params = init_params(cfg, seed=3)
    save_file(params, str(tmp_path / "model.safetensors"), {"format": "pt"})
    torch.save({k: torch.from_numpy(v) for k, v in params.items()}, tmp_path / "vit.pth")
    ckpt = save_checkpoint(tmp_path / "m.npz", params, cfg, {"class_names": [f"class_{i}" for i in range(4)]})
    outs = []
    for model in (tmp_path / "model.safetensors", tmp_path / "vit.pth", ckpt):
        r = _predict(model, pictures / "photo.jpg", "--json")
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout.strip().splitlines()[-1])["predictions"][0]["top_k"])
    assert outs[0] == outs[1] == outs[2]  # converted in memory = converted and saved by tinyvit


@pytest.mark.e2e
def test_cli_names_an_image_given_as_the_checkpoint(ckpts, pictures):
    r = _predict(pictures / "digit.png", ckpts[0])
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == (f"error: {pictures / 'digit.png'}: is an image, not a model: "
                        f"predict.py takes the checkpoint first, then images\n")


@pytest.mark.e2e
@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP"), (".bmp", "BMP"),
                                        (".tiff", "TIFF")])
def test_cli_attention_map_format_follows_suffix(ckpts, pictures, tmp_path, suffix, fmt):
    from PIL import features

    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    r = _predict(ckpts[1], pictures / "photo.jpg", pictures / "digit.png", "--attention-map", tmp_path / f"att{suffix}")
    assert r.returncode == 0, r.stderr
    for stem in ("photo", "digit"):
        with Image.open(tmp_path / f"att_{stem}{suffix}") as a:
            assert a.format == fmt and a.size == attention_layout(RGB.img_size)["size"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"att_digit{suffix}", f"att_photo{suffix}"]  # no temp files


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["att.txt", "att", "att.npz"])
def test_cli_refuses_an_attention_map_suffix_pillow_cannot_write(ckpts, pictures, tmp_path, name):
    r = _predict(ckpts[1], pictures / "photo.jpg", "--attention-map", tmp_path / name)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / name}: --attention-map needs the suffix of an image format")
    assert list(tmp_path.iterdir()) == []


# --- the README's first steps -------------------------------------------------------------------


@pytest.mark.e2e
def test_readme_python_example_classifies_the_example_digit():
    text = (ROOT / "README.md").read_text()
    block = next(b.split("\n", 1)[1] for b in text.split("```python")[1:] if "load_model" in b).split("```")[0]
    assert len(block.strip().splitlines()) <= 6
    r = run_python(block, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[('7', ")


@pytest.mark.e2e
def test_readme_first_prediction_and_a_colour_photo_for_a_digit_model_is_warned_about(tmp_path):
    mnist, digit = ROOT / "weights" / "mnist_vit.npz", ROOT / "docs" / "digit.png"
    r = _predict(mnist, digit, "--json")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["predictions"][0]["top_k"][0]["class"] == "7"
    a = np.zeros((40, 60, 3), np.uint8)
    a[..., 0], a[..., 1] = 200, np.arange(60, dtype=np.uint8)[None, :] * 3  # red to orange
    Image.fromarray(a).save(tmp_path / "photo.jpg")
    Image.fromarray(a[..., 0]).convert("RGB").save(tmp_path / "gray_as_rgb.png")  # no colour in it
    r = _predict(mnist, tmp_path / "photo.jpg", tmp_path / "gray_as_rgb.png", digit)
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "photo.jpg" in warned[0] and "1-channel model" in warned[0], r.stderr


# --- folders, lists, CSV and JSONL --------------------------------------------------------------


def _tree(root):
    """A folder of photos two levels deep, a broken JPEG among them, and a text file listing two."""
    (root / "a" / "b").mkdir(parents=True)
    for i, (sub, size) in enumerate([("a", (40, 30)), ("a/b", (20, 50)), ("", (33, 33)), ("a/b", (64, 48))]):
        _make("RGB", size).save(root / sub / f"p{i}.png")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "notes.md").write_text("not an image: not read")
    (root / "list.txt").write_text("# two of them\na/p0.png\n\na/b/p1.png\n")
    (root / "a" / ".ipynb_checkpoints").mkdir()  # hidden: not read, without a word
    _make("RGB", (40, 30)).save(root / "a" / ".ipynb_checkpoints" / "p0-checkpoint.png")
    return root


@pytest.mark.e2e
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_cli_predicts_a_folder_into_a_file(ckpts, tmp_path, suffix):
    root = _tree(tmp_path / "photos")
    out = tmp_path / "out" / f"preds{suffix}"
    r = _predict(ckpts[1], root / "a", root / "p2.png", "--output", out, "--top-k", "2", "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "broken.jpg" in warned[0]  # named once, skipped
    assert "4 predictions" in r.stdout and "1 unreadable" in r.stdout
    want = [root / "a" / "b" / "p1.png", root / "a" / "b" / "p3.png", root / "a" / "p0.png", root / "p2.png"]
    if suffix == ".csv":
        rows = out.read_text().splitlines()
        assert rows[0] == "image,class_1,probability_1,class_2,probability_2"
        images = [row.split(",")[0] for row in rows[1:]]
        assert all(v == f"{float(v):.6g}" for row in rows[1:] for v in row.split(",")[2::2]), rows  # 6 digits
        probs = [[float(v) for v in row.split(",")[2::2]] for row in rows[1:]]
    else:
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(set(r) == {"image", "top_k"} for r in recs)
        images = [r["image"] for r in recs]
        probs = [[t["probability"] for t in r["top_k"]] for r in recs]
    assert images == [str(p) for p in want]
    params, cfg, meta = load_checkpoint(ckpts[1])
    for img, pr in zip(want, probs):  # the same numbers as one vit_forward on the checkpoint's transform
        logits = vit_forward(params, load_image(img, cfg, meta), cfg, keep_cache=False)[0][0].astype(np.float64)
        p = np.exp(logits - logits.max())
        assert np.allclose(sorted(p / p.sum(), reverse=True)[:2], pr, rtol=1e-5 if suffix == ".csv" else 1e-9)


@pytest.mark.e2e
def test_cli_reads_a_list_file_and_strict_stops_at_a_broken_file(ckpts, tmp_path):
    root = _tree(tmp_path / "photos")
    r = _predict(ckpts[1], root / "list.txt", "--json")
    assert r.returncode == 0, r.stderr
    assert [p["image"] for p in json.loads(r.stdout)["predictions"]] == [str(root / "a/p0.png"), str(root / "a/b/p1.png")]
    r = _predict(ckpts[1], root, "--strict", "--output", tmp_path / "p.csv")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "broken.jpg" in r.stderr and "--strict" in r.stderr
    assert not (tmp_path / "p.csv").exists()
    r = _predict(ckpts[1], root / "a", "--output", tmp_path / "p.txt")
    assert r.returncode == 2 and ".csv or .jsonl" in r.stderr


@pytest.mark.e2e
def test_cli_rgba_predicts_as_its_rgb_conversion(ckpts, tmp_path):
    """An RGBA file gives the probabilities of the same file flattened by Pillow's convert("RGB"), what
    timm's and transformers' loaders give their models (a 1-channel model: its luminance)."""
    rgba = _with_alpha("RGBA", tmp_path / "rgba.png")
    Image.open(rgba).convert("RGB").save(tmp_path / "rgb.png")
    for ckpt in ckpts:
        r = _predict(ckpt, rgba, tmp_path / "rgb.png", "--json", "--top-k", "10")
        assert r.returncode == 0, r.stderr  # (the 1-channel model warns that both are colour images)
        a, b = (p["top_k"] for p in json.loads(r.stdout)["predictions"])
        assert [t["class"] for t in a] == [t["class"] for t in b]
        np.testing.assert_allclose([t["probability"] for t in a], [t["probability"] for t in b], rtol=1e-6)


@pytest.mark.e2e
def test_cli_nothing_predicted_is_an_error(ckpts, tmp_path):
    """Exit 2 when no image was read: a lone unreadable one (a model file named as one) is the error
    line itself; among several, each is named and one line ends the run."""
    r = _predict(ckpts[1], ckpts[0])
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr == (f"error: {ckpts[0]}: a tinyvit checkpoint, not an image (predict.py takes the checkpoint "
                        f"first, then images)\n")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    r = _predict(ckpts[1], ckpts[0], tmp_path / "junk.jpg", "--output", tmp_path / "out.csv")
    assert r.returncode == 2 and r.stdout == "", r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("warning: ") for line in lines[:2]), r.stderr
    assert lines[2] == "error: nothing predicted: none of the 2 images could be read (each named above)"
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("text,says", [("numpy>=1.24\npillow\n", "not a list of images: none of its 2 lines "
                                        "names a file (line 1: 'numpy>=1.24')"),
                                       ("# nothing yet\n\n", "lists no images"),
                                       (b"\x89\xff\xfe\x00", "not a list of images (not a text file)")])
def test_cli_a_text_file_that_lists_no_images_is_named(ckpts, tmp_path, text, says):
    f = tmp_path / "requirements.txt"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    r = _predict(ckpts[1], f)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {f}: {says}"), r.stderr


@pytest.mark.e2e
def test_cli_pixel_limit_names_its_flag(ckpts, pictures):
    """photo.jpg (64x48) is over 0.0025 megapixels, digit.png (60x40) is not."""
    r = _predict(ckpts[1], pictures / "photo.jpg", pictures / "digit.png", "--max-megapixels", "0.0025", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"warning: {pictures / 'photo.jpg'}: ") and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.endswith("over the limit of 2500 pixels (possible decompression bomb; --max-megapixels raises "
                             "the limit); skipped\n"), r.stderr
    assert [p["image"] for p in json.loads(r.stdout)["predictions"]] == [str(pictures / "digit.png")]


def test_rollout_skips_every_prefix_token():
    """With registers (or a distillation token) the patches start after the prefix: the map is the class
    token's row over those alone."""
    from family_configs import FAMILIES

    cfg = FAMILIES["dinov2_reg"]  # class token and 4 registers before 2x2 patches
    params = init_params(cfg, seed=1)
    x = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    maps = attention_maps(vit_forward(params, x, cfg, all_tokens=True)[1])
    heat = attention_rollout(maps, cfg.num_prefix_tokens)
    r = rollout_matrix(maps)
    assert heat.shape == (2, 2, 2) and np.allclose(heat.reshape(2, 4), r[:, 0, 5:])
    with pytest.raises(TinyViTError, match="square grid"):
        attention_rollout(maps)  # one prefix token assumed: 8 'patches' are no square


@pytest.mark.e2e
def test_any_size_model_predicts_and_evaluates_as_timm(tmp_path, ckpts):
    """timm's hub folder of a model with dynamic_img_size converted, then predict.py and evaluate.py with
    --keep-aspect and --img-size H,W: timm's probabilities on the same pixels, each image at its own size;
    a fixed-size model refuses the flags in one line."""
    timm = pytest.importorskip("timm")
    import torch
    save_for_hf = pytest.importorskip("timm.models._hub").save_for_hf
    args = dict(embed_dim=32, depth=2, num_heads=4, img_size=28, num_classes=3, dynamic_img_size=True)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    save_for_hf(model.eval(), tmp_path / "hub", model_args=args, safe_serialization=True)
    r = run_script("convert_weights.py", tmp_path / "hub", "--out", tmp_path / "m.npz", "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["config"]["dynamic_img_size"], r.stderr
    params, cfg, meta = load_checkpoint(tmp_path / "m.npz")
    paths = [tmp_path / "data" / "val" / "class_0" / "wide.png", tmp_path / "data" / "val" / "class_1" / "tall.png"]
    for i, (p, shape) in enumerate(zip(paths, [(30, 70, 3), (100, 40, 3)])):
        for d in (p.parent, tmp_path / "data" / "train" / p.parent.name):  # a train/ beside: val/ is evaluated
            d.mkdir(parents=True)
            Image.fromarray(_rng_array(shape, seed=i)).save(d / p.name)
    t = eval_transform(meta, 3)
    sizes = {"--keep-aspect": (InputSize(28, 14, keep_aspect=True), [(28, 70), (70, 28)]),
             "--img-size=42,28": (InputSize(28, 14, hw=(42, 28)), [(42, 28), (42, 28)])}
    right = {}
    for flag, (size, shapes) in sizes.items():
        r = run_script("predict.py", tmp_path / "m.npz", *paths, flag, "--json")
        assert r.returncode == 0, r.stderr
        for label, (path, pred, shape) in enumerate(zip(paths, json.loads(r.stdout)["predictions"], shapes)):
            x = image_to_input(open_image(path), cfg, t, size=size)
            assert x.shape[2:] == shape
            with torch.no_grad():
                want = torch.softmax(model(torch.tensor(x)), dim=1)[0].numpy()
            got = np.zeros(3)
            got[[c["index"] for c in pred["top_k"]]] = [c["probability"] for c in pred["top_k"]]
            assert np.abs(got - want).max() < 1e-5, (flag, path)
            right[flag] = right.get(flag, 0) + int(want.argmax() == label)
    r = run_script("evaluate.py", tmp_path / "m.npz", "--data", tmp_path / "data", "--keep-aspect", "--json")
    assert r.returncode == 0, r.stderr  # one batch of two shapes, scored as timm scores them
    assert json.loads(r.stdout.splitlines()[-1])["test_accuracy"] == right["--keep-aspect"] / 2 and "2 of the model's 3" in r.stderr
    r = run_script("predict.py", ckpts[1], paths[0], "--keep-aspect")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and \
        "--keep-aspect needs a model that takes any input size" in r.stderr, r.stderr
