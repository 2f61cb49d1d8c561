"""Fused CUDA kernels for the CuPy backend: GELU, layernorm, softmax and cross-entropy rows.

NumPy runs a GELU or a layernorm as a chain of passes; on a GPU each pass is a kernel launch and a
trip through device memory, so here each chain is one CuPy ElementwiseKernel or ReductionKernel
(compiled on first use; cuBLAS still does every matmul). The bodies are plain C over scalars of type
T (float or double): tests/test_kernels.py also compiles them with a host C++ compiler and checks
them against NumPy, and the layer tests run them through CuPy whenever a GPU is present.
"""
from typing import NamedTuple

from .backend import cupy_module


class Elementwise(NamedTuple):
    """cupy.ElementwiseKernel(in_params, out_params, body): body runs once per output element."""

    in_params: str
    out_params: str
    body: str


class RowReduce(NamedTuple):
    """cupy.ReductionKernel over the last axis: a = reduce(map(inputs)) from identity, then post."""

    in_params: str
    out_params: str
    map_expr: str
    reduce_expr: str
    post_expr: str
    identity: str


_INV_SQRT2, _INV_SQRT_2PI, _SQRT_2_OVER_PI = "0.7071067811865476", "0.3989422804014327", "0.7978845608028654"

SPECS = {
    # GELU = x c(x): forward also returns c (gelu_forward's cache); backward forms GELU' = c + x c'(x)
    "gelu_erf": Elementwise("T x", "T y, T c", f"c = (T)0.5 * ((T)1 + erf(x * (T){_INV_SQRT2})); y = x * c;"),
    "gelu_erf_grad": Elementwise(
        "T x, T c, T dout", "T dx", f"dx = dout * (c + x * exp((T)-0.5 * x * x) * (T){_INV_SQRT_2PI});"),
    # tanh form: c = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), with e = exp(-2|u|) (no overflow)
    "gelu_tanh": Elementwise(
        "T x", "T y, T c",
        f"T u = (T){_SQRT_2_OVER_PI} * (x + (T)0.044715 * x * x * x); T e = exp((T)-2 * fabs(u));"
        " c = (u >= (T)0 ? (T)1 : e) / ((T)1 + e); y = x * c;"),
    "gelu_tanh_grad": Elementwise(
        "T x, T c, T dout", "T dx",
        "T xc = fmin(fmax(x, (T)-1e4), (T)1e4);"  # beyond, c (1 - c) is 0: keep x^3 from inf * 0
        f" T du = (T)2 * (T){_SQRT_2_OVER_PI} * ((T)1 + (T)3 * (T)0.044715 * xc * xc);"
        " dx = dout * (c + xc * c * ((T)1 - c) * du);"),
    # layernorm: the row sum, then the squares about the mean (two passes, as the NumPy path); one
    # pass then writes xhat (and the affine output). Divisions by C are done on the (..., 1) results.
    "row_sum": RowReduce("T x", "T y", "x", "a + b", "y = a", "0"),
    "row_sq_dev": RowReduce("T x, T mean", "T y", "(x - mean) * (x - mean)", "a + b", "y = a", "0"),
    "ln_normalize": Elementwise("T x, T mean, T rstd", "T xhat", "xhat = (x - mean) * rstd;"),
    "ln_normalize_affine": Elementwise(
        "T x, T mean, T rstd, T w, T b", "T xhat, T y", "xhat = (x - mean) * rstd; y = xhat * w + b;"),
    "row_dot": RowReduce("T u, T v", "T y", "u * v", "a + b", "y = a", "0"),
    "row_dot3": RowReduce("T u, T v, T w", "T y", "u * v * w", "a + b", "y = a", "0"),
    "ln_grad": Elementwise(
        "T d, T w, T xhat, T rstd, T s1, T s2, T inv_n", "T dx",
        "dx = rstd * (d * w - (s1 + xhat * s2) * inv_n);"),
    # softmax rows as e * r with e = exp(x - max) and r = 1 / sum(e)
    "row_max": RowReduce("T x", "T y", "x", "fmax(a, b)", "y = a", "-3.4028234663852886e38"),
    "row_sum_exp": RowReduce("T x, T m", "T y", "exp(x - m)", "a + b", "y = (T)1 / a", "0"),
    "exp_shifted": Elementwise("T x, T m", "T e", "e = exp(x - m);"),
    "softmax_grad": Elementwise("T dr, T e, T r, T g", "T dx", "dx = e * (dr - r * g);"),
    # cross-entropy: log-probabilities, then their gradient with the one-hot (i: flat index)
    "log_softmax": Elementwise("T x, T m, T r", "T logp", "logp = x - m + log(r);"),
    "ce_grad": Elementwise(
        "T logp, int64 label, int64 k, T eps_k, T hit, T scale", "T dx",
        "dx = (exp(logp) - eps_k - (i % k == label ? hit : (T)0)) * scale;"),
}

_KERNELS = {}


def kernel(name):
    """The compiled CuPy kernel for SPECS[name] (built once per process)."""
    if name not in _KERNELS:
        cp, s = cupy_module(), SPECS[name]
        if isinstance(s, Elementwise):
            _KERNELS[name] = cp.ElementwiseKernel(s.in_params, s.out_params, s.body, f"tinyvit_{name}")
        else:
            _KERNELS[name] = cp.ReductionKernel(s.in_params, s.out_params, s.map_expr, s.reduce_expr,
                                                s.post_expr, s.identity, f"tinyvit_{name}")
    return _KERNELS[name]


def _rows(name, *args):
    """A row reduction over the last axis, kept as size 1: (..., C) -> (..., 1)."""
    return kernel(name)(*args, axis=-1, keepdims=True)


def gelu(x, kind):
    """(x c(x), c(x)) for GELU kind 'erf' or 'tanh', in one pass."""
    return kernel(f"gelu_{kind}")(x)


def gelu_grad(x, c, dout, kind):
    """dout * GELU'(x) from x and c(x)."""
    return kernel(f"gelu_{kind}_grad")(x, c, dout)


def layernorm_stats(x):
    """(mean, biased variance) of each row of x, each (..., 1)."""
    inv_n = 1.0 / x.shape[-1]
    mean = _rows("row_sum", x)
    mean *= inv_n
    var = _rows("row_sq_dev", x, mean)
    var *= inv_n
    return mean, var


def layernorm_apply(x, mean, rstd, w=None, b=None):
    """xhat, or (xhat, xhat * w + b), in one pass."""
    if w is None:
        return kernel("ln_normalize")(x, mean, rstd)
    return kernel("ln_normalize_affine")(x, mean, rstd, w, b)


def layernorm_grad(dout, xhat, rstd, w=None):
    """dx = rstd (dout w - mean(dout w) - xhat mean(dout w xhat)), w = 1 without an affine."""
    t = xhat.dtype.type
    if w is None:
        s1, s2, w = _rows("row_sum", dout), _rows("row_dot", dout, xhat), t(1.0)
    else:
        s1, s2 = _rows("row_dot", dout, w), _rows("row_dot3", dout, w, xhat)
    return kernel("ln_grad")(dout, w, xhat, rstd, s1, s2, t(1.0 / xhat.shape[-1]))


def softmax_parts(x):
    """(e, r) with softmax(x) = e * r over the last axis, shifted by the row max."""
    m = _rows("row_max", x)
    return kernel("exp_shifted")(x, m), _rows("row_sum_exp", x, m)


def softmax_parts_grad(dr, e, r):
    """e (dr - r sum(dr e)): softmax_parts_backward in two kernels."""
    return kernel("softmax_grad")(dr, e, r, _rows("row_dot", dr, e))


def log_softmax(x):
    """Log-probabilities of each row of x."""
    m = _rows("row_max", x)
    return kernel("log_softmax")(x, m, _rows("row_sum_exp", x, m))


def cross_entropy_grad(logp, labels, eps, scale):
    """(softmax - (1 - eps) onehot - eps / K) * scale for log-probabilities (B, K)."""
    t = logp.dtype.type
    k = logp.shape[1]
    return kernel("ce_grad")(logp, labels.reshape(-1, 1).astype("int64"), k, t(eps / k), t(1.0 - eps), t(scale))
