"""Inference-only forms of a block's two halves on NumPy (vit_forward with keep_cache=False): the same
math as the layers, run on blocks of tokens or images small enough to stay in cache, so each
intermediate (a block's scores, its MLP hidden rows) is made and used before it reaches memory.
Nothing is cached; training keeps the layers' whole-batch forms, whose caches backward needs."""
import numpy as np

from ..cpu.bf16 import to_bf16
from ..cpu.threads import parallel_blocks
from .activations import gelu_inplace, softmax_parts, softmax_parts_inplace
from .layers import _finite_total, layernorm_forward, layernorm_linear_forward, linear_forward

SCORES = 1 << 17  # scores per attention block (512 KB of float32, this CPU's L2): ViT-Ti/16's 3 heads of one image
ROWS = 1024  # tokens per MLP block: its hidden rows (1024 x 4C) stay in L3 (smaller blocks cost GEMM speed)


def ln_linear_infer(x, ln_w, ln_b, w, b, eps, q_scale=None, bf16=False):
    """layernorm_linear_forward's output alone, the first w.shape[1] outputs (attention's q) times
    q_scale, folded into w and b: q k^T / sqrt(D) then needs no pass of its own (bf16: its GEMM in bfloat16)."""
    if q_scale is not None:  # rows [0, C) of the fused qkv weight make q
        c = w.shape[1]
        w = w.copy()
        w[:c] *= q_scale
        if b is not None:
            b = b.copy()
            b[:c] *= q_scale
    return layernorm_linear_forward(x, ln_w, ln_b, w, b, eps, bf16)[0]  # its cache is dropped here


def _attend(q, k, v, ov, o):
    """o = softmax(q k^T) v for one block of images and heads, q already scaled (q (b, h, n, D); ov is
    o viewed (b, h, n, D)). The scores are exponentiated in place: one block-sized buffer in cache."""
    s = q @ k.transpose(0, 1, 3, 2)  # (b, h, n, N)
    r = softmax_parts_inplace(s)  # s = e now, softmax = e * r
    if r is not None:
        with np.errstate(over="ignore"):  # an overflow here is caught just below
            np.matmul(s, v, out=ov)
    if r is None or not _finite_total(ov):  # a row sum out of range, or an unshifted e times a huge
        s, r = softmax_parts(q @ k.transpose(0, 1, 3, 2), shift=True)  # |v| overflowed: the row max
        np.matmul(s, v, out=ov)
    o *= r.transpose(0, 2, 1, 3)  # normalise n x D rows, not n x N ones; in o's memory order


def attention_infer(qkv, w_proj, b_proj, heads, queries=None, bf16=False):
    """attention_heads_forward's output alone (B, n, C) from a qkv whose q is already scaled by
    1/sqrt(D) (ln_linear_infer's q_scale), its scores made and used about SCORES at a time (a group
    of heads of one image, or whole images), the projection in bfloat16 with bf16 (q k^T, p v in float32);
    plain form: reference.attention_forward after its qkv linear."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * heads)
    n = N if queries is None else queries
    q, k, v = qkv.reshape(B, N, 3, heads, D).transpose(2, 0, 3, 1, 4)  # each (B, H, N, D), views
    o = np.empty((B, n, heads, D), dtype=qkv.dtype)  # heads written straight into (B, n, C) order
    ov = o.transpose(0, 2, 1, 3)  # (B, H, n, D) view of it
    hs = max(1, min(heads, SCORES // (n * N)))  # heads per block
    bs = max(1, SCORES // (heads * n * N)) if hs == heads else 1  # images per block

    def block(start):
        i, h = start
        a, g = slice(i, i + bs), slice(h, h + hs)
        _attend(q[a, g, :n], k[a, g], v[a, g], ov[a, g], o[a, :, g])

    parallel_blocks(block, [(i, h) for i in range(0, B, bs) for h in range(0, heads, hs)])
    return linear_forward(o.reshape(B, n, heads * D), w_proj, b_proj, bf16)[0]  # (B, n, C)


def mlp_residual_infer(x, ln_w, ln_b, w1, b1, w2, b2, kind, eps, bf16=False):
    """x += fc2(gelu(fc1(layernorm(x)))) in place on x (B, n, C), ROWS tokens at a time: the block's
    second half at inference (bf16: fc1 and fc2 in bfloat16, each weight rounded once); plain form:
    reference.block_forward after its attention."""
    x2 = x.reshape(-1, x.shape[-1])  # (B*n, C), a view: x is the block's own contiguous buffer
    if w1.shape[0] < x2.shape[0]:  # more tokens than hidden units: fold the norm's affine into fc1 once
        w1, b1, ln_w, ln_b = w1 * ln_w, w1 @ ln_b + b1, None, None
    w1_16, w2_16 = (to_bf16(w1), to_bf16(w2)) if bf16 else (False, False)  # the bits every row block uses

    def block(i):
        xb = x2[i:i + ROWS]
        h = linear_forward(layernorm_forward(xb, ln_w, ln_b, eps)[0], w1, b1, w1_16)[0]  # (rows, hidden)
        xb += linear_forward(gelu_inplace(h, kind), w2, b2, w2_16)[0]

    parallel_blocks(block, range(0, x2.shape[0], ROWS))
    return x
