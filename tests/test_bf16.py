"""tinyvit.cpu.bf16: the rounding bit-exact against torch's .bfloat16(), the GEMM against torch's bf16 matmul
(through oneMKL where the mkl wheel is installed; CI installs it), the binding on a stand-in CBLAS, the refusals."""
import ctypes

import numpy as np
import pytest
import torch

from tinyvit.cpu import bf16
from tinyvit.errors import TinyViTError

MKL_HINT = "oneMKL not installed: pip install mkl (or pip install -e \".[mkl]\"); CI installs it (.ci/run)"
SHAPES = [(1, 1, 1), (7, 13, 5), (70, 33, 50), (257, 129, 65), (3, 1000, 2)]  # (m, k, n), odd on purpose
TRANS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.fixture
def mkl(monkeypatch):
    """The real bf16 GEMM of this process (skipped without one), run on any CPU."""
    monkeypatch.setenv(bf16.ANY_CPU_ENV, "1")
    gemm = bf16.library()
    if gemm is None or not gemm.name.startswith("oneMKL"):
        pytest.skip(MKL_HINT)
    return gemm


def _torch_bits(x):
    return torch.tensor(x).bfloat16().view(torch.int16).numpy().view(np.uint16)


def test_rounding_is_bit_exact_against_torch():
    """Every class of float32: random bit patterns (NaNs, infinities, subnormals included), ties, the edges."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 2 ** 16, size=4096, dtype=np.uint32) << 16) | 0x8000  # exactly half a bf16 ulp
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x007FFFFF,
                      0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF, 0x3F808000, 0x3F818000, 0x3F80FFFF], np.uint32)
    x = np.concatenate([bits, ties, edges]).view(np.float32)
    nan = np.isnan(x)
    assert nan.any() and np.isinf(x).any()
    ours, theirs = bf16.to_bf16(x), _torch_bits(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16.from_bf16(ours[nan])).all()  # a quiet NaN: 0xFFFF, as torch's vector path writes
    np.testing.assert_array_equal(bf16.to_bf16(x[:1000].reshape(10, 100)), _torch_bits(x[:1000]).reshape(10, 100))
    finite = x[np.isfinite(x)]
    back = torch.tensor(finite).bfloat16().float().numpy()
    np.testing.assert_array_equal(bf16.from_bf16(bf16.to_bf16(finite)), back)


def _operands(m, k, n, ta, tb, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    return a, b


def _check_against_torch(c, a, b, ta, tb):
    """c against the exact product of the bf16-rounded inputs (within float32 summation) and torch's bf16 matmul."""
    a16, b16 = (bf16.from_bf16(bf16.to_bf16(v)).astype(np.float64) for v in (a, b))
    a16, b16 = (a16.T if ta else a16), (b16.T if tb else b16)
    exact, size = a16 @ b16, np.abs(a16) @ np.abs(b16)
    k = a16.shape[1]
    assert c.dtype == np.float32 and c.shape == exact.shape
    assert np.all(np.abs(c - exact) <= (k + 2) * 2.0 ** -24 * size + 1e-30)  # float32 accumulation's bound
    at, bt = torch.tensor(a), torch.tensor(b)
    ours = torch.tensor(c).bfloat16().float()  # torch's bf16 matmul rounds its float32 sum to bf16
    theirs = torch.matmul((at.T if ta else at).bfloat16(), (bt.T if tb else bt).bfloat16()).float()
    torch.testing.assert_close(ours, theirs, rtol=2.0 ** -7, atol=(k + 2) * 2.0 ** -24 * float(size.max()))


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("ta,tb", TRANS)
def test_gemm_matches_torch_bf16_matmul(mkl, m, k, n, ta, tb):
    a, b = _operands(m, k, n, ta, tb)
    _check_against_torch(bf16.gemm_bf16(a, b, ta, tb), a, b, ta, tb)


def test_gemm_takes_transposed_views_and_bf16_bits(mkl):
    """An F-ordered operand (w.T) is read without a copy; uint16 operands are taken as bf16 bits."""
    a, b = _operands(37, 53, 29, False, True)
    want = bf16.gemm_bf16(a, b, transb=True)
    np.testing.assert_array_equal(bf16.gemm_bf16(a, np.ascontiguousarray(b.T)), want)
    np.testing.assert_array_equal(bf16.gemm_bf16(a, b.T), want)
    np.testing.assert_array_equal(bf16.gemm_bf16(np.asfortranarray(a), bf16.to_bf16(b), transb=True), want)


def test_gemm_on_empty_and_mismatched_shapes(mkl):
    np.testing.assert_array_equal(bf16.gemm_bf16(np.ones((3, 0), np.float32), np.ones((0, 4), np.float32)),
                                  np.zeros((3, 4), np.float32))
    with pytest.raises(TinyViTError, match="inner sizes differ"):
        bf16.gemm_bf16(np.ones((3, 5), np.float32), np.ones((4, 2), np.float32))


def _standin_cblas(int_type, calls):
    """A CBLAS bf16 GEMM written in NumPy behind a C function pointer: checks the arguments gemm_bf16 passes."""
    i, f, p = int_type, ctypes.c_float, ctypes.c_void_p
    proto = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, f, p, i, p, i, f, p, i)

    def gemm(layout, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        calls.append((layout, ta, tb, m, n, k, lda, ldb, ldc))
        rows = lambda ptr, r, ld: np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint16)), (r, ld))  # noqa: E731
        av = rows(a, k if ta == 112 else m, lda)
        bv = rows(b, n if tb == 112 else k, ldb)
        av, bv = (bf16.from_bf16(v).astype(np.float64) for v in (av, bv))
        out = np.ctypeslib.as_array(ctypes.cast(c, ctypes.POINTER(ctypes.c_float)), (m, ldc))
        out[:, :n] = alpha * ((av.T if ta == 112 else av) @ (bv.T if tb == 112 else bv))

    return proto(gemm)


@pytest.mark.parametrize("int_type", [ctypes.c_int32, ctypes.c_int64])
@pytest.mark.parametrize("ta,tb", TRANS)
def test_gemm_passes_cblas_arguments(monkeypatch, int_type, ta, tb):
    """Row-major layout, the trans flags, m/n/k and leading dimensions as CBLAS reads them (no library needed)."""
    calls = []
    fn = _standin_cblas(int_type, calls)
    monkeypatch.setattr(bf16, "_GEMM", [bf16.bind("stand-in", fn, int_type)])
    monkeypatch.setattr(bf16, "slow", lambda gemm: None)
    a, b = _operands(9, 6, 4, ta, tb)
    c = bf16.gemm_bf16(a, b, ta, tb)
    a16, b16 = (bf16.from_bf16(bf16.to_bf16(v)).astype(np.float64) for v in (a, b))
    np.testing.assert_allclose(c, (a16.T if ta else a16) @ (b16.T if tb else b16), rtol=1e-6)
    assert calls == [(101, 112 if ta else 111, 112 if tb else 111, 9, 4, 6, a.shape[1], b.shape[1], 4)]


def test_refused_in_one_line_without_a_library(monkeypatch):
    monkeypatch.setattr(bf16, "_GEMM", [None])
    with pytest.raises(TinyViTError, match=r"pip install mkl .*float32") as e:
        bf16.gemm_bf16(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), allow_slow=True)
    assert "\n" not in str(e.value)
    assert bf16.describe().startswith("none (pip install mkl")


INTEL = {"avx2": True, "avx512": True, "avx512_bf16": True, "amx_bf16": True}


def _standin_library(monkeypatch, name, calls):
    monkeypatch.setattr(bf16, "_GEMM", [bf16.bind(name, _standin_cblas(ctypes.c_int32, calls), ctypes.c_int32)])


@pytest.mark.parametrize("features,vendor,why", [
    (dict(INTEL, avx512_bf16=False, amx_bf16=False), "GenuineIntel", "neither AVX512-BF16 nor AMX-BF16"),
    (dict(INTEL, avx2=None, avx512=None, avx512_bf16=None, amx_bf16=None), None, "cannot tell"),
    (dict(INTEL, amx_bf16=False), "AuthenticAMD", "Intel CPUs only"),  # Zen 4: oneMKL's bf16 at float32's rate
])
def test_refused_where_bf16_would_not_pay_unless_told(monkeypatch, features, vendor, why):
    """No AVX512-BF16 or AMX, no way to tell, or oneMKL on AMD: refused, naming float32 and the override,
    which runs it."""
    calls = []
    _standin_library(monkeypatch, "oneMKL stand-in", calls)
    monkeypatch.setattr(bf16, "cpu_features", lambda: features)
    monkeypatch.setattr(bf16, "cpu_vendor", lambda: vendor)
    monkeypatch.delenv(bf16.ANY_CPU_ENV, raising=False)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TinyViTError, match=why + ".*use float32.*TINYVIT_BF16_ANY_CPU=1") as e:
        bf16.gemm_bf16(x, x, transb=True)
    assert "\n" not in str(e.value) and not calls
    assert "no faster than float32 here" in bf16.describe()
    np.testing.assert_array_equal(bf16.gemm_bf16(x, x, transb=True, allow_slow=True), np.full((2, 2), 3, np.float32))
    monkeypatch.setenv(bf16.ANY_CPU_ENV, "1")
    np.testing.assert_array_equal(bf16.gemm_bf16(x, x, transb=True), np.full((2, 2), 3, np.float32))
    assert len(calls) == 2


@pytest.mark.parametrize("avx,amx", [(True, False), (False, True), (True, True)])
def test_runs_where_the_cpu_has_either(monkeypatch, avx, amx):
    """AVX512-BF16 or AMX-BF16 on an Intel CPU with oneMKL; on any vendor with OpenBLAS's sbgemm."""
    monkeypatch.setattr(bf16, "cpu_features", lambda: dict(INTEL, avx512_bf16=avx, amx_bf16=amx))
    monkeypatch.delenv(bf16.ANY_CPU_ENV, raising=False)
    for name, vendor in (("oneMKL stand-in", "GenuineIntel"), ("OpenBLAS stand-in", "AuthenticAMD")):
        _standin_library(monkeypatch, name, [])
        monkeypatch.setattr(bf16, "cpu_vendor", lambda v=vendor: v)
        assert bf16.require().name == name and bf16.describe() == name + ", native"


def test_mkl_threads_follow_numpys_blas(mkl):
    """Inside blas.single_thread() (a batch shard) oneMKL runs on one thread; outside on NumPy's BLAS count."""
    import threading

    from tinyvit.cpu import blas

    if not blas.available():
        pytest.skip("NumPy's BLAS thread count cannot be set here (not OpenBLAS on Linux)")
    lib = ctypes.CDLL(bf16._mkl_paths()[0])
    x, seen = np.ones((8, 8), np.float32), {}

    def shard():
        with blas.single_thread():
            bf16.gemm_bf16(x, x)
            seen["shard"] = lib.MKL_Get_Max_Threads()

    t = threading.Thread(target=shard)
    t.start()
    t.join()
    bf16.gemm_bf16(x, x)
    assert seen["shard"] == 1 and lib.MKL_Get_Max_Threads() == blas.threads()
