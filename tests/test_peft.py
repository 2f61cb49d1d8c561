"""PEFT's adapter folders (tinyvit.io.peft): what tinyvit writes loads in peft.PeftModel onto the --to hf
export of the base with tinyvit's logits (ViT, DINOv2; LoRA, DoRA); PEFT's own folders (HF's names,
transformers 5's and 4's, and timm's) read back; the merged exports; the scripts end to end."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import last_json, rel_err, run_script

from tinyvit.errors import TinyViTError
from tinyvit.io.checkpoint import load_checkpoint, save_checkpoint
from tinyvit.io.export import export_hf
from tinyvit.io.peft import CONFIG, WEIGHTS, apply_adapter, export_peft
from tinyvit.io.safetensors import read_safetensors, write_safetensors
from tinyvit.nn.config import ViTConfig, init_params
from tinyvit.nn.lora import LoraConfig, merged_model
from tinyvit.nn.model import vit_forward

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

BASES = {"vit": ViTConfig(img_size=16, patch_size=8, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=32),
         "dinov2": ViTConfig(img_size=16, patch_size=8, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=32,
                             init_values=0.5, global_pool="token_avg")}
LORAS = {"qkv": LoraConfig(rank=2, alpha=3, targets=("qkv",)),
         "q,v-dora": LoraConfig(rank=3, alpha=4, targets=("q", "v"), dora=True),
         "all-rslora-dora": LoraConfig(rank=2, alpha=5, targets=("qkv", "proj", "fc1", "fc2"), rslora=True, dora=True)}


def _model(base, lora, seed=0):
    """A model with adapters, every parameter moved from its init (B is zero there)."""
    cfg = dataclasses.replace(BASES[base], lora=lora)
    rng = np.random.default_rng(seed)
    params = {k: (v + 0.2 * rng.normal(size=v.shape)).astype(np.float32)
              for k, v in init_params(cfg, seed=seed).items()}
    return params, cfg


def _logits(params, cfg, x):
    return np.asarray(vit_forward(params, x, cfg, keep_cache=False)[0])


def _images(cfg, n=2):
    return np.random.default_rng(9).normal(size=(n, 3, cfg.img_size, cfg.img_size)).astype(np.float32)


def _base_folder(tmp_path, params, cfg):
    """The --to hf export of the base: the checkpoint without its adapters."""
    plain = {k: v for k, v in params.items() if ".lora_" not in k}
    export_hf(tmp_path / "base", plain, dataclasses.replace(cfg, lora=None))
    return tmp_path / "base"


def _peft_logits(base_folder, adapter, x):
    base = transformers.AutoModelForImageClassification.from_pretrained(str(base_folder), local_files_only=True)
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x)).logits.numpy()


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("lora", list(LORAS))
def test_peft_loads_the_adapter_folder_with_tinyvits_logits(tmp_path, base, lora):
    params, cfg = _model(base, LORAS[lora])
    x = _images(cfg)
    want = _logits(params, cfg, x)
    export_peft(tmp_path / "adapter", params, cfg)
    c = json.loads((tmp_path / "adapter" / CONFIG).read_text())
    assert c["peft_type"] == "LORA" and c["use_dora"] == cfg.lora.dora and c["modules_to_save"] == ["classifier"]
    folder = _base_folder(tmp_path, params, cfg)
    assert rel_err(_peft_logits(folder, tmp_path / "adapter", x), want) < 1e-4
    # read back onto the base: the same logits (qkv comes back as q, k and v sharing A)
    plain, plain_cfg = {k: v for k, v in params.items() if ".lora_" not in k}, dataclasses.replace(cfg, lora=None)
    p2, cfg2, _ = apply_adapter(tmp_path / "adapter", plain, plain_cfg)
    assert rel_err(_logits(p2, cfg2, x), want) < 1e-5
    merged, mcfg = merged_model(params, cfg)
    assert mcfg.lora is None and rel_err(_logits(merged, mcfg, x), want) < 1e-5


def _v4_name(k):
    """transformers 4's module names for a transformers-5 ViT key (written here by hand, not by tinyvit)."""
    k = k.replace("vit.layers.", "vit.encoder.layer.")
    for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
        k = k.replace(new, old)
    return k


def test_reads_peft_s_own_folders_with_transformers_5_and_4_names(tmp_path):
    params, cfg = _model("vit", None)
    plain = {k: v for k, v in params.items()}
    folder = _base_folder(tmp_path, plain, cfg)
    base = transformers.ViTForImageClassification.from_pretrained(str(folder), local_files_only=True)
    pc = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj", "fc1"], use_dora=True,
                         modules_to_save=["classifier"])
    pm = peft.get_peft_model(base, pc)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    pm.eval()
    x = _images(cfg)
    with torch.no_grad():
        want = pm(pixel_values=torch.from_numpy(x)).logits.numpy()
    pm.save_pretrained(str(tmp_path / "v5"))
    p5, cfg5, _ = apply_adapter(tmp_path / "v5", plain, cfg)
    assert cfg5.lora.targets == ("q", "v", "proj", "fc1") and cfg5.lora.dora
    assert rel_err(_logits(p5, cfg5, x), want) < 1e-4
    shutil.copytree(tmp_path / "v5", tmp_path / "v4")
    tensors, md = read_safetensors(tmp_path / "v4" / WEIGHTS)
    write_safetensors(tmp_path / "v4" / WEIGHTS, {_v4_name(k): v for k, v in tensors.items()}, md)
    p4, cfg4, _ = apply_adapter(tmp_path / "v4", plain, cfg)
    assert rel_err(_logits(p4, cfg4, x), want) < 1e-4


def test_reads_a_timm_adapter_folder(tmp_path):
    from timm_oracle import params_of, timm_model
    cfg = BASES["vit"]
    model = timm_model(cfg, seed=3, dtype=torch.float32)
    plain = params_of(model, np.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["qkv"], modules_to_save=["head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x = _images(cfg)
    with torch.no_grad():
        want = pm.eval()(torch.from_numpy(x)).numpy()
    pm.save_pretrained(str(tmp_path / "timm"))
    p, c, _ = apply_adapter(tmp_path / "timm", plain, cfg)
    assert c.lora.targets == ("qkv",)
    assert rel_err(_logits(p, c, x), want) < 1e-4


@pytest.mark.parametrize("field,value,says", [("r", "8", "r = \"8\""), ("r", 0, "r = 0"), ("lora_alpha", -1.0, "lora_alpha"),
                                               ("use_dora", "yes", "use_dora"), ("peft_type", "IA3", "peft_type"),
                                               ("rank_pattern", {"q_proj": 4}, "rank_pattern"),
                                               ("lora_dropout", 1.5, "lora_dropout"), ("target_modules", 3, "target_modules")])
def test_bad_adapter_config_values_are_one_line_naming_file_and_field(tmp_path, field, value, says):
    params, cfg = _model("vit", LORAS["qkv"])
    export_peft(tmp_path / "a", params, cfg)
    c = json.loads((tmp_path / "a" / CONFIG).read_text())
    (tmp_path / "a" / CONFIG).write_text(json.dumps(dict(c, **{field: value})))
    plain = {k: v for k, v in params.items() if ".lora_" not in k}
    with pytest.raises(TinyViTError) as e:
        apply_adapter(tmp_path / "a", plain, dataclasses.replace(cfg, lora=None))
    msg = str(e.value)
    assert "\n" not in msg and CONFIG in msg and says in msg


def test_bad_adapter_tensors_are_refused(tmp_path):
    params, cfg = _model("vit", LORAS["q,v-dora"])
    export_peft(tmp_path / "a", params, cfg)
    plain, pcfg = {k: v for k, v in params.items() if ".lora_" not in k}, dataclasses.replace(cfg, lora=None)
    tensors, md = read_safetensors(tmp_path / "a" / WEIGHTS)
    for change, says in ((lambda t: {**t, "base_model.model.vit.layers.0.attention.q_proj.lora_A.weight": np.zeros((5, 16), np.float32)}, "shape"),
                         (lambda t: {**t, "base_model.model.vit.layers.7.attention.q_proj.lora_A.weight": np.zeros((3, 16), np.float32)}, "block 7"),
                         (lambda t: {**t, "base_model.model.vit.embeddings.cls_token": np.zeros((1, 1, 16), np.float32)}, "neither")):
        write_safetensors(tmp_path / "a" / WEIGHTS, change(tensors), md)
        with pytest.raises(TinyViTError, match=says):
            apply_adapter(tmp_path / "a", plain, pcfg)


@pytest.mark.e2e
def test_scripts_export_peft_and_merged_and_convert_with_an_adapter(tmp_path):
    params, cfg = _model("vit", LORAS["all-rslora-dora"])
    x = _images(cfg)
    want = _logits(params, cfg, x)
    ckpt = save_checkpoint(tmp_path / "lora.npz", params, cfg, {"class_names": list("abcd")})
    s = last_json(run_script("export_weights.py", str(ckpt), "--to", "peft", "--out", str(tmp_path / "adapter"), "--json"))
    assert s["target"] == "peft"
    folder = _base_folder(tmp_path, params, cfg)
    got = _peft_logits(folder, tmp_path / "adapter", x)
    assert rel_err(got, want) < 1e-4
    last_json(run_script("export_weights.py", str(ckpt), "--to", "hf", "--out", str(tmp_path / "merged"), "--json"))
    merged = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    with torch.no_grad():
        assert rel_err(merged.eval()(pixel_values=torch.from_numpy(x)).logits.numpy(), got) < 1e-4
    ort = pytest.importorskip("onnxruntime")
    last_json(run_script("export_weights.py", str(ckpt), "--to", "onnx", "--out", str(tmp_path / "m.onnx"), "--json"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert rel_err(sess.run(None, {"pixel_values": x})[0], got) < 1e-4
    timm = pytest.importorskip("timm")
    last_json(run_script("export_weights.py", str(ckpt), "--to", "timm", "--out", str(tmp_path / "t"), "--json"))
    with torch.no_grad():
        tm = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
        assert rel_err(tm(torch.from_numpy(x)).numpy(), got) < 1e-4
    r = run_script("convert_weights.py", str(folder), "--adapter", str(tmp_path / "adapter"), "--out",
                   str(tmp_path / "out.npz"), "--json")
    last_json(r)
    p2, cfg2, _ = load_checkpoint(tmp_path / "out.npz")
    assert cfg2.lora is None and rel_err(_logits(p2, cfg2, x), got) < 1e-4
    (tmp_path / "adapter" / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": -2}))
    r = run_script("convert_weights.py", str(folder), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "o2.npz"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "adapter_config.json: r = -2" in r.stderr


def test_checkpoint_with_adapters_round_trips_and_a_forged_lora_is_one_line(tmp_path):
    params, cfg = _model("vit", LORAS["q,v-dora"])
    ckpt = save_checkpoint(tmp_path / "c.npz", params, cfg, {})
    p2, cfg2, _ = load_checkpoint(ckpt)
    assert cfg2 == cfg and all(np.array_equal(p2[k], params[k]) for k in params)
    with pytest.raises(TinyViTError, match="holds no LoRA/DoRA adapters"):
        export_peft(tmp_path / "p", *merged_model(params, cfg))
    bad = dataclasses.replace(cfg, lora=None)
    with np.load(ckpt) as z:
        arrays = dict(z)
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    meta["config"] = dict(bad.to_dict(), lora={"rank": 10 ** 9, "targets": ["q"]})
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "forged.npz", **arrays)
    with pytest.raises(TinyViTError) as e:
        load_checkpoint(tmp_path / "forged.npz")
    assert "\n" not in str(e.value) and "forged.npz" in str(e.value) and "lora rank" in str(e.value)
