"""tinyvit.cpu: the blockwise helpers on the thread pool and host-allocator tuning (speed only)."""
import platform
import threading

import numpy as np
import pytest
from helpers import ROOT, run_python

from tinyvit.cpu import threads
from tinyvit.nn import activations, special
from tinyvit.nn import layers as L


@pytest.mark.parametrize("op", ["gelu", "softmax", "layernorm"])
def test_small_blocks_give_the_same_result(monkeypatch, op):
    """Blockwise (threaded) evaluation equals one whole-array call (row sums may round differently)."""
    x = np.random.default_rng(0).standard_normal((37, 11, 53)).astype(np.float32)
    w, b = np.full(53, 1.5, np.float32), np.full(53, 0.25, np.float32)
    run = {"gelu": lambda: L.gelu_forward(x)[0], "softmax": lambda: L.softmax_forward(x)[0],
           "layernorm": lambda: L.layernorm_forward(x, w, b)[0]}[op]
    whole = run()
    monkeypatch.setattr(threads, "CHUNK", 500)  # about 2,000 blocks for this array
    np.testing.assert_allclose(run(), whole, rtol=2e-6, atol=1e-7)


def test_nested_blockwise_calls_do_not_deadlock(monkeypatch):
    """A block that itself calls ew_chunks (the GELU table build runs erf) runs it inline."""
    monkeypatch.setattr(threads, "CHUNK", 1024)
    monkeypatch.setattr(activations, "_PHI_TABLE", None)  # first GELU builds the table inside a block
    x = np.linspace(-6, 6, 50_000, dtype=np.float32)
    result = {}
    t = threading.Thread(target=lambda: result.update(y=L.gelu_forward(x)[0]), daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "blockwise GELU deadlocked on nested pool use"
    ref = x.astype(np.float64) * 0.5 * (1 + special.erf(x.astype(np.float64) / np.sqrt(2)))
    np.testing.assert_allclose(result["y"], ref, rtol=2e-6, atol=1e-7)


def _print_in_fresh_process(expr, env, setup):
    """The printed value of expr in a new interpreter (after setup) with only the given environment."""
    out = run_python(f"{setup}; print({expr})", cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.e2e
def test_host_malloc_tuning_can_be_opted_out():
    """TINYVIT_MALLOC=system keeps the C library's defaults; on glibc the thresholds are set."""
    setup = "from tinyvit.cpu.malloc import tune_host_malloc"
    assert _print_in_fresh_process("tune_host_malloc()", {"TINYVIT_MALLOC": "system"}, setup) == "False"
    glibc = platform.libc_ver()[0] == "glibc"
    assert _print_in_fresh_process("tune_host_malloc()", {}, setup) == str(glibc)


ARENAS = """
import ctypes, threading
import numpy as np
from tinyvit.cpu.malloc import tune_host_malloc
tune_host_malloc()
def work():
    for _ in range(20):
        np.ones(1 << 18).sum()
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
f = libc.fopen(PATH.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
print(open(PATH).read().count("<heap nr="))"""


@pytest.mark.e2e
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_info")
def test_threads_share_one_malloc_arena(tmp_path):
    """Shard threads allocate from one arena, whose freed arrays each reuses (an arena per thread kept
    about 300 MiB more of ViT-B/16's peak); TINYVIT_MALLOC=system keeps glibc's arena per thread."""
    code = ARENAS.replace("PATH", repr(str(tmp_path / "info.xml")))
    tuned = run_python(code, cwd=ROOT, env={})
    plain = run_python(code, cwd=ROOT, env={"TINYVIT_MALLOC": "system"})
    assert tuned.returncode == 0 and plain.returncode == 0, tuned.stderr + plain.stderr
    assert int(tuned.stdout) == 1 and int(plain.stdout) > 1


@pytest.mark.e2e
def test_openblas_spin_time_is_short_unless_the_user_set_one():
    """tinyvit sets a short OpenBLAS spin before NumPy loads; a value in the environment wins."""
    timeout = "os.environ.get('OPENBLAS_THREAD_TIMEOUT')"
    setup = "import os, tinyvit, numpy"
    assert _print_in_fresh_process(timeout, {}, setup) == "16"
    assert _print_in_fresh_process(timeout, {"OPENBLAS_THREAD_TIMEOUT": "28"}, setup) == "28"
