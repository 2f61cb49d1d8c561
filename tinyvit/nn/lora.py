"""LoRA and DoRA on the ViT's linears, as PEFT computes them (peft.tuners.lora: layer.py, dora.py).

LoRA: y = x W^T + b + s dropout(x) A^T B^T, s = alpha / r (rslora: alpha / sqrt(r)), A (r, in), B (out, r).
DoRA: with W' = W + s B A and n = ||W'|| over each output row (PEFT detaches it: no gradient flows
through n), g = m / n; y = b + x W^T + (g - 1) * (x_d W^T) + g * s * x_d A^T B^T, x_d = dropout(x);
without dropout that is y = x (g W')^T + b. W and b are frozen: the pairs give dA, dB, dm and dx.

The layer pair (lora_linear_forward / _backward) is the branch form; the model runs the weight form
(lora_weight / _backward: the linear's weight W_eff = W' or g W', whose gradient G the model's own
backward already computes, then dA = s B^T G', dB = s G' A^T with G' = G or g G, dm = rowsum(G W') / n),
which is the same math whenever no dropout acts on the branch (with dropout, the model adds the difference:
tinyvit.nn.lora_branch). Plain forms: reference.lora_forward.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np

from ..backend import get_array_module
from ..errors import TinyViTError
from .layers import dropout_backward, dropout_forward
from .special import rowsum

TARGETS = ("qkv", "q", "k", "v", "proj", "fc1", "fc2")  # tinyvit's linears; q, k, v: rows of the fused qkv
LINEAR = {"qkv": "attn.qkv", "q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv", "proj": "attn.proj",
          "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
ROWS = {"q": 0, "k": 1, "v": 2}  # which third of qkv's rows
ALIASES = {"query": "q", "q_proj": "q", "key": "k", "k_proj": "k", "value": "v", "v_proj": "v",
           "o_proj": "proj", "dense": "proj", "out_proj": "proj"}  # PEFT's names on HF's modules
A, B, M = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"  # PEFT's names in its adapter files
Array = Any


@dataclass(frozen=True)
class LoraConfig:
    """Adapters on the targeted linears of every block: rank r, alpha (None: r), dropout on the branch's
    input, rslora (s = alpha / sqrt(r)), dora (a magnitude per output row)."""

    rank: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    targets: tuple = ("qkv",)
    rslora: bool = False
    dora: bool = False

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))  # JSON gives a list
        if type(self.rank) is not int or not 1 <= self.rank <= 65536:
            raise TinyViTError(f"lora rank must be a whole number from 1 to 65536, got {str(self.rank)[:40]}")
        if self.alpha is not None and (type(self.alpha) not in (int, float) or not math.isfinite(self.alpha)
                                       or not 0 < self.alpha <= 1e6):
            raise TinyViTError(f"lora alpha must be a number above 0, at most 1e6, got {str(self.alpha)[:40]}")
        if type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1:
            raise TinyViTError(f"lora dropout must be a number in [0, 1), got {str(self.dropout)[:40]}")
        if type(self.rslora) is not bool or type(self.dora) is not bool:
            raise TinyViTError("lora rslora and dora must be true or false")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) < len(self.targets):
            raise TinyViTError(f"lora targets must be distinct names from {', '.join(TARGETS)}, got "
                               f"{', '.join(map(str, self.targets))[:80] or 'none'}")
        if "qkv" in self.targets and set(self.targets) & set(ROWS):
            raise TinyViTError("lora targets: qkv already covers q, k and v (name qkv, or some of q, k, v)")

    @property
    def scale(self) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rslora."""
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        """Plain dict, for JSON metadata."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "rslora": self.rslora, "dora": self.dora}


def adapter_name(block: int, target: str) -> str:
    """The module an adapter sits on, in params' names: blocks.{i}.attn.qkv, blocks.{i}.attn.q, ... ."""
    return f"blocks.{block}.attn.{target}" if target in ROWS else f"blocks.{block}.{LINEAR[target]}"


def adapter_shapes(lora: LoraConfig, depth: int, dim: int, mlp_dim: int) -> dict:
    """Every adapter parameter's name and shape: lora_A (r, in), lora_B (out, r), DoRA's magnitude (out,)."""
    io = {"qkv": (dim, 3 * dim), "q": (dim, dim), "k": (dim, dim), "v": (dim, dim), "proj": (dim, dim),
          "fc1": (dim, mlp_dim), "fc2": (mlp_dim, dim)}
    shapes = {}
    for i in range(depth):
        for t in lora.targets:
            n_in, n_out = io[t]
            name = adapter_name(i, t)
            shapes[f"{name}.{A}"], shapes[f"{name}.{B}"] = (lora.rank, n_in), (n_out, lora.rank)
            if lora.dora:
                shapes[f"{name}.{M}"] = (n_out,)
    return shapes


def base_weight(params, name):
    """The frozen weight an adapter named `name` acts on: W, or its rows for q, k, v."""
    t = name.rsplit(".", 1)[1]
    w = params[name.rsplit(".", 1)[0] + ".qkv.weight"] if t in ROWS else params[name + ".weight"]
    if t not in ROWS:
        return w
    D = w.shape[1]
    return w[ROWS[t] * D:(ROWS[t] + 1) * D]


def init_adapters(params, lora: LoraConfig, depth, dim, mlp_dim, seed=0) -> dict:
    """Fresh adapters as PEFT inits them: A Kaiming-uniform (a = sqrt(5): U(+-1/sqrt(in))), B zero, and
    DoRA's magnitude the row norms of W (B A = 0), in the params' dtype and array module."""
    rng = np.random.default_rng(seed)
    w0 = params["blocks.0.attn.qkv.weight"] if depth else None
    xp, dtype = (get_array_module(w0), w0.dtype) if w0 is not None else (np, np.float32)
    out = {}
    for k, shape in adapter_shapes(lora, depth, dim, mlp_dim).items():
        if k.endswith(A):
            bound = 1.0 / math.sqrt(shape[1])
            out[k] = xp.asarray(rng.uniform(-bound, bound, size=shape).astype(dtype))
        elif k.endswith(B):
            out[k] = xp.zeros(shape, dtype)
        else:
            w = base_weight(params, k[:-len(M) - 1])
            out[k] = xp.sqrt((w * w).sum(axis=1))
    return out


def add_adapters(params, cfg, lora: LoraConfig, seed=0):
    """(params with fresh adapters (init_adapters), cfg with lora): the model fine-tuning with LoRA starts from."""
    if cfg.lora is not None:
        raise TinyViTError("this model already holds adapters: merge them first (merged_model)")
    new = init_adapters(params, lora, cfg.depth, cfg.dim, cfg.mlp_dim, seed)
    return {**params, **new}, dataclasses.replace(cfg, lora=lora)


BIAS = ("none", "all")  # PEFT's bias settings tinyvit trains: none, or every bias (BitFit)


def trainable_names(params, bias="none") -> list:
    """What LoRA fine-tuning trains: every adapter parameter and the head(s) in full (PEFT's modules_to_save),
    and with bias "all" every bias too (PEFT's bias="all": each name holding "bias", the norms' included)."""
    if bias not in BIAS:
        raise TinyViTError(f"bias must be one of {', '.join(BIAS)}, got {str(bias)[:40]}")
    return [k for k in params if ".lora_" in k or k.startswith(("head.", "head_dist."))
            or (bias == "all" and "bias" in k.rsplit(".", 1)[-1])]


# --- the layer pair: the branch beside a frozen linear --------------------------------------------


class LoraLinearCache(NamedTuple):
    """lora_linear_forward: the input and its dropped copy, the weights, the branch's rank-r activations,
    and DoRA's g = m / n with the base-plus-branch output it scales (None for LoRA)."""

    x_d: Array  # (..., in) dropout(x)
    mask: Optional[Array]
    w: Array  # (out, in)
    a: Array  # (r, in)
    b: Array  # (out, r)
    v: Array  # (..., r) x_d A^T
    scale: float
    g: Optional[Array] = None  # (out,)
    n: Optional[Array] = None  # (out,)
    ul: Optional[Array] = None  # (..., out) x_d W^T + s x_d A^T B^T


def _row_norms(w, a, b, scale):
    """||W + s B A|| over each output row (out,)."""
    w1 = w + scale * (b @ a)
    return get_array_module(w).sqrt((w1 * w1).sum(axis=1))


def lora_linear_forward(x, w, bias, a, b, scale, m=None, p_drop=0.0, rng=None, train=True):
    """y = x W^T + bias + s dropout(x) A^T B^T (LoRA), or DoRA's y with magnitude m; returns (y, cache).
    Plain form: reference.lora_forward."""
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (T, in)
    base = x2 @ w.T  # (T, out)
    x_d, mask = dropout_forward(x2, p_drop, rng, train)
    v = x_d @ a.T  # (T, r)
    lo = v @ b.T  # (T, out)
    if m is None:
        y = base + scale * lo
        g = n = ul = None
    else:
        n = _row_norms(w, a, b, scale)  # a constant to the backward, as PEFT's detach
        g = m / n
        u = base if mask is None else x_d @ w.T
        ul = u + scale * lo
        y = base + (g - 1) * u + g * scale * lo
    if bias is not None:
        y += bias
    return y.reshape(shape + (w.shape[0],)), LoraLinearCache(x_d, mask, w, a, b, v, scale, g, n, ul)


def lora_linear_backward(dout, cache):
    """Return (dx, dA, dB, dm) of lora_linear_forward; dm is None for LoRA (W, b frozen: no gradient).
    Plain form: reference.lora_backward."""
    c = cache
    dy = dout.reshape(-1, dout.shape[-1])  # (T, out)
    if c.g is None:
        dl, dx_d = c.scale * dy, None
        dm = None
    else:
        dm = (dy * c.ul).sum(axis=0) / c.n  # d/dm of g = m / n, n held constant
        dl = (c.g * c.scale) * dy
        dx_d = ((c.g - 1) * dy) @ c.w  # through (g - 1) x_d W^T
    db = dl.T @ c.v  # (out, r)
    dv = dl @ c.b  # (T, r)
    da = dv.T @ c.x_d  # (r, in)
    dx_d = dv @ c.a if dx_d is None else dx_d + dv @ c.a
    dx = dy @ c.w + dropout_backward(dx_d, c.mask)
    return dx.reshape(dout.shape[:-1] + (c.w.shape[1],)), da, db, dm


# --- the weight form: what the model runs ---------------------------------------------------------


class LoraWeightCache(NamedTuple):
    """lora_weight: the adapter's A, B, scale, and for DoRA W' = W + s B A, n and g = m / n."""

    a: Array
    b: Array
    scale: float
    w1: Optional[Array] = None
    n: Optional[Array] = None
    g: Optional[Array] = None


def lora_weight(w, a, b, scale, m=None):
    """The linear's weight with its adapter: W + s B A (LoRA) or g (W + s B A), g = m / ||.|| (DoRA, the
    norm held constant); returns (W_eff, cache)."""
    w1 = w + scale * (b @ a)
    if m is None:
        return w1, LoraWeightCache(a, b, scale)
    n = get_array_module(w).sqrt((w1 * w1).sum(axis=1))
    g = m / n
    return w1 * g[:, None], LoraWeightCache(a, b, scale, w1, n, g)


def lora_weight_backward(dw_eff, cache):
    """Return (dW, dA, dB, dm) from dL/dW_eff; dm is None for LoRA (dW: the frozen weight's, PEFT's)."""
    c = cache
    dm = None
    if c.g is not None:
        dm = rowsum(dw_eff * c.w1)[:, 0] / c.n  # (out,)
        dw_eff = dw_eff * c.g[:, None]
    return dw_eff, c.scale * (c.b.T @ dw_eff), c.scale * (dw_eff @ c.a.T), dm


def merge_adapters(params, lora: LoraConfig) -> dict:
    """params with every adapter merged into its linear (W_eff; DoRA's magnitude applied) and removed:
    a plain model that exports and loads anywhere."""
    out = {k: v for k, v in params.items() if ".lora_" not in k}
    for name in sorted({k[:-len(A) - 1] for k in params if k.endswith(A)}):
        m = params.get(f"{name}.{M}")
        w_eff, _ = lora_weight(base_weight(params, name), params[f"{name}.{A}"], params[f"{name}.{B}"],
                               lora.scale, m)
        t = name.rsplit(".", 1)[1]
        if t in ROWS:
            key = name.rsplit(".", 1)[0] + ".qkv.weight"
            D = w_eff.shape[1]
            out[key] = out[key].copy()
            out[key][ROWS[t] * D:(ROWS[t] + 1) * D] = w_eff
        else:
            out[name + ".weight"] = w_eff
    return out


def merged_model(params, cfg):
    """(params, cfg) with the adapters merged (merge_adapters) and cfg.lora cleared; as is without adapters."""
    if cfg.lora is None:
        return params, cfg
    return merge_adapters(params, cfg.lora), dataclasses.replace(cfg, lora=None)


# --- the model's hooks: one block's adapted linears -----------------------------------------------


def weight_key(name):
    """The params' key of the linear weight an adapter acts on (qkv's for q, k, v)."""
    return name.rsplit(".", 1)[0] + ".qkv.weight" if name.rsplit(".", 1)[1] in ROWS else name + ".weight"


def linear_of(name):
    """The linear an adapter sits on, within its block: 'attn.qkv' for q, k, v, else 'attn.proj', ... ."""
    return weight_key(name).split(".", 2)[2][:-len(".weight")]


def rows_of(name, width):
    """The rows of the linear's output an adapter feeds: a third of qkv's (width each) for q, k, v; None: all."""
    t = name.rsplit(".", 1)[1]
    return slice(ROWS[t] * width, (ROWS[t] + 1) * width) if t in ROWS else None


def adapted_layers(caches):
    """The linears within the block ('attn.qkv', ...) that carry adapters."""
    return {linear_of(name) for name, _ in caches or ()}


def adapted_block(params, prefix, lora: Optional[LoraConfig]):
    """(params, caches) for the block at prefix: params seen through each adapted linear's W_eff (the
    block's code runs unchanged on it), and what adapter_grads needs; (params, None) without adapters.
    Dropout on the branch in training is added beside it (tinyvit.nn.lora_branch)."""
    if lora is None:
        return params, None
    eff, caches = {}, []
    for t in lora.targets:
        name = adapter_name(int(prefix.split(".")[1]), t)
        w_eff, c = lora_weight(base_weight(params, name), params[f"{name}.{A}"], params[f"{name}.{B}"],
                               lora.scale, params.get(f"{name}.{M}"))
        key = weight_key(name)
        if t in ROWS:
            D = w_eff.shape[1]
            if key not in eff:
                eff[key] = params[key].copy()
            eff[key][ROWS[t] * D:(ROWS[t] + 1) * D] = w_eff
        else:
            eff[key] = w_eff
        caches.append((name, c))
    return {**params, **eff}, caches


def adapter_grads(grads, caches):
    """Turn the adapted linears' weight gradients (d W_eff, as the block's backward wrote them) into the
    adapters' (and the frozen weights' own), in place; returns grads."""
    for name, c in caches or ():
        key = weight_key(name)
        g = grads.get(key)
        if g is None:  # not computed: this adapter's gradients were taken low-rank (tinyvit.nn.lora_branch)
            continue
        rows = rows_of(name, g.shape[1])
        if rows is not None:
            dw, grads[f"{name}.{A}"], grads[f"{name}.{B}"], dm = lora_weight_backward(g[rows], c)
            g[rows] = dw
        else:
            grads[key], grads[f"{name}.{A}"], grads[f"{name}.{B}"], dm = lora_weight_backward(g, c)
        if dm is not None:
            grads[f"{name}.{M}"] = dm
    return grads
