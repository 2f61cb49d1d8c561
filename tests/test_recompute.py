"""Activation checkpointing: vit_forward(grad_checkpointing=True) keeps each block's input alone and
vit_backward runs the block again with the same dropout and drop-path draws (tinyvit.nn.recompute)."""
import dataclasses

import numpy as np
import pytest
from family_configs import FAMILIES
from toy_data import TINY, synthetic

from tinyvit import TinyViTError, attention_maps, init_params, preset, vit_backward, vit_forward
from tinyvit.backend import to_device, to_numpy
from tinyvit.nn.caches import BlockCheckpoint
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward
from tinyvit.nn.recompute import mark, replay
from tinyvit.train.config import TrainConfig
from tinyvit.train.loop import fit

DROPS = {"none": (0.0, 0.0, 0.0), "dropout and drop path": (0.1, 0.1, 0.3)}


def _setup(xp, name, dtype, drops):
    cfg = dataclasses.replace(FAMILIES[name], dropout=drops[0], attn_dropout=drops[1], drop_path=drops[2])
    params = {k: to_device(v, xp) for k, v in init_params(cfg, seed=1, dtype=dtype).items()}
    rng = np.random.default_rng(2)
    x = to_device(rng.normal(size=(3, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype), xp)
    return cfg, params, x, to_device(rng.integers(0, cfg.num_classes, size=3), xp)


def _step(xp, cfg, params, x, y, checkpoint, trainable=None):
    """(grads, the generator's next draws after the step) of one training forward and backward."""
    rng = np.random.default_rng(7) if xp is np else xp.random.default_rng(7)
    logits, cache = vit_forward(params, x, cfg, train=True, rng=rng, grad_checkpointing=checkpoint)
    _, ce = cross_entropy_forward(logits, y)
    return vit_backward(cross_entropy_backward(1.0, ce), cache, trainable), to_numpy(rng.random(4))


@pytest.mark.parametrize("name", ["dinov2_reg", "siglip", "deit_distilled", "mae_avg"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("drops", DROPS)
def test_checkpointed_gradients_are_the_same_bits(xp, name, dtype, drops):
    """Every gradient bit-identical to the step without checkpointing, the generator left where that step
    leaves it (the masks drawn once, in the same order); with frozen params too."""
    cfg, params, x, y = _setup(xp, name, dtype, DROPS[drops])
    plain, after = _step(xp, cfg, params, x, y, False)
    for trainable in (None, {k for k in params if k.startswith(("blocks.1.", "head"))}):
        grads, after_ck = _step(xp, cfg, params, x, y, True, trainable)
        assert set(grads) == set(trainable or params) and np.array_equal(after_ck, after)
        for k, g in grads.items():
            assert g.dtype == dtype and np.array_equal(to_numpy(g), to_numpy(plain[k])), k


def test_the_forward_keeps_each_blocks_input_alone():
    """The cache holds one (B, N, C) input per block (no activations), far less than the full cache."""
    import tracemalloc
    cfg = preset("vit-ti16", depth=4, img_size=64)
    params = init_params(cfg)
    x = np.zeros((8, 3, 64, 64), np.float32)
    tracemalloc.start()
    _, full = vit_forward(params, x, cfg, train=True)
    held_full = tracemalloc.get_traced_memory()[0]
    del full
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    _, ck = vit_forward(params, x, cfg, train=True, grad_checkpointing=True)
    held_ck = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    caches = ck.caches if hasattr(ck, "caches") else [ck]
    blocks = [b for c in caches for b in c.features.blocks]
    assert all(isinstance(b, BlockCheckpoint) and b.x.shape[1:] == (17, cfg.dim) for b in blocks)
    assert held_ck < held_full / 4, (held_ck, held_full)
    with pytest.raises(TinyViTError, match="grad_checkpointing"):
        attention_maps(ck)


@pytest.mark.parametrize("kind", ["numpy", "tape"])
def test_replay_draws_what_the_generator_drew(kind):
    """NumPy's generator is replayed from its state; another (CuPy's) through the tape of its draws."""
    rng = np.random.default_rng(3)
    seen = rng if kind == "numpy" else type("Other", (), {"random": lambda self, *a, **k: rng.random(*a, **k)})()
    draws, record = mark(seen)
    first = [draws.random((2, 3), dtype=np.float32), draws.random(4)]
    again = replay(record)
    assert all(np.array_equal(again.random(a.shape, dtype=a.dtype), a) for a in first)
    assert mark(None) == (None, None) and replay(None) is None


def test_fit_with_grad_checkpointing_ends_with_the_same_weights(tmp_path):
    """A training run with dropout and drop path: the same weights, bit for bit, with and without; a run
    resumed with it switched on (memory alone changes) ends as the straight one too."""
    cfg = dataclasses.replace(TINY, dropout=0.1, drop_path=0.2)

    def run(out, ck, **kw):
        tc = TrainConfig(epochs=2, batch_size=32, lr=2e-3, augment="shift", grad_checkpointing=ck)
        data = synthetic(64, 1), synthetic(32, 2)
        return fit(init_params(cfg, seed=0), cfg, tc, np, *data, tmp_path / out, quiet=True, **kw)["params"]
    ends = [run("plain", False), run("checkpointed", True)]
    run("stopped", False, max_steps=3)
    ends.append(run("resumed", True, resume=tmp_path / "stopped" / "checkpoint.npz"))
    assert all(np.array_equal(ends[0][k], end[k]) for end in ends[1:] for k in ends[0])
