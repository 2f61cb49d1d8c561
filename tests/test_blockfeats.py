"""tinyvit.nn.blockfeats: intermediate blocks' pooled features against timm's model (its blocks' outputs
through its final norm and its own pooling, forward_head(pre_logits=True))."""
import numpy as np
import pytest
import torch
from timm_oracle import FAMILIES, params_of, timm_model

from tinyvit import TinyViTError, vit_features
from tinyvit.nn.blockfeats import block_indices, vit_block_features


def timm_pooled(model, x, i):
    """timm: block i's output (all tokens), the final norm, then the head's pooling and fc_norm."""
    with torch.no_grad():
        out = model.forward_intermediates(torch.from_numpy(x), indices=[i], norm=False, output_fmt="NLC",
                                          intermediates_only=True, return_prefix_tokens=True)[0]
        tokens = torch.cat([out[1], out[0]], 1) if isinstance(out, tuple) else out  # (B, P+N, C)
        return model.forward_head(model.norm(tokens), pre_logits=True).numpy()


@pytest.mark.parametrize("family", ["dinov2_reg", "mae_avg", "siglip", "clip"])
def test_block_features_match_timm(family):
    cfg = FAMILIES[family]
    model = timm_model(cfg)
    params = params_of(model)
    x = np.random.default_rng(1).normal(size=(3, cfg.in_chans, cfg.img_size, cfg.img_size))
    got = vit_block_features(params, x, cfg, [0, -1])
    assert sorted(got) == [0, cfg.depth - 1]
    for i, f in got.items():
        want = timm_pooled(model, x, i)
        assert f.shape == (3, cfg.feature_dim)
        np.testing.assert_allclose(f, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[cfg.depth - 1], vit_features(params, x, cfg), rtol=1e-9, atol=1e-9)


def test_block_indices_are_checked():
    assert block_indices([8, -1, 8], 12) == [8, 11]
    with pytest.raises(TinyViTError, match="--layers: block 12 does not exist: this model has blocks 0 to 11"):
        block_indices([12], 12)
