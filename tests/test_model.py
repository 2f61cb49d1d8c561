"""The whole ViT against a torch ViT loaded with the same params: logits and every gradient."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch_vit import torch_vit_from_params

from tinyvit import TinyViTError, ViTConfig, attention_maps, init_params, preset, vit_backward, vit_forward
from tinyvit.backend import to_device, to_numpy
from tinyvit.cpu import blas
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward
from tinyvit.nn.model import count_params
from tinyvit.nn.partial import tail_backward, tail_forward, vit_tokens

CONFIGS = {
    # one block, one head, odd token count (3x3 patches + CLS = 10)
    "tiny-1block": ViTConfig(img_size=12, patch_size=4, in_chans=1, num_classes=3, dim=8, depth=1,
                             heads=1, mlp_dim=16),
    # several blocks and heads, RGB, tanh GELU
    "small-3blocks": ViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=5, dim=24, depth=3,
                               heads=3, mlp_dim=40, gelu="tanh"),
    "mnist-preset": preset("mnist", depth=2),
    # 65 tokens and narrow linears: every norm's affine folds into the linear after it
    "folded-norms": ViTConfig(img_size=16, patch_size=2, in_chans=1, num_classes=4, dim=8, depth=2,
                              heads=2, mlp_dim=12),
}


def _randomized_params(cfg, seed):
    """init_params, with norms/biases/cls perturbed so no gradient is trivially zero or one."""
    p = init_params(cfg, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for k, v in p.items():
        p[k] = v + 0.1 * rng.normal(size=v.shape)
    return p


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_vit_matches_torch(xp, name, B, dtype):
    cfg = CONFIGS[name]
    params = _randomized_params(cfg, seed=B)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(B, cfg.in_chans, cfg.img_size, cfg.img_size))
    labels = rng.integers(0, cfg.num_classes, size=B)
    # the float64 oracle sees our dtype's rounded params and images
    params = {k: v.astype(dtype).astype(np.float64) for k, v in params.items()}
    images = images.astype(dtype).astype(np.float64)

    model = torch_vit_from_params(cfg, params)
    logits_t = model(torch.tensor(images))
    loss_t = F.cross_entropy(logits_t, torch.tensor(labels), label_smoothing=0.1)
    loss_t.backward()

    dev = {k: to_device(v.astype(dtype), xp) for k, v in params.items()}
    logits, cache = vit_forward(dev, to_device(images.astype(dtype), xp), cfg)
    loss, ce_cache = cross_entropy_forward(logits, to_device(labels, xp), 0.1)
    grads = vit_backward(cross_entropy_backward(1.0, ce_cache), cache)

    tol = 1e-9 if dtype == np.float64 else 3e-4
    assert logits.dtype == dtype
    assert rel_err(logits, logits_t.detach().numpy()) < tol
    assert abs(float(loss) - loss_t.item()) < tol * abs(loss_t.item())
    assert set(grads) == set(params)
    for name_, p in model.named_parameters():
        assert grads[name_].dtype == dtype and grads[name_].shape == p.shape, name_
        assert rel_err(grads[name_], p.grad.numpy()) < tol, name_


@pytest.mark.parametrize("name", list(CONFIGS))
def test_last_block_on_class_token_equals_all_tokens(xp, name):
    """By default the last block computes the class token's output alone: same logits and grads."""
    cfg = CONFIGS[name]
    params = {k: to_device(v, xp) for k, v in _randomized_params(cfg, seed=4).items()}
    images = to_device(np.random.default_rng(5).normal(size=(3, cfg.in_chans, cfg.img_size, cfg.img_size)), xp)
    dlogits = to_device(np.random.default_rng(6).normal(size=(3, cfg.num_classes)), xp)
    runs = []
    for all_tokens in (False, True):
        logits, cache = vit_forward(params, images, cfg, all_tokens=all_tokens)
        blocks = (cache.caches[0] if hasattr(cache, "caches") else cache).features.blocks
        q = blocks[-1].attn.q  # the last block's cached queries (B, H, n, D)
        assert q.shape[2] == (cfg.num_patches + 1 if all_tokens else 1)
        runs.append((logits, vit_backward(dlogits, cache)))
    (a, ga), (b, gb) = runs
    assert rel_err(a, b) < 1e-12
    for k in ga:
        assert rel_err(ga[k], gb[k]) < 1e-12, k



TAIL_CONFIGS = dict(CONFIGS, registers=ViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=5, dim=24, depth=3,
                                                 heads=3, mlp_dim=40, reg_tokens=2, global_pool="avg"))


@pytest.mark.parametrize("name", list(TAIL_CONFIGS))
def test_tail_from_a_blocks_tokens_equals_the_whole_model(xp, name):
    """Partial fine-tuning's pair: tail_forward(vit_tokens(images, s), start=s) gives vit_forward's logits,
    and tail_backward the whole model's gradients of blocks[s:], the norm, the pooling and the head."""
    cfg = TAIL_CONFIGS[name]
    params = {k: to_device(v, xp) for k, v in _randomized_params(cfg, seed=4).items()}
    images = to_device(np.random.default_rng(5).normal(size=(3, cfg.in_chans, cfg.img_size, cfg.img_size)), xp)
    dlogits = to_device(np.random.default_rng(6).normal(size=(3, cfg.num_classes)), xp)
    logits, cache = vit_forward(params, images, cfg, train=True)
    want = vit_backward(dlogits, cache)
    for start in range(cfg.depth):
        tail, c = tail_forward(params, vit_tokens(params, images, cfg, start), cfg, start, train=True)
        got = tail_backward(dlogits, c)
        assert rel_err(tail, logits) < 1e-12
        trained = {k for k in want if not k.startswith(("blocks.", "patch_embed.", "cls_token", "reg_token",
                                                         "pos_embed")) or k.startswith(tuple(
            f"blocks.{i}." for i in range(start, cfg.depth)))}
        assert set(got) == trained, (start, set(got) ^ trained)
        assert max(rel_err(got[k], want[k]) for k in got) < 1e-10
    with pytest.raises(TinyViTError, match="tokens entering a block"):
        tail_forward(params, images, cfg, 0)

def test_attention_maps_need_all_tokens():
    cfg = CONFIGS["small-3blocks"]
    params = init_params(cfg, dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16))
    with pytest.raises(TinyViTError, match="all_tokens=True"):
        attention_maps(vit_forward(params, x, cfg)[1])
    maps = attention_maps(vit_forward(params, x, cfg, all_tokens=True)[1])
    assert [m.shape for m in maps] == [(2, 3, 17, 17)] * 3


@pytest.mark.parametrize("shards", ["1", "2"])
def test_backward_consumes_the_cache(monkeypatch, shards):
    """vit_backward frees each block's saved arrays as it goes; reusing the cache is a clear error."""
    monkeypatch.setenv("TINYVIT_SHARDS", shards)
    cfg = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=16)
    params = init_params(cfg, dtype=np.float64)
    images = np.random.default_rng(0).normal(size=(2, 1, 8, 8))
    logits, cache = vit_forward(params, images, cfg)
    dlogits = np.ones_like(logits)
    grads = vit_backward(dlogits, cache)
    caches = cache.caches if shards == "2" and blas.available() else [cache]  # one per shard
    assert all(c.features.blocks == [] for c in caches)  # every block's cache released
    with pytest.raises(TinyViTError, match="already used by vit_backward"):
        vit_backward(dlogits, cache)
    _, fresh = vit_forward(params, images, cfg)
    again = vit_backward(dlogits, fresh)
    assert all(np.array_equal(grads[k], again[k]) for k in grads)


def test_timm_state_dict_names_load_strictly():
    # a tinyvit params dict IS a timm-layout state dict: the torch ViT loads it with strict=True
    cfg = preset("vit-ti16", depth=2)
    params = init_params(cfg)
    model = torch_vit_from_params(cfg, params, dtype=torch.float32)
    assert [n for n, _ in model.named_parameters()] == list(params)


def test_vit_b16_size_and_cpu_forward():
    cfg = preset("vit-b16")
    params = init_params(cfg)
    assert count_params(params) == 86_567_656  # timm's vit_base_patch16_224
    assert all(v.dtype == np.float32 for v in params.values())
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    logits, _ = vit_forward(params, x, cfg)
    assert logits.shape == (2, 1000) and logits.dtype == np.float32 and np.isfinite(logits).all()


@pytest.mark.parametrize("name,count", [("vit-ti16", 5_717_416), ("vit-s16", 22_050_664),
                                        ("mnist", 205_962)])
def test_preset_param_counts(name, count):
    from tinyvit.nn.model import param_shapes

    assert sum(int(np.prod(s)) for s in param_shapes(preset(name)).values()) == count


def test_dropout_train_mode_is_reproducible_and_eval_is_deterministic():
    cfg = preset("mnist", depth=2, dropout=0.1, attn_dropout=0.1)
    params = init_params(cfg)
    x = np.random.default_rng(0).normal(size=(4, 1, 28, 28)).astype(np.float32)
    a, _ = vit_forward(params, x, cfg, train=True, rng=np.random.default_rng(5))
    b, _ = vit_forward(params, x, cfg, train=True, rng=np.random.default_rng(5))
    c, _ = vit_forward(params, x, cfg, train=False)
    d, _ = vit_forward(params, x, cfg, train=False)
    assert (a == b).all() and (c == d).all() and not np.allclose(a, c)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TinyViTError, match="unknown preset"):
        preset("vit-x99")
    with pytest.raises(TinyViTError, match="multiple of patch_size"):
        ViTConfig(img_size=30, patch_size=16)
    cfg = preset("mnist")
    with pytest.raises(TinyViTError, match=r"images must be \(B, 1, 28, 28\)"):
        vit_forward(init_params(cfg), np.zeros((2, 3, 28, 28), np.float32), cfg)
    # only the wrong shape is refused: the right one runs
    assert vit_forward(init_params(cfg), np.zeros((2, 1, 28, 28), np.float32), cfg, keep_cache=False)[0].shape == (2, 10)


def test_inference_without_cache_matches_and_keeps_nothing():
    cfg = preset("mnist", depth=2)
    params = init_params(cfg)
    x = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    a, cache = vit_forward(params, x, cfg)
    b, none = vit_forward(params, x, cfg, keep_cache=False)  # its own blockwise path (test_infer.py)
    assert none is None and cache is not None and rel_err(b, a) < 1e-5


def test_inference_memory_stays_about_one_block():
    # a 224 px ViT-Ti at batch 64: the backward cache of 12 blocks is several GB; inference must
    # not hold it (this is what made a 1,000-image evaluation run out of 24 GB before)
    import tracemalloc

    cfg = preset("vit-ti16", depth=6)
    params = init_params(cfg)
    x = np.zeros((16, 3, 224, 224), np.float32)
    tracemalloc.start()
    vit_forward(params, x, cfg, keep_cache=False)
    lean = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    _, cache = vit_forward(params, x, cfg)
    full = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del cache
    assert lean < full / 2.5, (lean, full)


# --- frozen params: vit_backward(trainable=...) -------------------------------------------------

TRAINED = {  # shell patterns of the params that train in each case; the complement trains too
    "patch embedding": ["patch_embed.*"],
    "last block, norms, head": ["blocks.1.*", "norm.*", "fc_norm.*", "head.*", "head_dist.*", "attn_pool.*"],
    "one block's MLP": ["blocks.1.mlp.*"],
    "first attention, tokens": ["blocks.0.norm1.*", "blocks.0.attn.*", "cls_token", "reg_token", "pos_embed"],
    "biases and LayerScale": ["*.bias", "*.gamma"],
    "the head's weight": ["head.weight"],
    "pooling, norm_pre": ["attn_pool.kv.*", "attn_pool.latent", "attn_pool.mlp.fc1.*", "norm_pre.*", "norm.weight"],
}


def _family(name):
    from family_configs import FAMILIES
    return CONFIGS[name] if name in CONFIGS else FAMILIES[name]


def _grads(params, x, y, cfg, trainable=None, **kw):
    logits, cache = vit_forward(params, x, cfg, **kw)
    _, ce = cross_entropy_forward(logits, y)
    return vit_backward(cross_entropy_backward(1.0, ce), cache, trainable)


@pytest.mark.parametrize("name", ["dinov2_reg", "clip", "siglip", "deit_distilled", "mae_avg", "folded-norms"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_frozen_params_get_no_gradient_and_the_trained_ones_the_same_bits(xp, name, dtype):
    """For each set of trained params (and its complement): exactly those get a gradient, equal bit for bit
    to the full backward's; the shards (NumPy) sum them as the full backward does."""
    import fnmatch
    cfg = _family(name)
    params = {k: to_device(v.astype(dtype), xp) for k, v in _randomized_params(cfg, seed=2).items()}
    rng = np.random.default_rng(3)
    x = to_device(rng.normal(size=(3, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype), xp)
    y = to_device(rng.integers(0, cfg.num_classes, size=3), xp)
    full = {k: to_numpy(v) for k, v in _grads(params, x, y, cfg).items()}
    for case, patterns in TRAINED.items():
        some = {n for n in params if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        for trained in (some, set(params) - some):
            grads = _grads(params, x, y, cfg, trained)
            assert set(grads) == trained, (case, set(grads) ^ trained)
            for k, g in grads.items():
                assert g.dtype == dtype and np.array_equal(to_numpy(g), full[k]), (case, k)


def _gemm_counter(monkeypatch, cp):
    """Record each matmul of two matrices (or stacks of them) on the CuPy stand-in: (left shape, right shape)."""
    calls = []
    mm, rmm, ufunc_call = cp.ndarray.__matmul__, cp.ndarray.__rmatmul__, cp.ufunc.__call__

    def note(a, b):
        if getattr(a, "ndim", 0) >= 2 and getattr(b, "ndim", 0) >= 2:
            calls.append((tuple(a.shape), tuple(b.shape)))

    def matmul(a, b):
        note(a, b)
        return mm(a, b)

    def rmatmul(b, a):
        note(a, b)
        return rmm(b, a)

    def call(self, *args, **kw):
        if self.name == "matmul":
            note(*args[:2])
        return ufunc_call(self, *args, **kw)

    monkeypatch.setattr(cp.ndarray, "__matmul__", matmul)
    monkeypatch.setattr(cp.ndarray, "__rmatmul__", rmatmul)
    monkeypatch.setattr(cp.ufunc, "__call__", call)
    return calls


@pytest.mark.parametrize("trained,weight_gemms,gemms", [
    (None, 10, None),  # every linear: 2 blocks x (qkv, proj, fc1, fc2), the patch embedding, the head
    (["patch_embed.proj.weight"], 1, None),  # every block runs its input gradient, no weight gradient
    (["blocks.0.mlp.fc2.weight", "blocks.1.norm1.weight"], 1, None),  # a norm's affine needs no GEMM
    (["head.weight", "head.bias"], 1, 1),  # the head's dW alone: nothing flows below the head
    (["blocks.1.mlp.fc1.weight"], 1, 3),  # the head's dx, fc2's dx, fc1's dW: then the backward stops
])
def test_a_frozen_layer_costs_no_weight_gradient_and_nothing_runs_below_the_lowest_trained(
        monkeypatch, trained, weight_gemms, gemms):
    """Counted on the CuPy stand-in: a weight-gradient GEMM sums over the batch's rows (its contraction is
    B x tokens: 3 x 5, 3 x 4 patches or the last block's 3 x 1), every other product over a width."""
    from tinyvit.testing import cupy_standin as cp
    cfg = _family("dinov2")  # 2 blocks, dim 32, 4 patches + the class token, 5 classes
    params = to_device(_randomized_params(cfg, seed=1), cp)
    x = cp.asarray(np.random.default_rng(0).normal(size=(3, 3, cfg.img_size, cfg.img_size)))
    logits, cache = vit_forward(params, x, cfg)
    _, ce = cross_entropy_forward(logits, cp.asarray(np.arange(3)))
    dlogits = cross_entropy_backward(1.0, ce)
    calls = _gemm_counter(monkeypatch, cp)
    grads = vit_backward(dlogits, cache, trained)
    assert set(grads) == set(trained or params)
    rows = {3, 3 * 4, 3 * 5}
    assert sum(len(a) == len(b) == 2 and a[1] in rows for a, b in calls) == weight_gemms, calls
    if gemms is not None:
        assert len(calls) == gemms, calls


@pytest.mark.parametrize("shards", ["1", "2"])
def test_training_at_another_size_updates_the_stored_pos_embed(monkeypatch, shards):
    """dynamic_img_size: a batch of 12x20 images (3x5 patches) on a model stored at 8x8 (2x2): pos_embed's
    gradient comes back at the stored grid, as central differences give it, and a step on it lowers the loss."""
    monkeypatch.setenv("TINYVIT_SHARDS", shards)
    cfg = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=16,
                    dynamic_img_size=True)
    params = _randomized_params(cfg, 0)
    rng = np.random.default_rng(1)
    images, labels = rng.normal(size=(4, 1, 12, 20)), rng.integers(0, 3, size=4)

    def loss(p):
        return float(cross_entropy_forward(vit_forward(p, images, cfg, keep_cache=False)[0], labels)[0])

    logits, cache = vit_forward(params, images, cfg, train=True, rng=np.random.default_rng(0))
    grads = vit_backward(cross_entropy_backward(1.0, cross_entropy_forward(logits, labels)[1]), cache)
    assert grads["pos_embed"].shape == params["pos_embed"].shape == (1, 5, 8)
    h, pos = 1e-6, params["pos_embed"]
    for i in (0, 9, 17, 39):  # the class token's row and grid rows
        old = pos.flat[i]
        pos.flat[i] = old + h
        up = loss(params)
        pos.flat[i] = old - h
        down = loss(params)
        pos.flat[i] = old
        assert abs((up - down) / (2 * h) - grads["pos_embed"].flat[i]) < 1e-7
    assert loss(dict(params, pos_embed=pos - 0.1 * grads["pos_embed"])) < loss(params)  # a step on pos_embed alone
