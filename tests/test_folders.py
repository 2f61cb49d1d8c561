"""Folder datasets and Oxford-IIIT Pet: layouts, splits, bad files, image modes, the decode transforms,
and the fine-tune script on real CIFAR-10 images written out as PNG and JPEG files."""
import json

import numpy as np
import pytest
from helpers import last_json, run_script
from PIL import Image

from tinyvit.data import loader
from tinyvit.data.batches import ArrayDataset
from tinyvit.data.cifar10 import load_cifar10
from tinyvit.data.folders import Warnings, evaluation_images, folder_splits, pets_splits, relabel
from tinyvit.data.loader import FolderDataset
from tinyvit.errors import TinyViTError
from tinyvit.io.convert import adapt, load_model
from tinyvit.train.config import TrainConfig
from tinyvit.train.finetune import extract_features, train_head

CLASSES = ["cat", "dog", "owl"]


def _png(path, size=(20, 16), value=(10, 20, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _tree(root, n=5, classes=CLASSES):
    for k, c in enumerate(classes):
        for i in range(n):
            _png(root / c / f"{i}.png", value=(k * 80, i * 10, 5))
    return root


# --- layouts and splits -------------------------------------------------------------------------


@pytest.mark.parametrize("val_split", [0.2, 0.5])
def test_class_folders_split_stratified_and_seeded(tmp_path, val_split):
    _tree(tmp_path, n=10)
    tr, va = folder_splits(tmp_path, val_split, seed=3)
    assert tr.classes == va.classes == CLASSES
    assert np.bincount(va.labels).tolist() == [round(10 * val_split)] * 3  # each class keeps its share
    assert not set(tr.paths) & set(va.paths) and len(tr) + len(va) == 30
    again, _ = folder_splits(tmp_path, val_split, seed=3)
    other, _ = folder_splits(tmp_path, val_split, seed=4)
    assert again.paths == tr.paths and other.paths != tr.paths


@pytest.mark.parametrize("val_name", ["val", "test"])
def test_train_and_val_folders(tmp_path, val_name):
    _tree(tmp_path / "train", n=3)
    _tree(tmp_path / val_name, n=2, classes=["cat", "owl"])  # a class may be absent from val
    tr, va = folder_splits(tmp_path)
    assert tr.classes == CLASSES and len(tr) == 9 and va.labels.tolist() == [0, 0, 2, 2]


def test_layout_errors_are_one_line(tmp_path):
    with pytest.raises(TinyViTError, match="no such folder"):
        folder_splits(tmp_path / "nope")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(TinyViTError, match="no class folders with images"):
        folder_splits(tmp_path / "empty")
    _tree(tmp_path / "tv" / "train", n=2)
    _tree(tmp_path / "tv" / "val", n=1, classes=["cat", "emu"])
    with pytest.raises(TinyViTError, match="'emu' has no counterpart"):
        folder_splits(tmp_path / "tv")
    _tree(tmp_path / "one", n=1)
    with pytest.raises(TinyViTError, match="needs 2 to be split"):
        folder_splits(tmp_path / "one")


@pytest.mark.parametrize("layout", ["flat", "train-val"])
def test_one_class_is_refused_for_training(tmp_path, layout):
    """One class folder would train to '100%': refused; evaluating a model on one class is fine."""
    if layout == "flat":
        _tree(tmp_path, n=6, classes=["cat"])
        where = tmp_path
    else:
        _tree(tmp_path / "train", n=3, classes=["cat"])
        _tree(tmp_path / "val", n=2, classes=["cat"])
        where = tmp_path / "train"
    (where / "dog").mkdir()  # an empty class folder is no class
    with pytest.raises(TinyViTError) as e:
        folder_splits(tmp_path)
    assert str(e.value) == (f"{where}: 1 class folder(s) with images (cat): a classifier needs at least 2 classes, "
                            f"one folder of images each")
    assert folder_splits(tmp_path, 0.5, min_classes=1)[1].classes == ["cat"]


def test_hidden_folders_inside_a_class_folder_are_skipped(tmp_path, capsys):
    """.ipynb_checkpoints/ (Jupyter's copies), or any hidden folder below a class, holds no data: skipped
    without a word, as hidden files and hidden class folders are."""
    _tree(tmp_path, n=4)
    _png(tmp_path / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")
    _png(tmp_path / "dog" / "sub" / ".cache" / "x.png")
    _png(tmp_path / "dog" / "sub" / "kept.png")
    (tmp_path / "owl" / ".git").mkdir()
    (tmp_path / "owl" / ".git" / "HEAD").write_text("ref: refs/heads/main")
    tr, va = folder_splits(tmp_path, 0.25, seed=0)
    paths = tr.paths + va.paths
    assert len(paths) == 13 and str(tmp_path / "dog" / "sub" / "kept.png") in paths
    assert not any(".ipynb" in f or ".cache" in f or ".git" in f for f in paths)
    assert capsys.readouterr().err == ""


def test_a_subset_of_the_classes_is_relabelled_onto_the_model(tmp_path):
    _tree(tmp_path, n=4, classes=["cat", "owl"])
    _, va = folder_splits(tmp_path, 0.5, min_classes=1)
    m = relabel(va, CLASSES, tmp_path)
    assert m.classes == CLASSES and m.paths == va.paths and m.labels.tolist() == [0, 0, 2, 2]
    with pytest.raises(TinyViTError) as e:
        relabel(va, ["cat", "dog"], tmp_path)
    assert str(e.value) == (f"{tmp_path}: class folder 'owl' is not one of the model's 2 classes (cat, dog); "
                            f"a folder of some of its classes is evaluated on those")


def test_evaluation_images_are_val_by_its_own_classes_or_the_training_split(tmp_path):
    _tree(tmp_path / "tv" / "train", n=3, classes=["dog"])
    _tree(tmp_path / "tv" / "val", n=2, classes=["cat", "owl"])  # not training's layout: still evaluated
    ev = evaluation_images(tmp_path / "tv")
    assert ev.classes == ["cat", "owl"] and ev.labels.tolist() == [0, 0, 1, 1]
    _tree(tmp_path / "flat", n=4)
    assert evaluation_images(tmp_path / "flat", 0.5, 3).paths == folder_splits(tmp_path / "flat", 0.5, 3)[1].paths
    _tree(tmp_path / "one", n=4, classes=["owl"])
    assert evaluation_images(tmp_path / "one", 0.5).classes == ["owl"]


@pytest.mark.e2e
def test_finetune_script_refuses_one_class(tmp_path):
    from tinyvit import init_params
    from tinyvit.io.checkpoint import save_checkpoint
    from tinyvit.nn.model import ViTConfig

    cfg = ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64)
    weights = save_checkpoint(tmp_path / "w.npz", init_params(cfg, seed=0), cfg, meta={})
    _tree(tmp_path / "data", n=6, classes=["cat"])
    r = run_script("finetune.py", "--data", tmp_path / "data", "--weights", weights, "--img-size", "32",
                   "--out", tmp_path / "run", timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr == (f"error: {tmp_path / 'data'}: 1 class folder(s) with images (cat): a classifier needs at "
                        f"least 2 classes, one folder of images each\n")


def _jpeg_bytes(a):
    import io

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _broken_files(folder):
    """A few files no training run should choke on: each should be named in one warning."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "text.png").write_text("not a png either")
    _png(folder / "tiny.png", size=(4, 4))
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    raw = _jpeg_bytes(noise)
    (folder / "truncated.jpg").write_bytes(raw[:len(raw) * 3 // 5])  # header whole, pixels cut off
    # a decompression bomb: a PNG header that claims 100,000 x 100,000 pixels
    hdr = Image.new("L", (1, 1))
    hdr.save(folder / "bomb.png")
    raw = bytearray((folder / "bomb.png").read_bytes())
    raw[16:24] = (100000).to_bytes(4, "big") * 2
    (folder / "bomb.png").write_bytes(bytes(raw))
    (folder / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored without a word
    return {"zero.jpg", "notes.txt", "text.png", "tiny.png", "truncated.jpg", "bomb.png"}


def test_bad_files_are_warned_about_and_skipped(tmp_path, capsys):
    _tree(tmp_path, n=4)
    bad = _broken_files(tmp_path / "cat")
    tr, va = folder_splits(tmp_path, 0.25, seed=0)
    header_bad = bad - {"truncated.jpg"}  # its header is fine: found when decoded
    err = capsys.readouterr().err
    for name in header_bad:
        assert sum(name in line for line in err.splitlines()) == 1, (name, err)
    assert ".DS_Store" not in err
    # the truncated file is dropped from its batch when decoded, with one warning
    ds = FolderDataset(tr if any("truncated" in p for p in tr.paths) else va, 32, (0.5,) * 3, (0.5,) * 3)
    seen = sum(len(y) for _, y in ds.batches(4, np, shuffle=False))
    assert seen == len(ds.labels) - 1 and "truncated.jpg" in capsys.readouterr().err
    assert seen == sum(len(y) for _, y in ds.batches(4, np, shuffle=False))  # skipped from then on, quietly
    with pytest.raises(TinyViTError, match="--strict"):
        folder_splits(tmp_path, 0.25, strict=True)


# --- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,value,rgb", [("L", 100, (100, 100, 100)), ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
                                            ("P", 0, (0, 0, 0)), ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
                                            ("I;16", 65535, (255, 255, 255)), ("1", 1, (255, 255, 255))])
def test_every_mode_decodes_to_rgb(tmp_path, mode, value, rgb):
    ext = ".tif" if mode in ("CMYK", "I;16") else ".png"
    p = _png(tmp_path / f"x{ext}", size=(40, 30), value=value, mode=mode)
    x = loader.decode(str(p), 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.uint8
    assert np.abs(x.reshape(3, -1).astype(int) - np.array(rgb)[:, None]).max() <= 1


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display: the white half goes to the top
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    x = loader.decode(str(tmp_path / "r.jpg"), 16, crop_pct=1.0).astype(int)
    assert x[:, :6].mean() > 200 and x[:, -6:].mean() < 50


def test_eval_transform_is_timm_centre_crop(tmp_path):
    """Shorter side to S / crop_pct, centre S x S: on a 2:1 image the middle square's centre part."""
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, 16:48] = 255  # the centred 32 x 32 square is white, the sides black
    Image.fromarray(a).save(tmp_path / "w.png")
    x = loader.decode(str(tmp_path / "w.png"), 16, crop_pct=0.875)
    assert x.min() == 255  # only the white square's inner 87.5% is seen


def test_train_transform_is_seeded_and_varies(tmp_path):
    _png(tmp_path / "c" / "a.png", size=(60, 50), value=(1, 2, 3))
    a = np.arange(60 * 50 * 3, dtype=np.uint8).reshape(50, 60, 3)
    Image.fromarray(a).save(tmp_path / "c" / "a.png")
    one = [loader.decode(str(tmp_path / "c" / "a.png"), 16, rng=np.random.default_rng([0, e])) for e in (0, 0, 1)]
    assert np.array_equal(one[0], one[1]) and not np.array_equal(one[0], one[2])


# --- Oxford-IIIT Pet ----------------------------------------------------------------------------


def test_pets_layout(tmp_path):
    folder = tmp_path / "oxford-iiit-pet"
    names = ["Abyssinian", "american_bulldog", "Bengal"]
    rows = {"trainval": [], "test": []}
    for k, n in enumerate(names, 1):
        for i in range(1, 5):
            _png(folder / "images" / f"{n}_{i}.jpg", value=(k * 50, i, 0))
            rows["trainval" if i <= 3 else "test"].append(f"{n}_{i} {k} {1 + (k == 2)} {i}")
    (folder / "annotations").mkdir()
    for s, r in rows.items():
        (folder / "annotations" / f"{s}.txt").write_text("\n".join(r) + "\n")
    tr, te = pets_splits(tmp_path, download=False)
    assert tr.classes == ["Abyssinian", "American Bulldog", "Bengal"]
    assert len(tr) == 9 and te.labels.tolist() == [0, 1, 2]
    with pytest.raises(TinyViTError, match="Oxford-IIIT Pet files missing"):
        pets_splits(tmp_path / "elsewhere", download=False)


# --- real images: the folder loader against the binary CIFAR-10 loader ----------------------------


def _cifar_tree(data, root, n, fmt):
    """The first n CIFAR-10 test images (from the data root) as files: root/train/<class>/ (the first 3/4)
    and root/val/."""
    x, y, names = load_cifar10(data, "test", limit=n)
    x, y = x[:n], y[:n]
    cut = 3 * n // 4
    for i in range(n):
        split = "train" if i < cut else "val"
        p = root / split / names[y[i]] / f"{i:05d}.{fmt}"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].transpose(1, 2, 0)).save(p, **({"quality": 95} if fmt == "jpg" else {}))
    return x, y, names, cut


def test_folder_features_and_accuracy_match_the_binary_loader(tmp_path, cifar_root, ti16):
    """Head mode at 32 px with crop_pct 1 (the whole image, as the binary loader takes it): the folder
    loader's features equal the binary loader's on the same pixels (PNG: CIFAR's own; JPEG: as decoded),
    so the accuracy is the same, and JPEG's loss moves it little."""
    params, cfg, meta = load_model(ti16)
    params, cfg = adapt(params, cfg, img_size=32, num_classes=10)
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    tc = TrainConfig(epochs=20, batch_size=64, lr=1e-3, augment="none", warmup_epochs=0.2)
    results = {}
    for fmt in ("png", "jpg"):
        x, y, names, cut = _cifar_tree(cifar_root, tmp_path / fmt, 320, fmt)
        lossless = x
        if fmt == "jpg":  # the same images as the JPEG files hold them
            files = sorted((tmp_path / fmt).rglob("*.jpg"), key=lambda p: p.name)
            x = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in files])
        tr, va = folder_splits(tmp_path / fmt)
        feats = {}
        for split, lst in (("train", tr), ("val", va)):
            ds = FolderDataset(lst, 32, mean, std, crop_pct=1.0)
            feats[split] = extract_features(params, cfg, ds, np, 64, split, quiet=True)[:2]
        sel = [names.index(c) for c in tr.classes]  # folder classes are the sorted names
        ref = {}
        for split, sl in (("train", slice(0, cut)), ("val", slice(cut, None))):
            order = np.lexsort((np.arange(len(y[sl])), np.argsort(sel)[y[sl]]))  # the folder's file order
            ds = ArrayDataset(x[sl][order], np.argsort(sel)[y[sl]][order], mean, std)
            ref[split] = extract_features(params, cfg, ds, np, 64, split, quiet=True)[:2]
        err = max(np.abs(feats[s][0] - ref[s][0]).max() / np.abs(ref[s][0]).max() for s in feats)
        assert all(np.array_equal(feats[s][1], ref[s][1]) for s in feats)  # same labels, same order
        head = {"head.weight": params["head.weight"], "head.bias": params["head.bias"]}
        accs = [train_head(f["train"][0], f["train"][1], f["val"][0], f["val"][1], head, cfg, tc, np, True)[1]
                for f in (feats, ref)]
        results[fmt] = (err, accs, np.abs(x.astype(int) - lossless).mean())
    for fmt in results:  # the same features; the head's training may round apart by an image or two
        assert results[fmt][0] < 1e-6 and abs(results[fmt][1][0] - results[fmt][1][1]) <= 2 / 80, (fmt, results)
    assert 0 < results["jpg"][2] < 5 and abs(results["jpg"][1][0] - results["png"][1][0]) <= 0.05, results
    assert results["png"][1][0] > 0.2  # 240 images at 32 px through a 224-px model: above chance (0.1)


@pytest.mark.e2e
def test_finetune_script_on_a_folder_with_broken_files(tmp_path, cifar_root, ti16):
    """The script end to end on real images plus broken files; evaluate and predict read its checkpoint."""
    _cifar_tree(cifar_root, tmp_path / "data", 200, "jpg")
    bad = _broken_files(tmp_path / "data" / "train" / "cat")
    r = run_script("finetune.py", "--data", tmp_path / "data", "--weights", ti16, "--mode", "head", "--img-size", "48",
                   "--epochs", "10", "--out", tmp_path / "run", "--json", "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert {n for n in bad if any(n in w for w in warned)} == bad and len(warned) == len(bad)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["test_accuracy"] > 0.2 and out["unreadable_files"] >= 1, out
    ev = last_json(run_script("evaluate.py", out["checkpoint"], "--json"))
    assert abs(ev["test_accuracy"] - out["test_accuracy"]) < 1e-9
    img = next((tmp_path / "data" / "val" / "ship").glob("*.jpg"))
    top = last_json(run_script("predict.py", out["checkpoint"], img, "--json"))["predictions"][0]["top_k"]
    assert {t["class"] for t in top} <= {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                         "ship", "truck"}


def test_warnings_stop_listing_after_a_limit(capsys):
    w = Warnings(limit=2)
    for i in range(5):
        w(f"f{i}", "bad")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "more unreadable files" in err[-1]


def test_pets_downloads_md5_checked_and_unpacks(tmp_path, monkeypatch):
    """--data pets without the files: both tarballs fetched (here from file:// copies), md5-checked, unpacked."""
    import hashlib
    import tarfile

    from tinyvit.data import folders

    src = tmp_path / "src"
    for n, k in (("Bombay", 1), ("keeshond", 2)):
        for i in (1, 2):
            _png(src / "images" / f"{n}_{i}.jpg", value=(k * 90, i, 0))
    (src / "annotations").mkdir()
    (src / "annotations" / "trainval.txt").write_text("Bombay_1 1 1 1\nkeeshond_1 2 2 1\n")
    (src / "annotations" / "test.txt").write_text("Bombay_2 1 1 1\nkeeshond_2 2 2 1\n")
    urls = {}
    for name in ("images", "annotations"):
        tar = tmp_path / "served" / f"{name}.tar.gz"
        tar.parent.mkdir(exist_ok=True)
        with tarfile.open(tar, "w:gz") as tf:
            tf.add(src / name, arcname=name)
        urls[f"{name}.tar.gz"] = (tar.as_uri(), hashlib.md5(tar.read_bytes()).hexdigest())
    monkeypatch.setattr(folders, "PETS_URLS", urls)
    tr, te = pets_splits(tmp_path / "root")
    assert tr.classes == ["Bombay", "Keeshond"] and te.labels.tolist() == [0, 1]
    bad = dict(urls, **{"images.tar.gz": (urls["images.tar.gz"][0], "0" * 32)})
    monkeypatch.setattr(folders, "PETS_URLS", bad)
    with pytest.raises(TinyViTError, match="md5 mismatch"):
        pets_splits(tmp_path / "other")
