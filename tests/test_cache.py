"""Head mode's feature cache (tinyvit.train.finetune.cached_features): the same pass again is a hit with the
same features; a change of the weights, the config, the image size, the transform or the dtype, one at a
time, is a miss (the pass runs again)."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from tinyvit import ViTConfig, init_params
from tinyvit.data.folders import ImageList
from tinyvit.data.loader import FolderDataset
from tinyvit.io.posembed import adapt
from tinyvit.train import finetune

CFG = ViTConfig(img_size=16, patch_size=8, num_classes=2, dim=16, depth=1, heads=2, mlp_dim=32)
TRANSFORM = dict(img_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.875, resize="shortest_edge",
                 interpolation="bicubic")


def _images(root, n=4):
    """n small photos of two classes."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return ImageList([str(root / f"{i}.png") for i in range(n)], np.arange(n) % 2, ["a", "b"])


def _params(cfg=CFG, dtype=np.float32):
    rng = np.random.default_rng(1)
    return {k: (v + 0.1 * rng.normal(size=v.shape)).astype(dtype) for k, v in init_params(cfg).items()}


@pytest.fixture
def cache_pass(tmp_path, monkeypatch):
    """f(params, cfg, **transform) -> (features, hit): cached_features in one folder, counting the real passes."""
    images, passes, extract = _images(tmp_path / "photos"), [], finetune.extract_features

    def counted(*args, **kw):
        passes.append(1)
        return extract(*args, **kw)

    monkeypatch.setattr(finetune, "extract_features", counted)

    def run(params, cfg=CFG, **transform):
        data = FolderDataset(images, workers=1, **dict(TRANSFORM, **transform))
        n = len(passes)
        feats, labels, _ = finetune.cached_features(tmp_path / "cache", "train", params, cfg, data, np, 4, "f",
                                                    quiet=True)
        assert list(labels) == [0, 1, 0, 1]
        return feats, len(passes) == n

    return run


def test_feature_cache_hits_on_a_rerun_only(cache_pass):
    params = _params()
    first, hit = cache_pass(params)
    assert not hit
    again, hit = cache_pass({k: v.copy() for k, v in params.items()})  # equal weights, new arrays
    assert hit and np.array_equal(again, first)
    head = dict(params, **{"head.weight": params["head.weight"] + 1})  # the features come before the head
    assert cache_pass(head)[1]


def _other_weights(p):
    w = p["blocks.0.mlp.fc1.weight"].copy()
    w[0, 0] += 1e-3  # one value: names, shapes and dtypes are the same
    return dict(p, **{"blocks.0.mlp.fc1.weight": w})


def _other_size(p):
    p, cfg = adapt(p, CFG, img_size=24)  # as --img-size 24 does
    return p, cfg, {"img_size": 24}


CHANGES = {  # each: params -> (params, cfg, transform changes)
    "weights": lambda p: (_other_weights(p), CFG, {}),
    "config": lambda p: (p, dataclasses.replace(CFG, gelu="tanh"), {}),
    "eps": lambda p: (p, dataclasses.replace(CFG, ln_eps=1e-5), {}),
    "image_size": _other_size,
    "crop_pct": lambda p: (p, CFG, {"crop_pct": 1.0}),
    "resize": lambda p: (p, CFG, {"resize": "squash"}),
    "interpolation": lambda p: (p, CFG, {"interpolation": "bilinear"}),
    "mean_std": lambda p: (p, CFG, {"mean": (0.4, 0.5, 0.5)}),
    "dtype": lambda p: ({k: v.astype(np.float64) for k, v in p.items()}, CFG, {}),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_feature_cache_misses_on_each_change(cache_pass, change):
    params = _params()
    cache_pass(params)
    p, cfg, transform = CHANGES[change](params)
    feats, hit = cache_pass(p, cfg, **transform)
    assert not hit, change
    assert cache_pass(p, cfg, **transform)[1]  # and the changed pass is cached in turn
    assert cache_pass(params)[1]  # beside the first
