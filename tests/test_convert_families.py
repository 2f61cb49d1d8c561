"""Converting the modern family from the files timm writes: timm's hub folder (as timm.models._hub.
save_for_hf writes it) and a bare state dict with --arch; the converted model's logits against timm's, and
the families tinyvit lacks refused in one line."""
import numpy as np
import pytest
import torch
from helpers import SCRIPTS, rel_err, run_script
from timm_oracle import timm

from tinyvit import TinyViTError, load_model, vit_forward
from tinyvit.io.convert import convert

save_for_hf = pytest.importorskip("timm.models._hub").save_for_hf
SMALL = dict(embed_dim=32, depth=2, num_heads=4)
ARCHS = {  # timm architecture -> the small model_args the test builds it with, and the pooling tinyvit reads
    "vit_small_patch14_dinov2": (dict(SMALL, img_size=28), "token"),
    "vit_small_patch14_reg4_dinov2": (dict(SMALL, img_size=28), "token"),
    "vit_base_patch16_clip_quickgelu_224": (dict(SMALL, img_size=32), "token"),
    "vit_base_patch16_siglip_224": (dict(SMALL, img_size=32), "map"),
    "vit_base_patch16_siglip_gap_224": (dict(SMALL, img_size=32), "avg"),
    "deit3_small_patch16_224": (dict(SMALL, img_size=32), "token"),
    "deit_tiny_distilled_patch16_224": (dict(SMALL, img_size=32), "token"),
    "vit_base_patch16_reg4_gap_256": (dict(SMALL, img_size=32), "avg"),
    "vit_base_patch16_224": (dict(SMALL, img_size=32, global_pool="avg"), "avg"),  # MAE's fine-tuning head
}


def _timm(arch, model_args, seed=0):
    """timm.create_model(arch, **model_args) with every parameter perturbed (LayerScale far from its init)."""
    model = timm.create_model(arch, pretrained=False, num_classes=7, **model_args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _check_logits(model, params, cfg):
    x = np.random.default_rng(0).normal(size=(3, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.tensor(x)).numpy()
    assert rel_err(vit_forward(params, x, cfg, keep_cache=False)[0], want) < 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_timm_hub_folder_converts_to_timms_logits(tmp_path, arch):
    model_args, pool = ARCHS[arch]
    model = _timm(arch, model_args)
    save_for_hf(model, tmp_path / "hub", model_args=dict(model_args, num_classes=7), safe_serialization=True)
    params, cfg, meta = convert(tmp_path / "hub")
    assert cfg.global_pool == pool and cfg.num_classes == 7
    _check_logits(model, params, cfg)


@pytest.mark.e2e
def test_cli_converts_a_hub_folder_and_a_bare_file_with_arch(tmp_path):
    arch = "vit_base_patch16_clip_quickgelu_224"  # what the file cannot tell: QuickGELU and eps 1e-5
    model_args = ARCHS[arch][0]
    model = _timm(arch, model_args, seed=1)
    save_for_hf(model, tmp_path / "hub", model_args=dict(model_args, num_classes=7), safe_serialization=True)
    r = run_script(SCRIPTS / "convert_weights.py", str(tmp_path / "hub"), "--out", str(tmp_path / "a.npz"))
    assert r.returncode == 0 and "gelu quick" in r.stdout, r.stderr
    bare = tmp_path / "hub" / "model.safetensors"
    r = run_script(SCRIPTS / "convert_weights.py", str(bare), "--arch", arch, "--out", str(tmp_path / "b.npz"))
    assert r.returncode == 0, r.stderr
    for out in ("a.npz", "b.npz"):
        params, cfg, _ = load_model(tmp_path / out)
        assert (cfg.gelu, cfg.ln_eps, cfg.pre_norm, cfg.patch_bias) == ("quick", 1e-5, True, False)
        _check_logits(model, params, cfg)


def test_contradicting_arch_is_one_line(tmp_path):
    model = _timm("vit_small_patch14_reg4_dinov2", ARCHS["vit_small_patch14_reg4_dinov2"][0])
    save_for_hf(model, tmp_path / "hub", safe_serialization=True)
    with pytest.raises(TinyViTError, match=r"--arch says reg_tokens=0 but the weights hold reg_tokens=4"):
        convert(tmp_path / "hub" / "model.safetensors", arch="vit_small_patch14_dinov2", heads=4)


@pytest.mark.e2e
@pytest.mark.parametrize("arch,lack", [("eva02_tiny_patch14_224", "rotary position embeddings"),
                                       ("beit_base_patch16_224", "relative position bias")])
def test_families_tinyvit_lacks_are_refused_in_one_line(tmp_path, arch, lack):
    model = timm.create_model(arch, pretrained=False, embed_dim=32, depth=1, num_heads=2, img_size=28 if "14" in arch else 32)
    save_for_hf(model, tmp_path / "hub", safe_serialization=True)
    r = run_script(SCRIPTS / "convert_weights.py", str(tmp_path / "hub"), "--out", str(tmp_path / "x.npz"))
    assert r.returncode == 2 and lack in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.npz").exists()


def test_original_dinov2_pth_converts_as_timms_converter_does(tmp_path):
    """The torch-hub layout (facebookresearch/dinov2): blocks in chunks, a mask token, registers beside a
    class token whose position row timm folds into it."""
    model = _timm("vit_small_patch14_reg4_dinov2", ARCHS["vit_small_patch14_reg4_dinov2"][0], seed=2)
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    row = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3))
    hub = {"cls_token": sd.pop("cls_token") - row, "pos_embed": torch.cat([row, sd.pop("pos_embed")], 1),
           "register_tokens": sd.pop("reg_token"), "mask_token": torch.zeros(1, 32)}
    hub.update({k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in sd.items()})
    torch.save(hub, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    params, cfg, meta = convert(tmp_path / "dinov2_vits14_reg4_pretrain.pth", heads=4, num_classes=7)
    assert cfg.reg_tokens == 4 and cfg.no_embed_class and cfg.init_values is not None
    assert meta["eval_transform"] == {"resize": "shortest_edge", "crop_pct": 1.0, "interpolation": "bicubic",
                                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # timm's DINOv2
    params = dict(params, **{k: v.detach().numpy() for k, v in model.state_dict().items() if k.startswith("head.")})
    _check_logits(model, params, cfg)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.e2e
def test_heads_come_from_the_named_architecture_not_the_width(tmp_path):
    """vit_huge_patch14_clip_224 has 16 heads where width // 64 says 20; here at width 64 (model_args), 16
    heads where width // 64 says 1: the converted model gives timm's logits only with timm's head count."""
    model_args = dict(embed_dim=64, depth=1, img_size=28)
    model = _timm("vit_huge_patch14_clip_224", model_args, seed=4)
    assert model.blocks[0].attn.num_heads == 16
    save_for_hf(model, tmp_path / "hub", model_args=dict(model_args, num_classes=7), safe_serialization=True)
    r = run_script(SCRIPTS / "convert_weights.py", str(tmp_path / "hub"), "--out", str(tmp_path / "h.npz"))
    assert r.returncode == 0 and "heads 16" in r.stdout and "head count" not in r.stderr, r.stderr
    params, cfg, _ = load_model(tmp_path / "h.npz")
    assert (cfg.heads, cfg.gelu, cfg.ln_eps, cfg.pre_norm) == (16, "erf", 1e-5, True)
    _check_logits(model, params, cfg)


@pytest.mark.e2e
def test_a_guessed_head_count_and_preprocessing_are_said(tmp_path):
    model = _timm("vit_base_patch16_224", dict(embed_dim=128, depth=1, num_heads=2, img_size=32))
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    r = run_script(SCRIPTS / "convert_weights.py", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "b.npz"))
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: ")]
    assert any("nothing states the head count: 2 heads guessed as width 128 // 64" in n for n in notes), r.stderr
    assert any("nothing states the preprocessing: mean/std 0.5 and timm's default eval transform" in n
               for n in notes), r.stderr
    r = run_script(SCRIPTS / "convert_weights.py", str(tmp_path / "bare.pth"), "--arch", "vit_tiny_patch16_224",
                   "--out", str(tmp_path / "c.npz"))  # a name whose sizes the weights contradict: one line
    assert r.returncode == 2 and "--arch says depth=12 but the weights hold depth=1" in r.stderr, r.stderr


@pytest.mark.e2e
def test_timm_file_without_qkv_biases_loads_and_gives_timms_logits(tmp_path):
    """All 12 blocks without a qkv bias: the loader checks the arrays the config names, not a count."""
    model = _timm("vit_tiny_patch16_224", dict(embed_dim=32, num_heads=4, img_size=32, qkv_bias=False))
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "noqkv.safetensors"))
    r = run_script(SCRIPTS / "convert_weights.py", str(tmp_path / "noqkv.safetensors"), "--heads", "4",
                   "--out", str(tmp_path / "n.npz"))
    assert r.returncode == 0, r.stderr
    params, cfg, _ = load_model(tmp_path / "n.npz")
    assert cfg.depth == 12 and not cfg.qkv_bias and "blocks.11.attn.qkv.bias" not in params
    _check_logits(model, params, cfg)
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (40, 36), (200, 30, 60)).save(tmp_path / "x.png")
    r = run_script(SCRIPTS / "predict.py", str(tmp_path / "n.npz"), str(tmp_path / "x.png"))
    assert r.returncode == 0 and "x.png: " in r.stdout, r.stderr
    r = run_script(SCRIPTS / "export_weights.py", str(tmp_path / "n.npz"), "--to", "timm", "--out", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    back = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    _check_logits(back, params, cfg)


@pytest.mark.e2e
def test_bare_file_with_arch_brings_timms_preprocessing(tmp_path, ti16):
    """README's ViT-Ti/16 example with --arch: timm's crop 0.9 (not 0.875), and predict.py gives the top
    class and probability timm's own pretrained_cfg transform gives."""
    from matplotlib import cbook
    from PIL import Image

    photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    out = tmp_path / "ti16.npz"
    r = run_script(SCRIPTS / "convert_weights.py", str(ti16), "--arch", "vit_tiny_patch16_224", "--out", str(out))
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr
    _, _, meta = load_model(out)
    assert meta["eval_transform"] == {"resize": "shortest_edge", "crop_pct": 0.9, "interpolation": "bicubic",
                                      "mean": [0.5] * 3, "std": [0.5] * 3}
    r = run_script(SCRIPTS / "predict.py", str(out), str(photo), "--json")
    top = __import__("json").loads(r.stdout)["predictions"][0]["top_k"][0]
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    with np.load(ti16) as z:
        model.load_state_dict({k: torch.tensor(z[k]) for k in z.files})
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        p = _softmax(model(transform(Image.open(photo).convert("RGB"))[None]).numpy()[0])
    assert top["index"] == int(p.argmax()) and abs(top["probability"] - p.max()) < 2e-3, (top, p.max())


def _openclip_layout(model):
    """A timm CLIP model's weights in OpenCLIP's layout (what timm's _convert_openai_clip reads), with a text tower."""
    t = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"visual.conv1.weight": t.pop("patch_embed.proj.weight"), "visual.class_embedding": t.pop("cls_token")[0, 0],
           "visual.positional_embedding": t.pop("pos_embed")[0], "visual.proj": t.pop("head.weight").T.contiguous()}
    t.pop("head.bias")
    swaps = (("blocks.", "transformer.resblocks."), ("norm_pre", "ln_pre"), ("norm1", "ln_1"), ("norm2", "ln_2"),
             ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"))
    for k, v in t.items():
        k = "ln_post" + k[len("norm"):] if k.startswith("norm.") else k
        for ours, theirs in swaps:
            k = k.replace(ours, theirs)
        out["visual." + k] = v
    g = torch.Generator().manual_seed(9)
    text = {"token_embedding.weight": (50, 16), "positional_embedding": (8, 16), "transformer.resblocks.0.ln_1.weight": (16,),
            "transformer.resblocks.0.attn.in_proj_weight": (48, 16), "ln_final.weight": (16,), "ln_final.bias": (16,),
            "text_projection": (16, 7), "logit_scale": ()}
    out.update({k: torch.randn(s, generator=g) for k, s in text.items()})
    return out


@pytest.mark.e2e
def test_openclip_file_converts_to_its_vision_towers_logits(tmp_path):
    """OpenCLIP's own layout (visual.*, a text tower, ln_final, logit_scale), as timm's converter reads it."""
    model = _timm("vit_base_patch16_clip_224", dict(embed_dim=128, depth=2, num_heads=2, img_size=32), seed=6)
    with torch.no_grad():
        model.head.bias.zero_()  # OpenCLIP's projection has no bias
    sd = _openclip_layout(model)
    convert_openai_clip = pytest.importorskip("timm.models.vision_transformer")._convert_openai_clip
    back = convert_openai_clip(sd, model)  # the layout built here is the one timm's own converter reads
    assert set(back) == set(model.state_dict()) and all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    r = run_script(SCRIPTS / "convert_weights.py", str(tmp_path / "open_clip_model.safetensors"), "--out",
                   str(tmp_path / "c.npz"))
    assert r.returncode == 0 and r.stdout.startswith("openclip -> ") and "exact GELU assumed" in r.stderr, r.stderr
    params, cfg, meta = load_model(tmp_path / "c.npz")
    assert (cfg.num_classes, cfg.ln_eps, cfg.pre_norm, cfg.patch_bias, cfg.gelu) == (7, 1e-5, True, False, "erf")
    assert meta["eval_transform"] == {"resize": "shortest_edge", "crop_pct": 1.0, "interpolation": "bicubic",
                                      "mean": [0.48145466, 0.4578275, 0.40821073],
                                      "std": [0.26862954, 0.26130258, 0.27577711]}
    assert any(d.startswith("logit_scale") for d in meta["dropped"])
    _check_logits(model, params, cfg)
