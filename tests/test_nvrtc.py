"""Every kernel in tinyvit.nn.kernels.SPECS compiled by NVRTC for sm_80 and sm_90, with no GPU needed.

The CUDA source is CuPy's own, not a copy of its template: kernels.kernel() builds the
cupy.ElementwiseKernel / ReductionKernel, and CuPy's per-device kernel builders (the functions under
their device memo, `__wrapped__`) generate the code and run core.compile_with_cache, its compiler
module and NVRTC unchanged. Only the device queries are replaced by a fixed arch, and the compile is
stopped with the binary in hand before CuPy would load it onto a device. Argument layouts (2-D
strided inputs, 32-bit indexing) and the reduction block sizes stand in for the arrays a call would
pass. Row reductions with one input and one output also get the CUB block-reduction kernel that
CuPy uses on a GPU for contiguous rows of 128 or more (with its renaming of the parameters to
in0/out0, mirrored in _cub_variant). Needs CuPy 14 (these builders are private), NVRTC and the
CUDA headers: pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12.
"""
import os
import re
import struct

import numpy as np
import pytest

from tinyvit.nn import kernels

ARCHS = ("80", "90")
DTYPES = (np.float32, np.float64)
ROWS, COLS = 64 * 197, 384  # a (B * tokens, width) reduction, for CuPy's block-size rules
ND, INDEXER, SCALAR = 1, 2, 3  # CuPy's _ArgKind (cupy/_core/_kernel.pxd)
EM_CUDA = 190  # ELF e_machine of a cubin


def _variants(spec):
    """The kernels CuPy may build for a spec: CUB only serves reductions of one input to one output."""
    if isinstance(spec, kernels.Elementwise):
        return ("elementwise",)
    one_to_one = len(spec.in_params.split(",")) == len(spec.out_params.split(",")) == 1
    return ("reduce", "cub") if one_to_one else ("reduce",)


CASES = [pytest.param(n, v, id=f"{n}-{v}") for n, s in kernels.SPECS.items() for v in _variants(s)]


class _Built(Exception):
    """Carries NVRTC's input and output out of CuPy's compile, before CuPy loads the cubin."""


@pytest.fixture(scope="module")
def cp():
    """The cupy module with a loadable NVRTC and CUDA headers, else a skip."""
    try:
        import cupy
        from cupy._core import core
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 (ImportError, or libnvrtc not found or not loadable)
        pytest.skip(f"CuPy with NVRTC is not usable here ({type(e).__name__}: {e})")
    if int(cupy.__version__.split(".")[0]) < 14:
        pytest.skip(f"drives CuPy 14's private kernel builders; CuPy {cupy.__version__} is installed")
    try:
        core.assemble_cupy_compiler_options(())  # CuPy's -I for the CUDA headers
    except RuntimeError as e:
        pytest.skip(f"CUDA headers not found: {e}")
    return cupy


@pytest.fixture(scope="module")
def header_mismatch(cp):
    """Why CuPy's CUDA headers don't suit its NVRTC (another CUDA major), or None."""
    from cupy._core import core
    from cupy_backends.cuda.libs import nvrtc

    inc = core.assemble_cupy_compiler_options(())[-1][2:]  # CuPy puts the CUDA headers' -I last
    with open(os.path.join(inc, "cuda_runtime_api.h")) as f:
        version = int(re.search(r"#define\s+CUDART_VERSION\s+(\d+)", f.read()).group(1))
    if version // 1000 != nvrtc.getVersion()[0]:
        return (f"CuPy found CUDA {version // 1000}.{version % 1000 // 10} headers in {inc} for NVRTC "
                f"{nvrtc.getVersion()}: pip install nvidia-cuda-runtime-cu{nvrtc.getVersion()[0]}")
    return None


@pytest.fixture
def build(cp, monkeypatch):
    """build(name, dtype, arch, variant) -> (source, NVRTC options, cubin) from CuPy's own compile."""
    from cupy.cuda import compiler

    arch = {}

    class Program(compiler._NVRTCProgram):
        def compile(self, options=(), log_stream=None):
            out = super().compile(options, log_stream)
            if self.src:  # CuPy also compiles an empty file, to version its cache key
                raise _Built(self.src, options, out[0])
            return out

    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")  # no kernel cache on disk, so no cache hits either
    monkeypatch.setattr(compiler, "_NVRTCProgram", Program)
    monkeypatch.setattr(compiler, "_get_arch", lambda: arch["sm"])  # what the device would report
    # the same logic without the per-device memo, which asks the driver for the current device
    monkeypatch.setattr(compiler, "_get_arch_for_options_for_nvrtc",
                        compiler._get_arch_for_options_for_nvrtc.__wrapped__)
    monkeypatch.setattr(kernels, "cupy_module", lambda: cp)  # it wants a GPU only to hand out cupy
    monkeypatch.setattr(kernels, "_KERNELS", {})

    def run(name, dtype, sm, variant):
        arch["sm"] = sm
        k = kernels.kernel(name)
        with pytest.raises(_Built) as built:
            _VARIANTS[variant](cp, k, np.dtype(dtype))
        return built.value.args

    return run


def _info(cp, kind, dtype=None, ndim=0, contiguous=True):
    """CuPy's description of one kernel argument (its dtype, rank and layout)."""
    from cupy._core import _carray, _kernel, _scalar

    typ = {ND: cp.ndarray, INDEXER: _carray.Indexer, SCALAR: _scalar.CScalar}[kind]
    return _kernel._ArgInfo(kind, typ, None if dtype is None else np.dtype(dtype), ndim, contiguous, True)


def _types(k, dtype):
    """(input types, output types, type map) as CuPy decides them with every T array of dtype."""
    from cupy._core import _kernel

    ins = tuple(dtype.type if p.dtype is None else p.dtype for p in k.in_params)
    return _kernel._decide_params_type(k.in_params, k.out_params, ins, ())


def _elementwise_variant(cp, k, dtype):
    """ElementwiseKernel.__call__'s build, for strided 2-D arrays."""
    from cupy._core import _kernel

    ins, outs, tmap = _types(k, dtype)
    infos = tuple(_info(cp, ND, t, 2, False) for t in ins + outs) + (_info(cp, INDEXER, ndim=2),)
    _kernel._get_elementwise_kernel.__wrapped__(
        infos, tmap, k.params, k.operation, k.name, k.preamble, **k.kwargs)


def _reduce_variant(cp, k, dtype):
    """ReductionKernel's plain (shared-memory) kernel over the last axis: 2-D in, 1-D out."""
    from cupy._core import _kernel, _reduction

    ins, outs, tmap = _types(k, dtype)
    tmap = _kernel._TypeMap(tmap._pairs + (("IndexT", "int32"),))  # added by _call (< 2**31 rows)
    infos = (tuple(_info(cp, ND, t, 2, False) for t in ins) + tuple(_info(cp, ND, t, 1) for t in outs)
             + (_info(cp, INDEXER, ndim=2), _info(cp, INDEXER, ndim=1), _info(cp, SCALAR, np.int32)))
    block_size = _reduction._get_block_specs(ROWS * COLS, ROWS, COLS, -1)[0]
    _reduction._ReductionKernel_get_cached_function.__wrapped__(
        k.nin, k.nout, k._params, infos, tmap, k.name, block_size, k.reduce_type, k.identity,
        k.map_expr, k.reduce_expr, k.post_map_expr, k.preamble, k.options)


def _cub_variant(cp, k, dtype):
    """The CUB kernel, set up as cupy/_core/_cub_reduction.pyx _try_to_call_cub_reduction does."""
    from cupy._core import _cub_reduction, _kernel

    ins, outs, tmap = _types(k, dtype)
    params = (_kernel._get_param_info("T in0", True) + _kernel._get_param_info("T out0", False)
              + _kernel._get_param_info("int32 _segment_size", True)
              + _kernel._get_param_info("int32 _array_size", True))
    # CuPy renames the parameters by plain text replacement in the expressions: kept as it is
    map_expr = k.map_expr.replace(k.in_params[0].name, "in0")
    post_map_expr = k.post_map_expr.replace(k.out_params[0].name, "out0")
    tmap = _kernel._TypeMap(tmap._pairs + (("IndexT", "int32"), ("sizeT", "int32"),
                                           ("type_in0_raw", ins[0]), ("type_out0_raw", outs[0])))
    infos = (_info(cp, ND, ins[0], 2), _info(cp, ND, outs[0], 1),
             _info(cp, SCALAR, np.int32), _info(cp, SCALAR, np.int32))
    items_per_thread = 4  # _get_cub_block_specs: 4 items a thread, COLS / 4 threads (32 to 512)
    block_size = min(max(1 << (-(-COLS // items_per_thread) - 1).bit_length(), 32), 512)
    _cub_reduction._SimpleCubReductionKernel_get_cached_function.__wrapped__(
        map_expr, k.reduce_expr, post_map_expr, k.reduce_type, params, infos, tmap, k.name,
        block_size, k.identity, k.preamble, (), items_per_thread)


_VARIANTS = {"elementwise": _elementwise_variant, "reduce": _reduce_variant, "cub": _cub_variant}


def _elf_sm(cubin):
    """The SM a cubin targets, from its ELF e_flags (low byte; the next byte in ELF ABI v8)."""
    flags = struct.unpack_from("<I", cubin, 48)[0]
    return (flags >> 8) & 0xFF if cubin[8] >= 8 else flags & 0xFF


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name,variant", CASES)
def test_kernel_compiles(build, header_mismatch, name, variant, dtype, arch):
    """CuPy's source for the kernel compiles to a cubin for this arch, with its entry point."""
    if variant == "cub" and header_mismatch:  # only CUB includes the CUDA headers (cuda_fp16.h...)
        pytest.skip(header_mismatch)
    src, options, cubin = build(name, dtype, arch, variant)
    entry = f"tinyvit_{name}"
    assert f'extern "C" __global__ void {entry}(' in " ".join(src.split())
    assert f"typedef {'float' if dtype == np.float32 else 'double'} T;" in src
    assert f"-arch=sm_{arch}" in options
    assert cubin[:4] == b"\x7fELF" and struct.unpack_from("<H", cubin, 18)[0] == EM_CUDA
    assert _elf_sm(cubin) == int(arch)
    assert entry.encode() + b"\0" in cubin  # the symbol, unmangled (extern "C")


def test_broken_kernel_fails_to_compile(build, monkeypatch):
    """An undeclared identifier in a body is an NVRTC error whose log names it."""
    from cupy.cuda.compiler import CompileException

    monkeypatch.setitem(kernels.SPECS, "broken", kernels.Elementwise("T x", "T y", "y = x * tinyvit_nope;"))
    with pytest.raises(CompileException, match="tinyvit_nope"):
        build("broken", np.float32, ARCHS[0], "elementwise")
