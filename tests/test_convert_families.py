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
    params = dict(params, **{k: v.detach().numpy() for k, v in model.state_dict().items() if k.startswith("head.")})
    _check_logits(model, params, cfg)
