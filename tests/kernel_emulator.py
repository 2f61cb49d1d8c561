"""A host stand-in for CuPy's ElementwiseKernel and ReductionKernel: compiles a kernel's C body with
the host C++ compiler and runs it on NumPy arrays, so tinyvit.kernels is checked without a GPU.

It follows CuPy's calling rules that tinyvit.kernels relies on: inputs broadcast together, scalars
allowed, T bound by the first array typed T, outputs allocated, `i` the flat index in elementwise
bodies, a and b the running and new values in reductions over the last axis (keepdims=True).
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

COMPILER = shutil.which("g++") or shutil.which("c++")
_CTYPES = {"T": None, "int64": ("long long", np.int64)}
_BUILD = os.path.join(tempfile.gettempdir(), "tinyvit_kernel_emulator")


def _params(spec):
    """'T x, int64 k' -> [('T', 'x'), ('int64', 'k')]."""
    return [tuple(p.split()) for p in spec.split(",")] if spec.strip() else []


def _compile(source):
    """Build source into a shared library once (cached by hash); return the ctypes handle."""
    os.makedirs(_BUILD, exist_ok=True)
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    so = os.path.join(_BUILD, f"k_{key}.so")
    if not os.path.exists(so):
        src = os.path.join(_BUILD, f"k_{key}.cpp")
        with open(src, "w") as f:
            f.write(source)
        tmp = so + f".{os.getpid()}"
        subprocess.run([COMPILER, "-O1", "-shared", "-fPIC", "-o", tmp, src], check=True, capture_output=True)
        os.replace(tmp, so)
    return ctypes.CDLL(so)


def _ctype(t, dtype):
    return ("double" if dtype == np.float64 else "float") if t == "T" else _CTYPES[t][0]


def _bind(params, args):
    """(T's dtype, args as arrays of their declared types)."""
    dtype = next(np.asarray(a).dtype for (t, _), a in zip(params, args) if t == "T" and np.ndim(a) > 0)
    arrays = [np.asarray(a, dtype=dtype if t == "T" else _CTYPES[t][1]) for (t, _), a in zip(params, args)]
    return np.dtype(dtype), arrays


def _header(dtype):
    return f"#include <cmath>\nusing namespace std;\ntypedef {_ctype('T', dtype)} T;\n"


def _loads(params, dtype, index, first=0):
    return "".join(f"const {_ctype(t, dtype)} {n} = (({_ctype(t, dtype)}*)p[{first + k}])[{index}];\n"
                   for k, (t, n) in enumerate(params))


class ElementwiseKernel:
    """cupy.ElementwiseKernel(in_params, out_params, operation, name) on the host."""

    def __init__(self, in_params, out_params, operation, name):
        self.ins, self.outs, self.body = _params(in_params), _params(out_params), operation

    def __call__(self, *args):
        dtype, ins = _bind(self.ins, args)
        ins = [np.ascontiguousarray(a) for a in np.broadcast_arrays(*ins)]
        outs = [np.empty(ins[0].shape, dtype=dtype if t == "T" else _CTYPES[t][1]) for t, _ in self.outs]
        decl = "".join(f"{_ctype(t, dtype)} {n};\n" for t, n in self.outs)
        store = "".join(f"(({_ctype(t, dtype)}*)p[{len(ins) + k}])[i] = {n};\n" for k, (t, n) in enumerate(self.outs))
        src = (_header(dtype) + 'extern "C" void run(long n, void** p) {\nfor (long i = 0; i < n; i++) {\n'
               + _loads(self.ins, dtype, "i") + decl + "{ " + self.body + " }\n" + store + "}\n}\n")
        _run(_compile(src).run, [ctypes.c_long(ins[0].size)], ins + outs)
        return outs[0] if len(outs) == 1 else tuple(outs)


class ReductionKernel:
    """cupy.ReductionKernel(in_params, out_params, map, reduce, post, identity, name), axis=-1 only."""

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name):
        self.ins, self.outs = _params(in_params), _params(out_params)
        self.map, self.reduce, self.post, self.identity = map_expr, reduce_expr, post_map_expr, identity

    def __call__(self, *args, axis=None, keepdims=False):
        assert axis == -1 and keepdims, "tinyvit reduces rows only"
        dtype, ins = _bind(self.ins, args)
        ins = np.broadcast_arrays(*ins)
        shape = ins[0].shape
        cols = shape[-1]
        ins = [np.ascontiguousarray(a).reshape(-1, cols) for a in ins]
        (t_out, n_out), = self.outs
        out = np.empty(shape[:-1] + (1,), dtype=dtype)
        src = (_header(dtype) + 'extern "C" void run(long rows, long cols, void** p) {\n'
               "for (long r = 0; r < rows; r++) {\n"
               f"T acc = (T)({self.identity});\n"
               "for (long j = 0; j < cols; j++) {\n" + _loads(self.ins, dtype, "r * cols + j")
               + f"T a = acc; T b = (T)({self.map}); acc = ({self.reduce});\n}}\n"
               f"T a = acc; T {n_out}; {{ {self.post}; }}\n(({_ctype(t_out, dtype)}*)p[{len(ins)}])[r] = {n_out};\n"
               "}\n}\n")
        _run(_compile(src).run, [ctypes.c_long(ins[0].shape[0]), ctypes.c_long(cols)], ins + [out])
        return out


def _run(fn, sizes, arrays):
    ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    fn(*sizes, ptrs)


class FakeCupy:
    """What tinyvit.kernels takes from the cupy module."""

    ElementwiseKernel = ElementwiseKernel
    ReductionKernel = ReductionKernel


def supported():
    """True when a host C++ compiler is available."""
    return COMPILER is not None
