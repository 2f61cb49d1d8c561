"""LoRA and DoRA (tinyvit.nn.lora): the layer pair and the weight form against torch autograd running
PEFT's formulas in float64, the plain forms, and the whole model against PEFT itself on timm's
VisionTransformer and transformers' ViTForImageClassification: logits and every adapter gradient by name."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from tinyvit.backend import to_device, to_numpy
from tinyvit.errors import TinyViTError
from tinyvit.nn import lora as LR
from tinyvit.nn import reference
from tinyvit.nn.config import ViTConfig, init_params, param_shapes
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward
from tinyvit.nn.model import vit_backward, vit_forward

TOL = {np.float64: 1e-9, np.float32: 3e-4}


def _torch_lora(x, w, bias, a, b, s, m=None, mask=None):
    """PEFT's forward (peft.tuners.lora.layer.Linear, variants.DoraLinearVariant, dora.DoraLinearLayer)."""
    x_d = x if mask is None else x * mask
    base = F.linear(x, w, bias)
    lo = F.linear(F.linear(x_d, a), b)
    if m is None:
        return base + lo * s
    norm = torch.linalg.norm(w + s * (b @ a).detach(), dim=1).detach()
    g = (m / norm).view(1, -1)
    base_d = F.linear(x_d, w) if mask is not None else base - bias
    return base + (g - 1) * base_d + g * lo * s


def _case(shape, n_out, r, dtype, dora, seed=0):
    rng = np.random.default_rng(seed)
    n_in = shape[-1]
    arrays = dict(x=rng.normal(size=shape), w=rng.normal(size=(n_out, n_in)), bias=rng.normal(size=n_out),
                  a=rng.normal(size=(r, n_in)), b=rng.normal(size=(n_out, r)),
                  m=rng.uniform(0.5, 2.0, size=n_out) if dora else None)
    return {k: (None if v is None else v.astype(dtype)) for k, v in arrays.items()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,n_out,r", [((2, 5, 8), 12, 2), ((7, 16), 6, 4), ((1, 1, 3), 1, 1)])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_lora_linear_matches_torch(xp, dtype, shape, n_out, r, dora, p_drop):
    c = _case(shape, n_out, r, dtype, dora)
    s = 1.7
    dev = {k: (None if v is None else to_device(v, xp)) for k, v in c.items()}
    rng = xp.random.default_rng(3)
    y, cache = LR.lora_linear_forward(dev["x"], dev["w"], dev["bias"], dev["a"], dev["b"], s, dev["m"],
                                      p_drop=p_drop, rng=rng, train=True)
    dout = np.random.default_rng(1).normal(size=y.shape).astype(dtype)
    d = to_device(dout, xp)
    before = to_numpy(d).copy()
    dx, da, db, dm = LR.lora_linear_backward(d, cache)
    assert (to_numpy(d) == before).all()
    mask = None if cache.mask is None else torch.tensor(to_numpy(cache.mask).astype(np.float64).reshape(shape))
    t = {k: (None if v is None else torch.tensor(v.astype(np.float64), requires_grad=k in "xabm"))
         for k, v in c.items()}
    yt = _torch_lora(t["x"], t["w"], t["bias"], t["a"], t["b"], s, t["m"], mask)
    yt.backward(torch.tensor(dout.astype(np.float64)))
    tol = TOL[dtype]
    assert y.dtype == dtype and dx.dtype == dtype and da.dtype == dtype
    assert rel_err(y, yt.detach().numpy()) < tol
    for got, want in ((dx, t["x"]), (da, t["a"]), (db, t["b"])) + (((dm, t["m"]),) if dora else ()):
        assert rel_err(got, want.grad.numpy()) < tol
    assert (dm is None) == (not dora)


@pytest.mark.parametrize("dora", [False, True])
def test_weight_form_matches_the_branch_and_torch(xp, dora):
    c = _case((3, 4, 10), 9, 3, np.float64, dora, seed=2)
    s = 0.5
    dev = {k: (None if v is None else to_device(v, xp)) for k, v in c.items()}
    y_branch, c_branch = LR.lora_linear_forward(dev["x"], dev["w"], dev["bias"], dev["a"], dev["b"], s, dev["m"])
    w_eff, c_w = LR.lora_weight(dev["w"], dev["a"], dev["b"], s, dev["m"])
    y = dev["x"] @ w_eff.T + dev["bias"]
    assert rel_err(y, y_branch) < 1e-12
    dout = to_device(np.random.default_rng(5).normal(size=y.shape), xp)
    g = dout.reshape(-1, 9).T @ dev["x"].reshape(-1, 10)  # dL/dW_eff, as the model's linear gives it
    dw, da, db, dm = LR.lora_weight_backward(g, c_w)
    _, da_b, db_b, dm_b = LR.lora_linear_backward(dout, c_branch)
    assert rel_err(da, da_b) < 1e-12 and rel_err(db, db_b) < 1e-12
    if dora:
        assert rel_err(dm, dm_b) < 1e-12
    t = {k: torch.tensor(v, requires_grad=True) for k, v in c.items() if v is not None}
    _torch_lora(t["x"], t["w"], t["bias"], t["a"], t["b"], s, t.get("m")).backward(torch.tensor(to_numpy(dout)))
    assert rel_err(dw, t["w"].grad.numpy()) < 1e-12  # the frozen weight's own gradient, as PEFT's graph gives


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("p_drop", [0.0, 0.4])
def test_reference_matches_the_engine(dora, p_drop):
    c = _case((2, 3, 6), 5, 2, np.float64, dora, seed=4)
    y, cache = LR.lora_linear_forward(c["x"], c["w"], c["bias"], c["a"], c["b"], 0.8, c["m"], p_drop,
                                      np.random.default_rng(2))
    mask = None if cache.mask is None else cache.mask.reshape(c["x"].shape)
    assert (mask is None) == (p_drop == 0)
    y_ref, c_ref = reference.lora_forward(c["x"], c["w"], c["bias"], c["a"], c["b"], 0.8, c["m"], mask)
    assert rel_err(y, y_ref) < 1e-12
    dout = np.random.default_rng(0).normal(size=y.shape)
    for got, want in zip(LR.lora_linear_backward(dout, cache), reference.lora_backward(dout, c_ref)):
        assert (got is None and want is None) or rel_err(got, want) < 1e-12


def test_config_checks_and_scale():
    assert LR.LoraConfig(rank=8).scale == 1.0 and LR.LoraConfig(rank=4, alpha=16, rslora=True).scale == 8.0
    for bad in (dict(rank=0), dict(rank=2.0), dict(alpha=-1), dict(dropout=1.0), dict(targets=("qkv", "q")),
                dict(targets=("query",)), dict(targets=()), dict(dora="yes")):
        with pytest.raises(TinyViTError):
            LR.LoraConfig(**bad)


def test_add_adapters_and_the_trainable_set():
    base = ViTConfig(img_size=8, patch_size=4, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=32)
    p, cfg = LR.add_adapters(init_params(base), base, LR.LoraConfig(rank=2, targets=("qkv", "fc1")))
    assert set(p) == set(param_shapes(cfg)) and cfg.lora.targets == ("qkv", "fc1")
    assert sorted(LR.trainable_names(p)) == sorted([k for k in p if ".lora_" in k] + ["head.weight", "head.bias"])
    with pytest.raises(TinyViTError, match="already holds adapters"):
        LR.add_adapters(p, cfg, cfg.lora)


def test_init_is_peft_s_and_the_config_round_trips():
    cfg = ViTConfig(img_size=8, patch_size=4, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=32,
                    lora=LR.LoraConfig(rank=4, targets=("q", "v", "fc2"), dora=True))
    p = init_params(cfg, dtype=np.float64)
    assert set(p) == set(param_shapes(cfg))
    assert p["blocks.1.mlp.fc2.lora_A.weight"].shape == (4, 32) and not p["blocks.1.attn.v.lora_B.weight"].any()
    assert np.abs(p["blocks.0.attn.q.lora_A.weight"]).max() <= 16 ** -0.5  # kaiming_uniform_(a=sqrt(5))
    w = p["blocks.0.attn.qkv.weight"][32:]
    assert np.allclose(p["blocks.0.attn.v.lora_magnitude_vector"], np.linalg.norm(w, axis=1))
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    assert "lora" not in dataclasses.replace(cfg, lora=None).to_dict()
    merged = LR.merge_adapters(p, cfg.lora)  # B = 0 and m = ||W||: the base model
    assert set(merged) == set(param_shapes(dataclasses.replace(cfg, lora=None)))
    assert all(np.allclose(merged[k], p[k]) for k in merged)


# --- the whole model against PEFT ---------------------------------------------------------------


def _perturb_adapters(model, seed):
    """PEFT inits B at zero (and m at ||W||): move every adapter parameter so each gradient shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _name(k):
    """A PEFT model's parameter name as tinyvit's (and PEFT's adapter files') name it."""
    k = k.replace(".base_layer", "").replace(".default", "").replace("modules_to_save.", "")
    return k.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def _tinyvit_step(params, cfg, images, labels, xp):
    dev = {k: to_device(v, xp) for k, v in params.items()}
    logits, cache = vit_forward(dev, to_device(images, xp), cfg)
    _, ce = cross_entropy_forward(logits, to_device(labels, xp))
    return logits, vit_backward(cross_entropy_backward(1.0, ce), cache)


@pytest.mark.parametrize("dora,rslora", [(False, False), (True, False), (False, True)])
def test_model_matches_peft_on_timm(xp, dora, rslora):
    peft = pytest.importorskip("peft")
    from timm_oracle import timm_model
    base = ViTConfig(img_size=16, patch_size=8, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=32,
                     init_values=0.5)  # LayerScale folded into proj and fc2: the adapters must see through it
    model = timm_model(base, seed=1)
    targets = ["qkv", "proj", "fc1", "fc2"]
    pc = peft.LoraConfig(r=3, lora_alpha=5, target_modules=r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",
                         use_dora=dora, use_rslora=rslora,
                         modules_to_save=["head"])
    pm = peft.get_peft_model(model, pc).double()
    _perturb_adapters(pm, 2)
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(3, 3, 16, 16)), rng.integers(0, 5, size=3)
    logits_t = pm(torch.tensor(images))
    F.cross_entropy(logits_t, torch.tensor(labels)).backward()

    cfg = dataclasses.replace(base, lora=LR.LoraConfig(rank=3, alpha=5, targets=tuple(targets), dora=dora,
                                                       rslora=rslora))
    params = {}
    for k, v in pm.base_model.model.state_dict().items():
        if "original_module" not in k:
            params[_name(k)] = v.detach().numpy()
    assert set(params) == set(param_shapes(cfg))
    logits, grads = _tinyvit_step(params, cfg, images, labels, xp)
    assert rel_err(logits, logits_t.detach().numpy()) < 1e-9
    peft_grads = {_name(n): p.grad for n, p in pm.base_model.model.named_parameters()
                  if p.requires_grad and "lora_" in n}
    assert len(peft_grads) == 2 * len(targets) * (3 if dora else 2)
    for n, g in peft_grads.items():
        assert rel_err(grads[n], g.numpy()) < 1e-9, n


def _hf_name(n):
    """A PEFT-wrapped ViTForImageClassification's adapter name as tinyvit's (transformers 5's modules)."""
    n = _name(n).replace("vit.layers.", "blocks.")
    for theirs, ours in (("attention.q_proj", "attn.q"), ("attention.v_proj", "attn.v")):
        n = n.replace(theirs, ours)
    return n


def _hf_peft(tmp_path, dora, dropout=0.0):
    """transformers' ViT (tinyvit's export of a perturbed small model) under PEFT with LoRA/DoRA on q_proj
    and v_proj (moved off their init); returns (peft model, tinyvit params with its adapters, cfg, images,
    labels, the PEFT adapter parameters by tinyvit's names)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from tinyvit.io.export import export_hf
    base = ViTConfig(img_size=16, patch_size=8, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=32)
    rng = np.random.default_rng(0)
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in init_params(base, dtype=np.float64).items()}
    export_hf(tmp_path / "hf", params, base)
    model = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    pm = peft.get_peft_model(model.double(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                                                             lora_dropout=dropout, use_dora=dora)).double()
    _perturb_adapters(pm, 4)
    images, labels = rng.normal(size=(2, 3, 16, 16)), rng.integers(0, 5, size=2)
    cfg = dataclasses.replace(base, lora=LR.LoraConfig(rank=2, alpha=3, dropout=dropout, targets=("q", "v"), dora=dora))
    named = {_hf_name(n): p for n, p in pm.base_model.model.named_parameters() if "lora_" in n}
    params.update({k: p.detach().numpy() for k, p in named.items()})
    return pm, params, cfg, images, labels, named


@pytest.mark.parametrize("dora", [False, True])
def test_model_matches_peft_on_transformers_vit(tmp_path, dora):
    pm, params, cfg, images, labels, named = _hf_peft(tmp_path, dora)
    logits_t = pm(pixel_values=torch.tensor(images)).logits
    F.cross_entropy(logits_t, torch.tensor(labels)).backward()
    assert set(params) == set(param_shapes(cfg))
    logits, grads = _tinyvit_step(params, cfg, images, labels, np)
    assert rel_err(logits, logits_t.detach().numpy()) < 1e-9
    for n, p in named.items():
        assert rel_err(grads[n], p.grad.numpy()) < 1e-9, n


class _Tape:
    """A generator whose uniform draws are kept, in order (the model's only call: random)."""

    def __init__(self, rng):
        self.rng, self.draws = rng, []

    def random(self, size=None, dtype=np.float64):
        r = self.rng.random(size, dtype=dtype)
        self.draws.append(to_numpy(r))
        return r


class _GivenMask(torch.nn.Module):
    """PEFT's lora_dropout with the keep mask tinyvit drew (over the tokens it computed; 1 on the rest)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        m = torch.ones_like(x)
        m[:, :self.mask.shape[1]] = self.mask
        return x * m


def _inject_masks(pm, draws, order, p_drop, batch):
    """Give each PEFT lora_dropout (named in `order`, tinyvit's draw order) the mask of its draw."""
    modules = dict(pm.named_modules())
    assert len(draws) == len(order)
    for name, r in zip(order, draws):
        keep = (r >= p_drop) / (1.0 - p_drop)  # dropout_forward's scaled keep mask
        modules[name].lora_dropout["default"] = _GivenMask(torch.tensor(keep.reshape(batch, -1, r.shape[-1])))


@pytest.mark.parametrize("dora", [False, True])
def test_branch_dropout_in_training_matches_peft_on_timm(xp, dora):
    """PEFT's lora_dropout on every linear of a LayerScale model, in training, with tinyvit's masks: logits
    and every gradient (adapters, frozen weights, norms, gamma) by name."""
    peft = pytest.importorskip("peft")
    from timm_oracle import timm_model
    base = ViTConfig(img_size=16, patch_size=8, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=32, init_values=0.5)
    pm = peft.get_peft_model(timm_model(base, seed=1), peft.LoraConfig(
        r=3, lora_alpha=5, lora_dropout=0.3, use_dora=dora, modules_to_save=["head"],
        target_modules=r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)")).double()
    _perturb_adapters(pm, 2)
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(3, 3, 16, 16)), rng.integers(0, 5, size=3)
    cfg = dataclasses.replace(base, lora=LR.LoraConfig(rank=3, alpha=5, dropout=0.3, dora=dora,
                                                       targets=("qkv", "proj", "fc1", "fc2")))
    params = {_name(k): v.detach().numpy() for k, v in pm.base_model.model.state_dict().items()
              if "original_module" not in k}
    tape = _Tape(xp.random.default_rng(7))
    logits, cache = vit_forward({k: to_device(v, xp) for k, v in params.items()}, to_device(images, xp), cfg,
                                train=True, rng=tape)
    grads = vit_backward(cross_entropy_backward(1.0, cross_entropy_forward(logits, to_device(labels, xp))[1]), cache)

    order = [f"base_model.model.blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    _inject_masks(pm, tape.draws, order, 0.3, 3)
    for p in pm.parameters():
        p.requires_grad_(True)  # the frozen weights' gradients too
    pm.train()
    logits_t = pm(torch.tensor(images))
    F.cross_entropy(logits_t, torch.tensor(labels)).backward()
    assert rel_err(logits, logits_t.detach().numpy()) < 1e-9
    named = {_name(n): p.grad for n, p in pm.base_model.model.named_parameters() if "original_module" not in n}
    assert set(named) == set(grads) and any(".lora_" in n for n in named)
    for n, g in named.items():
        assert rel_err(grads[n], g.numpy()) < 1e-9, n


@pytest.mark.parametrize("dora", [False, True])
def test_branch_dropout_matches_peft_on_transformers_vit(tmp_path, dora):
    """HF's separate query and value linears each drop their own mask (tinyvit: two draws over qkv's input)."""
    pm, params, cfg, images, labels, named = _hf_peft(tmp_path, dora, dropout=0.2)
    tape = _Tape(np.random.default_rng(5))
    logits, cache = vit_forward(params, images, cfg, train=True, rng=tape)
    grads = vit_backward(cross_entropy_backward(1.0, cross_entropy_forward(logits, labels)[1]), cache)
    prefix = "base_model.model.vit.layers"
    _inject_masks(pm, tape.draws, [f"{prefix}.{i}.attention.{m}" for i in range(2) for m in ("q_proj", "v_proj")],
                  0.2, 2)
    pm.train()
    logits_t = pm(pixel_values=torch.tensor(images)).logits
    F.cross_entropy(logits_t, torch.tensor(labels)).backward()
    assert rel_err(logits, logits_t.detach().numpy()) < 1e-9
    for n, p in named.items():
        assert rel_err(grads[n], p.grad.numpy()) < 1e-9, n


@pytest.mark.parametrize("family", ["dinov2_reg", "clip", "siglip", "deit3", "deit_distilled", "reg4_gap",
                                    "no_qkv_bias"])
def test_lora_in_training_matches_peft_on_every_family(family):
    """Each family's blocks (LayerScale, registers, pre-norm, QuickGELU, a latent-attention pool, two heads,
    no qkv bias) with DoRA or LoRA on all four linears and branch dropout: PEFT's logits and gradients."""
    peft = pytest.importorskip("peft")
    from timm_oracle import FAMILIES, timm_model
    base = FAMILIES[family]
    dora = family in ("dinov2_reg", "siglip", "deit_distilled")
    heads = ["head", "head_dist"] if base.distilled else ["head"]
    pm = peft.get_peft_model(timm_model(base, seed=3), peft.LoraConfig(
        r=2, lora_alpha=3, lora_dropout=0.25, use_dora=dora, modules_to_save=heads,
        target_modules=r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)")).double()
    _perturb_adapters(pm, 5)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, base.in_chans, base.img_size, base.img_size))
    labels = rng.integers(0, base.num_classes, size=2)
    cfg = dataclasses.replace(base, lora=LR.LoraConfig(rank=2, alpha=3, dropout=0.25, dora=dora,
                                                       targets=("qkv", "proj", "fc1", "fc2")))
    params = {_name(k): v.detach().numpy() for k, v in pm.base_model.model.state_dict().items()
              if "original_module" not in k}
    tape = _Tape(np.random.default_rng(2))
    logits, cache = vit_forward(params, images, cfg, train=True, rng=tape)
    grads = vit_backward(cross_entropy_backward(1.0, cross_entropy_forward(logits, labels)[1]), cache,
                         trainable=set(LR.trainable_names(params)))
    order = [f"base_model.model.blocks.{i}.{m}" for i in range(base.depth)
             for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    _inject_masks(pm, tape.draws, order, 0.25, 2)
    pm.train()
    logits_t = pm(torch.tensor(images))
    F.cross_entropy(logits_t, torch.tensor(labels)).backward()
    assert rel_err(logits, logits_t.detach().numpy()) < 1e-9
    named = {_name(n): p.grad for n, p in pm.base_model.model.named_parameters() if p.requires_grad}
    assert set(named) == set(grads)
    for n, g in named.items():
        assert rel_err(grads[n], g.numpy()) < 1e-9, n


@pytest.mark.parametrize("dora", [False, True])
def test_branch_dropout_recomputes_and_evaluates_exactly(dora):
    """With gradient checkpointing the backward draws the branches' masks again: the same gradients, bit
    for bit; at evaluation the dropout is the identity (the merged weights' logits)."""
    base = ViTConfig(img_size=8, patch_size=4, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=32)
    p, cfg = LR.add_adapters(init_params(base, dtype=np.float64), base,
                             LR.LoraConfig(rank=2, dropout=0.25, targets=("q", "v", "fc2"), dora=dora))
    rng = np.random.default_rng(0)
    p = {k: v + 0.1 * rng.normal(size=v.shape) if ".lora_" in k else v for k, v in p.items()}
    x, y = rng.normal(size=(3, 3, 8, 8)), np.array([0, 2, 1])
    runs = []
    for ckpt in (False, True):
        logits, cache = vit_forward(p, x, cfg, train=True, rng=np.random.default_rng(3), grad_checkpointing=ckpt)
        runs.append(vit_backward(cross_entropy_backward(1.0, cross_entropy_forward(logits, y)[1]), cache))
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k]), k
    merged, mcfg = LR.merged_model(p, cfg)
    assert rel_err(vit_forward(p, x, cfg, keep_cache=False)[0], vit_forward(merged, x, mcfg, keep_cache=False)[0]) < 1e-12


@pytest.mark.parametrize("targets", [("qkv",), ("q", "v", "fc2"), ("proj", "fc1")])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("bias", ["none", "all"])
def test_the_adapters_train_with_the_base_frozen(monkeypatch, targets, dora, bias):
    """vit_backward(trainable=adapters + head) skips the frozen weights' gradients: LoRA's adapters take
    theirs low-rank (no weight-gradient GEMM on an adapted linear), DoRA's through the frozen weight's
    (its magnitude needs it), BitFit's trained biases through it too; all equal the full backward's."""
    from tinyvit.nn import layers
    base = ViTConfig(img_size=8, patch_size=4, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=32, init_values=0.5)
    p, cfg = LR.add_adapters(init_params(base, dtype=np.float64), base, LR.LoraConfig(rank=2, alpha=3, targets=targets, dora=dora))
    rng = np.random.default_rng(0)
    p = {k: v + 0.1 * rng.normal(size=v.shape) if ".lora_" in k else v for k, v in p.items()}  # B != 0
    x, y = rng.normal(size=(3, 3, 8, 8)), np.array([0, 2, 1])
    full = _tinyvit_step(p, cfg, x, y, np)[1]
    logits, cache = vit_forward(p, x, cfg)
    trained = set(LR.trainable_names(p, bias))
    dense, real = [], layers.linear_backward

    def counted(dout, c, need_dx=True, need_dw=True):
        dense.append(need_dw and c.w.shape[0] != 3)  # weight-gradient GEMMs other than the head's
        return real(dout, c, need_dx, need_dw)

    monkeypatch.setattr(layers, "linear_backward", counted)
    part = vit_backward(cross_entropy_backward(1.0, cross_entropy_forward(logits, y)[1]), cache, trainable=trained)
    assert trained <= set(part)
    for k in trained:
        assert rel_err(part[k], full[k]) < 1e-12, k
    assert any(dense) == (dora or bias == "all")
