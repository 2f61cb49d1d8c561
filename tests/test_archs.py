"""tinyvit's table of named architectures (tinyvit.io.archs) against timm's and torchvision's own
definitions: every setting of every entry from the model timm builds for the name (on the meta device),
its default tag's preprocessing from timm's pretrained_cfg, and torchvision's ViTs from their builders
and their weights' transforms."""
import math

import pytest
import torch
from timm_oracle import timm

from tinyvit.io.archs import IMAGENET, SETTINGS, TIMM, TORCHVISION, timm_arch, torchvision_arch

LayerScale, deit, vision_transformer = timm.layers.LayerScale, timm.models.deit, timm.models.vision_transformer
VisionTransformerDistilled = deit.VisionTransformerDistilled

GELU = {"GELU": "erf", "GELUTanh": "tanh", "QuickGELU": "quick"}


def _gelu(act):
    """tinyvit's name of a timm activation module."""
    name = GELU[type(act).__name__]
    return "tanh" if getattr(act, "approximate", "none") == "tanh" else name


def _settings(model, init_values):
    """tinyvit's settings of a timm VisionTransformer, read from its modules."""
    pe, b = model.patch_embed, model.blocks[0]
    fc_norm = not isinstance(model.fc_norm, torch.nn.Identity)
    return dict(img_size=pe.img_size[0], patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
                dim=model.embed_dim, depth=len(model.blocks), heads=b.attn.num_heads, mlp_dim=b.mlp.fc1.out_features,
                ln_eps=b.norm1.eps, gelu=_gelu(b.mlp.act), class_token=model.cls_token is not None,
                reg_tokens=model.num_reg_tokens, distilled=isinstance(model, VisionTransformerDistilled),
                no_embed_class=model.no_embed_class, pre_norm=not isinstance(model.norm_pre, torch.nn.Identity),
                patch_bias=pe.proj.bias is not None, qkv_bias=b.attn.qkv.bias is not None,
                init_values=init_values if isinstance(b.ls1, LayerScale) else None, global_pool=model.global_pool,
                fc_norm=None if fc_norm == (model.global_pool == "avg") else fc_norm)


def test_every_timm_entry_is_timms_definition(monkeypatch):
    seen, depth = [], []
    init = LayerScale.__init__

    def spy(self, dim, init_values=1e-5, *args, **kwargs):  # the meta device holds no values: catch the init
        seen.append(init_values)
        init(self, dim, init_values, *args, **kwargs)

    def one_block(build):
        def build_one(*args, **kwargs):  # the name's own depth noted, one block built (the rest are alike)
            depth.append(kwargs.get("depth", 12))
            return build(*args, **dict(kwargs, depth=1))
        return build_one

    monkeypatch.setattr(LayerScale, "__init__", spy)
    for module in (vision_transformer, deit):
        monkeypatch.setattr(module, "build_model_with_cfg", one_block(module.build_model_with_cfg))
    for name in TIMM:
        seen.clear(), depth.clear()
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, weight_init="skip")
        settings, record, tag = timm_arch(name)
        assert list(settings) == list(SETTINGS)
        assert settings == dict(_settings(model, seen[0] if seen else None), depth=depth[0]), name
        p = model.pretrained_cfg
        assert tag == p["tag"], name
        want = {"shortest_edge": "center", "squash": "squash"}
        assert record is None or (want[record["resize"]] == p["crop_mode"] and math.isclose(record["crop_pct"], p["crop_pct"])
                                  and record["interpolation"] == p["interpolation"]), name
        assert record is not None or p["crop_mode"] not in ("center", "squash") or p["crop_pct"] != 1, name
        assert record is None or (tuple(record["mean"]), tuple(record["std"])) == (tuple(p["mean"]), tuple(p["std"])), name
        assert timm_arch(f"{name}.{tag}")[0] == settings


def test_timm_names_the_table_lacks_are_ones_tinyvit_cannot_compute():
    """Every timm ViT name left out holds something tinyvit lacks (spot checks of the reasons)."""
    assert timm_arch("vit_giant_patch14_dinov2") is None  # SwiGLU
    assert timm_arch("vit_base_patch16_rope_224") is None  # rotary embeddings
    assert timm_arch("vit_base_r50_s16_224") is None  # a ResNet stem
    assert timm_arch("not_a_model") is None and timm_arch(None) is None


def test_every_torchvision_entry_is_torchvisions_definition():
    tv = pytest.importorskip("torchvision")
    from torchvision.models import get_model_weights
    from torchvision.transforms import InterpolationMode

    for name, (P, D, L, H, M, weights) in TORCHVISION.items():
        with torch.device("meta"):
            model = tv.models.get_model(name)
        layer = model.encoder.layers[0]
        assert (model.patch_size, model.hidden_dim, len(model.encoder.layers), layer.self_attention.num_heads,
                model.mlp_dim, layer.ln_1.eps) == (P, D, L, H, M, 1e-6), name
        W = get_model_weights(name)
        got = [(w.transforms().crop_size[0], w.transforms().resize_size[0], w.transforms().interpolation) for w in W]
        assert got[0] == tuple(weights[0][:2]) + (InterpolationMode(weights[0][2]),) and W.DEFAULT == list(W)[0], name
        assert sorted(got, key=str) == sorted([(c, r, InterpolationMode(i)) for c, r, i in weights], key=str), name
        for crop, _, _ in weights:  # the first of its weights at that size
            found, settings, record = torchvision_arch(patch_size=P, dim=D, depth=L, img_size=crop)
            resize, interpolation = next(w[1:] for w in weights if w[0] == crop)
            assert found == name and settings["heads"] == H and "img_size" not in settings
            assert int(crop / record["crop_pct"]) == resize and record["interpolation"] == interpolation
            assert (tuple(record["mean"]), tuple(record["std"])) == IMAGENET
            assert all(W[w.name].transforms().mean == list(IMAGENET[0]) for w in W)


@pytest.mark.parametrize("name,img_size,heads,crop_pct", [("vit_h_14", 518, 16, 1.0), ("vit_h_14", 224, 16, 1.0),
                                                          ("vit_l_16", 224, 16, 224 / 242), ("vit_b_16", 384, 12, 1.0)])
def test_a_torchvision_file_is_named_by_its_sizes(name, img_size, heads, crop_pct):
    """torchvision's weights name no architecture: its sizes do (vit_h_14: 16 heads, not width // 64 = 20)."""
    import numpy as np

    tv = pytest.importorskip("torchvision")
    from tinyvit.io.families import architecture

    with torch.device("meta"):
        model = tv.models.get_model(name, image_size=img_size)
    state = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}
    stated, where, record, notes = architecture(None, {}, state, "torchvision", "x.pth")
    assert stated["arch"] == name and stated["heads"] == heads and where == f"torchvision's {name} (its sizes)"
    assert "img_size" not in stated and not notes
    assert math.isclose(record["crop_pct"], crop_pct) and int(img_size / record["crop_pct"]) == int(img_size / crop_pct + 1e-9)
