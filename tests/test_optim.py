"""tinyvit.train.optim against torch.optim / torch.nn.utils.clip_grad_norm_ / torch lr schedulers."""
import io
import math
import warnings

import numpy as np
import pytest
import torch

from tinyvit import backend
from tinyvit.errors import TinyViTError
from tinyvit.train import optim

SHAPES = {
    "patch_embed.proj.weight": (8, 3, 4, 4),
    "patch_embed.proj.bias": (8,),
    "cls_token": (1, 1, 8),
    "pos_embed": (1, 5, 8),
    "blocks.0.norm1.weight": (8,),
    "blocks.0.attn.qkv.weight": (24, 8),
    "blocks.0.attn.qkv.bias": (24,),
    "blocks.0.mlp.fc1.weight": (16, 8),
    "blocks.0.mlp.fc2.weight": (300, 500),  # 150k values: updated in blocks on the thread pool
    "norm.bias": (8,),
    "head.weight": (10, 8),
}
DECAYED = {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight",
           "blocks.0.mlp.fc2.weight", "head.weight"}
N_STEPS = 20
TOL = {np.float64: dict(rtol=1e-10, atol=1e-13), np.float32: dict(rtol=1e-5, atol=1e-6)}

# (our name, our kwargs, torch class, torch kwargs, torch groups split by decays())
CASES = {
    "adam": ("adam", dict(lr=1e-2, weight_decay=0.0), torch.optim.Adam, dict(lr=1e-2), False),
    "adam_l2": ("adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), False),
    "adamw": ("adamw", dict(lr=1e-2, weight_decay=0.3), torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.3), True),
    "adamw_nofilter": ("adamw", dict(lr=1e-2, weight_decay=0.3, decay_filter=False),
                       torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.3), False),
    "sgd_plain": ("sgd", dict(lr=0.1, momentum=0.0), torch.optim.SGD, dict(lr=0.1, momentum=0.0), False),
    "sgd_momentum_wd": ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.05),
                        torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.05), False),
    "sgd_nesterov_wd": ("sgd", dict(lr=0.1, momentum=0.8, weight_decay=0.05, nesterov=True),
                        torch.optim.SGD, dict(lr=0.1, momentum=0.8, weight_decay=0.05, nesterov=True), False),
    "sgd_filtered": ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.05, decay_filter=True),
                     torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.05), True),
}


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def make_grads(dtype, n, seed=1):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()} for _ in range(n)]


def run_torch(params, grads, cls, kw, split, lrs=None):
    """Run torch optimizer cls over the grads; return the final params as NumPy."""
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    if split:  # timm-style groups: decay only where optim.decays() says so
        wd = kw["weight_decay"]
        groups = [{"params": [tp[k] for k in tp if optim.decays(k, params[k])], "weight_decay": wd},
                  {"params": [tp[k] for k in tp if not optim.decays(k, params[k])], "weight_decay": 0.0}]
    else:
        groups = list(tp.values())
    opt = cls(groups, foreach=False, **kw)
    for i, g in enumerate(grads):
        for k, t in tp.items():
            t.grad = torch.tensor(g[k])
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        opt.step()
    return {k: t.detach().numpy() for k, t in tp.items()}


def run_ours(params, grads, name, kw, lrs=None):
    opt = optim.make_optimizer(name, **kw)
    for i, g in enumerate(grads):
        opt.step(params, g, lr=None if lrs is None else lrs[i])
    return opt


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch(case, dtype):
    name, kw, tcls, tkw, split = CASES[case]
    params, grads = make_params(dtype), make_grads(dtype, N_STEPS)
    expected = run_torch(params, grads, tcls, tkw, split)
    ids = {k: id(v) for k, v in params.items()}
    grads_before = [{k: v.copy() for k, v in g.items()} for g in grads]
    run_ours(params, grads, name, kw)
    for k in SHAPES:
        assert id(params[k]) == ids[k], "params must be updated in place"
        assert params[k].dtype == dtype
        np.testing.assert_allclose(params[k], expected[k], **TOL[dtype], err_msg=k)
    for g, g0 in zip(grads, grads_before):  # step never mutates the grads
        assert all(np.array_equal(g[k], g0[k]) for k in g)


@pytest.mark.parametrize("case", ["adam_l2", "adamw"])
def test_strided_params_are_updated_in_place(case):
    """A non-contiguous param (a transposed view) gets the same update as its contiguous copy."""
    name, kw = CASES[case][0], CASES[case][1]
    rng = np.random.default_rng(5)
    base = rng.standard_normal((500, 300))
    strided = {"head.weight": base.T}  # (300, 500) view, not C-contiguous
    dense = {"head.weight": np.ascontiguousarray(base.T)}
    grads = [{"head.weight": rng.standard_normal((300, 500))} for _ in range(3)]
    for params in (strided, dense):
        run_ours(params, grads, name, kw)
    assert strided["head.weight"].base is base  # still the caller's array, updated in place
    np.testing.assert_array_equal(strided["head.weight"], dense["head.weight"])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_decay_filter_skips_no_decay_set(name):
    """Filtered decay == no decay on the no-decay set, != on the rest."""
    kw = dict(lr=1e-2, weight_decay=0.5, decay_filter=True)
    p_wd, p_0, grads = make_params(np.float64), make_params(np.float64), make_grads(np.float64, 5)
    run_ours(p_wd, grads, name, kw)
    run_ours(p_0, grads, name, dict(kw, weight_decay=0.0))
    for k in SHAPES:
        assert np.array_equal(p_wd[k], p_0[k]) == (k not in DECAYED), k


def test_decays_rule():
    params = make_params(np.float64)
    assert {k for k, v in params.items() if optim.decays(k, v)} == DECAYED
    assert not optim.decays("dist_token", np.zeros((1, 1, 8)))
    assert optim.decays("blocks.0.attn.proj.weight", np.zeros((8, 8)))


@pytest.mark.parametrize("case", ["adamw", "sgd_nesterov_wd", "adam_l2"])
def test_lr_override(case):
    name, kw, tcls, tkw, split = CASES[case]
    params, grads = make_params(np.float64), make_grads(np.float64, N_STEPS)
    lrs = [optim.warmup_cosine(i, N_STEPS, 0.05, warmup_steps=3) for i in range(N_STEPS)]
    expected = run_torch(params, grads, tcls, tkw, split, lrs=lrs)
    opt = run_ours(params, grads, name, kw, lrs=lrs)
    assert opt.lr == kw["lr"]  # the override does not change the base lr
    for k in SHAPES:
        np.testing.assert_allclose(params[k], expected[k], **TOL[np.float64], err_msg=k)


@pytest.mark.parametrize("case", ["adam_l2", "adamw", "sgd_nesterov_wd", "sgd_momentum_wd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_resume_bit_exact(case, dtype):
    name, kw = CASES[case][:2]
    grads = make_grads(dtype, N_STEPS)
    straight = make_params(dtype)
    run_ours(straight, grads, name, kw)

    params = make_params(dtype)
    opt = run_ours(params, grads[:10], name, kw)
    sd = opt.state_dict()
    assert sd["step"].shape == () and sd["step"].dtype == np.int64 and int(sd["step"]) == 10
    kinds = {k.split("/")[0] for k in sd if k != "step"}
    assert {k.split("/", 1)[1] for k in sd if k != "step"} == set(SHAPES)
    assert len(sd) == 1 + len(kinds) * len(SHAPES)
    buf = io.BytesIO()
    np.savez(buf, **sd, **{f"param/{k}": v for k, v in params.items()})
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        loaded = {k: z[k] for k in z.files}
    resumed = {k[len("param/"):]: v for k, v in loaded.items() if k.startswith("param/")}
    fresh = optim.make_optimizer(name, **kw)
    fresh.load_state_dict({k: v for k, v in loaded.items() if not k.startswith("param/")})
    for g in grads[10:]:
        fresh.step(resumed, g)
    assert fresh.step_count == N_STEPS
    for k in SHAPES:
        assert resumed[k].tobytes() == straight[k].tobytes(), k


def test_load_state_dict_rejects_bad_entries():
    opt = optim.Adam(lr=1e-3)
    with pytest.raises(TinyViTError, match="step"):
        opt.load_state_dict({})
    with pytest.raises(TinyViTError, match="unexpected entry"):
        opt.load_state_dict({"step": np.array(1, dtype=np.int64), "momentum_buffer/head.weight": np.zeros(3)})
    with pytest.raises(TinyViTError, match="step"):
        opt.load_state_dict({"step": np.array([1.5])})
    opt.load_state_dict({"step": np.array(1, dtype=np.int64), "exp_avg/head.weight": np.zeros(3),
                         "exp_avg_sq/head.weight": np.zeros(3)})
    with pytest.raises(TinyViTError, match="shape"):
        opt.step({"head.weight": np.zeros((2, 2))}, {"head.weight": np.zeros((2, 2))})


def test_bad_settings():
    with pytest.raises(TinyViTError, match="unknown optimizer"):
        optim.make_optimizer("lamb")
    with pytest.raises(TinyViTError, match="bad settings"):
        optim.make_optimizer("adam", momentum=0.9)
    with pytest.raises(TinyViTError, match="nesterov"):
        optim.SGD(lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(TinyViTError, match="differ"):
        optim.SGD(lr=0.1).step({"a": np.zeros(2)}, {"b": np.zeros(2)})


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_norm", [1.0, 1e3])  # clips / does not clip
def test_clip_grad_norm(xp, dtype, max_norm):
    """Against torch; the norm is a float on NumPy and stays on the device (0-d) on CuPy."""
    host = make_grads(dtype, 1)[0]
    tgrads = [torch.tensor(g) for g in host.values()]
    tp = [torch.zeros_like(g, requires_grad=True) for g in tgrads]
    for p, g in zip(tp, tgrads):
        p.grad = g
    expected = float(torch.nn.utils.clip_grad_norm_(tp, max_norm, foreach=False))
    grads = backend.to_device(host, xp)
    total = optim.clip_grad_norm(grads, max_norm)
    assert isinstance(total, float) if xp is np else total.shape == ()
    tol = TOL[dtype]
    np.testing.assert_allclose(float(total), expected, rtol=tol["rtol"])
    for (k, g), p in zip(grads.items(), tp):
        np.testing.assert_allclose(backend.to_numpy(g), p.grad.numpy(), **tol, err_msg=k)
        assert g.dtype == dtype
    if max_norm > float(total):
        assert all(np.array_equal(backend.to_numpy(grads[k]), host[k]) for k in grads)


def test_clip_grad_norm_nonfinite_leaves_grads(xp):
    host = make_grads(np.float64, 1)[0]
    host["head.bias"] = np.array([1.0, np.inf])
    grads = backend.to_device(host, xp)
    assert float(optim.clip_grad_norm(grads, 1.0)) == math.inf
    grads["head.bias"][1] = np.nan
    assert math.isnan(float(optim.clip_grad_norm(grads, 1.0)))
    assert all(np.array_equal(backend.to_numpy(grads[k]), host[k]) for k in grads if k != "head.bias")


def torch_lrs(make_sched, n, base_lr):
    """The lr torch's scheduler gives at steps 0..n-1."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's internal step(0) deprecation notice
        sched = make_sched(opt)
        lrs = []
        for _ in range(n):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return np.array(lrs)


@pytest.mark.parametrize("warmup,min_lr", [(0, 0.0), (25, 0.0), (25, 1e-4), (1, 1e-3)])
def test_warmup_cosine_vs_torch(warmup, min_lr):
    total, base = 300, 0.1
    S = torch.optim.lr_scheduler

    def make(opt):  # linear warmup (LambdaLR) then torch's own CosineAnnealingLR, via SequentialLR
        lin = S.LambdaLR(opt, lambda s: s / warmup) if warmup else None
        cos = S.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)
        return S.SequentialLR(opt, [lin, cos], milestones=[warmup]) if warmup else cos

    expected = torch_lrs(make, total, base)
    ours = np.array([optim.warmup_cosine(s, total, base, warmup, min_lr) for s in range(total)])
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12 * base)
    sched = optim.make_schedule("cosine", base, total_steps=total, warmup_steps=warmup, min_lr=min_lr)
    assert [sched(s) for s in range(total)] == list(ours)
    assert optim.warmup_cosine(total + 5, total, base, warmup, min_lr) == min_lr


def test_exponential_vs_torch():
    base, gamma, epochs, spe = 0.1, 0.97, 300, 3
    expected = torch_lrs(lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma), epochs, base)
    ours = np.array([optim.exponential(e, base, gamma) for e in range(epochs)])
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    sched = optim.make_schedule("exponential", base, steps_per_epoch=spe, gamma=gamma)
    np.testing.assert_array_equal([sched(s) for s in range(epochs * spe)], np.repeat(ours, spe))


def test_constant_and_warmup_for_all():
    expected = torch_lrs(lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0), 50, 0.3)
    assert list(expected) == [optim.constant(0.3)] * 50
    assert [optim.make_schedule("constant", 0.3)(s) for s in range(50)] == list(expected)
    sched = optim.make_schedule("constant", 0.3, warmup_steps=4)
    assert [sched(s) for s in range(6)] == [0.0, 0.075, 0.15, 0.22499999999999998, 0.3, 0.3]
    sched = optim.make_schedule("exponential", 1.0, warmup_steps=2, steps_per_epoch=2, gamma=0.5)
    assert [sched(s) for s in range(7)] == [0.0, 0.5, 1.0, 1.0, 0.5, 0.5, 0.25]


def test_schedule_errors():
    with pytest.raises(TinyViTError, match="unknown schedule"):
        optim.make_schedule("step", 0.1)
    with pytest.raises(TinyViTError, match="total_steps"):
        optim.make_schedule("cosine", 0.1, total_steps=10, warmup_steps=10)
    with pytest.raises(TinyViTError, match="gamma"):
        optim.make_schedule("exponential", 0.1)


@pytest.mark.skipif(not backend.cupy_available(), reason="CuPy with a CUDA GPU is not available")
@pytest.mark.parametrize("case", ["adamw", "sgd_nesterov_wd"])
def test_cupy_matches_numpy(case):
    """Same steps on the GPU (float64) agree with NumPy; state moves through a NumPy .npz."""
    xp = backend.get_backend("cupy")
    name, kw = CASES[case][:2]
    grads = make_grads(np.float64, N_STEPS)
    ref = make_params(np.float64)
    run_ours(ref, grads, name, kw)
    params = backend.to_device(make_params(np.float64), xp)
    opt = run_ours(params, [backend.to_device(g, xp) for g in grads[:10]], name, kw)
    fresh = optim.make_optimizer(name, **kw)
    fresh.load_state_dict(backend.to_numpy(opt.state_dict()))  # host arrays, moved on first step
    for g in grads[10:]:
        fresh.step(params, backend.to_device(g, xp))
    gpu_grads = backend.to_device(grads[0], xp)
    np.testing.assert_allclose(float(optim.clip_grad_norm(gpu_grads, 1.0)),
                               optim.clip_grad_norm({k: v.copy() for k, v in grads[0].items()}, 1.0),
                               rtol=1e-12)
    for k in SHAPES:
        np.testing.assert_allclose(backend.to_numpy(params[k]), ref[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_no_weight_decay_on_tokens_gammas_and_the_latent():
    for name, shape in (("reg_token", (1, 4, 8)), ("attn_pool.latent", (1, 1, 8)), ("blocks.3.ls1.gamma", (8,)),
                        ("cls_token", (1, 1, 8)), ("pos_embed", (1, 5, 8)), ("fc_norm.weight", (8,))):
        assert not optim.decays(name, np.zeros(shape)), name
    assert optim.decays("attn_pool.kv.weight", np.zeros((16, 8)))


def test_layer_decay_scales_follow_the_blocks():
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm_pre.weight", "blocks.0.norm1.weight",
             "blocks.2.mlp.fc2.bias", "norm.weight", "attn_pool.latent", "head.weight", "head_dist.bias"]
    s = optim.layer_decay_scales(names, depth=3, decay=0.5)
    assert [s[n] for n in names] == [1 / 16] * 4 + [1 / 8, 1 / 2] + [1.0] * 4


def test_layer_decay_scales_each_params_step():
    """An AdamW step with layer decay moves each param as a plain step at its scaled lr would."""
    rng = np.random.default_rng(0)
    p = {"blocks.0.attn.qkv.weight": rng.normal(size=(6, 2)), "head.weight": rng.normal(size=(3, 2))}
    g = {k: rng.normal(size=v.shape) for k, v in p.items()}
    scaled = optim.AdamW(lr=0.1, weight_decay=0.05)
    scaled.lr_scale = optim.layer_decay_scales(p, depth=1, decay=0.25)
    a = {k: v.copy() for k, v in p.items()}
    scaled.step(a, g)
    for k, lr in (("blocks.0.attn.qkv.weight", 0.025), ("head.weight", 0.1)):
        b = {k: p[k].copy()}
        optim.AdamW(lr=lr, weight_decay=0.05).step(b, {k: g[k]})
        assert np.array_equal(a[k], b[k]), k


def test_trainable_names_freeze_by_shell_pattern():
    names = list(SHAPES)
    trained = optim.trainable_names(names, ("patch_embed.*", "cls_token", "blocks.[0-5].*"))
    assert trained == {"pos_embed", "norm.bias", "head.weight"}
    assert optim.trainable_names(names, ()) is None  # nothing frozen: every param trains
    with pytest.raises(TinyViTError, match=r"--freeze 'blocks\.7\.\*' matches no parameter of the model") as e:
        optim.trainable_names(names, ("head.*", "blocks.7.*"))
    assert "\n" not in str(e.value) and "blocks.0.*" in str(e.value)
    with pytest.raises(TinyViTError, match="freezes every parameter"):
        optim.trainable_names(names, ("*",))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_optimizer_holds_state_for_the_trained_params_alone(name):
    """Stepped with the trained params' grads (as the loop does), the state and its state_dict name those alone."""
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    trained = optim.trainable_names(params, ("blocks.*", "patch_embed.*"))
    frozen = {k: v.copy() for k, v in params.items() if k not in trained}
    opt = optim.make_optimizer(name, lr=1e-2)
    for _ in range(2):
        opt.step({k: params[k] for k in trained}, {k: rng.normal(size=params[k].shape) for k in trained})
    assert {key.split("/", 1)[1] for key in opt.state_dict() if key != "step"} == trained
    assert all(np.array_equal(params[k], v) for k, v in frozen.items())
