"""Every ViT layer as a forward/backward function pair over NumPy or CuPy arrays.

Convention (as llm.c): `out, cache = X_forward(...)` and `grads = X_backward(dout, cache)`.
No hidden state; backward never writes into `dout`; every op keeps its input dtype.
"""
import math

from .backend import erf, ew_chunks, get_array_module, in_place_blocks, row_chunks

# --- sums as BLAS products -------------------------------------------------------------------
# NumPy's reduce over a short last axis (C = 64) is 4-6x slower than a matrix-vector product
# with a ones vector, which BLAS also runs on every core.


def rowsum(x):
    """Sum over the last axis, keeping it as size 1: (..., C) -> (..., 1)."""
    xp = get_array_module(x)
    return (x @ xp.ones(x.shape[-1], dtype=x.dtype))[..., None]


def colsum(x2):
    """Sum over the rows of a 2-D array: (M, C) -> (C,)."""
    xp = get_array_module(x2)
    return xp.ones(x2.shape[0], dtype=x2.dtype) @ x2


# --- linear -----------------------------------------------------------------------------------


def linear_forward(x, w, b=None):
    """y = x @ w.T + b for x (..., in), w (out, in) in torch layout, b (out,)."""
    # one 2-D GEMM: NumPy runs a 3-D @ 2-D product as many small, much slower ones
    out = x.reshape(-1, x.shape[-1]) @ w.T  # (M, out)
    if b is not None:
        out += b
    return out.reshape(x.shape[:-1] + (w.shape[0],)), (x, w, b is not None)


def linear_backward(dout, cache, need_dx=True):
    """Return (dx, dw, db); db is None when the layer has no bias, dx None if not needed."""
    x, w, has_b = cache
    d_out = dout.shape[-1]
    dout2 = dout.reshape(-1, d_out)  # (M, out)
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    dw = dout2.T @ x2  # (out, in)
    db = colsum(dout2) if has_b else None
    dx = (dout2 @ w).reshape(x.shape) if need_dx else None  # (..., in)
    return dx, dw, db


# --- layernorm --------------------------------------------------------------------------------


def _layernorm_rows_scaled(x, out, xhat, rstd, w, b, eps):
    """Layernorm of rows whose sums overflow: normalise x / max|x| per row, which is the same math.

    With s = max|x|: xhat = (x/s - mean(x/s)) / sqrt(var(x/s) + eps/s^2) and rstd = that root's
    inverse / s, so backward (which reads xhat and rstd) is unchanged.
    """
    xp = get_array_module(x)
    c = x.shape[-1]
    s = xp.abs(x).max(axis=-1, keepdims=True)
    s = xp.where(s > 0, s, 1.0).astype(x.dtype)
    xs = x / s
    xp.subtract(xs, rowsum(xs) / c, out=xhat)
    s64 = s.astype(xp.float64)
    r64 = 1.0 / xp.sqrt(rowsum(xhat * xhat) / c + eps / s64 ** 2)  # float64: eps / s^2 underflows float32
    rstd[...] = r64 / s64  # the true 1 / sqrt(var(x) + eps), finite
    xhat *= xp.minimum(r64, xp.finfo(x.dtype).max).astype(x.dtype)  # constant rows: xhat = 0 anyway
    xp.multiply(xhat, w, out=out)
    out += b


def layernorm_forward(x, w, b, eps=1e-5):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * w + b."""
    xp = get_array_module(x)
    c = x.shape[-1]

    def rows(x, out, xhat, rstd):
        mean = rowsum(x) / c
        xp.subtract(x, mean, out=xhat)  # centred
        var = rowsum(xhat * xhat)
        var /= c  # biased variance, as torch
        if bool(xp.isinf(var).any() | xp.isinf(mean).any()):  # |x| beyond ~1e19 in float32
            return _layernorm_rows_scaled(x, out, xhat, rstd, w, b, eps)
        var += eps
        xp.sqrt(var, out=var)
        xp.divide(1.0, var, out=rstd)
        xhat *= rstd
        xp.multiply(xhat, w, out=out)
        out += b

    out, xhat = xp.empty_like(x, order="C"), xp.empty_like(x, order="C")
    rstd = xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    row_chunks(rows, [x], [out, xhat, rstd])
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """Return (dx, dw, db) of layernorm_forward."""
    xhat, rstd, w = cache
    xp = get_array_module(dout)
    c = xhat.shape[-1]
    dw = colsum((dout * xhat).reshape(-1, c))
    db = colsum(dout.reshape(-1, c))

    def rows(dout, xhat, rstd, dx):
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * w
        xp.multiply(dout, w, out=dx)
        m2 = rowsum(dx * xhat)
        m2 /= c
        dx -= rowsum(dx) / c
        dx -= xhat * m2
        dx *= rstd

    dx = xp.empty_like(xhat, order="C")
    row_chunks(rows, [dout, xhat, rstd], [dx])
    return dx, dw, db


# --- GELU -------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# float32 Phi(x) by linear interpolation in a 16385-entry table on [-10, 10] (built once from our
# float64 erf): ~10 NumPy passes instead of ~30 for the rational erf. Interpolation error
# h^2/8 * max|Phi''| = 4.5e-8 and index rounding ~1e-9: below float32's resolution of Phi.
_PHI_LO, _PHI_N = -10.0, 16384
_PHI_INV_H = _PHI_N / (2 * -_PHI_LO)
_PHI_TABLE = None


def _phi_table():
    """(values, differences) of Phi on the grid, float32, built on first use."""
    global _PHI_TABLE
    if _PHI_TABLE is None:
        import numpy as np

        grid = np.linspace(_PHI_LO, -_PHI_LO, _PHI_N + 1)
        phi = 0.5 * (1.0 + erf(grid * _INV_SQRT_2))
        _PHI_TABLE = (phi.astype(np.float32), np.append(np.diff(phi), 0.0).astype(np.float32))
    return _PHI_TABLE


def _phi32_block(x, cdf):
    """float32 Phi(x) into cdf, by table interpolation (NumPy only)."""
    import numpy as np

    values, diffs = _phi_table()
    half = _PHI_N // 2
    u = x * np.float32(_PHI_INV_H)  # grid units from 0: relative precision, no large offset
    np.clip(u, -half, half, out=u)  # beyond +-10, Phi is 0 or 1 to float32 precision
    i = np.floor(u)
    u -= i  # fractional position in the cell, exact
    i = i.astype(np.intp)  # intp indices: the fast path of take
    i += half
    # mode="clip" keeps the index valid without a pass of its own (NaN casts to INT_MIN; it stays in u)
    np.take(values, i, out=cdf, mode="clip")
    d = np.take(diffs, i, mode="clip")
    d *= u
    cdf += d


def _gelu_erf_block(x, out, cdf):
    """out = x * Phi(x) and cdf = Phi(x) = (1 + erf(x / sqrt 2)) / 2 on one block."""
    if x.dtype.name == "float32" and get_array_module(x).__name__ == "numpy":
        _phi32_block(x, cdf)
    else:
        cdf[...] = erf(x * _INV_SQRT_2)
        cdf += 1.0
        cdf *= 0.5
    get_array_module(x).multiply(x, cdf, out=out)


def _gelu_erf_train_block(x, out, dg):
    """out = x Phi(x) and dg = GELU'(x) = Phi(x) + x phi(x) on one block."""
    xp = get_array_module(x)
    _gelu_erf_block(x, out, dg)  # dg holds Phi(x) so far
    pdf = x * x
    pdf *= -0.5
    xp.exp(pdf, out=pdf)
    pdf *= _INV_SQRT_2PI
    pdf *= x
    dg += pdf


def _gelu_erf_inplace_block(x):
    """x = x * Phi(x) in place on one block, Phi in a block-sized scratch."""
    _gelu_erf_block(x, x, get_array_module(x).empty_like(x))


def gelu_inplace(x, kind="erf"):
    """GELU overwriting x, with nothing kept for backward: inference on a buffer we own."""
    if kind != "erf":
        x[...] = gelu_forward(x, kind)[0]
        return x
    in_place_blocks(_gelu_erf_inplace_block, [], [x])
    return x


def gelu_forward(x, kind="erf"):
    """GELU: exact x * Phi(x) ('erf') or torch's tanh approximation ('tanh')."""
    xp = get_array_module(x)
    if kind == "erf":
        # keep GELU'(x) rather than x: backward is one multiply, and x can be freed
        out, dg = xp.empty_like(x, order="C"), xp.empty_like(x, order="C")
        ew_chunks(_gelu_erf_train_block, [x], [out, dg])
        return out, (None, dg, kind)
    if kind == "tanh":
        u = x * x
        u *= 0.044715
        u += 1.0
        u *= x
        u *= _SQRT_2_OVER_PI  # u = sqrt(2/pi) * (x + 0.044715 x^3)
        # 0.5 (1 + tanh u) = sigmoid(2u); with e = exp(-2|u|) it neither cancels nor overflows
        e = xp.abs(u)
        e *= -2.0
        xp.exp(e, out=e)
        s = xp.where(u >= 0, 1.0, e).astype(x.dtype, copy=False)
        e += 1.0
        s /= e
        return x * s, (x, s, kind)
    raise ValueError(f"unknown GELU kind {kind!r}: use 'erf' or 'tanh'")


def gelu_backward(dout, cache):
    """Return dx of gelu_forward."""
    x, c, kind = cache
    if kind == "erf":
        return dout * c  # c = GELU'(x), computed in forward
    xp = get_array_module(x)
    # tanh kind, c = sigmoid(2u): d/dx [x c] = c + 2 x c (1 - c) u'(x)
    x = xp.clip(x, -1e4, 1e4)  # beyond, c (1 - c) is exactly 0: keep x^3 from inf * 0 = NaN
    du = x * x
    du *= 3 * 0.044715
    du += 1.0
    du *= 2 * _SQRT_2_OVER_PI  # 2 u'(x)
    du *= x
    du *= c
    du *= 1.0 - c
    du += c
    du *= dout
    return du


# --- softmax ----------------------------------------------------------------------------------


def _softmax_rows(x, y):
    """Softmax of a block of rows into y."""
    xp = get_array_module(x)
    xp.subtract(x, x.max(axis=-1, keepdims=True), out=y)  # shift by the row max: no overflow
    xp.exp(y, out=y)
    y /= rowsum(y)


def _softmax_grad_rows(dout, y, dx):
    """dx = y * (dout - sum(dout * y)) for a block of rows."""
    xp = get_array_module(dout)
    xp.multiply(dout, y, out=dx)
    xp.subtract(dout, rowsum(dx), out=dx)
    dx *= y


def softmax_forward(x):
    """Softmax over the last axis, stable for any finite logits."""
    y = get_array_module(x).empty_like(x, order="C")
    row_chunks(_softmax_rows, [x], [y])
    return y, y


def softmax_backward(dout, cache):
    """Return dx of softmax_forward: y * (dout - sum(dout * y))."""
    y = cache
    dx = get_array_module(y).empty_like(y, order="C")
    row_chunks(_softmax_grad_rows, [dout, y], [dx])
    return dx


# --- dropout ----------------------------------------------------------------------------------


def dropout_forward(x, p, rng=None, train=True):
    """Inverted dropout with an explicit RNG (numpy/cupy Generator); identity at eval or p=0."""
    if not train or p == 0.0:
        return x, None
    if rng is None:
        raise ValueError("dropout in training needs an explicit rng")
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    mask = keep.astype(x.dtype)
    mask *= 1.0 / (1.0 - p)
    return x * mask, mask


def dropout_backward(dout, cache):
    """Return dx of dropout_forward."""
    return dout if cache is None else dout * cache


# --- multi-head self-attention ----------------------------------------------------------------


def attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, heads, attn_drop=0.0, rng=None, train=False):
    """Multi-head self-attention with fused qkv on x (B, N, C), as timm's Attention."""
    xp = get_array_module(x)
    B, N, C = x.shape
    D = C // heads
    qkv, qkv_cache = linear_forward(x, w_qkv, b_qkv)  # (B, N, 3C)
    # contiguous heads: batched matmuls on strided views fall off BLAS in NumPy (~4x slower)
    qkv = xp.ascontiguousarray(qkv.reshape(B, N, 3, heads, D).transpose(2, 0, 3, 1, 4))  # (3, B, H, N, D)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = D ** -0.5
    q *= scale  # scaling q (N x D) is cheaper than scaling the scores (N x N)
    s = q @ k.transpose(0, 1, 3, 2)  # (B, H, N, N)
    a, sm_cache = softmax_forward(s)
    a_d, drop_cache = dropout_forward(a, attn_drop, rng, train)
    o = a_d @ v  # (B, H, N, D)
    o = o.transpose(0, 2, 1, 3).reshape(B, N, C)  # (B, N, C)
    out, proj_cache = linear_forward(o, w_proj, b_proj)
    return out, (qkv_cache, q, k, v, a_d, sm_cache, drop_cache, proj_cache, heads, scale)


def attention_backward(dout, cache, need_dx=True):
    """Return (dx, dw_qkv, db_qkv, dw_proj, db_proj) of attention_forward."""
    qkv_cache, q, k, v, a_d, sm_cache, drop_cache, proj_cache, heads, scale = cache
    xp = get_array_module(dout)
    B, H, N, D = q.shape
    do, dw_proj, db_proj = linear_backward(dout, proj_cache)  # (B, N, C)
    do = xp.ascontiguousarray(do.reshape(B, N, H, D).transpose(0, 2, 1, 3))  # (B, H, N, D)
    dqkv = xp.empty((3, B, H, N, D), dtype=dout.dtype)  # dq, dk, dv written in place
    xp.matmul(a_d.transpose(0, 1, 3, 2), do, out=dqkv[2])  # dv (B, H, N, D)
    da = do @ v.transpose(0, 1, 3, 2)  # (B, H, N, N)
    da = dropout_backward(da, drop_cache)
    ds = softmax_backward(da, sm_cache)
    xp.matmul(ds, k, out=dqkv[0])
    dqkv[0] *= scale  # dq; q is cached already scaled
    xp.matmul(ds.transpose(0, 1, 3, 2), q, out=dqkv[1])  # dk
    dqkv = dqkv.transpose(1, 3, 0, 2, 4).reshape(B, N, 3 * H * D)  # (B, N, 3C)
    dx, dw_qkv, db_qkv = linear_backward(dqkv, qkv_cache, need_dx)
    return dx, dw_qkv, db_qkv, dw_proj, db_proj


# --- patch embedding --------------------------------------------------------------------------


def patch_embed_forward(x, w, b):
    """Conv2d(kernel = stride = P) on x (B, C, H, W) as reshape + matmul -> (B, N, D)."""
    B, C, H, W = x.shape
    Dm, _, P, _ = w.shape
    hp, wp = H // P, W // P
    p = x.reshape(B, C, hp, P, wp, P).transpose(0, 2, 4, 1, 3, 5)  # (B, hp, wp, C, P, P)
    p = p.reshape(B, hp * wp, C * P * P)  # (B, N, C*P*P), rows in conv-weight order
    out, lin_cache = linear_forward(p, w.reshape(Dm, C * P * P), b)  # (B, N, D)
    return out, (lin_cache, x.shape, w.shape)


def patch_embed_backward(dout, cache, need_dx=True):
    """Return (dx, dw, db) of patch_embed_forward; dx is None when not needed."""
    lin_cache, x_shape, w_shape = cache
    B, C, H, W = x_shape
    P = w_shape[2]
    dp, dw, db = linear_backward(dout, lin_cache, need_dx)
    dw = dw.reshape(w_shape)  # (D, C, P, P)
    if not need_dx:
        return None, dw, db
    dp = dp.reshape(B, H // P, W // P, C, P, P).transpose(0, 3, 1, 4, 2, 5)  # (B, C, hp, P, wp, P)
    return dp.reshape(B, C, H, W), dw, db


# --- softmax cross-entropy --------------------------------------------------------------------


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy over the batch; labels are int class ids (B,)."""
    xp = get_array_module(logits)
    B, K = logits.shape
    z = logits - logits.max(axis=1, keepdims=True)
    lse = xp.log(xp.exp(z).sum(axis=1, keepdims=True))
    logp = z - lse  # (B, K) log-probabilities
    rows = xp.arange(B)
    nll = -logp[rows, labels]
    if label_smoothing:
        # target = (1 - e) * onehot + e / K, as torch's CrossEntropyLoss(label_smoothing=e)
        nll = (1.0 - label_smoothing) * nll - (label_smoothing / K) * logp.sum(axis=1)
    loss = nll.mean()
    return loss, (logp, labels, label_smoothing)


def cross_entropy_backward(dloss, cache):
    """Return dlogits of cross_entropy_forward for an upstream scalar dloss (usually 1.0)."""
    logp, labels, eps = cache
    xp = get_array_module(logp)
    B, K = logp.shape
    dlogits = xp.exp(logp)  # softmax
    if eps:
        dlogits -= eps / K
    dlogits[xp.arange(B), labels] -= 1.0 - eps
    dlogits *= dloss / B
    return dlogits
