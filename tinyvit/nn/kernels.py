"""Fused CUDA kernels for the CuPy backend: GELU, layernorm, softmax and cross-entropy rows.

NumPy runs a GELU or a layernorm as a chain of passes; on a GPU each pass is a kernel launch and a
trip through device memory, so here each chain is one CuPy ElementwiseKernel or ReductionKernel
(compiled on first use; cuBLAS still does every matmul). The bodies are plain C over scalars of type
T (float or double): tests/test_kernels.py also compiles them with a host C++ compiler and checks
them against NumPy, and the layer tests run them through CuPy whenever a GPU is present.
"""
from typing import NamedTuple

from ..backend import cupy_module, get_array_module


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
    # QuickGELU (CLIP): c = sigmoid(1.702 x), with e = exp(-|1.702 x|)
    "gelu_quick": Elementwise(
        "T x", "T y, T c", "T e = exp((T)-1.702 * fabs(x)); c = (x >= (T)0 ? (T)1 : e) / ((T)1 + e); y = x * c;"),
    "gelu_quick_grad": Elementwise(
        "T x, T c, T dout", "T dx", "dx = dout * (c + (T)1.702 * x * c * ((T)1 - c));"),
    # layernorm: a row's max |x| picks a power-of-two scale (1 unless the squares could overflow:
    # exact, and decided on the device, no host check); then the row sum and the squares about
    # the mean of the scaled row (two passes, as the NumPy path), rstd in double (eps / s^2
    # underflows T), and one pass writing xhat (and the affine output).
    "row_absmax": RowReduce("T x", "T y", "fabs(x)", "fmax(a, b)", "y = a", "0"),
    "ln_scale": Elementwise(
        "T m", "T inv_s", "inv_s = m > (sizeof(T) == 4 ? (T)1e12 : (T)1e120) ? exp2(-ceil(log2(m))) : (T)1;"),
    "row_sum_scaled": RowReduce("T x, T inv_s", "T y", "x * inv_s", "a + b", "y = a", "0"),
    "row_sq_dev": RowReduce("T x, T inv_s, T mean", "T y", "(x * inv_s - mean) * (x * inv_s - mean)", "a + b",
                            "y = a", "0"),
    "ln_rstd": Elementwise(
        "T var, T inv_s, float64 eps", "T rstd_s, T rstd",
        "double s = 1.0 / (double)inv_s; double r = 1.0 / sqrt((double)var + eps / (s * s));"
        " rstd_s = (T)r; rstd = (T)(r * (double)inv_s);"),
    "ln_normalize": Elementwise("T x, T inv_s, T mean, T rstd_s", "T xhat", "xhat = (x * inv_s - mean) * rstd_s;"),
    "ln_normalize_affine": Elementwise(
        "T x, T inv_s, T mean, T rstd_s, T w, T b", "T xhat, T y",
        "xhat = (x * inv_s - mean) * rstd_s; y = xhat * w + b;"),
    "row_sum": RowReduce("T x", "T y", "x", "a + b", "y = a", "0"),
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


def kernel(name, like=None):
    """The compiled kernel for SPECS[name] from the cupy module that owns `like` (real CuPy or its
    host stand-in; the backend's cupy when like is None), built once per process and module."""
    cp = cupy_module() if like is None else get_array_module(like)
    key = (cp.__name__, name)
    if key not in _KERNELS:
        s = SPECS[name]
        if isinstance(s, Elementwise):
            _KERNELS[key] = cp.ElementwiseKernel(s.in_params, s.out_params, s.body, f"tinyvit_{name}")
        else:
            _KERNELS[key] = cp.ReductionKernel(s.in_params, s.out_params, s.map_expr, s.reduce_expr,
                                               s.post_expr, s.identity, f"tinyvit_{name}")
    return _KERNELS[key]


def _rows(name, *args):
    """A row reduction over the last axis, kept as size 1: (..., C) -> (..., 1)."""
    return kernel(name, args[0])(*args, axis=-1, keepdims=True)


def gelu(x, kind):
    """(x c(x), c(x)) for GELU kind 'erf', 'tanh' or 'quick', in one pass."""
    return kernel(f"gelu_{kind}", x)(x)


def gelu_grad(x, c, dout, kind):
    """dout * GELU'(x) from x and c(x)."""
    return kernel(f"gelu_{kind}_grad", x)(x, c, dout)


def layernorm(x, eps, w=None, b=None):
    """(xhat, rstd), or (xhat, rstd, xhat * w + b), of each row of x, in six kernels and no host sync.

    Rows whose squares could overflow are scaled by a power of two first (exact); rstd is the true
    1 / sqrt(var(x) + eps), (..., 1), which backward reads. A fused op, not an `out, cache` pair:
    layers.layernorm_forward builds its cache from these."""
    t, inv_n = x.dtype.type, 1.0 / x.shape[-1]
    inv_s = kernel("ln_scale", x)(_rows("row_absmax", x))  # (..., 1)
    mean = _rows("row_sum_scaled", x, inv_s)
    mean *= t(inv_n)
    var = _rows("row_sq_dev", x, inv_s, mean)
    var *= t(inv_n)
    rstd_s, rstd = kernel("ln_rstd", var)(var, inv_s, float(eps))
    if w is None:
        return kernel("ln_normalize", x)(x, inv_s, mean, rstd_s), rstd
    xhat, y = kernel("ln_normalize_affine", x)(x, inv_s, mean, rstd_s, w, b)
    return xhat, rstd, y


def layernorm_grad(dout, xhat, rstd, w=None):
    """dx = rstd (dout w - mean(dout w) - xhat mean(dout w xhat)), w = 1 without an affine."""
    t = xhat.dtype.type
    if w is None:
        s1, s2, w = _rows("row_sum", dout), _rows("row_dot", dout, xhat), t(1.0)
    else:
        s1, s2 = _rows("row_dot", dout, w), _rows("row_dot3", dout, w, xhat)
    return kernel("ln_grad", dout)(dout, w, xhat, rstd, s1, s2, t(1.0 / xhat.shape[-1]))


def softmax_parts(x):
    """(e, r) with softmax(x) = e * r over the last axis, shifted by the row max."""
    m = _rows("row_max", x)
    return kernel("exp_shifted", x)(x, m), _rows("row_sum_exp", x, m)


def softmax_parts_grad(dr, e, r):
    """e (dr - r sum(dr e)): softmax_parts_backward in two kernels."""
    return kernel("softmax_grad", dr)(dr, e, r, _rows("row_dot", dr, e))


def log_softmax(x):
    """Log-probabilities of each row of x."""
    m = _rows("row_max", x)
    return kernel("log_softmax", x)(x, m, _rows("row_sum_exp", x, m))


def cross_entropy_grad(logp, labels, eps, scale):
    """(softmax - (1 - eps) onehot - eps / K) * scale for log-probabilities (B, K)."""
    t = logp.dtype.type
    k = logp.shape[1]
    return kernel("ce_grad", logp)(logp, labels.reshape(-1, 1).astype("int64"), k, t(eps / k), t(1.0 - eps), t(scale))
