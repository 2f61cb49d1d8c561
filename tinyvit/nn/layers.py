"""Every ViT layer as a forward/backward function pair over NumPy or CuPy arrays.

Convention (as llm.c): `out, cache = X_forward(...)` and `grads = X_backward(dout, cache)`.
No hidden state; backward never writes into `dout`; every op keeps its input dtype. Each cache is a
NamedTuple of tinyvit.nn.caches, read by field. GELU and softmax live in tinyvit.nn.activations and
are re-exported here.
"""
import numpy as np

from ..backend import get_array_module
from ..cpu.bf16 import gemm_bf16, to_bf16
from ..cpu.threads import row_chunks
from . import kernels
from .activations import (  # noqa: F401  (re-exported: layers is the one place to find every layer)
    gelu_backward,
    gelu_forward,
    gelu_inplace,
    softmax_backward,
    softmax_forward,
    softmax_parts,
    softmax_parts_backward,
)
from .caches import (
    AttentionCache,
    AttentionHeadsCache,
    CrossEntropyCache,
    GeluLinearCache,
    LayerNormCache,
    LayerNormLinearCache,
    LinearCache,
    PatchEmbedCache,
)
from .special import colsum, rowsum  # noqa: F401  (colsum re-exported)

# --- linear -----------------------------------------------------------------------------------


def linear_forward(x, w, b=None, bf16=False):
    """y = x @ w.T + b for x (..., in), w (out, in) in torch layout, b (out,) (plain form: reference.linear_forward).

    bf16 (NumPy): this GEMM and backward's in bfloat16 with float32 sums (tinyvit.cpu.bf16; the caller has
    checked the CPU with its require()), w rounded here (True) or given as its bf16 bits (to_bf16(w), made
    once for many calls); bias, output and gradients stay float32, as under torch's CPU autocast."""
    x2 = x.reshape(-1, x.shape[-1])  # one 2-D GEMM: NumPy runs a 3-D @ 2-D product as many small, slower ones
    w16 = None
    if isinstance(bf16, np.ndarray) or bf16:
        w16 = bf16 if isinstance(bf16, np.ndarray) else to_bf16(w)
        out = gemm_bf16(x2, w16, transb=True, allow_slow=True)  # (M, out)
    else:
        out = x2 @ w.T  # (M, out)
    if b is not None:
        out += b
    return out.reshape(x.shape[:-1] + (w.shape[0],)), LinearCache(x, w, b is not None, w16)


def linear_backward(dout, cache, need_dx=True, need_dw=True):
    """Return (dx, dw, db); db is None when the layer has no bias, dx None if not need_dx, dw and db None
    if not need_dw (a frozen layer: no weight-gradient GEMM, no bias sum) (plain form: reference.linear_backward)."""
    x = cache.x
    d_out = dout.shape[-1]
    dout2 = dout.reshape(-1, d_out)  # (M, out)
    dw = db = None
    w16 = cache.w16  # bf16 GEMMs: dout rounded once for both
    d16 = to_bf16(dout2) if w16 is not None and (need_dw or need_dx) else None
    if need_dw:
        x2 = x.reshape(-1, x.shape[-1])
        dw = dout2.T @ x2 if w16 is None else gemm_bf16(d16, x2, transa=True, allow_slow=True)  # (out, in)
        db = colsum(dout2) if cache.has_b else None
    dx = None
    if need_dx:
        dx = dout2 @ cache.w if w16 is None else gemm_bf16(d16, w16, allow_slow=True)
        dx = dx.reshape(dout.shape[:-1] + cache.w.shape[1:])  # (..., in)
    return dx, dw, db


# --- layernorm --------------------------------------------------------------------------------


def _layernorm_rows_scaled(x, xhat, rstd, eps):
    """Normalise rows whose sums overflow: x / max|x| per row first, which is the same math.

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


def _stats_overflow(mean, var):
    """True when some row's mean or variance overflowed (|x| beyond ~1e19 in float32)."""
    xp = get_array_module(mean)
    return bool(xp.isinf(var).any() | xp.isinf(mean).any())


def layernorm_forward(x, w, b, eps=1e-5):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * w + b.

    w = b = None leaves out the affine: the output is xhat itself (layernorm_linear_forward folds
    the affine into the next linear). Plain form: reference.layernorm_forward."""
    xp = get_array_module(x)
    if xp is not np:  # CuPy: fused kernels, no host check of the statistics
        return _layernorm_fused(x, w, b, eps)
    c = x.shape[-1]

    def rows(x, xhat, rstd, *out):
        mean = rowsum(x) / c
        xp.subtract(x, mean, out=xhat)  # centred
        var = rowsum(xhat * xhat)
        var /= c  # biased variance, as torch
        if _stats_overflow(mean, var):
            _layernorm_rows_scaled(x, xhat, rstd, eps)
        else:
            var += eps
            xp.sqrt(var, out=var)
            xp.divide(1.0, var, out=rstd)
            xhat *= rstd
        for y in out:  # the affine (when there is one), while the block is in cache
            xp.multiply(xhat, w, out=y)
            y += b

    xhat, rstd = xp.empty_like(x, order="C"), xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    outs = [xhat, rstd] if w is None else [xhat, rstd, xp.empty_like(x, order="C")]
    row_chunks(rows, [x], outs)
    return outs[-1] if w is not None else xhat, LayerNormCache(xhat, rstd, w)


def _layernorm_fused(x, w, b, eps):
    """layernorm_forward on CuPy: fused kernels that handle overflowing rows on the device."""
    if w is None:
        xhat, rstd = kernels.layernorm(x, eps)
        return xhat, LayerNormCache(xhat, rstd, w)
    xhat, rstd, y = kernels.layernorm(x, eps, w, b)
    return y, LayerNormCache(xhat, rstd, w)


def layernorm_backward(dout, cache, need_dx=True, need_dw=True):
    """Return (dx, dw, db) of layernorm_forward (dw = db = None without an affine or need_dw, dx None
    without need_dx); plain form: reference.layernorm_backward."""
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    xp = get_array_module(dout)
    c = xhat.shape[-1]
    dw = None if w is None or not need_dw else colsum((dout * xhat).reshape(-1, c))
    db = None if w is None or not need_dw else colsum(dout.reshape(-1, c))
    if not need_dx:
        return None, dw, db
    if xp is not np:
        return kernels.layernorm_grad(dout, xhat, rstd, w), dw, db

    def rows(dout, xhat, rstd, dx):
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * w
        dxhat = dout if w is None else xp.multiply(dout, w, out=dx)
        m2 = rowsum(dxhat * xhat)
        m2 /= c
        xp.subtract(dxhat, rowsum(dxhat) / c, out=dx)
        dx -= xhat * m2
        dx *= rstd

    dx = xp.empty_like(xhat, order="C")
    row_chunks(rows, [dout, xhat, rstd], [dx])
    return dx, dw, db


def layernorm_linear_forward(x, ln_w, ln_b, w, b, eps=1e-5, bf16=False):
    """linear(layernorm(x)), with the norm's affine folded into the linear when that is cheaper
    (bf16: the linear's GEMMs in bfloat16, as linear_forward; the norm in float32).

    (xhat * g + beta) @ w.T + b = xhat @ (w * g).T + (w @ beta + b). Folded, xhat feeds the GEMM
    directly: two passes over x fewer forward and about four backward, for about five passes over
    w. So we fold when w has fewer rows (outputs) than x has rows (tokens), as in small models.
    Plain form: reference.layernorm_forward, then reference.linear_forward."""
    fold = w.shape[0] < x.size // x.shape[-1]
    if not fold:
        y, c_ln = layernorm_forward(x, ln_w, ln_b, eps)
        out, c_lin = linear_forward(y, w, b, bool(bf16))
        return out, LayerNormLinearCache(c_ln, c_lin, fold)
    xhat, c_ln = layernorm_forward(x, None, None, eps)
    b_fold = w @ ln_b if b is None else w @ ln_b + b  # (out,)
    out, c_lin = linear_forward(xhat, w * ln_w, b_fold, bool(bf16))  # w * ln_w scales column i by g_i
    return out, LayerNormLinearCache(c_ln, c_lin, fold, w, ln_w, ln_b, b is not None)


def layernorm_linear_backward(dout, cache, need_dx=True, need_dw=True, need_ln_dw=True, dy_extra=None):
    """Return (dx, d ln_w, d ln_b, dw, db) of layernorm_linear_forward; db is None without a bias, dw and
    db None without need_dw (the linear frozen), d ln_w and d ln_b None without need_ln_dw (the norm's
    affine frozen), dx None without need_dx (plain form: reference.linear_backward, then
    reference.layernorm_backward). dy_extra: more gradient at the linear's input (a LoRA branch's)."""
    if not cache.fold:
        dy, dw, db = linear_backward(dout, cache.lin, need_dx or need_ln_dw, need_dw)
        dx = d_ln_w = d_ln_b = None
        if dy is not None:
            if dy_extra is not None:
                dy += dy_extra
            dx, d_ln_w, d_ln_b = layernorm_backward(dy, cache.ln, need_dx, need_ln_dw)
        return dx, d_ln_w, d_ln_b, dw, db
    w, ln_w, ln_b = cache.w, cache.ln_w, cache.ln_b
    dxhat, dw_fold, db_fold = linear_backward(dout, cache.lin, need_dx, need_dw or need_ln_dw)
    dw = db = d_ln_w = d_ln_b = dx = None
    if need_dw:
        dw = dw_fold * ln_w  # through w * g ...
        dw += db_fold[:, None] * ln_b  # ... and through w @ beta: (out, in)
        db = db_fold if cache.has_b else None
    if need_ln_dw:
        d_ln_w = colsum(w * dw_fold)  # sum over outputs of w_oi * dL/dw'_oi: (in,)
        d_ln_b = db_fold @ w  # (in,)
        if dy_extra is not None:  # y = xhat * g + beta feeds the extra path
            e2 = dy_extra.reshape(-1, dy_extra.shape[-1])  # (T, in)
            d_ln_w += colsum(e2 * cache.ln.xhat.reshape(e2.shape))
            d_ln_b += colsum(e2)
    if need_dx:
        if dy_extra is not None:
            dxhat += dy_extra * ln_w
        dx, _, _ = layernorm_backward(dxhat, cache.ln)
    return dx, d_ln_w, d_ln_b, dw, db


def gelu_linear_forward(x, w, b=None, kind="erf", p_drop=0.0, rng=None, train=True, bf16=False):
    """linear(dropout(gelu(x))), the MLP's second half, caching x and GELU's factor c (gelu = x c)
    instead of the linear's input: backward remakes that input in one pass, so the forward keeps
    two fc1-sized arrays, as a GELU that stored its derivative would, without computing it (bf16: the
    linear's GEMMs in bfloat16, as linear_forward; GELU in float32).
    Plain form (no dropout): reference.gelu_forward, then reference.linear_forward."""
    y, c_g = gelu_forward(x, kind)
    y, mask = dropout_forward(y, p_drop, rng, train)
    out, c_lin = linear_forward(y, w, b, bf16)
    return out, GeluLinearCache(c_g, mask, c_lin.w, c_lin.has_b, c_lin.w16)  # y is freed here


def gelu_linear_backward(dout, cache, need_dx=True, need_dw=True, dy_extra=None):
    """Return (dx, dw, db) of gelu_linear_forward; db is None without a bias, dw and db None without
    need_dw (the input is then not remade), dx None without need_dx (plain form, no dropout:
    reference.linear_backward, then reference.gelu_backward). dy_extra: more gradient at the linear's input."""
    y = None
    if need_dw:
        y = cache.gelu.x * cache.gelu.c  # the GELU output again
        if cache.mask is not None:
            y *= cache.mask  # and its dropout
    dy, dw, db = linear_backward(dout, LinearCache(y, cache.w, cache.has_b, cache.w16), need_dx, need_dw)
    del y
    if not need_dx:
        return None, dw, db
    if dy_extra is not None:
        dy += dy_extra
    dy = dropout_backward(dy, cache.mask)
    return gelu_backward(dy, cache.gelu), dw, db


# --- dropout ----------------------------------------------------------------------------------


def dropout_forward(x, p_drop, rng=None, train=True):
    """Inverted dropout with an explicit RNG (numpy/cupy Generator); identity at eval or p_drop=0.

    The cache is the scaled keep mask, or None when nothing is dropped (the reference has no dropout)."""
    if not train or p_drop == 0.0:
        return x, None
    if rng is None:
        raise ValueError("dropout in training needs an explicit rng")
    keep = rng.random(x.shape, dtype=x.dtype) >= p_drop
    mask = keep.astype(x.dtype)
    mask *= 1.0 / (1.0 - p_drop)
    return x * mask, mask


def dropout_backward(dout, cache):
    """Return dx of dropout_forward."""
    return dout if cache is None else dout * cache


# --- multi-head self-attention ----------------------------------------------------------------


def _finite_total(x):
    """True when x holds no inf or NaN (checked through one BLAS row-sum, not a boolean pass)."""
    return bool(get_array_module(x).isfinite(rowsum(x.reshape(-1, x.shape[-1])).sum()))


def attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, heads, attn_drop=0.0, rng=None, train=False, bf16=False):
    """Multi-head self-attention with fused qkv on x (B, N, C), as timm's Attention (tests only: the model
    runs layernorm_linear_forward, then attention_heads_forward); plain form: reference.attention_forward."""
    qkv, c_qkv = linear_forward(x, w_qkv, b_qkv, bf16)  # (B, N, 3C)
    out, c_heads = attention_heads_forward(qkv, w_proj, b_proj, heads, attn_drop, rng, train, bf16=bf16)
    return out, AttentionCache(c_qkv, c_heads)


def attention_backward(dout, cache, need_dx=True):
    """Return (dx, dw_qkv, db_qkv, dw_proj, db_proj) of attention_forward (tests only); plain form:
    reference.attention_backward."""
    dqkv, dw_proj, db_proj = attention_heads_backward(dout, cache.heads)
    dx, dw_qkv, db_qkv = linear_backward(dqkv, cache.qkv, need_dx)
    return dx, dw_qkv, db_qkv, dw_proj, db_proj


def attention_heads_forward(qkv, w_proj, b_proj, heads, attn_drop=0.0, rng=None, train=False, queries=None,
                            bf16=False):
    """Attention after the qkv linear: softmax(q k^T / sqrt(D)) v per head, then the projection (bf16:
    its GEMMs in bfloat16, as linear_forward; q k^T and p v stay float32).

    queries=n computes the output of the first n tokens only (B, n, C), attending over all N: the
    last block needs just the class token's. Plain form: reference.attention_forward after its qkv linear."""
    xp = get_array_module(qkv)
    B, N, C3 = qkv.shape
    D = C3 // (3 * heads)
    n = N if queries is None else queries
    # views, no copy: each (N, D) head matrix has unit stride along D, which BLAS takes as is
    q, k, v = qkv.reshape(B, N, 3, heads, D).transpose(2, 0, 3, 1, 4)  # each (B, H, N, D)
    scale = D ** -0.5
    # scale q (n x D), cheaper than the scores (n x N), into a contiguous copy: BLAS runs
    # q @ k^T faster on it than on the strided view, and backward's ds^T @ q too (docs/performance.md)
    q = q[:, :, :n] * scale  # (B, H, n, D)
    s = q @ k.transpose(0, 1, 3, 2)  # (B, H, n, N)
    o = xp.empty((B, n, heads, D), dtype=qkv.dtype)  # heads written straight into (B, n, C) order
    ov = o.transpose(0, 2, 1, 3)  # (B, H, n, D) view of it
    e, r = softmax_parts(s)  # softmax = e * r
    e_d, mask = dropout_forward(e, attn_drop, rng, train)
    with np.errstate(over="ignore"):  # an overflow here is caught just below
        xp.matmul(e_d, v, out=ov)
    if xp is np and not _finite_total(o):  # an unshifted e times a huge |v| can overflow: redo with the
        # row max (CuPy's softmax is always shifted: nothing to redo, and no host check)
        e, r = softmax_parts(s, shift=True)
        e_d = e if mask is None else e * mask  # the same dropout mask
        xp.matmul(e_d, v, out=ov)
    del s
    o *= r.transpose(0, 2, 1, 3)  # normalise n x D rows, not n x N ones; in o's memory order
    out, c_proj = linear_forward(o.reshape(B, n, heads * D), w_proj, b_proj, bf16)  # (B, n, C)
    return out, AttentionHeadsCache(q, k, v, e, r, e_d, mask, c_proj, scale)


def attention_probs(heads_cache):
    """The attention probabilities (B, H, n, N) (before dropout) from attention_heads_forward's cache
    (plain form: the `a` of reference.attention_forward's cache)."""
    return heads_cache.e * heads_cache.r


def attention_heads_backward(dout, cache, need_dx=True, need_dw=True, do_extra=None):
    """Return (dqkv, dw_proj, db_proj) of attention_heads_forward; dqkv is (B, N, 3C) for any queries, None
    without need_dx; dw_proj and db_proj None without need_dw (plain form: reference.attention_backward
    up to its qkv linear). do_extra: more gradient at the projection's input (a LoRA branch's)."""
    q, k, v, e, r = cache.q, cache.k, cache.v, cache.e, cache.r
    xp = get_array_module(dout)
    B, H, n, D = q.shape
    N = k.shape[2]
    do, dw_proj, db_proj = linear_backward(dout, cache.proj, need_dx, need_dw)  # (B, n, C)
    if not need_dx:
        return None, dw_proj, db_proj
    if do_extra is not None:
        do += do_extra
    u = (do.reshape(B, n, H, D) * r.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # (B, H, n, D): do * r
    dqkv = xp.empty((B, N, 3, H, D), dtype=dout.dtype)  # the layout qkv had: no copy back
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # each (B, H, N, D), views written in place
    if n < N:
        dq[:, :, n:] = 0  # tokens that asked nothing
        dq = dq[:, :, :n]  # (B, H, n, D)
    xp.matmul(cache.e_d.transpose(0, 1, 3, 2), u, out=dv)
    dr = u @ v.transpose(0, 1, 3, 2)  # (B, H, n, N) = r * dL/d(probs after dropout)
    dr = dropout_backward(dr, cache.mask)
    ds = softmax_parts_backward(dr, e, r)  # dL/ds
    del dr
    xp.matmul(ds, k, out=dq)
    dq *= cache.scale  # q is cached already scaled
    xp.matmul(ds.transpose(0, 1, 3, 2), q, out=dk)
    return dqkv.reshape(B, N, 3 * H * D), dw_proj, db_proj


# --- patch embedding --------------------------------------------------------------------------


def patch_embed_forward(x, w, b, bf16=False):
    """Conv2d(kernel = stride = P) on x (B, Cin, H, W) as reshape + matmul -> (B, N, C) (bf16: in bfloat16,
    as linear_forward); plain form: reference.patch_embed_forward."""
    B, Cin, H, W = x.shape
    C, _, P, _ = w.shape
    hp, wp = H // P, W // P
    patches = x.reshape(B, Cin, hp, P, wp, P).transpose(0, 2, 4, 1, 3, 5)  # (B, hp, wp, Cin, P, P)
    patches = patches.reshape(B, hp * wp, Cin * P * P)  # (B, N, Cin*P*P), rows in conv-weight order
    out, c_lin = linear_forward(patches, w.reshape(C, Cin * P * P), b, bf16)  # (B, N, C)
    return out, PatchEmbedCache(c_lin, x.shape, w.shape)


def patch_embed_backward(dout, cache, need_dx=True, need_dw=True):
    """Return (dx, dw, db) of patch_embed_forward; dx is None when not needed, dw and db without need_dw
    (plain form: reference.patch_embed_backward)."""
    B, Cin, H, W = cache.x_shape
    P = cache.w_shape[2]
    dpatches, dw, db = linear_backward(dout, cache.lin, need_dx, need_dw)  # (B, N, Cin*P*P)
    dw = None if dw is None else dw.reshape(cache.w_shape)  # (C, Cin, P, P)
    if not need_dx:
        return None, dw, db
    dpatches = dpatches.reshape(B, H // P, W // P, Cin, P, P).transpose(0, 3, 1, 4, 2, 5)  # (B, Cin, hp, P, wp, P)
    return dpatches.reshape(B, Cin, H, W), dw, db


# --- softmax cross-entropy --------------------------------------------------------------------


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy over the batch; labels are int class ids (B,) (plain form:
    reference.cross_entropy_forward)."""
    xp = get_array_module(logits)
    B, K = logits.shape
    if xp is not np:
        logp = kernels.log_softmax(logits)  # (B, K) log-probabilities
    else:
        z = logits - logits.max(axis=1, keepdims=True)
        lse = xp.log(xp.exp(z).sum(axis=1, keepdims=True))
        logp = z - lse  # (B, K) log-probabilities
    rows = xp.arange(B)
    nll = -logp[rows, labels]
    if label_smoothing:
        # target = (1 - e) * onehot + e / K, as torch's CrossEntropyLoss(label_smoothing=e)
        nll = (1.0 - label_smoothing) * nll - (label_smoothing / K) * logp.sum(axis=1)
    loss = nll.mean()
    return loss, CrossEntropyCache(logp, labels, label_smoothing)


def cross_entropy_backward(dloss, cache):
    """Return dlogits of cross_entropy_forward for an upstream scalar dloss (usually 1.0); plain form:
    reference.cross_entropy_backward (for dloss = 1)."""
    logp, labels, eps = cache.logp, cache.labels, cache.label_smoothing
    xp = get_array_module(logp)
    B, K = logp.shape
    if xp is not np:
        return kernels.cross_entropy_grad(logp, labels, eps, float(dloss) / B)
    dlogits = xp.exp(logp)  # softmax
    if eps:
        dlogits -= eps / K
    dlogits[xp.arange(B), labels] -= 1.0 - eps
    dlogits *= dloss / B
    return dlogits
