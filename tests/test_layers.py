"""Each layer's forward and hand-written backward against torch autograd (float64, and float32)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from helpers import torch_gelu

from tinyvit.backend import to_device, to_numpy
from tinyvit.nn import layers as L
from tinyvit.nn import reference
from tinyvit.nn.resample import pos_resample_backward, pos_resample_forward

TOL = {np.float64: 1e-10, np.float32: 2e-5}


def _t(a, dtype=np.float64, grad=True):
    """float64 torch tensor of `a` rounded to `dtype` first, so the float64 oracle sees exactly
    the inputs our `dtype` run sees and only arithmetic error is measured."""
    a = np.asarray(a, dtype=np.float64).astype(dtype).astype(np.float64)
    return torch.tensor(a, requires_grad=grad)


def _check_no_mutation(backward, dout, cache):
    """Run backward and assert it left dout untouched."""
    before = dout.copy()
    out = backward(dout, cache)
    assert (dout == before).all(), "backward mutated dout"
    return out


def _assert_dtype(dtype, *arrays):
    for a in arrays:
        if a is not None:
            assert a.dtype == dtype, (a.dtype, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,out_f,bias", [((1, 4), 3, True), ((2, 7, 16), 24, True),
                                              ((3, 5, 9, 8), 5, False), ((1, 1, 1), 1, True)])
def test_linear(xp, dtype, shape, out_f, bias):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=shape), rng.normal(size=(out_f, shape[-1]))
    b, g = rng.normal(size=out_f), rng.normal(size=shape[:-1] + (out_f,))
    xt, wt, bt = _t(x, dtype), _t(w, dtype), _t(b, dtype)
    yt = F.linear(xt, wt, bt if bias else None)
    yt.backward(_t(g, dtype, grad=False))
    dev = lambda a: to_device(a.astype(dtype), xp)  # noqa: E731
    y, cache = L.linear_forward(dev(x), dev(w), dev(b) if bias else None)
    dx, dw, db = _check_no_mutation(L.linear_backward, dev(g), cache)
    _assert_dtype(dtype, y, dx, dw, db)
    assert rel_err(y, yt.detach().numpy()) < TOL[dtype]
    assert rel_err(dx, xt.grad.numpy()) < TOL[dtype]
    assert rel_err(dw, wt.grad.numpy()) < TOL[dtype]
    assert (db is None) == (not bias)
    if bias:
        assert rel_err(db, bt.grad.numpy()) < TOL[dtype]


LN_CASES = {
    "normal": lambda r, s: r.normal(size=s),
    "offset_1e4": lambda r, s: 1e4 + r.normal(size=s),  # large mean: centring must be exact
    "tiny_var": lambda r, s: 3.0 + 1e-7 * r.normal(size=s),  # variance far below eps
    "constant": lambda r, s: np.full(s, 2.5),  # zero variance
    "huge": lambda r, s: 1e6 * r.normal(size=s),
}


# float32 cannot hold the variations of offset_1e4 and tiny_var (all round to one value): float64 only
LN_DTYPE_CASES = [(d, c) for d in (np.float64, np.float32) for c in LN_CASES
                  if d == np.float64 or c not in ("offset_1e4", "tiny_var")]


@pytest.mark.parametrize("dtype,case", LN_DTYPE_CASES)
@pytest.mark.parametrize("shape,eps", [((1, 5, 8), 1e-6), ((3, 17, 12), 1e-5), ((4, 3), 1e-6)])
def test_layernorm(xp, dtype, case, shape, eps):
    rng = np.random.default_rng(1)
    x = LN_CASES[case](rng, shape)
    w, b = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
    g = rng.normal(size=shape)
    xt, wt, bt = _t(x, dtype), _t(w, dtype), _t(b, dtype)
    yt = F.layer_norm(xt, (shape[-1],), wt, bt, eps)
    yt.backward(_t(g, dtype, grad=False))
    dev = lambda a: to_device(a.astype(dtype), xp)  # noqa: E731
    y, cache = L.layernorm_forward(dev(x), dev(w), dev(b), eps)
    dx, dw, db = _check_no_mutation(L.layernorm_backward, dev(g), cache)
    _assert_dtype(dtype, y, dx, dw, db)
    for a in (y, dx, dw, db):
        assert np.isfinite(a).all()
    tol = TOL[dtype] if case != "huge" or dtype == np.float64 else 1e-4
    if case == "tiny_var":  # condition number |x| / std = 3e7: rounding alone gives ~3e-9
        tol = 1e-7
    for ours, ref in ((y, yt.detach()), (dx, xt.grad), (dw, wt.grad), (db, bt.grad)):
        assert rel_err(ours, ref.numpy()) < tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 4), (2, 9, 16), (3, 5, 64)])
def test_layernorm_without_affine(xp, dtype, shape):
    rng = np.random.default_rng(11)
    x, g = rng.normal(size=shape) * 3 + 1, rng.normal(size=shape)
    xt = _t(x, dtype)
    yt = F.layer_norm(xt, (shape[-1],), eps=1e-6)
    yt.backward(_t(g, dtype, grad=False))
    y, cache = L.layernorm_forward(to_device(x.astype(dtype), xp), None, None, 1e-6)
    dx, dw, db = _check_no_mutation(L.layernorm_backward, to_device(g.astype(dtype), xp), cache)
    _assert_dtype(dtype, y, dx)
    assert dw is None and db is None
    assert rel_err(y, yt.detach().numpy()) < TOL[dtype]
    assert rel_err(dx, xt.grad.numpy()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,out_f,bias", [((2, 9, 16), 48, True), ((3, 5, 8), 6, False), ((1, 1, 4), 1, True),
                                              ((4, 7, 8), 24, True), ((2, 3, 4), 12, False)])
def test_layernorm_linear(xp, dtype, shape, out_f, bias):
    """linear(layernorm(x)), folded (fewer outputs than tokens) or not: every output and gradient as torch."""
    rng = np.random.default_rng(12)
    c = shape[-1]
    x, g = rng.normal(size=shape) * 2 - 1, rng.normal(size=shape[:-1] + (out_f,))
    gam, bet = rng.normal(size=c), rng.normal(size=c)
    w, b = rng.normal(size=(out_f, c)) / np.sqrt(c), rng.normal(size=out_f)
    ts = [_t(a, dtype) for a in (x, gam, bet, w, b)]
    yt = F.linear(F.layer_norm(ts[0], (c,), ts[1], ts[2], 1e-6), ts[3], ts[4] if bias else None)
    yt.backward(_t(g, dtype, grad=False))
    dev = lambda a: to_device(a.astype(dtype), xp)  # noqa: E731
    y, cache = L.layernorm_linear_forward(dev(x), dev(gam), dev(bet), dev(w), dev(b) if bias else None, 1e-6)
    assert cache.fold == (out_f < x.size // c)  # folded exactly when w has fewer rows than x
    grads = _check_no_mutation(L.layernorm_linear_backward, dev(g), cache)
    _assert_dtype(dtype, y, *grads)
    assert rel_err(y, yt.detach().numpy()) < TOL[dtype]
    assert (grads[4] is None) == (not bias)
    for ours, t in zip(grads, ts):
        if ours is not None:
            assert rel_err(ours, t.grad.numpy()) < TOL[dtype]


GELU_INPUTS = {
    "normal": lambda r: r.normal(size=(3, 7, 11)) * 3,
    "extreme": lambda r: np.array([-1e4, -50.0, -10.0, -5.5, -1.0, -1e-9, 0.0, 1e-9, 1.0, 5.5, 10.0, 50.0, 1e4]),
    "dense": lambda r: np.linspace(-8, 8, 4001),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["erf", "tanh", "quick"])
@pytest.mark.parametrize("case", list(GELU_INPUTS))
def test_gelu(xp, dtype, kind, case):
    rng = np.random.default_rng(2)
    x = GELU_INPUTS[case](rng)
    g = rng.normal(size=x.shape)
    xt = _t(x, dtype)
    yt = torch_gelu(xt, kind)
    yt.backward(_t(g, dtype, grad=False))
    y, cache = L.gelu_forward(to_device(x.astype(dtype), xp), kind)
    dx = _check_no_mutation(L.gelu_backward, to_device(g.astype(dtype), xp), cache)
    _assert_dtype(dtype, y, dx)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    tol = 1e-12 if dtype == np.float64 else 4e-6  # float32: a chain of ~8 rounded multiplies
    assert rel_err(y, yt.detach().numpy()) < tol
    assert rel_err(dx, xt.grad.numpy()) < tol
    # elementwise where |y| > 1e-3: float64 to 1e-12 relative; float32 at most 2x torch float32's
    # own worst absolute and worst relative error on the same inputs
    yn, yr = to_numpy(y).astype(np.float64), yt.detach().numpy()
    big = np.abs(yr) > 1e-3
    err = np.abs(yn - yr)
    if dtype == np.float64:
        assert np.all(err[big] <= 1e-12 * np.abs(yr[big]))
    else:
        t32 = torch_gelu(torch.tensor(x.astype(np.float32)), kind).double().numpy()
        terr = np.abs(t32 - yr)
        assert err.max() <= 2 * terr.max() + 1e-7
        assert (err[big] / np.abs(yr[big])).max() <= 2 * (terr[big] / np.abs(yr[big])).max() + 1e-6


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["erf", "tanh", "quick"])
@pytest.mark.parametrize("n", [7, 300_001])  # one block, and many blocks on the pool
def test_gelu_inplace_equals_forward(xp, dtype, kind, n):
    """The inference GELU (in place, nothing cached) gives gelu_forward's values exactly."""
    x = to_device(np.random.default_rng(4).normal(0, 3, size=(n,)).astype(dtype), xp)
    y = L.gelu_forward(x, kind)[0]
    buf = x.copy()
    assert L.gelu_inplace(buf, kind) is buf
    assert np.array_equal(to_numpy(buf), to_numpy(y))
    strided = xp.zeros((2, n), dtype=dtype)
    strided[0] = x
    view = strided[:, ::1].T[:, 0]  # x's values in a non-contiguous view
    L.gelu_inplace(view, kind)
    assert np.array_equal(to_numpy(strided[0]), to_numpy(y))  # updated in place, not in a copy


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["erf", "tanh", "quick"])
@pytest.mark.parametrize("shape,out_f,p", [((2, 5, 12), 7, 0.0), ((3, 220, 150), 20, 0.0), ((2, 9, 16), 6, 0.4)])
def test_gelu_linear(xp, dtype, kind, shape, out_f, p):
    """linear(dropout(gelu(x))), whose backward remakes the linear's input: against torch, with
    the dropout mask ours drew; the middle shape spans several blocks of the chunked GELU."""
    rng = np.random.default_rng(11)
    x, w, b = 2 * rng.normal(size=shape), rng.normal(size=(out_f, shape[-1])), rng.normal(size=out_f)
    g = rng.normal(size=shape[:-1] + (out_f,))
    dev = lambda a: to_device(a.astype(dtype), xp)  # noqa: E731
    out, cache = L.gelu_linear_forward(dev(x), dev(w), dev(b), kind, p, xp.random.default_rng(0), True)
    dx, dw, db = _check_no_mutation(L.gelu_linear_backward, dev(g), cache)
    mask = 1.0 if p == 0 else to_numpy(cache.mask).astype(np.float64)
    assert p == 0 or 0 < (mask == 0).mean() < 1
    xt, wt, bt = (_t(a, dtype) for a in (x, w, b))
    yt = F.linear(torch_gelu(xt, kind) * torch.tensor(mask), wt, bt)
    yt.backward(_t(g, dtype, grad=False))
    _assert_dtype(dtype, out, dx, dw, db)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    assert rel_err(out, yt.detach().numpy()) < tol
    for ours, t in ((dx, xt), (dw, wt), (db, bt)):
        assert rel_err(ours, t.grad.numpy()) < tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 5), (4, 2, 17, 17)])
def test_softmax(xp, dtype, scale, shape):
    rng = np.random.default_rng(3)
    x, g = scale * rng.normal(size=shape), rng.normal(size=shape)
    xt = _t(x, dtype)
    yt = torch.softmax(xt, dim=-1)
    yt.backward(_t(g, dtype, grad=False))
    y, cache = L.softmax_forward(to_device(x.astype(dtype), xp))
    dx = _check_no_mutation(L.softmax_backward, to_device(g.astype(dtype), xp), cache)
    _assert_dtype(dtype, y, dx)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    tol = 1e-12 if dtype == np.float64 else 2e-6
    assert rel_err(y, yt.detach().numpy()) < tol
    # dx = y (g - sum(g y)) cancels for near one-hot y: measure its error on the scale of g
    assert rel_err(dx, xt.grad.numpy(), floor=np.abs(g).max()) < tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("offset,shifted", [(0.0, False), (30.0, False), (-30.0, False),
                                            (60.0, True), (-60.0, True), (1e4, True)])
def test_softmax_parts_shift_only_when_needed(xp, dtype, offset, shifted):
    rng = np.random.default_rng(7)
    x = offset + 3.0 * rng.normal(size=(3, 4, 33))
    e, r = L.softmax_parts(to_device(x.astype(dtype), xp))
    e, r = to_numpy(e), to_numpy(r)
    x = x.astype(dtype)
    if shifted or xp is not np:  # row sums beyond 2^+-60 (CuPy: always): exp of x minus the row max
        # (largest entry exactly 1)
        assert (e.max(axis=-1) == 1).all()
    else:  # the cheap path: e is exp(x) itself
        np.testing.assert_allclose(e, np.exp(x), rtol=1e-6 if dtype == np.float32 else 1e-14)
    yt = torch.softmax(_t(x, dtype, grad=False), dim=-1).numpy()
    assert rel_err(e * r, yt) < (1e-12 if dtype == np.float64 else 2e-6)


def _torch_attention(x, wq, bq, wp, bp, heads):
    B, N, C = x.shape
    qkv = F.linear(x, wq, bq).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    a = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (C // heads) ** -0.5, dim=-1)
    return F.linear((a @ qkv[2]).transpose(1, 2).reshape(B, N, C), wp, bp)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B,N,C,heads", [(1, 1, 4, 1), (2, 5, 12, 3), (3, 17, 16, 1), (2, 50, 64, 4)])
def test_attention(xp, dtype, B, N, C, heads):
    rng = np.random.default_rng(4)
    x, g = rng.normal(size=(B, N, C)), rng.normal(size=(B, N, C))
    wq, bq = rng.normal(size=(3 * C, C)) / np.sqrt(C), rng.normal(size=3 * C)
    wp, bp = rng.normal(size=(C, C)) / np.sqrt(C), rng.normal(size=C)
    ts = [_t(a, dtype) for a in (x, wq, bq, wp, bp)]
    yt = _torch_attention(*ts, heads)
    yt.backward(_t(g, dtype, grad=False))
    dev = lambda a: to_device(a.astype(dtype), xp)  # noqa: E731
    y, cache = L.attention_forward(dev(x), dev(wq), dev(bq), dev(wp), dev(bp), heads)
    grads = _check_no_mutation(L.attention_backward, dev(g), cache)
    _assert_dtype(dtype, y, *grads)
    assert rel_err(y, yt.detach().numpy()) < TOL[dtype]
    for ours, t in zip(grads, ts):
        assert rel_err(ours, t.grad.numpy()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("N,n", [(5, 1), (17, 1), (9, 4), (6, 6)])
def test_attention_heads_first_queries_only(xp, dtype, N, n):
    """queries=n: the first n tokens' outputs of full attention, and gradients through those alone."""
    B, C, heads = 2, 12, 3
    rng = np.random.default_rng(7)
    x, g = rng.normal(size=(B, N, C)), rng.normal(size=(B, n, C))
    wq, bq = rng.normal(size=(3 * C, C)) / np.sqrt(C), rng.normal(size=3 * C)
    wp, bp = rng.normal(size=(C, C)) / np.sqrt(C), rng.normal(size=C)
    ts = [_t(a, dtype) for a in (x, wq, bq, wp, bp)]
    yt = _torch_attention(*ts, heads)[:, :n]
    yt.backward(_t(g, dtype, grad=False))
    dev = lambda a: to_device(a.astype(dtype), xp)  # noqa: E731
    qkv, qkv_cache = L.linear_forward(dev(x), dev(wq), dev(bq))
    y, cache = L.attention_heads_forward(qkv, dev(wp), dev(bp), heads, queries=n)
    assert y.shape == (B, n, C) and L.attention_probs(cache).shape == (B, heads, n, N)
    dqkv, dwp, dbp = _check_no_mutation(L.attention_heads_backward, dev(g), cache)
    dx, dwq, dbq = L.linear_backward(dqkv, qkv_cache)
    _assert_dtype(dtype, y, dqkv, dwp, dbp)
    assert rel_err(y, yt.detach().numpy()) < TOL[dtype]
    for ours, t in zip((dx, dwq, dbq, dwp, dbp), ts):
        assert rel_err(ours, t.grad.numpy()) < TOL[dtype]


def test_attention_probs_match_torch(xp):
    rng = np.random.default_rng(8)
    B, N, C, heads = 2, 9, 12, 3
    x, wq, bq = rng.normal(size=(B, N, C)), rng.normal(size=(3 * C, C)), rng.normal(size=3 * C)
    wp, bp = rng.normal(size=(C, C)), rng.normal(size=C)
    _, cache = L.attention_forward(*(to_device(a, xp) for a in (x, wq, bq, wp, bp)), heads)
    qkv = F.linear(torch.tensor(x), torch.tensor(wq), torch.tensor(bq)).reshape(B, N, 3, heads, -1)
    q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
    ref = torch.softmax(q @ k.transpose(-2, -1) * (C // heads) ** -0.5, dim=-1).numpy()
    assert rel_err(L.attention_probs(cache.heads), ref) < 1e-12  # the heads' cache, after the qkv linear


def test_attention_redoes_shifted_when_unshifted_overflows(xp):
    """Scores ~34 keep row sums in range, but exp(34) * 1e30 overflows float32: the shifted redo must
    give torch's finite answer (softmax is uniform here, so out = proj(v) exactly)."""
    B, N, C, heads = 2, 6, 4, 1
    rng = np.random.default_rng(9)
    x = rng.normal(size=(B, N, C)) * 1e-3
    wq = np.zeros((3 * C, C))
    bq = np.concatenate([np.full(C, 17.0 ** 0.5), np.full(C, 17.0 ** 0.5), np.full(C, 1e30)])  # s = 34
    wp, bp = np.eye(C) * 0.5, np.zeros(C)
    g = rng.normal(size=(B, N, C))
    ts = [_t(a, np.float32) for a in (x, wq, bq, wp, bp)]
    yt = _torch_attention(*ts, heads)
    yt.backward(_t(g, np.float32, grad=False))
    dev = lambda a: to_device(a.astype(np.float32), xp)  # noqa: E731
    y, cache = L.attention_forward(dev(x), dev(wq), dev(bq), dev(wp), dev(bp), heads)
    assert np.isfinite(to_numpy(y)).all()
    assert rel_err(y, yt.detach().numpy()) < 1e-6
    dx, dwq, dbq, dwp, dbp = (to_numpy(a) for a in L.attention_backward(dev(g), cache))
    assert all(np.isfinite(a).all() for a in (dx, dwq, dbq, dwp, dbp))
    # the v and proj grads are well conditioned; the q/k ones cancel at 1e30 scale in float32
    v = slice(2 * C, 3 * C)
    for ours, ref in ((dwq[v], ts[1].grad[v]), (dbq[v], ts[2].grad[v]), (dwp, ts[3].grad), (dbp, ts[4].grad)):
        assert rel_err(ours, ref.numpy()) < 1e-5


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B,C,H,P,D", [(1, 1, 4, 4, 3), (2, 3, 8, 4, 6), (3, 1, 28, 7, 5), (1, 3, 32, 16, 8)])
def test_patch_embed(xp, dtype, B, C, H, P, D):
    rng = np.random.default_rng(5)
    x, w, b = rng.normal(size=(B, C, H, H)), rng.normal(size=(D, C, P, P)), rng.normal(size=D)
    g = rng.normal(size=(B, (H // P) ** 2, D))
    xt, wt, bt = _t(x, dtype), _t(w, dtype), _t(b, dtype)
    yt = F.conv2d(xt, wt, bt, stride=P).flatten(2).transpose(1, 2)  # (B, N, D)
    yt.backward(_t(g, dtype, grad=False))
    dev = lambda a: to_device(a.astype(dtype), xp)  # noqa: E731
    y, cache = L.patch_embed_forward(dev(x), dev(w), dev(b))
    dx, dw, db = _check_no_mutation(L.patch_embed_backward, dev(g), cache)
    _assert_dtype(dtype, y, dx, dw, db)
    for ours, ref in ((y, yt.detach()), (dx, xt.grad), (dw, wt.grad), (db, bt.grad)):
        assert rel_err(ours, ref.numpy()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("B,K,scale", [(1, 2, 1.0), (8, 10, 1.0), (5, 1000, 3.0), (4, 7, 1e4)])
def test_cross_entropy(xp, dtype, smoothing, B, K, scale):
    rng = np.random.default_rng(6)
    z, y = scale * rng.normal(size=(B, K)), rng.integers(0, K, size=B)
    zt = _t(z, dtype)
    lt = F.cross_entropy(zt, torch.tensor(y), label_smoothing=smoothing)
    lt.backward()
    loss, cache = L.cross_entropy_forward(to_device(z.astype(dtype), xp), to_device(y, xp), smoothing)
    dz = L.cross_entropy_backward(1.0, cache)
    _assert_dtype(dtype, loss, dz)
    assert np.isfinite(float(loss)) and np.isfinite(dz).all()
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert abs(float(loss) - lt.item()) <= tol * max(1.0, abs(lt.item()))
    assert rel_err(dz, zt.grad.numpy()) < tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dropout(xp, dtype):
    x = to_device(np.random.default_rng(7).normal(size=(64, 33, 16)).astype(dtype), xp)
    g = to_device(np.random.default_rng(8).normal(size=(64, 33, 16)).astype(dtype), xp)
    for train, p in ((False, 0.5), (True, 0.0)):  # identity at eval and at p = 0
        y, cache = L.dropout_forward(x, p, None, train)
        assert y is x and L.dropout_backward(g, cache) is g
    rng = xp.random.default_rng(0)
    y, cache = L.dropout_forward(x, 0.25, rng, train=True)
    dx = _check_no_mutation(L.dropout_backward, g, cache)
    _assert_dtype(dtype, y, dx)
    kept = y != 0
    assert abs(float(kept.mean()) - 0.75) < 0.01  # about 1 - p kept
    assert np.allclose(np.asarray(y[kept].get() if hasattr(y, "get") else y[kept]),
                       np.asarray((x[kept] / 0.75).get() if hasattr(x, "get") else x[kept] / 0.75))
    # the backward by its definition, with the mask drawn (x has no zeros): d(x * keep / (1 - p)) = g * keep / (1 - p);
    # and as torch differentiates x * keep / (1 - p)
    keep, gh = to_numpy(kept), to_numpy(g)
    tol = 1e-7 if dtype == np.float32 else 1e-15  # an ulp: 1 / 0.75 rounds once or twice
    assert rel_err(dx, gh * keep / 0.75) <= tol
    xt = torch.tensor(to_numpy(x), requires_grad=True)
    (xt * torch.tensor(keep) / 0.75).backward(torch.tensor(gh))
    assert rel_err(dx, xt.grad.numpy()) <= tol
    y2, _ = L.dropout_forward(x, 0.25, xp.random.default_rng(0))  # training unless told: train=True is the default
    assert (y2 == y).all()  # the explicit RNG makes it reproducible
    with pytest.raises(ValueError, match="^dropout in training needs an explicit rng$"):
        L.dropout_forward(x, 0.25, None, train=True)


@pytest.mark.parametrize("tokens", [2, 40])  # the norm's affine folded into the linear (40 rows) or not
def test_backward_flags_skip_what_is_not_needed_and_keep_the_rest_bit_identical(xp, tokens):
    """need_dx / need_dw / need_ln_dw: the gradients asked for are the full backward's bits, the others None."""
    rng = np.random.default_rng(0)
    x = to_device(rng.normal(size=(2, tokens // 2, 6)), xp)
    w, b, ln_w, ln_b = (to_device(rng.normal(size=s), xp) for s in [(5, 6), (5,), (6,), (6,)])
    dout = to_device(rng.normal(size=(2, tokens // 2, 5)), xp)
    cases = {
        "linear": (L.linear_backward, L.linear_forward(x, w, b)[1], ("need_dx", "need_dw"), ((0,), (1, 2))),
        "layernorm": (L.layernorm_backward, L.layernorm_forward(x, ln_w, ln_b)[1], ("need_dx", "need_dw"),
                      ((0,), (1, 2))),
        "layernorm_linear": (L.layernorm_linear_backward, L.layernorm_linear_forward(x, ln_w, ln_b, w, b)[1],
                             ("need_dx", "need_dw", "need_ln_dw"), ((0,), (3, 4), (1, 2))),
        "gelu_linear": (L.gelu_linear_backward, L.gelu_linear_forward(x, w, b)[1], ("need_dx", "need_dw"),
                        ((0,), (1, 2))),
        "attention_heads": (L.attention_heads_backward,
                            L.attention_heads_forward(to_device(rng.normal(size=(2, tokens // 2, 12)), xp),
                                                      w[:, :4], b, heads=2)[1], ("need_dx", "need_dw"), ((0,), (1, 2))),
    }
    for name, (backward, cache, flags, outputs) in cases.items():
        d = dout if name != "layernorm" else x
        full = [to_numpy(g) for g in backward(d, cache)]
        for off in flags:
            got = backward(d, cache, **{off: False})
            skipped = outputs[flags.index(off)]
            for i, g in enumerate(got):
                assert (g is None) if i in skipped else np.array_equal(to_numpy(g), full[i]), (name, off, i)


# grid -> new grid, prefix rows: up, down (antialiased), rectangles both ways, unchanged
RESAMPLE_CASES = [((2, 2), (3, 3), 1), ((4, 4), (2, 3), 0), ((3, 5), (7, 2), 5), ((6, 6), (6, 6), 1),
                  ((16, 16), (37, 24), 2)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("grid,new,prefix", RESAMPLE_CASES)
def test_pos_resample(xp, dtype, grid, new, prefix):
    rng = np.random.default_rng(8)
    C = 5
    pos, g = rng.normal(size=(1, prefix + grid[0] * grid[1], C)), rng.normal(size=(1, prefix + new[0] * new[1], C))
    pt = _t(pos, dtype)  # the oracle: torch's own interpolation, with autograd
    e = pt[:, prefix:].reshape(1, grid[0], grid[1], C).permute(0, 3, 1, 2)
    if tuple(grid) != tuple(new):
        e = F.interpolate(e, size=new, mode="bicubic", antialias=True, align_corners=False)
    yt = torch.cat([pt[:, :prefix], e.permute(0, 2, 3, 1).reshape(1, -1, C)], dim=1)
    yt.backward(_t(g, dtype, grad=False))
    dev = lambda a: to_device(a.astype(dtype), xp)  # noqa: E731
    y, cache = pos_resample_forward(dev(pos), grid, new, prefix)
    dpos = _check_no_mutation(pos_resample_backward, dev(g), cache)
    _assert_dtype(dtype, y, dpos)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    assert rel_err(y, yt.detach().numpy()) < tol and rel_err(dpos, pt.grad.numpy()) < tol
    y_ref, c_ref = reference.pos_resample_forward(dev(pos), grid, new, prefix)  # the plain form
    assert rel_err(y, y_ref) < tol and rel_err(dpos, reference.pos_resample_backward(dev(g), c_ref)) < tol


def test_pos_resample_is_timms():
    """timm's own resample_abs_pos_embed (float32 inside) gives what ours gives, the unchanged grid untouched."""
    resample_abs_pos_embed = pytest.importorskip("timm.layers").resample_abs_pos_embed
    pos = np.random.default_rng(9).normal(size=(1, 1 + 4 * 4, 8)).astype(np.float32)
    for new in ((6, 3), (2, 2), (4, 4)):
        want = resample_abs_pos_embed(torch.tensor(pos), list(new), old_size=[4, 4], num_prefix_tokens=1)
        got = pos_resample_forward(pos, (4, 4), new, 1)[0]
        assert rel_err(got, want.numpy()) < 1e-6
    assert pos_resample_forward(pos, (4, 4), (4, 4), 1)[0] is pos
