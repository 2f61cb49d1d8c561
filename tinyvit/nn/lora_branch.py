"""The adapters' own backward beside the merged weight the model runs (tinyvit.nn.lora.adapted_block).

Low-rank gradients: a LoRA adapter's gradients through its frozen weight's are dA = s B^T G, dB = s G A^T
with G = dy^T x, a GEMM as large as the linear's; where nothing else needs G (the weight, its bias and
LayerScale frozen), they are taken low-rank instead, dA = s (dy B)^T x and dB = s dy^T (x A^T), so the
frozen base costs only its input gradient, as under PEFT. DoRA's magnitude needs G: it keeps the weight form.

Dropout (PEFT's lora_dropout) in training: with x_d = dropout(x) on the branch's input, PEFT's output
differs from x W_eff^T + b by (x_d - x) (W_eff - W)^T, for LoRA (W_eff - W = s B A) and DoRA (g W' - W,
the norm in g held constant) alike: each adapted linear adds that correction, low-rank for LoRA, dense
for DoRA. Its backward gives the adapters' (and the frozen weight's) extra gradients and an extra input
gradient, (mask - 1) * (dy (W_eff - W)), which the fused layer adds to its own.
Plain form: reference.lora_forward (with the dropout mask) and reference.lora_backward.
"""
from typing import Any, NamedTuple, Optional

from .caches import GeluLinearCache, LayerNormLinearCache
from .layers import dropout_forward
from .lora import A, B, LoraWeightCache, M, linear_of, lora_weight_backward, rows_of, weight_key

Array = Any


class DropBranch(NamedTuple):
    """One adapter's correction: its name, the keep mask and x_d - x, and the rank-r v = (x_d - x) A^T
    (LoRA) or the dense W_eff - W (DoRA)."""

    name: str  # blocks.{i}.attn.qkv, blocks.{i}.attn.q, ...
    mask: Array  # (T, in) scaled keep mask
    delta: Array  # (T, in) x_d - x
    rows: Optional[slice]  # the rows of qkv's output it adds to (q, k, v), or None: all
    w: LoraWeightCache
    v: Optional[Array] = None  # (T, r), LoRA
    dw: Optional[Array] = None  # (out, in), DoRA


class LoraDropCache(NamedTuple):
    """lora_drop_forward on one linear: each adapter's branch, and LayerScale's gamma with the corrections
    it scaled (None without LayerScale)."""

    branches: tuple
    gamma: Optional[Array] = None  # (out,)
    corr: Optional[Array] = None  # (T, out) the corrections before gamma


def linear_input(cache):
    """The input a fused linear ran on, made again from its cache: the norm's output (affine included)
    for layernorm_linear, dropout(GELU(h)) for gelu_linear, the input itself for a plain linear."""
    if isinstance(cache, LayerNormLinearCache):
        if not cache.fold:
            return cache.lin.x
        return cache.ln.xhat * cache.ln_w + cache.ln_b
    if isinstance(cache, GeluLinearCache):
        y = cache.gelu.x * cache.gelu.c
        return y if cache.mask is None else y * cache.mask
    return cache.x  # LinearCache


def _branch(name, c: LoraWeightCache, x2, p_drop, rng):
    """One adapter's DropBranch and its correction (T, out) for input rows x2 (T, in)."""
    rows = rows_of(name, x2.shape[1])
    x_d, mask = dropout_forward(x2, p_drop, rng, True)
    delta = x_d - x2  # (T, in)
    if c.g is None:  # LoRA: s (x_d - x) A^T B^T, rank r throughout
        v = delta @ c.a.T  # (T, r)
        return DropBranch(name, mask, delta, rows, c, v=v), (c.scale * v) @ c.b.T
    dw = (c.g - 1)[:, None] * c.w1 + c.scale * (c.b @ c.a)  # g W' - W: (out, in)
    return DropBranch(name, mask, delta, rows, c, dw=dw), delta @ dw.T


def lora_drop_forward(c_lora, linear, cache, y, p_drop, rng, gamma=None):
    """Add PEFT's branch dropout to y, the output of the linear named `linear` ('attn.qkv', ...) whose
    fused layer left `cache`, in place (times LayerScale's gamma where it has one); returns the
    LoraDropCache, or None when no adapter sits on this linear or nothing drops."""
    ads = [(n, c) for n, c in c_lora or () if linear_of(n) == linear]
    if not ads or not p_drop:
        return None
    x = linear_input(cache)
    x2 = x.reshape(-1, x.shape[-1])  # (T, in)
    y2 = y.reshape(-1, y.shape[-1])  # (T, out), a view: y changes in place
    branches, corr = [], None
    for name, c in ads:
        br, d = _branch(name, c, x2, p_drop, rng)
        branches.append(br)
        if gamma is not None:  # proj and fc2 alone have LayerScale: one adapter, all rows
            corr = d
            d = d * gamma
        if br.rows is None:
            y2 += d
        else:
            y2[:, br.rows] += d
    return LoraDropCache(tuple(branches), gamma, corr)


def low_rank_linears(c_lora, trains):
    """The block's linears ('attn.qkv', ...) whose adapters take their gradients low-rank: LoRA's (not
    DoRA's) on a linear whose own weight, bias and LayerScale do not train (trains(linear) False)."""
    return {linear_of(n) for n, c in c_lora or () if c.g is None and not trains(linear_of(n))}


def lora_branch_backward(dy, c_lora, linear, cache, drop, low_rank, gamma, extra):
    """The adapters' own backward at `linear`, given dL/dy of its output (after LayerScale's gamma): the
    low-rank gradients (low_rank; `cache` is the fused layer's, whose input is made again), then dropout's
    part (drop: lora_drop_forward's cache, or None). The gradients go into `extra` (the adapters' by name;
    a frozen weight's under ('weight', adapter name)); returns (the extra input gradient shaped as dy with
    the input's width, or None; gamma's extra gradient, or None)."""
    dy2 = dy.reshape(-1, dy.shape[-1])  # (T, out)
    d_gamma = None
    if drop is not None and drop.gamma is not None:
        d_gamma = (dy2 * drop.corr).sum(axis=0)  # (out,)
    if gamma is not None:
        dy2 = dy2 * gamma  # the gradient at the linear's own output
    if low_rank:
        x = linear_input(cache)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        for name, c in c_lora:
            if linear_of(name) == linear:
                rows = rows_of(name, x2.shape[1])
                d = dy2 if rows is None else dy2[:, rows]  # (T, out of this adapter)
                _add(extra, f"{name}.{A}", c.scale * ((d @ c.b).T @ x2))  # s (dy B)^T x: (r, in)
                _add(extra, f"{name}.{B}", c.scale * (d.T @ (x2 @ c.a.T)))  # s dy^T (x A^T): (out, r)
    if drop is None:
        return None, d_gamma
    return _drop_backward(dy2, drop, extra).reshape(dy.shape[:-1] + (-1,)), d_gamma


def _drop_backward(dy2, cache, extra):
    """The dropout corrections' backward, given the linear's own output gradient (T, out): the gradients
    into extra, the extra input gradient (T, in) returned."""
    dx = None
    for br in cache.branches:
        d = dy2 if br.rows is None else dy2[:, br.rows]  # (T, out of this adapter)
        c = br.w
        if br.v is not None:  # LoRA
            u = d @ c.b  # (T, r)
            _add(extra, f"{br.name}.{A}", c.scale * (u.T @ br.delta))
            _add(extra, f"{br.name}.{B}", c.scale * (d.T @ br.v))
            dxi = (c.scale * u) @ c.a  # (T, in); the frozen weight gets nothing: the branch holds no W
        else:  # DoRA: through W_eff as the weight form, then W's own share (g - 1) dW_eff
            g = d.T @ br.delta  # (out, in)
            gw, da, db, dm = lora_weight_backward(g, c)
            _add(extra, f"{br.name}.{A}", da)
            _add(extra, f"{br.name}.{B}", db)
            _add(extra, f"{br.name}.{M}", dm)
            _add(extra, ("weight", br.name), gw - g)
            dxi = d @ br.dw
        dxi *= br.mask - 1  # through x_d - x = x (mask - 1)
        dx = dxi if dx is None else dx + dxi
    return dx


def _add(extra, key, g):
    """extra[key] += g (set when absent)."""
    extra[key] = g if key not in extra else extra[key] + g


def add_extra(grads, extra):
    """Add the branches' gradients (lora_branch_backward's `extra`) into grads, after adapter_grads wrote the
    weight form's (set where it wrote none: the low-rank ones), the frozen weights' into their rows
    where grads holds them."""
    for key, g in extra.items():
        if isinstance(key, tuple):  # the frozen weight an adapter sits on (qkv's rows for q, k, v)
            wkey, rows = weight_key(key[1]), rows_of(key[1], g.shape[1])
            if grads.get(wkey) is not None:
                if rows is None:
                    grads[wkey] += g
                else:
                    grads[wkey][rows] += g
        elif grads.get(key) is not None:
            grads[key] += g
        elif not key.endswith(".gamma"):  # a low-rank adapter's; a frozen LayerScale gets none
            grads[key] = g
    return grads
