"""CuPy's ElementwiseKernel and ReductionKernel on the host: each kernel's C body is compiled with the
host C++ compiler and run over NumPy arrays, so tinyvit.nn.kernels is checked without a GPU.

It follows CuPy's calling rules: inputs broadcast together; Python and NumPy scalars take the type
of their parameter, while arrays bind a placeholder type (T) and must all agree with it and with
any fixed type ("Type is mismatched", as CuPy says); outputs are allocated in the broadcast shape
unless passed after the inputs; `i` is the flat output index in elementwise bodies; a and b are
the running and the new value in reductions (over the last axis, as tinyvit uses them).
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

COMPILER = shutil.which("g++") or shutil.which("c++")
_FIXED = {"int64": ("long long", np.int64), "int32": ("int", np.int32), "float32": ("float", np.float32),
          "float64": ("double", np.float64), "bool": ("bool", np.bool_)}
_BUILD = os.path.join(tempfile.gettempdir(), "tinyvit_kernel_emulator")
_LIBS = {}  # source -> loaded library, so a kernel called every step compiles once per process


def supported():
    """True when a host C++ compiler is available."""
    return COMPILER is not None


def _params(spec):
    """'T x, int64 k' -> [('T', 'x'), ('int64', 'k')]."""
    return [tuple(p.split()) for p in spec.split(",")] if spec.strip() else []


def _compile(source):
    """Build source into a shared library once (cached by hash on disk and per process)."""
    lib = _LIBS.get(source)
    if lib is not None:
        return lib
    if COMPILER is None:
        raise RuntimeError("the kernel emulator needs a host C++ compiler (g++), and none was found")
    os.makedirs(_BUILD, exist_ok=True)
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    so = os.path.join(_BUILD, f"k_{key}.so")
    if not os.path.exists(so):
        src = os.path.join(_BUILD, f"k_{key}.{os.getpid()}.cpp")
        with open(src, "w") as f:
            f.write(source)
        tmp = so + f".{os.getpid()}"
        r = subprocess.run([COMPILER, "-O1", "-shared", "-fPIC", "-o", tmp, src], capture_output=True, text=True)
        os.unlink(src)
        if r.returncode:  # as CuPy's CompileException: the compiler's log
            raise RuntimeError(f"kernel does not compile:\n{r.stderr.strip()}")
        os.replace(tmp, so)
    lib = _LIBS[source] = ctypes.CDLL(so)
    return lib


def _ctype(t, dtype):
    """The C type of parameter type t once T is bound to dtype."""
    return ("double" if dtype == np.float64 else "float") if t == "T" else _FIXED[t][0]


def _np_type(t, dtype):
    return dtype if t == "T" else np.dtype(_FIXED[t][1])


def _bind(params, args):
    """(T's dtype, args as arrays of their parameter types), by CuPy's type rules."""
    bound = None
    for (t, name), a in zip(params, args):
        if not isinstance(a, np.ndarray):
            continue  # scalars never bind a type: they are cast to their parameter's
        want = bound if t == "T" else np.dtype(_FIXED[t][1])
        if want is not None and a.dtype != want:
            raise TypeError(f"Type is mismatched. {name} {a.dtype.type} {want.type}")
        if t == "T":
            bound = a.dtype
    if bound is None and any(t == "T" for t, _ in params):
        raise TypeError("Cannot determine the type of T: no array argument binds it")
    if bound is not None and bound not in (np.float32, np.float64):
        raise TypeError(f"the kernel emulator runs T as float or double, got {bound}")
    return bound, [np.asarray(a, dtype=_np_type(t, bound)) for (t, _), a in zip(params, args)]


def _header(dtype):
    return f"#include <cmath>\nusing namespace std;\ntypedef {_ctype('T', dtype or np.float64)} T;\n"


def _loads(params, dtype, index, first=0):
    return "".join(f"const {_ctype(t, dtype)} {n} = (({_ctype(t, dtype)}*)p[{first + k}])[{index}];\n"
                   for k, (t, n) in enumerate(params))


class ElementwiseKernel:
    """cupy.ElementwiseKernel(in_params, out_params, operation, name) on the host."""

    def __init__(self, in_params, out_params, operation, name="kernel"):
        self.ins, self.outs, self.body, self.name = _params(in_params), _params(out_params), operation, name

    def __call__(self, *args):
        if len(args) not in (len(self.ins), len(self.ins) + len(self.outs)):
            raise TypeError(f"Wrong number of arguments for {self.name!r}")
        dtype, ins = _bind(self.ins, args[:len(self.ins)])
        given = args[len(self.ins):]
        shape = np.broadcast_shapes(*(a.shape for a in ins), *(o.shape for o in given))
        ins = [np.ascontiguousarray(np.broadcast_to(a, shape)) for a in ins]
        out_types = [_np_type(t, dtype) for t, _ in self.outs]
        for o, want, (_, n) in zip(given, out_types, self.outs):
            if o.dtype != want:
                raise TypeError(f"Type is mismatched. {n} {o.dtype.type} {np.dtype(want).type}")
        outs = [np.empty(shape, dtype=t) for t in out_types]  # written back into given outputs below
        decl = "".join(f"{_ctype(t, dtype)} {n};\n" for t, n in self.outs)
        store = "".join(f"(({_ctype(t, dtype)}*)p[{len(ins) + k}])[i] = {n};\n" for k, (t, n) in enumerate(self.outs))
        src = (_header(dtype) + 'extern "C" void run(long n, void** p) {\nfor (long i = 0; i < n; i++) {\n'
               + _loads(self.ins, dtype, "i") + decl + "{ " + self.body + "; }\n" + store + "}\n}\n")
        _run(_compile(src).run, [ctypes.c_long(int(np.prod(shape)))], ins + outs)
        if given:
            for o, r in zip(given, outs):
                o[...] = r
            outs = list(given)
        return outs[0] if len(outs) == 1 else tuple(outs)


class ReductionKernel:
    """cupy.ReductionKernel(in_params, out_params, map, reduce, post, identity, name), over the last axis."""

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name="reduce_kernel"):
        self.ins, self.outs = _params(in_params), _params(out_params)
        self.map, self.reduce, self.post, self.identity = map_expr, reduce_expr, post_map_expr, identity

    def __call__(self, *args, axis=None, keepdims=False):
        if axis not in (-1,):
            raise NotImplementedError("the kernel emulator reduces over axis=-1 only (as tinyvit does)")
        dtype, ins = _bind(self.ins, args)
        shape = np.broadcast_shapes(*(a.shape for a in ins))
        cols = shape[-1]
        ins = [np.ascontiguousarray(np.broadcast_to(a, shape)).reshape(-1, cols) for a in ins]
        (t_out, n_out), = self.outs
        out = np.empty(shape[:-1] + ((1,) if keepdims else ()), dtype=_np_type(t_out, dtype))
        src = (_header(dtype) + 'extern "C" void run(long rows, long cols, void** p) {\n'
               "for (long r = 0; r < rows; r++) {\n"
               f"T acc = (T)({self.identity});\n"
               "for (long j = 0; j < cols; j++) {\n" + _loads(self.ins, dtype, "r * cols + j")
               + f"T a = acc; T b = (T)({self.map}); acc = ({self.reduce});\n}}\n"
               f"T a = acc; {_ctype(t_out, dtype)} {n_out}; {{ {self.post}; }}\n"
               f"(({_ctype(t_out, dtype)}*)p[{len(ins)}])[r] = {n_out};\n"
               "}\n}\n")
        _run(_compile(src).run, [ctypes.c_long(ins[0].shape[0]), ctypes.c_long(cols)], ins + [out])
        return out


def _run(fn, sizes, arrays):
    ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    fn(*sizes, ptrs)
