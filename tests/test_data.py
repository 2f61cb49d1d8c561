"""Tests for tinyvit.data / tinyvit.data.cifar10: real files, synthetic and broken files, downloads, batching."""
import gzip
import hashlib
import io
import itertools
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import evil_pickle

from tinyvit.backend import to_numpy
from tinyvit.data import augment, batches, cifar10, download, mnist
from tinyvit.errors import TinyViTError

MNIST_MD5 = {"train": ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624"),
             "test": ("2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637")}


def _one_line_error(fn, *needles):
    """Run fn, expect a one-line TinyViTError containing every needle; return the message."""
    with pytest.raises(TinyViTError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for s in needles:
        assert str(s) in msg, msg
    return msg


# --- real data ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["train", "test"])
def real_mnist(request, mnist_root):
    return request.param, mnist.load_mnist(mnist_root, request.param, download=False)


@pytest.fixture(scope="module", params=["train", "test"])
def real_cifar(request, cifar_root):
    return request.param, cifar10.load_cifar10(cifar_root, request.param, download=False)


def test_real_mnist(real_mnist):
    split, (x, y) = real_mnist
    n = 60000 if split == "train" else 10000
    assert x.shape == (n, 28, 28) and x.dtype == np.uint8 and y.shape == (n,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9 and (np.bincount(y) > 800).all()
    img_md5, lab_md5 = MNIST_MD5[split]  # md5 of the decompressed IDX files, rebuilt from arrays
    assert hashlib.md5(struct.pack(">4I", 2051, n, 28, 28) + x.tobytes()).hexdigest() == img_md5
    assert hashlib.md5(struct.pack(">2I", 2049, n) + y.astype(np.uint8).tobytes()).hexdigest() == lab_md5


def test_real_cifar(real_cifar):
    split, (x, y, names) = real_cifar
    n = 50000 if split == "train" else 10000
    assert x.shape == (n, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert (np.bincount(y, minlength=10) == n // 10).all()
    assert names == cifar10.CIFAR10_CLASSES
    if split == "train":  # the published normalisation constants, from exact pixel histograms
        for c in range(3):
            h = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
            k = np.arange(256) / 255.0
            mean = (h * k).sum() / h.sum()
            std = np.sqrt((h * k * k).sum() / h.sum() - mean ** 2)
            assert abs(mean - cifar10.CIFAR10_MEAN[c]) < 1e-6 and abs(std - cifar10.CIFAR10_STD[c]) < 1e-6


def test_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYVIT_DATA", str(tmp_path / "env"))
    assert download.data_root(tmp_path / "given") == tmp_path / "given"
    assert download.data_root() == tmp_path / "env"
    monkeypatch.delenv("TINYVIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.data_root() == tmp_path / "xdg" / "tinyvit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.data_root() == tmp_path / "home" / ".cache" / "tinyvit"


# --- synthetic MNIST ----------------------------------------------------------------------------
def _idx(magic, dims, payload):
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload


def _write(path, raw, gz):
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _mnist_files(root, split="train", n=5, gz=(True, True), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.uint8)
    pre = "train" if split == "train" else "t10k"
    pi = _write(root / "mnist" / f"{pre}-images-idx3-ubyte", _idx(2051, (n, 28, 28), x.tobytes()), gz[0])
    pl = _write(root / "mnist" / f"{pre}-labels-idx1-ubyte", _idx(2049, (n,), y.tobytes()), gz[1])
    return x, y, pi, pl


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("gz", [(True, True), (False, False), (True, False)])
def test_mnist_synthetic(tmp_path, split, gz):
    x, y, _, _ = _mnist_files(tmp_path, split, gz=gz)
    xs, ys = mnist.load_mnist(tmp_path, split, download=False)
    assert xs.dtype == np.uint8 and ys.dtype == np.int64
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)


BAD_MNIST = {  # case -> (which file, new raw bytes given (images, labels), expected words)
    "truncated": ("img", lambda x, y: _idx(2051, (5, 28, 28), x.tobytes())[:-10], "truncated"),
    "trailing": ("img", lambda x, y: _idx(2051, (5, 28, 28), x.tobytes()) + b"\0", "trailing"),
    "magic": ("lab", lambda x, y: _idx(2051, (5,), y.tobytes()), "magic"),
    "empty": ("lab", lambda x, y: b"", "empty"),
    "short": ("img", lambda x, y: b"\0\0\x08", "too short"),
    "dims": ("img", lambda x, y: _idx(2051, (5, 27, 28), x.tobytes()[:5 * 27 * 28]), "28x28"),
    "count": ("lab", lambda x, y: _idx(2049, (4,), y[:4].tobytes()), "4 labels"),
    "label": ("lab", lambda x, y: _idx(2049, (5,), bytes([1, 2, 10, 3, 4])), "label 10"),
}


@pytest.mark.parametrize("case", sorted(BAD_MNIST))
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_bad_files(tmp_path, case, gz):
    which, make, words = BAD_MNIST[case]
    x, y, pi, pl = _mnist_files(tmp_path, gz=(gz, gz))
    path = pi if which == "img" else pl
    path.write_bytes(gzip.compress(make(x, y)) if gz else make(x, y))
    _one_line_error(lambda: mnist.load_mnist(tmp_path, "train", download=False), path, words)


def test_mnist_not_gzip(tmp_path):
    _, _, pi, _ = _mnist_files(tmp_path)
    pi.write_bytes(b"this is not gzip data at all")
    _one_line_error(lambda: mnist.load_mnist(tmp_path, download=False), pi)
    pi.write_bytes(gzip.compress(b"x" * 10000)[:50])  # truncated gzip stream
    _one_line_error(lambda: mnist.load_mnist(tmp_path, download=False), pi)


def test_mnist_bad_split(tmp_path):
    _one_line_error(lambda: mnist.load_mnist(tmp_path, "val"), "val")


# --- downloads ----------------------------------------------------------------------------------
def _offline(url, *a, **k):
    raise urllib.error.URLError("network is unreachable")


MISSING = {"mnist": (mnist.load_mnist, ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]),
           "cifar10": (cifar10.load_cifar10, [f"data_batch_{i}.bin" for i in range(1, 6)] + [cifar10.TAR_NAME])}


@pytest.mark.parametrize("name", sorted(MISSING))
@pytest.mark.parametrize("download", [True, False])
def test_missing_files_message(tmp_path, monkeypatch, name, download):
    load, files = MISSING[name]
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    msg = _one_line_error(lambda: load(tmp_path, "train", download=download),
                          tmp_path / name, "--data-dir", "TINYVIT_DATA", *files)
    assert ("unreachable" in msg) == download
    if (tmp_path / name).exists():
        assert os.listdir(tmp_path / name) == []


class _Payload(io.BytesIO):
    headers = {"Content-Length": "0"}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_download_md5_mismatch_leaves_nothing(tmp_path, monkeypatch, name, capsys):
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda u, **k: urls.append(u) or _Payload(b"junk"))
    _one_line_error(lambda: MISSING[name][0](tmp_path, "train"), "md5 mismatch", "--data-dir")
    assert os.listdir(tmp_path / name) == []
    assert len(urls) == (2 if name == "mnist" else 1)  # every mirror tried
    assert "downloading" in capsys.readouterr().err


def test_mnist_download_falls_back_to_second_mirror(tmp_path, monkeypatch):
    src = tmp_path / "src"
    x, y, pi, pl = _mnist_files(src, "test")
    payloads = {p.name: p.read_bytes() for p in (pi, pl)}
    for p in (pi, pl):
        monkeypatch.setitem(mnist.MNIST_FILES, p.name[:-3], hashlib.md5(payloads[p.name]).hexdigest())

    def urlopen(url, **k):
        if url.startswith(mnist.MNIST_URLS[0]):
            raise urllib.error.HTTPError(url, 403, "Forbidden", {}, None)
        return _Payload(payloads[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    dst = tmp_path / "dst"
    xs, ys = mnist.load_mnist(dst, "test")
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)
    assert sorted(os.listdir(dst / "mnist")) == sorted(payloads)  # no temp files left


# --- synthetic CIFAR-10 -------------------------------------------------------------------------
R = 4  # records per batch in the synthetic files


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(cifar10, "RECORDS_PER_BATCH", R)


def _records(n_batches, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n_batches * R, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, n_batches * R)
    return x, y


def _bin(x, y):
    return np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], axis=1).tobytes()


def _py2_pickle(x, labels):
    """A protocol-2 pickle laid out as Python 2 wrote the official CIFAR-10 python batches."""
    def s(b):  # SHORT_BINSTRING
        return b"U" + bytes([len(b)]) + b

    def i1(v):  # BININT1
        return b"K" + bytes([v])

    m1 = b"J" + struct.pack("<i", -1)
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i1(0) + i1(1) + b"\x87R"
             + b"(" + i1(3) + s(b"|") + b"NNN" + m1 + m1 + i1(0) + b"tb")
    raw = x.tobytes()
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i1(0) + b"\x85" + s(b"b")
           + b"\x87R(" + i1(1) + b"M" + struct.pack("<H", x.shape[0]) + b"M" + struct.pack("<H", 3072)
           + b"\x86" + dtype + b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb")
    lab = b"](" + b"".join(i1(int(v)) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"batch_label") + s(b"b") + s(b"labels") + lab + s(b"data") + arr + b"u."


NAMES = [f"class{i}" for i in range(10)]


def _write_cifar(root, layout, x, y, stems):
    """Write batches (R records each) of x, y named stems under root/cifar10 in one layout."""
    folder = root / "cifar10"
    meta_txt = ("\n".join(NAMES) + "\n\n").encode()
    if layout in ("bin", "bin.gz"):
        for i, s in enumerate(stems):
            _write(folder / cifar10.BIN_DIR / f"{s}.bin", _bin(x[i * R:(i + 1) * R], y[i * R:(i + 1) * R]),
                   layout == "bin.gz")
        (folder / cifar10.BIN_DIR / "batches.meta.txt").write_bytes(meta_txt)
    elif layout == "tar":
        folder.mkdir(parents=True)
        with tarfile.open(folder / cifar10.TAR_NAME, "w:gz") as tf:
            members = [("batches.meta.txt", meta_txt)] + [
                (f"{s}.bin", _bin(x[i * R:(i + 1) * R], y[i * R:(i + 1) * R])) for i, s in enumerate(stems)]
            for name, raw in members[::-1]:  # any member order
                info = tarfile.TarInfo(f"{cifar10.BIN_DIR}/{name}")
                info.size = len(raw)
                tf.addfile(info, io.BytesIO(raw))
    else:  # python pickles: "py2" hand-written like the official files, or "pyN" = protocol N
        (folder / cifar10.PY_DIR).mkdir(parents=True)
        for i, s in enumerate(stems):
            xb, yb = x[i * R:(i + 1) * R].reshape(R, -1), y[i * R:(i + 1) * R]
            raw = _py2_pickle(xb, yb) if layout == "py2" else pickle.dumps(
                {b"data": xb, b"labels": [int(v) for v in yb], b"batch_label": b"b"}, protocol=int(layout[2]))
            (folder / cifar10.PY_DIR / s).write_bytes(raw)
        (folder / cifar10.PY_DIR / "batches.meta").write_bytes(
            pickle.dumps({b"label_names": [n.encode() for n in NAMES]}, protocol=2))


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("layout", ["bin", "bin.gz", "tar", "py2", "py_2", "py_4", "py_5"])
def test_cifar_layouts(tmp_path, small, layout, split):
    stems = cifar10.batch_names(split)
    x, y = _records(len(stems))
    _write_cifar(tmp_path, layout.replace("_", ""), x, y, stems)
    xs, ys, names = cifar10.load_cifar10(tmp_path, split, download=False)
    assert xs.dtype == np.uint8 and ys.dtype == np.int64 and xs.shape == (len(stems) * R, 3, 32, 32)
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)
    assert names == NAMES


@pytest.mark.parametrize("layout", ["bin", "bin.gz", "tar", "py2"])
def test_cifar_limit_reads_only_the_batches_it_needs(tmp_path, small, layout):
    """limit=N takes the first N images' batches; in the binary layouts the others may be absent."""
    stems = cifar10.batch_names("train")
    x, y = _records(len(stems))
    _write_cifar(tmp_path, layout, x, y, stems)
    if layout.startswith("bin"):
        for p in (tmp_path / "cifar10" / cifar10.BIN_DIR).glob("data_batch_[2-5].bin*"):
            p.unlink()  # only the first batch is present
    xs, ys, _ = cifar10.load_cifar10(tmp_path, "train", download=False, limit=R - 1)
    assert xs.shape == (R, 3, 32, 32)
    np.testing.assert_array_equal(xs, x[:R])
    np.testing.assert_array_equal(ys, y[:R])


def test_cifar_precedence_and_default_names(tmp_path, small):
    x, y = _records(1, seed=1)
    _write_cifar(tmp_path, "tar", *_records(1, seed=2), ["test_batch"])
    _write(tmp_path / "cifar10" / cifar10.BIN_DIR / "test_batch.bin", _bin(x, y), True)
    xs, ys, names = cifar10.load_cifar10(tmp_path, "test", download=False)
    np.testing.assert_array_equal(xs, x)  # binary folder wins over the tar
    assert names == cifar10.CIFAR10_CLASSES  # no batches.meta.txt beside it


def _bad_bin(x, y):
    return {"truncated": (_bin(x, y)[:-5], "not a multiple"), "count": (_bin(x[:3], y[:3]), "3 records"),
            "empty": (b"", "empty"), "label": (_bin(x, np.array([1, 2, 10, 3])), "label 10")}


@pytest.mark.parametrize("case", ["truncated", "count", "empty", "label"])
@pytest.mark.parametrize("gz", [True, False])
def test_cifar_bad_bin(tmp_path, small, case, gz):
    raw, words = _bad_bin(*_records(1))[case]
    path = _write(tmp_path / "cifar10" / cifar10.BIN_DIR / "test_batch.bin", raw, gz)
    _one_line_error(lambda: cifar10.load_cifar10(tmp_path, "test", download=False), path, words)


def test_cifar_bad_tar_and_meta(tmp_path, small):
    x, y = _records(1)
    _write_cifar(tmp_path, "tar", x, y, ["test_batch"])
    tar = tmp_path / "cifar10" / cifar10.TAR_NAME
    _one_line_error(lambda: cifar10.load_cifar10(tmp_path, "train", download=False), tar, "data_batch_1.bin")
    tar.write_bytes(tar.read_bytes()[:100])
    _one_line_error(lambda: cifar10.load_cifar10(tmp_path, "test", download=False), tar)
    tar.unlink()
    _write_cifar(tmp_path, "bin", x, y, ["test_batch"])
    meta = tmp_path / "cifar10" / cifar10.BIN_DIR / "batches.meta.txt"
    meta.write_text("only\nthree\nnames\n")
    _one_line_error(lambda: cifar10.load_cifar10(tmp_path, "test", download=False), meta, "10 class names")


@pytest.mark.parametrize("case", ["not_dict", "shape", "labels", "garbage", "empty"])
def test_cifar_bad_pickle(tmp_path, small, case):
    x, y = _records(1)
    _write_cifar(tmp_path, "py4", x, y, ["test_batch"])
    path = tmp_path / "cifar10" / cifar10.PY_DIR / "test_batch"
    raw = {"not_dict": pickle.dumps([1, 2, 3]),
           "shape": pickle.dumps({"data": np.zeros((R, 3000), np.uint8), "labels": [0] * R}),
           "labels": pickle.dumps({"data": x.reshape(R, -1), "labels": [0, 1, 2, 11]}),
           "garbage": b"\x80\x04not a pickle", "empty": b""}[case]
    path.write_bytes(raw)
    _one_line_error(lambda: cifar10.load_cifar10(tmp_path, "test", download=False), path)


@pytest.mark.parametrize("how", ["os.system", "builtins.open", "builtins.eval"])
@pytest.mark.parametrize("where", ["batch", "meta"])
def test_cifar_malicious_pickle(tmp_path, small, how, where):
    x, y = _records(1)
    _write_cifar(tmp_path, "py2", x, y, ["test_batch"])
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar10" / cifar10.PY_DIR / ("test_batch" if where == "batch" else "batches.meta")
    path.write_bytes(evil_pickle(how, marker, 2, lambda e: {b"data": x.reshape(R, -1), b"labels": e}))
    _one_line_error(lambda: cifar10.load_cifar10(tmp_path, "test", download=False), path, "not allowed")
    assert not marker.exists()


def test_cifar_download(tmp_path, small, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    x, y = _records(1)
    _write_cifar(src, "tar", x, y, ["test_batch"])
    payload = (src / "cifar10" / cifar10.TAR_NAME).read_bytes()
    monkeypatch.setattr(cifar10, "TAR_MD5", hashlib.md5(payload).hexdigest())
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, **k: _Payload(payload))
    xs, ys, names = cifar10.load_cifar10(dst, "test")
    np.testing.assert_array_equal(xs, x)
    assert names == NAMES and os.listdir(dst / "cifar10") == [cifar10.TAR_NAME]


# --- batching -----------------------------------------------------------------------------------
# the xp fixture (numpy, and cupy when a GPU is present) comes from conftest.py
def _batches(*args, **kw):
    return [(to_numpy(x), to_numpy(y)) for x, y in batches.iterate_batches(*args, **kw)]


def _toy(n=37, c=3, hw=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, c, hw, hw) if c else (n, hw, hw), dtype=np.uint8)
    return x, np.arange(n)  # labels = index, to track each image


@pytest.mark.parametrize("augment", [None, "crop_flip"])
def test_batches_deterministic(xp, augment):
    x, y = _toy()
    kw = dict(mean=cifar10.CIFAR10_MEAN, std=cifar10.CIFAR10_STD, seed=3, augment=augment)
    a, b = _batches(x, y, 8, xp, epoch=1, **kw), _batches(x, y, 8, xp, epoch=1, **kw)
    c = _batches(x, y, 8, xp, epoch=2, **kw)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(np.concatenate([v for _, v in a]), np.concatenate([v for _, v in c]))
    resumed = _batches(x, y, 8, xp, epoch=1, start_batch=2, **kw)  # mid-epoch resume
    for (xa, ya), (xb, yb) in zip(a[2:], resumed, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batches_cover_epoch_and_normalise(xp, drop_last, dtype):
    x, y = _toy()
    out = _batches(x, y, 8, xp, mean=cifar10.CIFAR10_MEAN, std=cifar10.CIFAR10_STD, drop_last=drop_last, dtype=dtype)
    assert len(out) == batches.num_batches(37, 8, drop_last) == (4 if drop_last else 5)
    ys = np.concatenate([v for _, v in out])
    assert ys.dtype == np.int64 and len(ys) == (32 if drop_last else 37) and len(set(ys)) == len(ys)
    assert not np.array_equal(ys, np.arange(len(ys)))  # shuffled
    mean = np.array(cifar10.CIFAR10_MEAN)[:, None, None]
    std = np.array(cifar10.CIFAR10_STD)[:, None, None]
    for xb, yb in out:
        assert xb.dtype == dtype and xb.shape[1:] == (3, 32, 32)
        np.testing.assert_allclose(xb, (x[yb] / 255.0 - mean) / std, atol=1e-5 if dtype == np.float32 else 1e-12)
    plain = _batches(x, y, 10, xp, mean=(0, 0, 0), std=(1, 1, 1), shuffle=False)
    np.testing.assert_array_equal(np.concatenate([v for _, v in plain]), np.arange(37))


def test_batches_mnist_shift_mass(xp):
    x, y = _toy(n=64, c=0, hw=28)
    x[:, :3, :] = 0
    x[:, -3:, :] = 0
    x[:, :, :3] = 0
    x[:, :, -3:] = 0  # content well inside the ±2 px margin
    out = _batches(x, y, 16, xp, mean=(0.0,), std=(1.0,), augment="shift", seed=1, dtype=np.float64)
    shifts = set()
    for xb, yb in out:
        assert xb.shape == (16, 1, 28, 28)
        np.testing.assert_allclose(xb.sum(axis=(1, 2, 3)), x[yb].sum(axis=(1, 2)) / 255.0)  # mass kept
        for img, i in zip(xb[:, 0], yb):
            found = [(dy, dx) for dy, dx in itertools.product(range(-2, 3), repeat=2)
                     if np.allclose(img, np.roll(x[i], (dy, dx), axis=(0, 1)) / 255.0, rtol=0, atol=1e-12)]
            assert found
            shifts.add(found[0])
    assert len(shifts) > 10  # the translations really vary


def test_batches_crop_flip(xp):
    x, y = _toy(n=64)
    out = _batches(x, y, 32, xp, mean=(0, 0, 0), std=(1, 1, 1), augment="crop_flip", crop_pad=0,
                   dtype=np.float64)
    flips = 0
    for xb, yb in out:
        assert xb.shape == (32, 3, 32, 32)
        for img, i in zip(xb, yb):
            same = np.allclose(img, x[i] / 255.0, rtol=0, atol=1e-12)
            mirrored = np.allclose(img, x[i, :, :, ::-1] / 255.0, rtol=0, atol=1e-12)
            assert same or mirrored
            flips += mirrored
    assert 10 < flips < 54  # p = 0.5 over 64 images
    out = _batches(x, y, 8, xp, mean=(0, 0, 0), std=(1, 1, 1), augment="crop_flip", dtype=np.float64)
    pad = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))  # zero padding
    for img, i in zip(out[0][0], out[0][1]):
        crops = [pad[i, :, oy:oy + 32, ox:ox + 32] for oy in range(9) for ox in range(9)]
        k = np.rint(img * 255.0)
        assert any(np.array_equal(k, c) or np.array_equal(k, c[..., ::-1]) for c in crops)
    big = _batches(x, y, 8, xp, mean=cifar10.CIFAR10_MEAN, std=cifar10.CIFAR10_STD, augment="crop_flip", img_size=48)
    small_ = _batches(x, y, 8, xp, mean=cifar10.CIFAR10_MEAN, std=cifar10.CIFAR10_STD, augment="crop_flip")
    assert big[0][0].shape == (8, 3, 48, 48)
    np.testing.assert_allclose(big[0][0], augment.bilinear_resize(small_[0][0], 48), atol=1e-6)


def test_batches_bad_arguments():
    x, y = _toy(n=4)
    kw = dict(mean=cifar10.CIFAR10_MEAN, std=cifar10.CIFAR10_STD)
    for bad in (dict(augment="rotate"), dict(mean=(0.5,), std=(0.5,)), dict(batch_size=0)):
        args = {**kw, "batch_size": 2, **bad}
        bs = args.pop("batch_size")
        _one_line_error(lambda: next(batches.iterate_batches(x, y, bs, np, **args)))
    _one_line_error(lambda: next(batches.iterate_batches(x, y[:3], 2, np, **kw)), "3 labels")


@pytest.mark.parametrize("dtype,atol", [(np.float32, 1e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("src,dst", [(32, 224), (28, 40), (32, 17), (32, (20, 50))])
def test_bilinear_resize_matches_torch(xp, src, dst, dtype, atol):
    x = np.random.default_rng(0).random((2, 3, src, src)).astype(dtype)
    size = (dst, dst) if isinstance(dst, int) else dst
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                                           align_corners=False, antialias=False).numpy()
    got = to_numpy(augment.bilinear_resize(xp.asarray(x), dst))
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_affine_augment_resamples_exactly(xp):
    """Identity, whole-pixel shifts and quarter turns hit pixel centres: exact; what leaves is 0."""
    from tinyvit.data.augment import affine, random_affine

    x = np.random.default_rng(0).random((2, 1, 9, 9)).astype(np.float32)
    m = np.zeros((2, 2, 3))
    m[:, 0, 0] = m[:, 1, 1] = 1
    assert np.array_equal(to_numpy(affine(xp.asarray(x), m)), x)
    m[:, 0, 2] = -2  # output column c reads source column c - 2
    y = to_numpy(affine(xp.asarray(x), m))
    assert np.array_equal(y[..., 2:], x[..., :-2]) and not y[..., :2].any()
    q = np.zeros((2, 2, 3))
    q[:, 0, 1], q[:, 1, 0] = 1, -1  # a quarter turn about the centre
    assert np.allclose(to_numpy(affine(xp.asarray(x), q)), np.rot90(x, -1, axes=(2, 3)), atol=1e-6)  # clockwise
    maps = random_affine(np.random.default_rng(1), 1000)
    angles = np.degrees(np.arctan2(maps[:, 0, 1], maps[:, 0, 0]))
    assert np.abs(angles).max() <= 10 and np.abs(angles).max() > 9  # +-10 degrees


def test_affine_batches_are_seeded(xp):
    x = np.random.default_rng(0).integers(0, 256, (64, 28, 28)).astype(np.uint8)
    y = np.arange(64) % 10
    kw = dict(mean=(0.1307,), std=(0.3081,), augment="affine", seed=3)
    a = [to_numpy(b) for b, _ in batches.iterate_batches(x, y, 32, xp, epoch=0, **kw)]
    b = [to_numpy(b) for b, _ in batches.iterate_batches(x, y, 32, xp, epoch=0, **kw)]
    c = [to_numpy(b) for b, _ in batches.iterate_batches(x, y, 32, xp, epoch=1, **kw)]
    assert all(np.array_equal(p, q) for p, q in zip(a, b)) and not np.array_equal(a[0], c[0])
