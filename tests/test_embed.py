"""scripts/embed.py and tinyvit.cli.embed / tinyvit.io.embeddings: features of a tiny random-weight
checkpoint written to an embedding folder, checked against the model run on each image directly."""
import json

import numpy as np
import pytest
from helpers import run_script, tiny_photos

from tinyvit import ViTConfig, eval_transform, init_params, load_image, vit_features
from tinyvit.cli.embed import EmbedConfig, embed_run, folder_labels
from tinyvit.data import cifar10
from tinyvit.data.batches import ArrayDataset
from tinyvit.io.embeddings import EmbeddingWriter, read_embed_dir
from tinyvit.nn.blockfeats import vit_block_features

CFG = ViTConfig(img_size=32, patch_size=16, in_chans=3, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=32)
META = {"eval_transform": {"mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, photos/ with train/<class>/ and val/<class>/, one broken file in train/a/)."""
    return tiny_photos(tmp_path_factory.mktemp("embed"))


def direct(ckpt, images, layers=()):
    """Each image through load_image and the model, one at a time."""
    from tinyvit import load_model
    params, cfg, meta = load_model(ckpt)
    t = eval_transform(meta, cfg.in_chans)
    x = np.concatenate([load_image(p, cfg, t) for p in images])
    return vit_features(params, x, cfg), vit_block_features(params, x, cfg, list(layers) or [0])


@pytest.mark.e2e
def test_embed_script_writes_the_folder(tiny, tmp_path):
    ckpt, photos = tiny
    r = run_script("embed.py", ckpt, photos / "train", "--out", tmp_path / "e", "--layers", "0", "--batch-size", "2",
                   "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["images"] == 6
    assert r.stderr.count("broken.png") == 1  # named once, skipped
    x, rows, meta = read_embed_dir(tmp_path / "e")
    assert [label for _, label in rows] == ["a"] * 3 + ["b"] * 3
    assert all("broken" not in img for img, _ in rows)
    feats, blocks = direct(ckpt, [img for img, _ in rows])
    np.testing.assert_allclose(x, feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "e" / "layer0.npy"), blocks[0], rtol=1e-5, atol=1e-6)
    assert {"checkpoint", "sha256", "config", "eval_transform", "D", "N", "pooling", "normalized"} <= set(meta)
    assert (meta["D"], meta["N"], meta["pooling"], meta["normalized"]) == (16, 6, "token", False)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["embeddings.npy", "images.csv", "layer0.npy",
                                                                   "meta.json"]
    r = run_script("embed.py", ckpt, photos, "--out", tmp_path / "n", "--normalize", "--json")
    x, rows, _ = read_embed_dir(tmp_path / "n")
    assert len(rows) == 10 and {label for _, label in rows} == {"a", "b"}  # train/ and val/ both labelled
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-6)


@pytest.mark.e2e
def test_strict_leaves_no_file_that_looks_finished(tiny, tmp_path):
    ckpt, photos = tiny
    r = run_script("embed.py", ckpt, photos / "train", "--out", tmp_path / "e", "--strict", "--batch-size", "1")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "broken.png" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == []  # no .npy, not even a partial one


def test_folder_labels(tmp_path):
    for rel in ("c/x/1.png", "c/2.png", "d/3.png", "train/e/4.png", "val/e/5.png", "loose.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    files = [str(tmp_path / r) for r in ("c/x/1.png", "c/2.png", "d/3.png")]
    assert folder_labels(tmp_path, files) == ["c", "c", "d"]
    assert folder_labels(tmp_path, [str(tmp_path / r) for r in ("train/e/4.png", "val/e/5.png")]) == ["e", "e"]
    assert folder_labels(tmp_path, files + [str(tmp_path / "loose.png")]) == [""] * 4  # not a tree of classes


def test_writer_trims_renames_and_aborts(tmp_path):
    w = EmbeddingWriter(tmp_path, ["embeddings"], 10, 3)
    rows = np.arange(21, dtype=np.float32).reshape(7, 3)
    w.add({"embeddings": rows[:4]})
    w.add({"embeddings": rows[4:]})
    assert not (tmp_path / "embeddings.npy").exists()
    w.finish()
    np.testing.assert_array_equal(np.load(tmp_path / "embeddings.npy"), rows)
    w = EmbeddingWriter(tmp_path / "b", ["embeddings", "layer1"], 5, 2)
    w.abort()
    assert list((tmp_path / "b").iterdir()) == []


def test_cifar10_split_as_finetuning_feeds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "RECORDS_PER_BATCH", 5)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8), np.array([0, 3, 9, 3, 1])
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "test_batch.bin").write_bytes(np.concatenate([y.astype(np.uint8)[:, None], x.reshape(5, -1)], 1).tobytes())
    cfg = CFG
    params = init_params(cfg, seed=1)
    t = eval_transform(META, 3)
    ec = EmbedConfig("model.npz", ("cifar10:test",), str(tmp_path / "e"), batch_size=2, quiet=True)
    assert embed_run(ec, params, cfg, {}, t, np, data_dir=tmp_path)["images"] == 5
    got, rows, meta = read_embed_dir(tmp_path / "e")
    want = vit_features(params, next(ArrayDataset(x, y, t.mean, t.std, img_size=32).batches(5, np, shuffle=False))[0], cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert rows[1] == ("cifar10:test/1", "cat") and (meta["dataset"], meta["split"], meta["N"]) == ("cifar10", "test", 5)
