"""--precision bf16: the linears' GEMMs in bfloat16 with float32 sums, per layer and for the whole ViT, against
torch.autocast('cpu', dtype=torch.bfloat16) on the same float32 inputs (outputs and every gradient), against
the exact bf16 products, by training, and the refusals; float32 never takes the bf16 path.

Tolerances are relative, max |ours - theirs| / max |theirs|, each about 2x what a correct run measures here:
bf16 keeps 8 significant bits (an input's rounding error is up to 2^-9 = 2e-3 of it), and autocast also
rounds each linear's output and runs attention's products (q k^T, p v) and GELU in bf16, where tinyvit keeps
them in float32. Runs through oneMKL on any CPU (TINYVIT_BF16_ANY_CPU=1); skipped without the mkl wheel.
"""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err, torch_gelu
from torch_vit import torch_vit_from_params
from toy_data import TINY, synthetic

from tinyvit import TinyViTError, init_params, preset, vit_backward, vit_forward
from tinyvit.cpu import bf16
from tinyvit.nn import infer, layers
from tinyvit.train.config import TrainConfig
from tinyvit.train.loop import fit

MKL_HINT = "oneMKL not installed: pip install mkl (or pip install -e \".[mkl]\"); CI installs it (.ci/run)"


@pytest.fixture
def mkl(monkeypatch):
    """bf16 GEMMs through the real library, on any CPU (skipped without one)."""
    monkeypatch.setenv(bf16.ANY_CPU_ENV, "1")
    gemm = bf16.library()
    if gemm is None:
        pytest.skip(MKL_HINT)
    return gemm


def _t(a, grad=True):
    return torch.tensor(np.asarray(a, np.float32), requires_grad=grad)


def _autocast_grads(fn, inputs, dout):
    """fn(*inputs) under torch's CPU bf16 autocast, and the float32 gradients of sum(out * dout)."""
    ts = [_t(a) if a is not None else None for a in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*ts)
    (out.float() * torch.tensor(dout)).sum().backward()
    return out.float().detach().numpy(), [None if t is None else t.grad.numpy() for t in ts]


def _rng_arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _round(a):
    """a rounded to bf16, in float64."""
    return bf16.from_bf16(bf16.to_bf16(a)).astype(np.float64)


def _check(ours, theirs, f32, bound, what):
    """Each of ours within bound of theirs, and (all but the bias-like sums, db...) off float32's: it rounded."""
    assert len(ours) == len(theirs) == len(f32) == len(what)
    for o, t, f, name in zip(ours, theirs, f32, what):
        err = rel_err(o, t)
        assert err <= bound, f"{name}: {err:.2e} > {bound:.0e}"
        assert name.startswith("db") or rel_err(o, f) > 2e-4, f"{name}: no bf16 rounding seen"


def test_linear_is_the_exact_bf16_product_summed_in_float32(mkl):
    """y = r(x) r(w)^T + b, dx = r(dy) r(w), dw = r(dy)^T r(x) (r: rounding to bf16) within 1e-6, float32
    summation's error (measured 2.5e-7): a GEMM that skipped the rounding would be off by about 2e-3."""
    x, w, b, dy = _rng_arrays(0, (3, 40, 96), (72, 96), (72,), (3, 40, 72))
    y, cache = layers.linear_forward(x, w, b, bf16=True)
    dx, dw, db = layers.linear_backward(dy, cache)
    x2, d2 = _round(x.reshape(-1, 96)), _round(dy.reshape(-1, 72))
    want = [x2 @ _round(w).T + b, d2 @ _round(w), d2.T @ x2, dy.reshape(-1, 72).sum(0)]
    for name, o, t in zip(["y", "dx", "dw", "db"], [y.reshape(-1, 72), dx.reshape(-1, 96), dw, db], want):
        assert rel_err(o, t) <= 1e-6, name
    assert cache.w16.dtype == np.uint16 and y.dtype == dx.dtype == dw.dtype == np.float32


def test_linear_against_autocast(mkl):
    x, w, b, dy = _rng_arrays(1, (4, 50, 96), (80, 96), (80,), (4, 50, 80))
    y, cache = layers.linear_forward(x, w, b, bf16=True)
    y32, c32 = layers.linear_forward(x, w, b)
    ty, tg = _autocast_grads(F.linear, [x, w, b], dy)
    _check([y, *layers.linear_backward(dy, cache)], [ty, *tg], [y32, *layers.linear_backward(dy, c32)], 7e-3,
           ["y", "dx", "dw", "db"])


@pytest.mark.parametrize("out", [48, 256])  # 48 < 200 tokens: the norm's affine folded into w; 256: not
def test_layernorm_linear_against_autocast(mkl, out):
    x, g, beta, w, b, dy = _rng_arrays(2, (4, 50, 64), (64,), (64,), (out, 64), (out,), (4, 50, out))
    g += 1.0
    y, cache = layers.layernorm_linear_forward(x, g, beta, w, b, 1e-6, bf16=True)
    y32, c32 = layers.layernorm_linear_forward(x, g, beta, w, b, 1e-6)
    assert cache.fold == (out == 48)
    ty, tg = _autocast_grads(lambda *a: F.linear(F.layer_norm(a[0], (64,), a[1], a[2], 1e-6), a[3], a[4]),
                             [x, g, beta, w, b], dy)
    _check([y, *layers.layernorm_linear_backward(dy, cache)], [ty, *tg],
           [y32, *layers.layernorm_linear_backward(dy, c32)], 1.3e-2, ["y", "dx", "dg", "dbeta", "dw", "db"])


@pytest.mark.parametrize("kind", ["erf", "tanh"])
def test_gelu_linear_against_autocast(mkl, kind):
    x, w, b, dy = _rng_arrays(3, (4, 50, 128), (64, 128), (64,), (4, 50, 64))
    y, cache = layers.gelu_linear_forward(x, w, b, kind, bf16=True)
    y32, c32 = layers.gelu_linear_forward(x, w, b, kind)
    ty, tg = _autocast_grads(lambda *a: F.linear(torch_gelu(a[0], kind), a[1], a[2]), [x, w, b], dy)
    _check([y, *layers.gelu_linear_backward(dy, cache)], [ty, *tg], [y32, *layers.gelu_linear_backward(dy, c32)],
           7e-3, ["y", "dx", "dw", "db"])


def test_patch_embed_against_autocast(mkl):
    img, w, b, dy = _rng_arrays(4, (4, 3, 32, 32), (64, 3, 8, 8), (64,), (4, 16, 64))
    y, cache = layers.patch_embed_forward(img, w, b, bf16=True)
    y32, c32 = layers.patch_embed_forward(img, w, b)
    ty, tg = _autocast_grads(lambda *a: F.conv2d(a[0], a[1], a[2], stride=8).flatten(2).transpose(1, 2),
                             [img, w, b], dy)
    _check([y, *layers.patch_embed_backward(dy, cache)], [ty, *tg], [y32, *layers.patch_embed_backward(dy, c32)],
           6e-3, ["y", "dx", "dw", "db"])


def test_attention_against_autocast(mkl):
    """qkv and the projection in bf16, q k^T and p v in float32 (autocast runs those in bf16 too)."""
    C, H = 64, 4
    x, w_qkv, b_qkv, w_p, b_p, dy = _rng_arrays(5, (4, 50, C), (3 * C, C), (3 * C,), (C, C), (C,), (4, 50, C))
    w_qkv *= C ** -0.5
    w_p *= C ** -0.5
    y, cache = layers.attention_forward(x, w_qkv, b_qkv, w_p, b_p, H, bf16=True)
    y32, c32 = layers.attention_forward(x, w_qkv, b_qkv, w_p, b_p, H)

    def torch_attention(x, w_qkv, b_qkv, w_p, b_p):  # scripts/torch_vit.py's Attention
        B, N, _ = x.shape
        q, k, v = F.linear(x, w_qkv, b_qkv).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(dim=-1)
        return F.linear((a @ v).transpose(1, 2).reshape(B, N, C), w_p, b_p)

    ty, tg = _autocast_grads(torch_attention, [x, w_qkv, b_qkv, w_p, b_p], dy)
    _check([y, *layers.attention_backward(dy, cache)], [ty, *tg], [y32, *layers.attention_backward(dy, c32)], 1.2e-2,
           ["y", "dx", "dw_qkv", "db_qkv", "dw_proj", "db_proj"])


CFG = preset("mnist", depth=2, precision="bf16")  # 50 tokens, width 64, 4 heads: folded and unfolded norms


def _model_case(cfg, B=16, seed=0):
    params = init_params(cfg, seed=seed, std=0.07)
    rng = np.random.default_rng(seed + 1)
    for k, v in params.items():  # norms, biases and tokens off their init: no trivially zero gradient
        params[k] = (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
    images = rng.standard_normal((B, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
    dlogits = rng.standard_normal((B, cfg.num_classes)).astype(np.float32)
    return params, images, dlogits


def test_vit_logits_and_every_gradient_against_autocast(mkl):
    """The whole model (TorchViT of scripts/torch_vit.py, float32 params) under autocast: logits within
    1.7e-2 and every parameter's gradient within 2.4e-2 (measured 8.4e-3, and 1.2e-2 at most); the inference
    path (keep_cache=False, its own bf16 GEMMs) as close."""
    params, images, dlogits = _model_case(CFG)
    logits, cache = vit_forward(params, images, CFG)
    grads = vit_backward(dlogits, cache)
    model = torch_vit_from_params(CFG, params, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tl = model(torch.tensor(images))
    (tl.float() * torch.tensor(dlogits)).sum().backward()
    theirs = {k: p.grad.numpy() for k, p in model.named_parameters()}
    assert rel_err(logits, tl.float().detach().numpy()) <= 1.7e-2
    assert set(grads) == set(theirs)
    errs = {k: rel_err(grads[k], theirs[k]) for k in theirs}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 2.4e-2, (worst, errs[worst])
    infer_logits, _ = vit_forward(params, images, CFG, keep_cache=False)
    assert rel_err(infer_logits, tl.float().detach().numpy()) <= 1.7e-2
    f32 = vit_forward(params, images, dataclasses.replace(CFG, precision="float32"), keep_cache=False)[0]
    assert rel_err(infer_logits, f32) > 2e-4  # it rounded


def test_every_linear_runs_in_bf16(mkl, monkeypatch):
    """Each linear's GEMMs go through gemm_bf16: forward (training and inference), backward's dx and dW."""
    calls, real = [], layers.gemm_bf16

    def spy(a, b, transa=False, transb=False, allow_slow=None):
        calls.append(a.shape)
        return real(a, b, transa, transb, allow_slow)

    monkeypatch.setattr(layers, "gemm_bf16", spy)
    monkeypatch.setenv("TINYVIT_SHARDS", "1")
    params, images, dlogits = _model_case(CFG, B=4)
    linears = 2 + 4 * CFG.depth  # the patch embedding, each block's qkv, proj, fc1 and fc2, the head
    logits, cache = vit_forward(params, images, CFG, train=True, rng=np.random.default_rng(0))
    assert len(calls) == linears
    calls.clear()
    vit_backward(dlogits, cache)
    assert len(calls) == 2 * linears - 1  # dx and dW of each, but no dx of the images
    calls.clear()
    vit_forward(params, images, CFG, keep_cache=False)
    assert len(calls) == linears


def test_grad_checkpointing_recomputes_in_bf16(mkl):
    """The blocks run again in the backward in the same precision: the same gradients, bit for bit."""
    params, images, dlogits = _model_case(CFG, B=4)
    plain = vit_backward(dlogits, vit_forward(params, images, CFG)[1])
    again = vit_backward(dlogits, vit_forward(params, images, CFG, grad_checkpointing=True)[1])
    assert all(np.array_equal(plain[k], again[k]) for k in plain)


def test_vit_bf16_is_as_close_to_float64_as_autocast(mkl):
    """Against the float64 model, tinyvit's bf16 errs no more than torch's autocast does (it rounds less)."""
    params, images, dlogits = _model_case(CFG, seed=3)
    logits, cache = vit_forward(params, images, CFG)
    grads = vit_backward(dlogits, cache)
    ref = torch_vit_from_params(CFG, params)
    ac = torch_vit_from_params(CFG, params, dtype=torch.float32)
    ref_l, ac_l = ref(torch.tensor(images, dtype=torch.float64)), None
    (ref_l * torch.tensor(dlogits, dtype=torch.float64)).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ac_l = ac(torch.tensor(images))
    (ac_l.float() * torch.tensor(dlogits)).sum().backward()
    truth = dict({k: p.grad.numpy() for k, p in ref.named_parameters()}, logits=ref_l.detach().numpy())
    auto = dict({k: p.grad.numpy() for k, p in ac.named_parameters()}, logits=ac_l.float().detach().numpy())
    ours = dict(grads, logits=logits)
    mean_ours = np.mean([rel_err(ours[k], truth[k]) for k in truth])
    mean_auto = np.mean([rel_err(auto[k], truth[k]) for k in truth])
    assert mean_ours <= mean_auto, (mean_ours, mean_auto)
    assert mean_ours > 1e-4  # it really ran in bf16 (float32 errs about 1e-6 here)


def test_float32_never_takes_the_bf16_path(monkeypatch):
    """precision float32 (the default): no rounding, no bf16 GEMM, in training, backward and inference."""
    def refuse(*a, **k):
        raise AssertionError("the bf16 path ran in float32 mode")

    for mod in (layers, infer):
        monkeypatch.setattr(mod, "to_bf16", refuse)
    monkeypatch.setattr(layers, "gemm_bf16", refuse)
    cfg = dataclasses.replace(CFG, precision="float32")
    params, images, dlogits = _model_case(cfg)
    logits, cache = vit_forward(params, images, cfg, train=True, rng=np.random.default_rng(0))
    vit_backward(dlogits, cache)
    vit_forward(params, images, cfg, keep_cache=False)
    assert cfg == CFG and "precision" not in CFG.to_dict()  # how it runs, not what the model is


def test_bf16_training_reaches_float32_accuracy(mkl, tmp_path):
    """The toy run of test_train (8 epochs of 256 images) in bf16 ends within noise of float32's accuracy."""
    acc = {}
    for p in ("float32", "bf16"):
        tc = TrainConfig(epochs=8, batch_size=32, lr=3e-3, warmup_epochs=0.5, precision=p)
        s = fit(init_params(TINY, seed=0), TINY, tc, np, synthetic(256, 1), synthetic(128, 2), tmp_path / p,
                quiet=True)
        acc[p] = s["test_accuracy"]
    assert acc["float32"] > 0.8 and abs(acc["bf16"] - acc["float32"]) <= 0.05, acc


def test_refused_in_one_line(monkeypatch, tmp_path):
    """No library, a CPU where bf16 would not pay (without the override), CuPy: one line each, before a step."""
    params, images, _ = _model_case(CFG, B=2)
    monkeypatch.setattr(bf16, "_GEMM", [None])
    with pytest.raises(TinyViTError, match=r"pip install mkl") as e:
        vit_forward(params, images, CFG)
    assert "\n" not in str(e.value)
    with pytest.raises(TinyViTError, match=r"pip install mkl"):
        fit(init_params(TINY), TINY, TrainConfig(epochs=1, batch_size=32, precision="bf16"), np, synthetic(64, 1),
            synthetic(32, 2), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()
    monkeypatch.setattr(bf16, "_GEMM", [bf16.Gemm("oneMKL stand-in", None, None)])
    monkeypatch.setattr(bf16, "slow", lambda gemm: ("emulated", "this CPU has neither AVX512-BF16 nor AMX-BF16"))
    monkeypatch.delenv(bf16.ANY_CPU_ENV, raising=False)
    with pytest.raises(TinyViTError, match="neither AVX512-BF16 nor AMX-BF16.*use float32.*TINYVIT_BF16_ANY_CPU=1"):
        vit_forward(params, images, CFG, keep_cache=False)
    with pytest.raises(TinyViTError, match="NumPy .CPU. only: use float32 on CuPy"):
        bf16.check_precision("bf16", xp=object())
    bf16.check_precision("float32", xp=object())
    with pytest.raises(TinyViTError, match="precision must be one of float32, bf16"):
        preset("mnist", precision="float16")


def test_precision_flag_is_saved_and_resumed(mkl, tmp_path):
    """--precision reaches TrainConfig; the checkpoint's train config holds it; --resume takes it back."""
    from helpers import load_script

    train_mnist = load_script("train_mnist.py")
    args = train_mnist.parse_args(["--precision", "bf16", "--out", str(tmp_path / "a")])
    tc = train_mnist.train_config(args, train_mnist.DEFAULTS)
    assert tc.precision == "bf16"
    assert train_mnist.parse_args(["--out", str(tmp_path / "b")]).precision == "float32"
    s = fit(init_params(TINY), TINY, dataclasses.replace(TrainConfig(epochs=1, batch_size=32), precision="bf16"),
            np, synthetic(64, 1), synthetic(32, 2), tmp_path / "run", quiet=True)
    resumed = train_mnist.parse_args(["--resume", str(tmp_path / "run" / "checkpoint.npz")])
    assert s["epochs"] == 1 and resumed.precision == "bf16"
    with pytest.raises(TinyViTError, match="--precision float32 differs from the saved run's 'bf16'"):
        train_mnist.parse_args(["--resume", str(tmp_path / "run" / "checkpoint.npz"), "--precision", "float32"])


def test_head_mode_trains_its_head_in_bf16(mkl, monkeypatch):
    """finetune.py --mode head: the cached features come from float32, the head trains in the run's precision."""
    from tinyvit.train.finetune import train_head

    calls, real = [], layers.gemm_bf16
    monkeypatch.setattr(layers, "gemm_bf16", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96)
    f = (rng.standard_normal((96, 16)) + 2 * np.eye(3, 16)[y]).astype(np.float32)  # separable by class
    head = {"head.weight": np.zeros((3, 16), np.float32), "head.bias": np.zeros(3, np.float32)}
    cfg = preset("mnist", dim=16, heads=2, num_classes=3)
    tc = TrainConfig(epochs=3, batch_size=32, lr=0.05, warmup_epochs=0, precision="bf16")
    _, acc, _ = train_head(f, y, f, y, head, cfg, tc, np, True)
    assert acc > 0.8 and len(calls) == 3 * 3 * 2 + 3  # forward and dW per step, one forward per epoch's test
