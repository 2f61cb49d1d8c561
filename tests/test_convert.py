"""Weight conversion: every public layout and file type back to the same timm params, logits vs torch,
the real ViT-Ti/16 file, pos-embed resizing, head adaptation, and every kind of bad file."""
import json
import re
import struct
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, evil_pickle, rel_err, run_script
from torch_vit import torch_vit_from_params

from tinyvit import TinyViTError, ViTConfig, preset, vit_forward
from tinyvit.io.checkpoint import load_checkpoint, save_checkpoint
from tinyvit.io.convert import adapt, convert, detect_format, from_foreign, load_model, load_state, resize_pos_embed
from tinyvit.io.safetensors import read_safetensors, write_safetensors
from tinyvit.io.torchzip import load_torch_zip
from tinyvit.nn.model import param_shapes

# ViT-B/16 widths, two blocks, 32 px (2x2 patches + CLS)
CFG = ViTConfig(img_size=32, patch_size=16, in_chans=3, num_classes=10, dim=768, depth=2, heads=12, mlp_dim=3072)


# --- the public layouts, written from a timm-layout params dict (inverse of the converters) -----


def to_google(p, heads, pre_logits=False):
    """timm -> Google vision_transformer .npz names and layouts (README's table)."""
    D = p["norm.weight"].shape[0]
    H, d = heads, D // heads
    g = {"embedding/kernel": p["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": p["patch_embed.proj.bias"], "cls": p["cls_token"],
         "Transformer/posembed_input/pos_embedding": p["pos_embed"],
         "Transformer/encoder_norm/scale": p["norm.weight"], "Transformer/encoder_norm/bias": p["norm.bias"],
         "head/kernel": p["head.weight"].T, "head/bias": p["head.bias"]}
    i = 0
    while f"blocks.{i}.norm1.weight" in p:
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        a = b + "MultiHeadDotProductAttention_1/"
        g[b + "LayerNorm_0/scale"], g[b + "LayerNorm_0/bias"] = p[t + "norm1.weight"], p[t + "norm1.bias"]
        g[b + "LayerNorm_2/scale"], g[b + "LayerNorm_2/bias"] = p[t + "norm2.weight"], p[t + "norm2.bias"]
        for j, n in enumerate(("query", "key", "value")):
            g[f"{a}{n}/kernel"] = p[t + "attn.qkv.weight"][j * D:(j + 1) * D].T.reshape(D, H, d)
            g[f"{a}{n}/bias"] = p[t + "attn.qkv.bias"][j * D:(j + 1) * D].reshape(H, d)
        g[a + "out/kernel"] = p[t + "attn.proj.weight"].T.reshape(H, d, D)
        g[a + "out/bias"] = p[t + "attn.proj.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            g[f"{b}MlpBlock_3/Dense_{j}/kernel"] = p[f"{t}mlp.{fc}.weight"].T
            g[f"{b}MlpBlock_3/Dense_{j}/bias"] = p[f"{t}mlp.{fc}.bias"]
        i += 1
    if pre_logits:
        g["pre_logits/kernel"], g["pre_logits/bias"] = np.eye(D, dtype=np.float32), np.zeros(D, np.float32)
    return g


def _rename(p, top, block_pat, block_map):
    out = {}
    for k, v in p.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            stem, wb = rest.rsplit(".", 1)
            out[block_pat.format(i) + block_map[stem] + "." + wb] = v
        else:
            out[top[k]] = v
    return out


def to_torchvision(p, old_mlp=False):
    """timm -> torchvision vit_b_16 names (mlp.0/mlp.3, or the older mlp.linear_1/linear_2)."""
    top = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
           "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias",
           "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias",
           "head.weight": "heads.head.weight", "head.bias": "heads.head.bias"}
    fc1, fc2 = ("mlp.linear_1", "mlp.linear_2") if old_mlp else ("mlp.0", "mlp.3")
    blk = {"norm1": "ln_1", "norm2": "ln_2", "attn.proj": "self_attention.out_proj", "mlp.fc1": fc1, "mlp.fc2": fc2}
    out = _rename({k: v for k, v in p.items() if ".attn.qkv." not in k}, top, "encoder.layers.encoder_layer_{}.", blk)
    for k, v in p.items():
        if ".attn.qkv." in k:
            i, wb = k.split(".")[1], k.rsplit(".", 1)[1]
            out[f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_{wb}"] = v
    return out


def to_hf(p, bare=False):
    """timm -> HF ViTForImageClassification names (bare ViTModel: no `vit.` prefix, no classifier)."""
    v = "" if bare else "vit."
    top = {"cls_token": v + "embeddings.cls_token", "pos_embed": v + "embeddings.position_embeddings",
           "patch_embed.proj.weight": v + "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": v + "embeddings.patch_embeddings.projection.bias",
           "norm.weight": v + "layernorm.weight", "norm.bias": v + "layernorm.bias",
           "head.weight": "classifier.weight", "head.bias": "classifier.bias"}
    blk = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    out = _rename({k: x for k, x in p.items() if ".attn.qkv." not in k}, top, v + "encoder.layer.{}.", blk)
    for k, x in p.items():
        if ".attn.qkv." in k:
            i, wb = k.split(".")[1], k.rsplit(".", 1)[1]
            D = x.shape[0] // 3
            for j, n in enumerate(("query", "key", "value")):
                out[f"{v}encoder.layer.{i}.attention.attention.{n}.{wb}"] = x[j * D:(j + 1) * D]
    if bare:
        out = {k: x for k, x in out.items() if not k.startswith("classifier.")}
        D = p["norm.weight"].shape[0]
        out["pooler.dense.weight"], out["pooler.dense.bias"] = np.eye(D, dtype=np.float32), np.zeros(D, np.float32)
    return out


def save_npz(path, d):
    np.savez(path, **d)


def save_pth(path, d, wrap=None):
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}
    if wrap == "state_dict":  # a training checkpoint of a DataParallel model
        sd = {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3, "arch": "vit"}
    torch.save(sd, path)


def save_st(path, d):
    write_safetensors(path, d, {"format": "pt"})


# (id, layout function(params, heads) -> state, saver, suffix, expected format)
CASES = [
    ("google-npz", lambda p, h: to_google(p, h), save_npz, ".npz", "google"),
    ("google-npz-prelogits", lambda p, h: to_google(p, h, pre_logits=True), save_npz, ".npz", "google"),
    ("timm-pth", lambda p, h: p, save_pth, ".pth", "timm"),
    ("timm-pth-wrapped", lambda p, h: p, lambda f, d: save_pth(f, d, "state_dict"), ".pth", "timm"),
    ("timm-safetensors", lambda p, h: p, save_st, ".safetensors", "timm"),
    ("timm-npz", lambda p, h: p, save_npz, ".npz", "timm"),
    ("torchvision-pth", lambda p, h: to_torchvision(p), save_pth, ".pth", "torchvision"),
    ("torchvision-pth-oldmlp", lambda p, h: to_torchvision(p, old_mlp=True), save_pth, ".pt", "torchvision"),
    ("hf-safetensors", lambda p, h: to_hf(p), save_st, ".safetensors", "hf"),
    ("hf-bin", lambda p, h: to_hf(p), save_pth, ".bin", "hf"),
]


def random_params(cfg, seed=0):
    """Random timm-layout float32 params: every weight, bias and norm distinct and non-trivial."""
    rng = np.random.default_rng(seed)
    p = {}
    for k, shape in param_shapes(cfg).items():
        x = rng.standard_normal(shape, dtype=np.float32)
        p[k] = 1 + 0.1 * x if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight" \
            else x * np.float32(0.05 if k.endswith("bias") else 0.02)
    return p


@pytest.fixture(scope="module")
def ref():
    return random_params(CFG)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).standard_normal((2, 3, CFG.img_size, CFG.img_size))


_TORCH_LOGITS = {}


def torch_logits(cfg, params, images):
    """The torch oracle's float64 logits (cached per LayerNorm eps: HF files mean eps 1e-12)."""
    if cfg.ln_eps not in _TORCH_LOGITS:
        with torch.no_grad():
            _TORCH_LOGITS[cfg.ln_eps] = torch_vit_from_params(cfg, params)(torch.from_numpy(images)).numpy()
    return _TORCH_LOGITS[cfg.ln_eps]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_format_converts_exactly(case, ref, images, tmp_path):
    name, layout, save, suffix, fmt = case
    src = tmp_path / f"w{suffix}"
    save(src, layout(ref, CFG.heads))
    params, cfg, meta = convert(src)
    assert meta["format"] == fmt and detect_format(load_state(src)) == fmt
    want = CFG if fmt != "hf" else ViTConfig(**{**CFG.to_dict(), "ln_eps": 1e-12})
    assert cfg == want
    assert list(params) == list(ref)
    for k in ref:
        assert params[k].dtype == np.float32 and np.array_equal(params[k], ref[k]), k
    assert meta["heads_from"] == ("file" if fmt == "google" else "dim // 64")
    assert meta["mean"] == ([0.485, 0.456, 0.406] if fmt == "torchvision" else [0.5] * 3)
    assert meta["class_names"] == [f"class_{i}" for i in range(10)]
    assert bool(meta["dropped"]) == name.endswith("prelogits")
    logits, _ = vit_forward({k: v.astype(np.float64) for k, v in params.items()}, images, cfg)
    assert rel_err(logits, torch_logits(cfg, ref, images)) < 1e-10


def test_hf_bare_vitmodel_gets_zero_head(ref, tmp_path):
    save_st(tmp_path / "m.safetensors", to_hf(ref, bare=True))
    params, cfg, meta = convert(tmp_path / "m.safetensors")
    assert cfg.num_classes == 1000 and not params["head.weight"].any() and not params["head.bias"].any()
    assert any("pooler" in d for d in meta["dropped"]) and meta["notes"]
    assert all(np.array_equal(params[k], ref[k]) for k in ref if not k.startswith("head."))


def test_hf_sidecar_config(ref, tmp_path):
    save_st(tmp_path / "model.safetensors", to_hf(ref))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "vit", "num_attention_heads": 6, "layer_norm_eps": 1e-6,
        "id2label": {str(i): f"label{i}" for i in range(10)}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.2] * 3}))
    _, cfg, meta = convert(tmp_path / "model.safetensors")
    assert (cfg.heads, cfg.ln_eps, meta["heads_from"]) == (6, 1e-6, "config.json")
    assert meta["class_names"][3] == "label3" and meta["mean"] == [0.4] * 3
    assert convert(tmp_path / "model.safetensors", heads=3)[1].heads == 3


@pytest.mark.parametrize("fmt", ["google", "timm", "torchvision", "hf"])
def test_full_vit_b16_key_set(fmt):
    """All 12 blocks of ViT-B/16 map, on shapes only: zero-stride float16 views, no 330 MB arrays."""
    b16 = preset("vit-b16")
    zero = np.zeros((), np.float16)
    p = {k: np.broadcast_to(zero, s) for k, s in param_shapes(b16).items()}
    state = {"google": lambda: to_google(p, 12), "timm": lambda: p, "torchvision": lambda: to_torchvision(p),
             "hf": lambda: to_hf(p)}[fmt]()
    assert len(state) == 152 + 48 * (fmt in ("google", "hf"))  # those two keep q, k, v apart
    params, cfg, info = from_foreign(state)
    assert info["format"] == fmt and list(params) == list(param_shapes(b16))
    assert cfg == (b16 if fmt != "hf" else preset("vit-b16", ln_eps=1e-12))
    assert all(params[k].shape == s for k, s in param_shapes(b16).items())


def test_real_vit_ti16_every_format(tmp_path, ti16):
    ti = load_state(ti16)
    base, cfg0, _ = convert(ti16)
    assert cfg0 == preset("vit-ti16")
    n = 0
    for name, layout, save, suffix, fmt in CASES:
        src = tmp_path / f"{name}{suffix}"
        save(src, layout(ti, 3))
        params, cfg, meta = convert(src)
        assert meta["format"] == fmt
        assert cfg == (preset("vit-ti16", ln_eps=1e-12) if fmt == "hf" else preset("vit-ti16")), name
        assert all(np.array_equal(params[k], base[k]) for k in base) and list(params) == list(base), name
        src.unlink()
        n += 1
    assert n == len(CASES)


# --- pos-embed resizing and adapt ---------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("old,new", [(14, 24), (14, 7), (2, 3), (3, 3), ((2, 3), (5, 4))])
def test_resize_pos_embed_matches_f_interpolate(old, new, dtype, tol):
    (oh, ow), (nh, nw) = [(g, g) if isinstance(g, int) else g for g in (old, new)]
    pos = np.random.default_rng(0).standard_normal((1, 1 + oh * ow, 16)).astype(dtype)
    out = resize_pos_embed(pos, new, old_grid=None if oh == ow else old)
    grid = torch.from_numpy(pos[:, 1:].reshape(1, oh, ow, 16)).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(nh, nw), mode="bilinear", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, nh * nw, 16).numpy()
    assert out.shape == (1, 1 + nh * nw, 16) and out.dtype == dtype
    assert np.array_equal(out[:, 0], pos[:, 0])
    assert rel_err(out[:, 1:], want) < tol


def test_adapt_resizes_and_zero_inits_head():
    cfg = ViTConfig(img_size=32, patch_size=16, num_classes=7, dim=64, depth=1, heads=2, mlp_dim=128)
    p = random_params(cfg)
    q, c = adapt(p, cfg, img_size=48, num_classes=5)
    assert (c.img_size, c.num_classes) == (48, 5) and (cfg.img_size, cfg.num_classes) == (32, 7)
    assert q["pos_embed"].shape == (1, 10, 64) and p["pos_embed"].shape == (1, 5, 64)
    assert q["head.weight"].shape == (5, 64) and not q["head.weight"].any() and not q["head.bias"].any()
    assert q["head.weight"].dtype == np.float32 and q["blocks.0.attn.qkv.weight"] is p["blocks.0.attn.qkv.weight"]
    logits, _ = vit_forward(q, np.zeros((1, 3, 48, 48), np.float32), c)
    assert logits.shape == (1, 5) and not logits.any()
    same, c2 = adapt(p, cfg, img_size=32, num_classes=7)
    assert c2 == cfg and all(same[k] is p[k] for k in p)
    with pytest.raises(TinyViTError, match="multiple"):
        adapt(p, cfg, img_size=40)


# --- our own readers --------------------------------------------------------------------------


def test_safetensors_roundtrip_all_dtypes(tmp_path):
    t = {"f16": np.arange(6, dtype=np.float16).reshape(2, 3), "f32": np.float32([1.5, -2]),
         "f64": np.float64([[np.pi]]), "i64": np.int64([-(2 ** 40)]), "i32": np.int32([7, 8]),
         "u8": np.uint8([255]), "b": np.array([True, False]), "empty": np.zeros((0, 4), np.float32),
         "scalar": np.float32(3.0), "strided": np.arange(12.0).reshape(3, 4).T}
    write_safetensors(tmp_path / "a.safetensors", t, {"k": "v"})
    got, meta = read_safetensors(tmp_path / "a.safetensors")
    assert meta == {"k": "v"} and set(got) == set(t)
    for k, v in t.items():
        assert got[k].dtype == np.asarray(v).dtype and np.array_equal(got[k], v), k
    assert (tmp_path / "a.safetensors").read_bytes()[8:].index(b"{") == 0 and not list(tmp_path.glob("*.tmp"))


def _raw_safetensors(path, header, data):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_safetensors_bf16_reads_as_float32(tmp_path):
    x = torch.randn(3, 5).bfloat16()
    raw = x.view(torch.int16).numpy().tobytes()
    f = _raw_safetensors(tmp_path / "b.safetensors", {"x": {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, 30]}}, raw)
    got = read_safetensors(f)[0]["x"]
    assert got.dtype == np.float32 and np.array_equal(got, x.float().numpy())


def test_torchzip_matches_torch_load(tmp_path):
    base = torch.randn(4, 6, dtype=torch.float64)
    sd = {"t": base.t(), "view": base[1:3, ::2], "same": base, "half": torch.randn(3).half(),
          "bf": torch.randn(3).bfloat16(), "long": torch.arange(5), "int": torch.arange(3, dtype=torch.int32),
          "byte": torch.arange(4, dtype=torch.uint8), "bool": torch.tensor([True, False]),
          "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(torch.randn(2)),
          "nested": {"x": torch.ones(2)}}
    for proto in (2, 4):
        torch.save({"model": sd, "epoch": 1}, tmp_path / "a.pth", pickle_protocol=proto)
        got = load_torch_zip(tmp_path / "a.pth")["model"]
        for k, v in sd.items():
            if k == "nested":
                v, got_k = v["x"], got[k]["x"]
            else:
                got_k = got[k]
            want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            assert got_k.dtype == want.dtype and np.array_equal(got_k, want) and got_k.flags.writeable, k


# --- bad files --------------------------------------------------------------------------------


def _small(seed=0):
    cfg = ViTConfig(img_size=32, patch_size=16, num_classes=3, dim=128, depth=2, heads=2, mlp_dim=64)
    return random_params(cfg, seed), cfg


@pytest.mark.parametrize("edit,match", [
    (lambda p: p.pop("blocks.1.norm1.weight"), r"missing \['blocks.1.norm1.weight'\]"),
    (lambda p: p.update({"blocks.0.attn.proj.weight": np.zeros((128, 64), np.float32)}),
     r"blocks.0.attn.proj.weight has shape \(128, 64\), expected \(128, 128\)"),
    (lambda p: p.update({"extra_token": np.zeros((1, 1, 128), np.float32)}), r"unexpected \['extra_token'\]"),
    # a distillation token the position embedding has no row for
    (lambda p: p.update({"dist_token": np.zeros((1, 1, 128), np.float32)}), r"pos_embed has shape \(1, 5, 128\)"),
    (lambda p: p.update({"blocks.0.norm1.bias": np.full(128, np.nan, np.float32)}), "NaN"),
])
def test_bad_keys_and_shapes(edit, match, tmp_path):
    p, _ = _small()
    edit(p)
    save_npz(tmp_path / "w.npz", p)
    with pytest.raises(TinyViTError, match=match):
        convert(tmp_path / "w.npz")


def test_google_unexpected_and_bad_shape(tmp_path):
    p, _ = _small()
    g = to_google(p, 2)
    save_npz(tmp_path / "g.npz", {**g, "Transformer/encoderblock_0/Extra/kernel": np.zeros(3, np.float32)})
    with pytest.raises(TinyViTError, match=r"unexpected \['Transformer/encoderblock_0/Extra/kernel'\]"):
        convert(tmp_path / "g.npz")
    save_npz(tmp_path / "g.npz", {**g, "embedding/kernel": np.zeros((16, 16, 3), np.float32)})
    with pytest.raises(TinyViTError, match="embedding/kernel has unusable shape"):
        convert(tmp_path / "g.npz")
    with pytest.raises(TinyViTError, match=r"google layout\): .*unexpected \['blocks.0.attn.proj.bias'"):
        from_foreign(p, fmt="google")


def _st(tmp_path):
    p, _ = _small()
    return write_safetensors(tmp_path / "w.safetensors", p)


@pytest.mark.parametrize("corrupt,match", [
    (lambda b: b[:-7], "outside the|cover"),
    (lambda b: b[:100], "header length|outside"),
    (lambda b: struct.pack("<Q", 10 ** 12) + b[8:], "header length"),
    (lambda b: b[:8] + b"[" + b[9:], "invalid JSON"),
    (lambda b: b"", "empty"),
    (lambda b: b[:5], "only 5 bytes"),
])
def test_corrupt_safetensors(corrupt, match, tmp_path):
    f = _st(tmp_path)
    f.write_bytes(corrupt(f.read_bytes()))
    with pytest.raises(TinyViTError, match=match) as e:
        read_safetensors(f)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("header,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12 bytes"),
    ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "cover 4"),
    ({"__metadata__": {"x": 1}}, "strings"),
    ([1, 2], "not an object"),
    (b'{"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}, "a": {}}', "duplicate"),
])
def test_bad_safetensors_header(header, match, tmp_path):
    with pytest.raises(TinyViTError, match=match):
        read_safetensors(_raw_safetensors(tmp_path / "h.safetensors", header, bytes(12)))


@pytest.mark.parametrize("proto", [2, 4])
def test_malicious_pickle_is_refused(proto, tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pth"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("evil/data.pkl", evil_pickle("os.system", marker, proto, lambda e: {"blocks.0.x": e}))
        z.writestr("evil/byteorder", "little")
    for load in (load_torch_zip, convert):
        with pytest.raises(TinyViTError, match=r"refusing to load \w+\.system"):
            load(f)
    assert not marker.exists()


def test_out_of_bounds_tensor_view_is_refused(tmp_path):
    torch.save({"x": torch.zeros(4)}, tmp_path / "a.pth")
    src, dst = zipfile.ZipFile(tmp_path / "a.pth"), zipfile.ZipFile(tmp_path / "b.pth", "w")
    for n in src.namelist():  # stretch the tensor's size from 4 to 100 elements of its 4-element storage
        data = src.read(n)
        dst.writestr(n, data.replace(b"K\x04\x85", b"Kd\x85") if n.endswith("data.pkl") else data)
    dst.close()
    with pytest.raises(TinyViTError, match="reads past its storage"):
        load_torch_zip(tmp_path / "b.pth")


def test_legacy_and_empty_and_unknown_files(tmp_path):
    torch.save({"x": torch.zeros(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(TinyViTError, match="legacy.*re-save"):
        convert(tmp_path / "old.pth")
    for name in ("e.pth", "e.safetensors", "e.npz", "e.bin"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(TinyViTError, match="empty"):
            convert(tmp_path / name)
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(TinyViTError, match="unknown weights file type"):
        convert(tmp_path / "w.h5")
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(TinyViTError, match="not a PyTorch checkpoint|corrupt"):
        convert(tmp_path / "junk.pth")


# --- the script ---------------------------------------------------------------------------------


def _script(*args):
    return run_script("convert_weights.py", *args, cwd=ROOT, timeout=60)


@pytest.mark.e2e
def test_cli_converts_and_adapts(tmp_path):
    p, cfg = _small()
    save_pth(tmp_path / "w.pth", to_torchvision(p))
    r = _script(tmp_path / "w.pth", "--out", tmp_path / "out" / "m.npz", "--heads", "2", "--img-size", "48",
                "--num-classes", "4")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and "torchvision" in r.stdout and "heads 2" in r.stdout
    params, c, meta = load_checkpoint(tmp_path / "out" / "m.npz")
    assert c == ViTConfig(**{**cfg.to_dict(), "img_size": 48, "num_classes": 4})
    assert meta["format"] == "torchvision" and len(meta["class_names"]) == 4 and not params["head.weight"].any()
    assert np.array_equal(params["blocks.1.mlp.fc2.weight"], p["blocks.1.mlp.fc2.weight"])


@pytest.mark.e2e
def test_cli_json_is_one_line_describing_the_checkpoint_written(tmp_path):
    p, cfg = _small()
    save_st_lib(tmp_path / "model.safetensors", p)
    r = _script(tmp_path / "model.safetensors", "--out", tmp_path / "m.npz", "--heads", "2", "--num-classes", "5",
                "--json")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1
    out = json.loads(r.stdout)
    params, c, _ = load_checkpoint(out["checkpoint"])
    assert out["config"] == c.to_dict() and c.num_classes == 5 and out["params"] == sum(v.size for v in params.values())
    assert out["format"] == "timm" and out["source"] == str(tmp_path / "model.safetensors")
    assert any("head replaced" in n for n in out["notes"])


@pytest.mark.e2e
def test_cli_error_path(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x01" * 20)
    r = _script(tmp_path / "bad.safetensors", "--out", tmp_path / "m.npz")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.npz").exists()


# --- load_model: a tinyvit checkpoint, or any weights file, where a model is read ----------------

EVAL = ViTConfig(img_size=32, patch_size=16, in_chans=3, num_classes=10, dim=64, depth=1, heads=1, mlp_dim=64)


def save_st_lib(path, d):
    """A .safetensors written by the safetensors package itself, as timm and HF save them."""
    save_file = pytest.importorskip("safetensors.torch").save_file
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}, str(path), {"format": "pt"})


MODEL_FILES = {  # name -> (file name, writer(path, timm-layout params)); names as users have them
    "google-npz": ("ViT-Ti_16.npz", lambda f, p: save_npz(f, to_google(p, 1))),
    "timm-safetensors": ("model.safetensors", save_st_lib),
    "timm-pth": ("vit.pth", save_pth),
    "timm-ckpt-wrapped": ("last.ckpt", lambda f, p: save_pth(f, p, "state_dict")),
    "torchvision-pth": ("vit_b_16.pth", lambda f, p: save_pth(f, to_torchvision(p))),
    "hf-bin": ("pytorch_model.bin", lambda f, p: save_pth(f, to_hf(p))),
    "safetensors-named-npz": ("weights.npz", save_st_lib),  # the bytes decide, not the suffix
    "pth-named-npz": ("weights2.npz", save_pth),
}


@pytest.mark.parametrize("name", list(MODEL_FILES))
def test_load_model_reads_every_weights_file(name, tmp_path):
    p = random_params(EVAL)
    fname, write = MODEL_FILES[name]
    write(tmp_path / fname, p)
    params, cfg, meta = load_model(tmp_path / fname)
    assert cfg == ViTConfig(**{**EVAL.to_dict(), "ln_eps": 1e-12 if name.startswith("hf") else 1e-6})
    assert list(params) == list(p) and all(np.array_equal(params[k], p[k]) for k in p)
    assert meta["class_names"] == [f"class_{i}" for i in range(10)]
    with pytest.raises(TinyViTError) as e:  # the checkpoint reader names what the file is instead
        load_checkpoint(tmp_path / fname)
    msg = str(e.value)
    assert "pickled" not in msg and "not an .npy" not in msg and "\n" not in msg, msg
    if meta["format"] != "google":
        assert re.search(r": is a (safetensors|torch \.pth) file, not a tinyvit \.npz checkpoint: convert it with "
                         r"scripts/convert_weights\.py", msg), msg


def test_load_model_takes_a_tinyvit_checkpoint_as_is(tmp_path):
    p = random_params(EVAL)
    ckpt = save_checkpoint(tmp_path / "m.npz", p, EVAL, {"class_names": list("abcdefghij"), "dataset": "cifar10"})
    params, cfg, meta = load_model(ckpt)
    assert cfg == EVAL and meta["class_names"][2] == "c" and meta["dataset"] == "cifar10"
    assert all(np.array_equal(params[k], p[k]) for k in p)


def test_load_model_names_an_image_and_other_files(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.npz", format="JPEG")  # an image by its bytes
    hint = "predict.py takes the checkpoint first, then images"
    with pytest.raises(TinyViTError, match=f"x.png: is an image, not a model: {hint}$"):
        load_model(tmp_path / "x.png", hint=hint)
    with pytest.raises(TinyViTError, match="photo.npz: is an image, not a model$"):
        load_model(tmp_path / "photo.npz")
    with pytest.raises(TinyViTError, match="x.png: is an image, not a tinyvit .npz checkpoint$"):
        load_checkpoint(tmp_path / "x.png")
    (tmp_path / "notes.npz").write_text("not a checkpoint at all")
    with pytest.raises(TinyViTError, match="notes.npz: not an .npz checkpoint \\(no zip signature"):
        load_checkpoint(tmp_path / "notes.npz")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(TinyViTError, match="w.h5: unknown weights file type"):
        load_model(tmp_path / "w.h5")
    with pytest.raises(TinyViTError, match="no such model file"):
        load_model(tmp_path / "missing.pth")


@pytest.mark.e2e
def test_evaluate_script_takes_any_weights_file(tmp_path, cifar_root):
    p = random_params(EVAL)
    results = []
    for name in ("google-npz", "timm-safetensors", "torchvision-pth"):
        fname, write = MODEL_FILES[name]
        write(tmp_path / fname, p)
        r = run_script("evaluate.py", tmp_path / fname, "--dataset", "cifar10", "--data-dir", cifar_root,
                       "--limit", "16", "--json", cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert all(r["images"] == 16 and r["test_accuracy"] == results[0]["test_accuracy"] for r in results)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    r = run_script("evaluate.py", tmp_path / "cat.png", "--dataset", "cifar10", cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'cat.png'}: is an image, not a model: evaluate.py takes"), r.stderr
