"""Data-parallel shards: one part of the batch per core, each with one BLAS thread."""
import numpy as np
import pytest

from tinyvit import TinyViTError, ViTConfig, attention_maps, init_params, vit_backward, vit_features, vit_forward
from tinyvit.cpu import blas, threads
from tinyvit.nn.model import head_backward

CFG = ViTConfig(img_size=8, patch_size=4, in_chans=2, num_classes=5, dim=12, depth=2, heads=3, mlp_dim=20)


def _openblas_numpy():
    """True when this NumPy is built on OpenBLAS (then its thread count must be settable)."""
    try:
        return "openblas" in np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"].lower()
    except (TypeError, KeyError):  # older NumPy: no dict mode
        return False


needs_blas = pytest.mark.skipif(not blas.available(), reason="NumPy's BLAS thread count cannot be set here")


@pytest.mark.skipif(not _openblas_numpy(), reason="NumPy is not built on OpenBLAS")
def test_openblas_thread_count_is_found_and_restored():
    n = blas.threads()
    assert n >= 1
    with blas.single_thread():
        assert blas.threads() == 1
    assert blas.threads() == n


@needs_blas
def test_overlapping_single_thread_blocks_restore_the_count():
    """Two threads whose blocks overlap (A in, B in, A out, B out) leave the count as it was."""
    import threading

    n = blas.threads()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with blas.single_thread():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with blas.single_thread():
            b_in.set()
            a_out.wait(10)
            seen["b after a left"] = blas.threads()  # still one thread: b is inside

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"b after a left": 1}
    assert blas.threads() == n
    with blas.single_thread():
        with blas.single_thread():  # nested in one thread
            assert blas.threads() == 1
        assert blas.threads() == 1
    assert blas.threads() == n


@pytest.mark.skipif(not _openblas_numpy(), reason="NumPy is not built on OpenBLAS")
def test_every_mapped_openblas_goes_to_one_thread(monkeypatch):
    """SciPy ships its own OpenBLAS: both copies must drop to one thread, NumPy's is found first."""
    pytest.importorskip("scipy.linalg")  # maps SciPy's copy into this process
    monkeypatch.setattr(blas, "_API", None)  # look up again, now with both mapped
    assert blas.available()
    paths = [path for path, _, _ in blas._API]
    assert "numpy" in paths[0]
    before = [get() for _, _, get in blas._API]
    with blas.single_thread():
        assert [get() for _, _, get in blas._API] == [1] * len(paths)
    assert [get() for _, _, get in blas._API] == before


@pytest.mark.parametrize("n,k", [(1, 2), (2, 2), (7, 2), (8, 3), (5, 8)])
def test_batch_shards_cover_the_batch(monkeypatch, n, k):
    monkeypatch.setenv("TINYVIT_SHARDS", str(k))
    shards = threads.batch_shards(n)
    if min(n, k) < 2 or not blas.available():
        assert shards is None
        return
    assert len(shards) == min(n, k)
    assert [i for s in shards for i in range(n)[s]] == list(range(n))  # in order, no gaps or overlaps
    sizes = [s.stop - s.start for s in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_shard_count_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("TINYVIT_SHARDS", value)
    with pytest.raises(TinyViTError, match="TINYVIT_SHARDS must be a positive integer"):
        threads.batch_shards(4)


@needs_blas
def test_run_shards_restores_blas_threads_after_an_error():
    n = blas.threads()
    seen = []

    def fn(i):
        seen.append(blas.threads())
        if i == 1:
            raise ValueError("shard failed")
        return i

    with pytest.raises(ValueError, match="shard failed"):
        threads.run_shards(fn, range(3))
    assert seen == [1, 1, 1] and blas.threads() == n


def _run(monkeypatch, shards, dtype=np.float64, train=True, cfg=CFG, rng=None):
    monkeypatch.setenv("TINYVIT_SHARDS", shards)
    params = init_params(cfg, seed=1, dtype=dtype, std=0.3)
    images = np.random.default_rng(2).normal(size=(7, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype)
    logits, cache = vit_forward(params, images, cfg, train=train, rng=rng)
    dlogits = np.random.default_rng(3).normal(size=logits.shape).astype(dtype)
    maps = attention_maps(vit_forward(params, images, cfg, train=train, rng=rng, all_tokens=True)[1])
    head = head_backward(dlogits, cache)
    grads = vit_backward(dlogits, cache)
    return logits, maps, head, grads, vit_features(params, images, cfg), cache


@needs_blas
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_sharded_run_equals_whole_batch(monkeypatch, dtype, tol):
    whole = _run(monkeypatch, "1", dtype)
    sharded = _run(monkeypatch, "3", dtype)
    assert type(sharded[-1]).__name__ == "_ShardedCache" and type(whole[-1]).__name__ == "ViTCache"
    logits, maps, head, grads, feats, _ = whole
    s_logits, s_maps, s_head, s_grads, s_feats, _ = sharded
    rel = lambda a, b: np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)  # noqa: E731
    assert rel(s_logits, logits) < tol and rel(s_feats, feats) < tol
    assert len(s_maps) == len(maps) and all(rel(a, b) < tol for a, b in zip(s_maps, maps))
    assert all(rel(s_head[k], head[k]) < tol for k in head)
    assert s_grads.keys() == grads.keys()
    for k in grads:
        assert s_grads[k].shape == grads[k].shape and rel(s_grads[k], grads[k]) < tol, k


def test_dropout_training_keeps_the_batch_whole(monkeypatch):
    """Dropout masks come from one RNG stream in order: sharding would reorder them."""
    cfg = ViTConfig(**{**CFG.to_dict(), "dropout": 0.1, "attn_dropout": 0.1})
    a = _run(monkeypatch, "1", cfg=cfg, rng=np.random.default_rng(5))
    b = _run(monkeypatch, "3", cfg=cfg, rng=np.random.default_rng(5))
    assert type(b[-1]).__name__ == "ViTCache"  # not sharded
    assert np.array_equal(a[0], b[0])
    assert all(np.array_equal(a[3][k], b[3][k]) for k in a[3])


@needs_blas
def test_sharded_cache_is_consumed_once(monkeypatch):
    monkeypatch.setenv("TINYVIT_SHARDS", "2")
    params = init_params(CFG, dtype=np.float64)
    images = np.zeros((4, CFG.in_chans, CFG.img_size, CFG.img_size))
    logits, cache = vit_forward(params, images, CFG, train=True)
    vit_backward(np.ones_like(logits), cache)
    with pytest.raises(TinyViTError, match="already used by vit_backward"):
        vit_backward(np.ones_like(logits), cache)


def test_bad_images_name_the_whole_batch(monkeypatch):
    """Shape errors are raised before sharding, so they report the batch the caller passed."""
    monkeypatch.setenv("TINYVIT_SHARDS", "2")
    params = init_params(CFG)
    with pytest.raises(TinyViTError, match=r"got \(6, 2, 8, 9\)"):
        vit_forward(params, np.zeros((6, 2, 8, 9), np.float32), CFG)


def test_ordered_sum_adds_in_shard_order_whatever_order_they_arrive():
    """((a + b) + c) in float32 differs from ((a + c) + b) here; arrivals c, a, b still give the first."""
    a, b, c = np.float32([1e8, 1.0]), np.float32([-1e8, 3.0]), np.float32([1.0, 1e-8])
    s = threads.OrderedSum()
    for shard, x in ((2, c), (0, a.copy()), (1, b)):
        s.add(shard, "w", x)
    assert np.array_equal(s.sums["w"], (a + b) + c) and not np.array_equal((a + b) + c, (a + c) + b)
    assert not s._waiting  # nothing left beside the sum


def test_two_shards_add_whichever_comes_first_in_shard_zeros_order():
    a, b = np.float32([1e8, 1.0]), np.float32([-1e8, 3.0])
    s = threads.OrderedSum(2)
    s.add(1, "w", b.copy())
    s.add(1, "v", a.copy())
    s.add(0, "v", b.copy())
    s.add(0, "w", a.copy())
    out = s.result()
    assert list(out) == ["v", "w"] and np.array_equal(out["w"], a + b) and np.array_equal(out["v"], a + b)


def test_sharded_backward_holds_one_set_of_gradients(monkeypatch, shards=2):
    """Each shard hands its gradients over block by block: the backward's peak stays near one set of them
    (a wide, shallow model on a tiny batch, whose gradients outweigh its activations), not one per shard."""
    import tracemalloc

    monkeypatch.setenv("TINYVIT_SHARDS", str(shards))
    cfg = ViTConfig(img_size=16, patch_size=8, in_chans=3, num_classes=10, dim=384, depth=6, heads=4, mlp_dim=1536)
    params = init_params(cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((shards, 3, 16, 16)).astype(np.float32)
    logits, cache = vit_forward(params, x, cfg, train=True)
    one_set = sum(v.nbytes for v in params.values())
    tracemalloc.start()
    try:
        grads = vit_backward(np.ones_like(logits), cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(grads) == set(params)
    assert peak < 1.4 * one_set, (peak / one_set)  # 1.17 measured; 2.0 when each shard kept its own set
