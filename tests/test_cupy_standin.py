"""The CuPy stand-in refuses what real CuPy refuses, and tinyvit's CuPy path keeps its host-sync budget.

These tests use the stand-in's arrays directly (tinyvit takes the module from its arrays), so they
run in every pass, with or without TINYVIT_CUPY_STANDIN, and on a GPU machine too.
"""
import json

import numpy as np
import pytest

from tinyvit import backend
from tinyvit.data.batches import ArrayDataset
from tinyvit.nn.model import init_params, preset, vit_forward
from tinyvit.testing import cupy_standin as cp
from tinyvit.train import loop as T
from tinyvit.train.optim import clip_grad_norm

IMPLICIT = "Implicit conversion to a NumPy array is not allowed"


def test_api_record_names_its_cupy():
    assert cp.API["cupy_version"].split(".")[0].isdigit() and len(cp.API["functions"]) > 300
    assert "take" in cp.API["functions"] and "permutation" not in cp.API["random.Generator"]


@pytest.mark.parametrize("convert", [np.asarray, np.array, lambda d: np.testing.assert_allclose(d, 1.0),
                                     lambda d: np.ones(3)[d.astype(np.int64)]])
def test_implicit_host_conversion_is_refused(convert):
    d = cp.ones(3)
    with pytest.raises(TypeError, match=IMPLICIT):
        convert(d)


@pytest.mark.parametrize("op", [lambda d, h: d + h, lambda d, h: h * d, lambda d, h: cp.multiply(d, h),
                                lambda d, h: cp.concatenate([d, h]), lambda d, h: d.__setitem__(slice(1), h[:1]),
                                lambda d, h: cp.exp(d, out=h), lambda d, h: np.add(h, d)])
def test_host_array_meeting_device_array_is_refused(op):
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>|Only cupy arrays"):
        op(cp.ones(3), np.ones(3))


@pytest.mark.parametrize("join", [cp.concatenate, cp.stack])
def test_joins_take_device_arrays_only(join):
    """NumPy would join scalars and 0-d arrays alike; CuPy takes only its arrays."""
    assert join([cp.ones(1), cp.zeros(1)]).shape == ((2,) if join is cp.concatenate else (2, 1))
    with pytest.raises(TypeError, match="Only cupy arrays can be concatenated"):
        join([cp.ones(1), np.float64(1)])


def test_what_cupy_lacks_is_refused():
    with pytest.raises(TypeError, match="unexpected keyword argument 'mode'"):
        cp.take(cp.arange(4), cp.arange(2), mode="clip")
    with pytest.raises(TypeError, match="unexpected keyword argument 'mode'"):
        cp.arange(4).take(cp.arange(2), mode="clip")
    rng = cp.random.default_rng(0)
    for name in ("permutation", "normal", "choice", "shuffle"):
        with pytest.raises(AttributeError, match=name):
            getattr(rng, name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_cupy_function'"):
        cp.not_a_cupy_function  # noqa: B018


def test_device_values_stay_on_the_device_until_read():
    """Reductions give 0-d device arrays; only explicit reads reach the host, each one counted."""
    d = cp.asarray(np.arange(6.0).reshape(2, 3))
    s = d.sum()
    assert isinstance(s, cp.ndarray) and s.shape == ()
    reads = [lambda: d.get(), lambda: cp.asnumpy(d), lambda: float(s), lambda: int(s), lambda: bool(s > 1),
             lambda: s.item(), lambda: d.tolist(), lambda: f"{s}"]
    for read in reads:
        before = cp.sync_count()
        read()
        assert cp.sync_count() == before + 1
    before = cp.sync_count()
    ((d * 2 + 1).max(axis=1, keepdims=True) @ cp.ones((1, 3)))[0, 1:] = 0
    assert cp.sync_count() == before
    assert cp.asnumpy(d * 2).tolist() == [[0, 2, 4], [6, 8, 10]]


def test_host_data_is_copied_to_the_device():
    h = np.ones(3)
    d = cp.asarray(h)
    d *= 2
    assert h.tolist() == [1, 1, 1] and d.get().tolist() == [2, 2, 2]
    d[:] = h  # a whole-array assignment copies host data in (CuPy allows it)
    assert d.get().tolist() == [1, 1, 1]
    assert cp.asarray([cp.ones(2), cp.zeros(2)]).shape == (2, 2)  # a list of device arrays
    with pytest.raises(TypeError, match=IMPLICIT):
        cp.array([0.0, cp.cos(cp.zeros(()))])  # device values mixed with host ones
    assert cp.asarray(d) is not None and cp.asarray(d)._a is d._a  # device data: no copy, as CuPy


def test_kernels_bind_types_as_cupy():
    k = cp.ElementwiseKernel("T x, T y", "T z", "z = x + y", "add")
    f32, f64 = cp.ones(2, dtype=np.float32), cp.ones(2)
    assert k(f32, 2.0).dtype == np.float32 and k(f32, np.float64(2)).get().tolist() == [3, 3]
    with pytest.raises(TypeError, match="Type is mismatched"):
        k(f32, f64)
    with pytest.raises(TypeError, match="Unsupported type"):
        k(f32, np.ones(2, np.float32))
    i = cp.ElementwiseKernel("int64 a", "T b", "b = a", "cast")
    with pytest.raises(TypeError, match="Type is mismatched"):
        i(cp.ones(2, dtype=np.int32), cp.empty(2))
    out = cp.empty((2, 2))
    assert k(f64, cp.ones((2, 1)), out) is out and out.get().tolist() == [[2, 2], [2, 2]]


def test_standin_is_chosen_only_without_a_gpu(monkeypatch):
    monkeypatch.setattr(backend, "_CUPY", {})
    monkeypatch.setattr(backend, "_real_cupy", lambda: None)
    monkeypatch.setenv("TINYVIT_CUPY_STANDIN", "1")
    assert backend.get_backend("cupy") is cp and backend.is_standin(cp)
    monkeypatch.setenv("TINYVIT_CUPY_STANDIN", "0")
    with pytest.raises(Exception, match="needs CuPy and a CUDA GPU"):
        backend.get_backend("cupy")
    real = object()
    monkeypatch.setattr(backend, "_CUPY", {})
    monkeypatch.setattr(backend, "_real_cupy", lambda: real)
    monkeypatch.setenv("TINYVIT_CUPY_STANDIN", "1")
    assert backend.get_backend("cupy") is real


# --- the host-sync budget -----------------------------------------------------------------------
CONFIGS = {"mnist": preset("mnist"),
           "vit-b16-shaped": preset("vit-b16", depth=2, img_size=32, num_classes=10)}  # B/16 widths, 2 blocks


def _batch(cfg, xp, n=4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
    return xp.asarray(x), xp.asarray(np.arange(n) % cfg.num_classes)


@pytest.mark.parametrize("name", CONFIGS)
def test_train_step_and_inference_read_nothing_from_the_device(name):
    """Forward, backward, clipping and the optimizer step: no host read; an inference batch: none."""
    cfg = CONFIGS[name]
    params = backend.to_device(init_params(cfg), cp)
    x, y = _batch(cfg, cp)
    tc = T.TrainConfig(clip=1.0)
    opt = tc.make_optimizer()
    before = cp.sync_count()
    loss, correct, grads = T._step_grads(params, x, y, cfg, tc, cp.random.default_rng(0), False)
    clip_grad_norm(grads, tc.clip)
    opt.step(params, grads, lr=1e-3)
    vit_forward(params, x, cfg, keep_cache=False)
    assert cp.sync_count() == before
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("name", CONFIGS)
def test_fit_reads_at_most_once_per_step(name, tmp_path, monkeypatch):
    """A whole training run: at most one device-to-host transfer per step, besides evaluation and
    checkpoint writing (once per epoch, each a deliberate transfer)."""
    cfg = CONFIGS[name]
    steps = 12
    n = 4 * steps
    rng = np.random.default_rng(1)
    shape = (n, cfg.img_size, cfg.img_size) if cfg.in_chans == 1 else (n, 3, cfg.img_size, cfg.img_size)
    ds = ArrayDataset(rng.integers(0, 256, shape).astype(np.uint8), np.arange(n) % 10,
                   (0.5,) * cfg.in_chans, (0.25,) * cfg.in_chans)
    outside = []  # syncs inside evaluation and checkpoint writes

    def counted(fn):
        def run(*a, **k):
            s = cp.sync_count()
            r = fn(*a, **k)
            outside.append(cp.sync_count() - s)
            return r
        return run

    monkeypatch.setattr(T, "evaluate", counted(T.evaluate))
    monkeypatch.setattr(T, "save_checkpoint", counted(T.save_checkpoint))
    before = cp.sync_count()
    T.fit(init_params(cfg), cfg, T.TrainConfig(epochs=1, batch_size=4, warmup_epochs=0.2, clip=1.0), cp,
          ds, ds, tmp_path, quiet=True)
    train_syncs = cp.sync_count() - before - sum(outside)
    assert train_syncs == -(-steps // T.DEVICE_READ_EVERY) <= steps
    assert outside[0] == 1  # evaluate: one read for the whole pass
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(log[0]["train_loss"]) and 0 <= log[0]["train_accuracy"] <= 1
