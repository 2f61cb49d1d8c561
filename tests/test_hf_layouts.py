"""HF transformers' files of the modern family (written by save_pretrained) converted: ViT-style DeiT with
its distillation head, Dinov2 with and without registers and with its classification head, CLIP's and
SigLIP's vision towers (alone, with CLIP's projection, or inside a whole CLIPModel / SiglipModel); the
converted model's logits or pooled features against transformers' own forward."""
import dataclasses

import numpy as np
import pytest
import torch
from helpers import SCRIPTS, rel_err, run_script

from tinyvit import TinyViTError, ViTConfig, init_params, load_model, vit_features, vit_forward
from tinyvit.io.checkpoint import save_checkpoint
from tinyvit.io.export import export

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=28,
             patch_size=14)


def _build(name):
    """(model, what tinyvit should reproduce: 'logits' or 'features', and how to get it from the model)."""
    t = transformers
    if name == "dinov2_reg":
        return t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=2)), "features", \
            lambda m, x: m(pixel_values=x).pooler_output
    if name == "dinov2_cls":
        return t.Dinov2ForImageClassification(t.Dinov2Config(**SMALL, num_labels=3)), "logits", \
            lambda m, x: m(pixel_values=x).logits
    if name == "dinov2_reg_cls":
        return t.Dinov2WithRegistersForImageClassification(t.Dinov2WithRegistersConfig(
            **SMALL, num_labels=3, num_register_tokens=3)), "logits", lambda m, x: m(pixel_values=x).logits
    if name == "clip_projection":
        return t.CLIPVisionModelWithProjection(t.CLIPVisionConfig(**SMALL, projection_dim=8)), "logits", \
            lambda m, x: m(pixel_values=x).image_embeds
    if name == "clip_tower":
        return t.CLIPVisionModel(t.CLIPVisionConfig(**SMALL)), "features", lambda m, x: m(pixel_values=x).pooler_output
    if name == "clip_whole":
        cfg = t.CLIPConfig(vision_config=dict(SMALL, hidden_act="gelu"), projection_dim=8,
                           text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32, vocab_size=50))
        return t.CLIPModel(cfg), "logits", lambda m, x: m.visual_projection(m.vision_model(pixel_values=x).pooler_output)
    if name == "siglip_tower":
        return t.SiglipVisionModel(t.SiglipVisionConfig(**SMALL)), "features", lambda m, x: m(pixel_values=x).pooler_output
    if name == "siglip_whole":
        cfg = t.SiglipConfig(vision_config=SMALL, text_config=dict(hidden_size=16, num_hidden_layers=1,
                                                                     num_attention_heads=2, intermediate_size=32,
                                                                     vocab_size=50))
        return t.SiglipModel(cfg), "features", lambda m, x: m.vision_model(pixel_values=x).pooler_output
    return t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**SMALL, num_labels=3)), "logits", \
        lambda m, x: m(pixel_values=x).logits


NAMES = ["dinov2_reg", "dinov2_cls", "dinov2_reg_cls", "clip_projection", "clip_tower", "clip_whole",
         "siglip_tower", "siglip_whole", "deit_teacher"]


def _saved(tmp_path, name, seed=0):
    model, what, out = _build(name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.eval().save_pretrained(tmp_path / name)
    return model, what, out


@pytest.mark.parametrize("name", NAMES)
def test_hf_folder_converts_to_transformers_outputs(tmp_path, name):
    model, what, out = _saved(tmp_path, name)
    params, cfg, meta = load_model(tmp_path / name)
    x = np.random.default_rng(1).normal(size=(2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        want = out(model, torch.tensor(x)).numpy()
    got = vit_forward(params, x, cfg, keep_cache=False)[0] if what == "logits" else vit_features(params, x, cfg)
    assert rel_err(got, want) < 1e-4, (name, cfg)
    if name.startswith("clip"):
        assert (cfg.pre_norm, cfg.patch_bias, cfg.ln_eps) == (True, False, 1e-5)
    if name.endswith("whole"):
        assert any("text tower" in d for d in meta["dropped"])


@pytest.mark.e2e
def test_cli_converts_an_hf_folder(tmp_path):
    model, _, out = _saved(tmp_path, "siglip_tower")
    r = run_script(SCRIPTS / "convert_weights.py", str(tmp_path / "siglip_tower"), "--num-classes", "4",
                   "--out", str(tmp_path / "s.npz"))
    assert r.returncode == 0 and "pool map" in r.stdout and "gelu tanh" in r.stdout, r.stderr
    params, cfg, meta = load_model(tmp_path / "s.npz")
    assert cfg.num_classes == 4 and not params["head.weight"].any()
    x = np.random.default_rng(2).normal(size=(1, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        assert rel_err(vit_features(params, x, cfg), out(model, torch.tensor(x)).numpy()) < 1e-4


def test_deit_with_one_head_and_swiglu_are_refused(tmp_path):
    t = transformers
    t.DeiTForImageClassification(t.DeiTConfig(**SMALL, num_labels=3)).save_pretrained(tmp_path / "deit")
    with pytest.raises(TinyViTError, match="DeiTForImageClassificationWithTeacher is"):
        load_model(tmp_path / "deit")
    t.Dinov2Model(t.Dinov2Config(**SMALL, use_swiglu_ffn=True)).save_pretrained(tmp_path / "g")
    with pytest.raises(TinyViTError, match="SwiGLU"):
        load_model(tmp_path / "g")


HF_EXPORTS = {  # a tinyvit config -> the HF class that computes it exactly
    "deit_distilled": (dict(distilled=True), "DeiTForImageClassificationWithTeacher"),
    "dinov2_cls": (dict(init_values=1e-5, global_pool="token_avg"), "Dinov2ForImageClassification"),
    "dinov2_reg_cls": (dict(init_values=1e-5, global_pool="token_avg", reg_tokens=4, no_embed_class=True),
                       "Dinov2WithRegistersForImageClassification"),
    # a DINOv2 backbone fine-tuned with a class-token head: HF's head with the patch mean's half zero
    "dinov2_token": (dict(init_values=1e-5), "Dinov2ForImageClassification"),
    "dinov2_reg_token": (dict(init_values=1e-5, reg_tokens=4, no_embed_class=True),
                         "Dinov2WithRegistersForImageClassification"),
}


@pytest.mark.parametrize("name", list(HF_EXPORTS))
def test_hf_export_loads_in_transformers_with_our_logits(tmp_path, name):
    fields, cls = HF_EXPORTS[name]
    cfg = ViTConfig(img_size=28, patch_size=14, num_classes=3, dim=32, depth=2, heads=4, mlp_dim=64, **fields)
    rng = np.random.default_rng(0)
    params = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in init_params(cfg).items()}
    ckpt = save_checkpoint(tmp_path / "m.npz", params, cfg, dict(class_names=["x", "y", "z"]))
    export(ckpt, "hf", tmp_path / "hf")
    model = transformers.AutoModelForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(model).__name__ == cls
    x = rng.normal(size=(2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        got = model(pixel_values=torch.tensor(x)).logits.numpy()
    assert rel_err(got, vit_forward(params, x, cfg, keep_cache=False)[0]) < 1e-5
    back, cfg_back, _ = load_model(tmp_path / "hf")  # and back, bit for bit
    assert dataclasses.replace(cfg_back, init_values=cfg.init_values) == cfg
    assert all(np.array_equal(back[k], params[k]) for k in params)


def test_hf_export_refuses_what_no_hf_class_computes(tmp_path):
    cfg = ViTConfig(img_size=28, patch_size=14, num_classes=3, dim=32, depth=1, heads=4, mlp_dim=64, init_values=1e-5,
                    no_embed_class=True)  # DeiT-III: no HF class
    save_checkpoint(tmp_path / "m.npz", init_params(cfg), cfg, {})
    with pytest.raises(TinyViTError, match="--to timm writes it"):
        export(tmp_path / "m.npz", "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
