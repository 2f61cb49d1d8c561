"""Fuzzing every file loader: from a small valid file, seeded random truncations, bit flips, inserted,
deleted and overwritten bytes, huge sizes and pure noise. Each load must give a TinyViTError or a
well-formed result, never another exception, and each must finish within BUDGET_S seconds of CPU."""
import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import time
import zipfile

import numpy as np
import pytest
import torch
from test_convert import to_google

from tinyvit import ViTConfig
from tinyvit.data import cifar10, mnist
from tinyvit.errors import TinyViTError
from tinyvit.io.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from tinyvit.io.convert import convert, load_model
from tinyvit.io.export import export
from tinyvit.io.safetensors import read_safetensors, write_safetensors
from tinyvit.io.torchzip import load_torch_zip
from tinyvit.nn.model import init_params, param_shapes

CASES = int(os.environ.get("TINYVIT_FUZZ_CASES", 60))  # per target; 16 targets: ~960 loads, seconds
SEED = int(os.environ.get("TINYVIT_FUZZ_SEED", 0))  # set both for a longer or different campaign
# per load, in CPU seconds of this process (a loaded machine stretches the clock, not this): nothing may crawl
# through a huge claimed size; a correct load takes milliseconds. A wait (which burns no CPU) is caught by the
# wall clock at a margin no correct load reaches on a loaded machine
BUDGET_S, WALL_S = 2.0, 30.0
R = 2  # CIFAR records per batch in the synthetic files
CFG = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=16)
HEADS = 2
# numpy parses .npy headers with literal_eval: mutated headers may hold odd escapes
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::SyntaxWarning")
# values that make a size or count field absurd when written over one (little or big endian)
_WILD = [b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\x00\x00",
         b"\xff\xff\xff\xff\xff\xff\xff\xff", b"\x00\x00\x00\x00\x00\x00\x00\x10", b"\xff\xff\xff\x7f"]


# --- mutations ----------------------------------------------------------------------------------
def mutate(raw, rng):
    """One random corruption of raw -> (description, bytes); positions favour the first 512 and the
    last 256 bytes, where headers, pickles' opening and zip directories live."""
    n = len(raw)

    def pos():
        r = rng.random()
        if r < 0.35:
            return int(rng.integers(0, max(1, min(n, 512))))
        if r < 0.6:
            return int(rng.integers(max(0, n - 256), max(1, n)))
        return int(rng.integers(0, max(1, n)))

    kind = rng.choice(["truncate", "bitflip", "bitflip", "insert", "delete", "overwrite", "wild", "random"])
    if kind == "truncate":
        k = int(rng.integers(0, max(1, n)))
        return f"truncate to {k} of {n} bytes", raw[:k]
    if kind == "bitflip":
        b, where = bytearray(raw), []
        for _ in range(int(rng.integers(1, 5))):
            p = min(pos(), n - 1)
            b[p] ^= 1 << int(rng.integers(8))
            where.append(p)
        return f"flip bits at {where}", bytes(b)
    p = pos()
    if kind == "insert":
        ins = rng.bytes(int(rng.integers(1, 17)))
        return f"insert {ins!r} at {p}", raw[:p] + ins + raw[p:]
    if kind == "delete":
        k = int(rng.integers(1, 17))
        return f"delete {k} bytes at {p}", raw[:p] + raw[p + k:]
    if kind in ("overwrite", "wild"):
        chunk = rng.bytes(int(rng.integers(1, 9))) if kind == "overwrite" else _WILD[int(rng.integers(len(_WILD)))]
        return f"write {chunk!r} at {p}", raw[:p] + chunk + raw[p + len(chunk):]
    k = int(rng.integers(0, 2 * n + 1))
    return f"{k} random bytes", rng.bytes(k)


def _zip(members):
    """A stored (uncompressed) zip of {name: bytes}, in the given order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    return buf.getvalue()


def _unzip(raw):
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def variants(raw, inner, favour, rng):
    """One mutated file: the file's own bytes mutated, or (past gzip's and zip's CRCs) the gzipped
    payload / one zip member mutated and re-packed. favour: the zip member picked half the time."""
    if inner is None or rng.random() < 0.5:
        return mutate(raw, rng)
    if inner == "gz":
        desc, payload = mutate(gzip.decompress(raw), rng)
        return f"gzip payload: {desc}", gzip.compress(payload, mtime=0)
    members = _unzip(raw)
    names = list(members)
    name = favour if favour in members and rng.random() < 0.5 else names[int(rng.integers(len(names)))]
    desc, members[name] = mutate(members[name], rng)
    return f"member {name}: {desc}", _zip(members)


# --- small valid files and their loaders ------------------------------------------------------
def _idx(magic, dims, payload):
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload


def _mnist(root, which, gz):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([0, 9, 4], np.uint8)
    folder = root / "mnist"
    folder.mkdir(parents=True)
    files = {"train-images-idx3-ubyte": _idx(2051, x.shape, x.tobytes()),
             "train-labels-idx1-ubyte": _idx(2049, y.shape, y.tobytes())}
    for stem, raw in files.items():
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    target = folder / (f"train-{which}-idx{3 if which == 'images' else 1}-ubyte" + (".gz" if gz else ""))

    def load(_):
        xs, ys = mnist.load_mnist(root, "train", download=False)
        assert xs.dtype == np.uint8 and xs.ndim == 3 and xs.shape[1:] == (28, 28)
        assert ys.dtype == np.int64 and ys.shape == (len(xs),) and ((ys >= 0) & (ys <= 9)).all()
    return target, "gz" if gz else None, None, load


def _cifar_records():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (R, 3, 32, 32), dtype=np.uint8), np.array([3, 7], np.uint8)


def _check_cifar(out):
    xs, ys, names = out
    assert xs.dtype == np.uint8 and xs.shape == (R, 3, 32, 32)
    assert ys.dtype == np.int64 and ys.shape == (R,) and ((ys >= 0) & (ys <= 9)).all()
    assert len(names) == 10 and all(isinstance(s, str) for s in names)


def _cifar(root, layout):
    x, y = _cifar_records()
    records = np.concatenate([y[:, None], x.reshape(R, -1)], axis=1).tobytes()
    meta = "\n".join(f"class{i}" for i in range(10)).encode()
    folder = root / "cifar10"
    inner = None
    if layout in ("bin", "bin.gz"):
        (folder / cifar10.BIN_DIR).mkdir(parents=True)
        target = folder / cifar10.BIN_DIR / f"test_batch.{layout}"
        target.write_bytes(gzip.compress(records, mtime=0) if layout == "bin.gz" else records)
        (folder / cifar10.BIN_DIR / "batches.meta.txt").write_bytes(meta)
        inner = "gz" if layout == "bin.gz" else None
    elif layout == "tar":
        folder.mkdir(parents=True)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, raw in (("batches.meta.txt", meta), ("test_batch.bin", records)):
                info = tarfile.TarInfo(f"{cifar10.BIN_DIR}/{name}")
                info.size = len(raw)
                tf.addfile(info, io.BytesIO(raw))
        target = folder / cifar10.TAR_NAME
        target.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
        inner = "gz"
    else:  # python pickles, as the official (protocol 2, bytes keys); fuzz the batch or the meta
        (folder / cifar10.PY_DIR).mkdir(parents=True)
        batch = pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in y],
                              b"data": x.reshape(R, -1)}, protocol=2)
        (folder / cifar10.PY_DIR / "test_batch").write_bytes(batch)
        (folder / cifar10.PY_DIR / "batches.meta").write_bytes(pickle.dumps(
            {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, protocol=2))
        target = folder / cifar10.PY_DIR / ("batches.meta" if layout == "py-meta" else "test_batch")
    return target, inner, None, lambda _: _check_cifar(cifar10.load_cifar10(root, "test", download=False))


def _check_converted(out):
    params, cfg, meta = out
    shapes = param_shapes(cfg)
    assert set(params) == set(shapes) and isinstance(meta, dict)
    for k, v in params.items():
        assert isinstance(v, np.ndarray) and v.shape == tuple(shapes[k]) and v.dtype.kind == "f"


def _checkpoint(root, compress):
    params = init_params(CFG, seed=3)
    opt = {"step": np.array(5, np.int64), **{f"m.{k}": np.full_like(v, 0.5) for k, v in params.items()}}
    target = save_checkpoint(root / "ckpt.npz", params, CFG, {"class_names": ["a", "b", "c"]}, opt, compress)

    def load(path):
        params, cfg, meta = load_checkpoint(path)
        shapes = param_shapes(cfg)
        assert isinstance(cfg, ViTConfig) and isinstance(meta, dict) and set(params) == set(shapes)
        for k, v in params.items():
            assert v.shape == tuple(shapes[k]) and v.dtype.kind == "f" and np.isfinite(v).all()
        st = load_optimizer_state(path)
        assert isinstance(st, dict) and all(isinstance(v, np.ndarray) for v in st.values())
    return target, "zip", "__meta__.npy", load


def _google(root):
    target = root / "ViT-tiny.npz"
    np.savez(target, **to_google(init_params(CFG, seed=4), HEADS))
    return target, "zip", "Transformer/posembed_input/pos_embedding.npy", lambda p: _check_converted(convert(p))


def _safetensors(root):
    target = write_safetensors(root / "model.safetensors", init_params(CFG, seed=5), {"format": "pt"})

    def load(path):
        tensors, meta = read_safetensors(path)
        assert all(isinstance(v, np.ndarray) for v in tensors.values())
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        _check_converted(convert(path, heads=HEADS))
    return target, None, None, load


def _timm_export(root):
    """tinyvit's timm export, read back by load_model: its __metadata__ (JSON strings) is parsed too."""
    t = {"resize": "shortest_edge", "crop_pct": 0.9, "interpolation": "bicubic", "mean": [0.4], "std": [0.3]}
    ckpt = save_checkpoint(root / "m.npz", init_params(CFG, seed=7), CFG,
                           {"class_names": ["a", "b", "c"], "mean": [0.4], "std": [0.3], "eval_transform": t})
    target = root / "vit.safetensors"
    export(ckpt, "timm", target)
    return target, None, None, lambda p: _check_converted(load_model(p))


def _walk(obj):
    """Every leaf of a loaded torch object is an array or a plain value."""
    if isinstance(obj, dict):
        for v in obj.values():
            _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v)
    else:
        assert obj is None or isinstance(obj, (np.ndarray, int, float, str, bytes, bool)), type(obj)


def _torch(root, suffix):
    target = root / f"model{suffix}"
    sd = {k: torch.from_numpy(v) for k, v in init_params(CFG, seed=6).items()}
    torch.save({"state_dict": sd, "epoch": 3} if suffix == ".pth" else sd, target)

    def load(path):
        _walk(load_torch_zip(path))
        _check_converted(convert(path, heads=HEADS))
    return target, "zip", "archive/data.pkl", load


TARGETS = {
    "mnist-images-gz": lambda root: _mnist(root, "images", True),
    "mnist-labels-gz": lambda root: _mnist(root, "labels", True),
    "mnist-images-raw": lambda root: _mnist(root, "images", False),
    "mnist-labels-raw": lambda root: _mnist(root, "labels", False),
    "cifar-bin": lambda root: _cifar(root, "bin"),
    "cifar-bin-gz": lambda root: _cifar(root, "bin.gz"),
    "cifar-tar-gz": lambda root: _cifar(root, "tar"),
    "cifar-py-batch": lambda root: _cifar(root, "py"),
    "cifar-py-meta": lambda root: _cifar(root, "py-meta"),
    "checkpoint-npz": lambda root: _checkpoint(root, False),
    "checkpoint-npz-compressed": lambda root: _checkpoint(root, True),
    "google-npz": _google,
    "safetensors": _safetensors,
    "timm-export-safetensors": _timm_export,
    "torch-pth": lambda root: _torch(root, ".pth"),
    "hf-bin": lambda root: _torch(root, ".bin"),
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_loader(name, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "RECORDS_PER_BATCH", R)
    target, inner, favour, load = TARGETS[name](tmp_path)
    valid = target.read_bytes()
    load(target)  # the unmutated file loads
    rng = np.random.default_rng([SEED, sum(map(ord, name))])  # seeded per target: failures reproduce
    outcomes, bad = {"ok": 0, "TinyViTError": 0}, []
    for i in range(CASES):
        desc, raw = variants(valid, inner, favour, rng)
        target.write_bytes(raw)
        t0, w0 = time.process_time(), time.perf_counter()
        try:
            load(target)
            outcomes["ok"] += 1
        except TinyViTError as e:
            outcomes["TinyViTError"] += 1
            if "\n" in str(e):
                bad.append(f"case {i} ({desc}): multi-line message {str(e)!r}")
        except Exception as e:  # noqa: BLE001 -- the point: nothing but TinyViTError may escape
            bad.append(f"case {i} ({desc}): {type(e).__name__}: {e}")
        took, waited = time.process_time() - t0, time.perf_counter() - w0
        if took > BUDGET_S or waited > WALL_S:
            bad.append(f"case {i} ({desc}): took {took:.1f} s of CPU, {waited:.1f} s in all")
    assert not bad, f"{name} {outcomes}:\n" + "\n".join(bad[:20])
    assert outcomes["TinyViTError"] > 0  # the mutations really do break files


# --- hand-made worst cases: what random mutation rarely finds -----------------------------------
def _st_file(path, header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _ckpt_with_meta(path, meta_bytes=None, config=None):
    """A checkpoint whose JSON record is meta_bytes, or whose config is replaced by config."""
    params = init_params(CFG, seed=7)
    save_checkpoint(path, params, CFG)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if config is not None:
        meta = json.loads(arrays["__meta__"].tobytes())
        meta["config"] = {**meta["config"], **config}
        meta_bytes = json.dumps(meta).encode()
    arrays["__meta__"] = np.frombuffer(meta_bytes, np.uint8)
    np.savez(path, **arrays)
    return path


def _bad_ckpt(meta_bytes=None, **config):
    """A CRAFTED entry: load a checkpoint with this JSON record or these config fields."""
    return lambda tmp: lambda: load_checkpoint(_ckpt_with_meta(tmp / "c.npz", meta_bytes, config or None))


def _google_edited(path, **edits):
    state = to_google(init_params(CFG, seed=4), HEADS)
    state.update(edits)
    np.savez(path, **state)
    return path


def _idx_overflow(tmp):
    folder = tmp / "mnist"
    folder.mkdir()
    # 2**22 * 2**21 * 2**21 = 2**64, which wraps to 0 in int64: "header only" looked complete
    (folder / "train-images-idx3-ubyte").write_bytes(_idx(2051, (1 << 22, 1 << 21, 1 << 21), b""))
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx(2049, (0,), b""))
    return lambda: mnist.load_mnist(tmp, "train", download=False)


def _py_batch(tmp, labels):
    x, _ = _cifar_records()
    folder = tmp / "cifar10" / cifar10.PY_DIR
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": x.reshape(R, -1), b"labels": labels}, protocol=2))
    return lambda: cifar10.load_cifar10(tmp, "test", download=False)


def _torch_expanded(tmp):
    path = tmp / "expanded.pth"  # a legal torch.save: 4 bytes of storage viewed as 2**26 floats
    torch.save({"w": torch.zeros(1).expand(1 << 26)}, path)
    return lambda: load_torch_zip(path)


CRAFTED = {
    "idx-size-overflows-int64": _idx_overflow,
    "cifar-py-labels-not-a-list": lambda tmp: _py_batch(tmp, 5),
    "cifar-py-labels-ragged": lambda tmp: _py_batch(tmp, [[1], [2, 3]]),
    "npy-named-npz": lambda tmp: (np.save(tmp / "a.npy", np.zeros(3)), (tmp / "a.npy").rename(tmp / "a.npz"),
                                  lambda: load_checkpoint(tmp / "a.npz"))[-1],
    "npz-member-not-npy": lambda tmp: ((tmp / "c.npz").write_bytes(_zip({"__meta__": b"{}", "x.npy": b"junk"})),
                                       lambda: load_checkpoint(tmp / "c.npz"))[-1],
    "ckpt-meta-deep-json": _bad_ckpt(b"[" * 100000),
    "ckpt-meta-huge-int": _bad_ckpt(b"[" + b"9" * 5000 + b"]"),
    "ckpt-config-zero-patch": _bad_ckpt(patch_size=0),
    "ckpt-config-zero-heads": _bad_ckpt(heads=0),
    "ckpt-config-float-depth": _bad_ckpt(depth=1.0),
    "ckpt-config-huge-depth": _bad_ckpt(depth=10**6),
    "ckpt-config-string-eps": _bad_ckpt(ln_eps="x"),
    "safetensors-deep-json": lambda tmp: lambda: read_safetensors(_st_file(tmp / "a.safetensors", b"[" * 100000)),
    "safetensors-dtype-not-str": lambda tmp: lambda: read_safetensors(_st_file(
        tmp / "a.safetensors", {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)),
    "safetensors-shape-wraps-to-0": lambda tmp: lambda: read_safetensors(_st_file(
        tmp / "a.safetensors", {"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 0]}})),
    "safetensors-shape-bigint": lambda tmp: lambda: read_safetensors(_st_file(
        tmp / "a.safetensors", {"w": {"dtype": "F32", "shape": [1 << 70], "data_offsets": [0, 0]}})),
    "torch-expanded-view": _torch_expanded,
    "google-zero-patch": lambda tmp: lambda: convert(_google_edited(
        tmp / "g.npz", **{"embedding/kernel": np.zeros((0, 0, 1, 8), np.float32)})),
    "google-0d-head": lambda tmp: lambda: convert(_google_edited(
        tmp / "g.npz", **{"head/kernel": np.float32(1.0), "head/bias": np.float32(1.0)})),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_file_is_refused(name, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "RECORDS_PER_BATCH", R)
    load = CRAFTED[name](tmp_path)
    t0 = time.process_time()
    with pytest.raises(TinyViTError) as info:
        load()
    assert time.process_time() - t0 < BUDGET_S
    assert "\n" not in str(info.value)
