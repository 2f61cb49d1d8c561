"""A strict CuPy stand-in: answers the cupy calls tinyvit makes, computing with NumPy on the host.

With TINYVIT_CUPY_STANDIN=1 and no usable GPU, tinyvit.backend hands this module out as `cupy`,
so the CuPy path runs on any machine. It refuses what real CuPy refuses, with CuPy's errors:
- implicit host conversion (np.asarray(d), np.array(d), NumPy functions that would convert);
  only .get(), asnumpy() and the scalar conversions (float, int, bool, .item(), .tolist()) reach
  the host, and each of those is counted (sync_count());
- a device array meeting a host np.ndarray in an operator, a ufunc or a cupy function;
- any name, method or keyword that the recorded CuPy (cupy_api.json, written from a real CuPy by
  scripts/record_cupy_api.py) does not have;
- ElementwiseKernel / ReductionKernel bodies run through the host kernel emulator, with CuPy's
  type binding, broadcasting and output rules.
Reductions return 0-d device arrays (as CuPy does), never host scalars.
"""
import functools
import json
import sys
import types
from pathlib import Path

import numpy as np

from . import kernel_emulator

API = json.loads((Path(__file__).with_name("cupy_api.json")).read_text())
__version__ = API["cupy_version"]
_SYNCS = 0
_HOST_IN = frozenset({"asarray", "array", "asanyarray"})  # the creation calls that take host data


def sync_count() -> int:
    """Device-to-host transfers so far in this process."""
    return _SYNCS


def _sync():
    global _SYNCS
    _SYNCS += 1


def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)}")


def _check_call(name, sig, args, kwargs):
    """TypeError for keywords (or too many positionals) that CuPy's `name` does not take."""
    if sig is None:
        return
    if not sig["varkw"]:
        for k in kwargs:
            if k not in sig["params"]:
                raise TypeError(f"{name}() got an unexpected keyword argument '{k}'")
    if not sig["varargs"] and len(args) > len(sig["params"]):
        raise TypeError(f"{name}() takes at most {len(sig['params'])} positional arguments ({len(args)} given)")


def _dev(x):
    """Host value(s) from device arrays, refusing host ndarrays (CuPy: Unsupported type)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_dev(v) for v in x)
    return x


def _wrap(r):
    """Device arrays for what a NumPy call returned (0-d for NumPy scalars, as CuPy's reductions)."""
    if isinstance(r, np.ndarray):
        return ndarray(r)
    if isinstance(r, np.generic):
        return ndarray(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


_JOINS = frozenset({"concatenate", "stack", "hstack", "vstack", "dstack", "column_stack"})


def _call(name, fn, sig, args, kwargs):
    """fn(*args, **kwargs) on host values after CuPy's checks; the result as device arrays."""
    _check_call(name, sig, args, kwargs)
    if name in _JOINS and args and any(not isinstance(a, ndarray) for a in args[0]):
        raise TypeError("Only cupy arrays can be concatenated")  # scalars too, unlike NumPy
    return _wrap(fn(*_dev(args), **{k: _dev(v) for k, v in kwargs.items()}))


class _Flags:
    """ndarray.flags: the three CuPy has."""

    def __init__(self, a):
        self.c_contiguous, self.f_contiguous, self.owndata = (
            a.flags.c_contiguous, a.flags.f_contiguous, a.flags.owndata)

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous,
                "OWNDATA": self.owndata}[key]


def _binary(op, reflected=False):
    def method(self, other):
        if isinstance(other, np.ndarray):
            raise _unsupported(other)
        if not isinstance(other, (ndarray, int, float, complex, bool, np.generic)):
            return NotImplemented
        o = other._a if isinstance(other, ndarray) else other
        return _wrap(op(o, self._a) if reflected else op(self._a, o))
    return method


def _inplace(op):
    def method(self, other):
        if isinstance(other, np.ndarray):
            raise _unsupported(other)
        op(self._a, other._a if isinstance(other, ndarray) else other, out=self._a, casting="same_kind")
        return self
    return method


def _to_host(method):
    """A scalar conversion: a counted device-to-host transfer."""
    def convert(self, *args):
        _sync()
        return getattr(self._a, method)(*args)
    return convert


class ndarray:
    """A device array: NumPy storage that refuses to be read implicitly from the host."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100.0

    def __init__(self, a):
        self._a = a

    # --- what stays on the device
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    T = property(lambda self: ndarray(self._a.T))
    mT = property(lambda self: ndarray(np.swapaxes(self._a, -1, -2)))
    real = property(lambda self: ndarray(self._a.real))
    imag = property(lambda self: ndarray(self._a.imag))
    base = property(lambda self: None if self._a.base is None else ndarray(self._a.base))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (ndarray(v) if isinstance(v, np.ndarray) else ndarray(np.asarray(v)) for v in self._a)

    def __getitem__(self, key):
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray) and not _whole(key):  # d[:] = h and d[...] = h copy host data in
            raise _unsupported(value)
        self._a[_index(key)] = value._a if isinstance(value, ndarray) else value

    def __getattr__(self, name):
        sig = API["ndarray_methods"].get(name, False)
        if sig is False or name.startswith("__") or not hasattr(self._a, name):
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        fn = getattr(self._a, name)
        return lambda *args, **kw: _call(f"ndarray.{name}", fn, sig, args, kw)

    def reshape(self, *shape, **kw):
        _check_call("ndarray.reshape", API["ndarray_methods"]["reshape"], shape, kw)
        return ndarray(self._a.reshape(*shape, **kw))

    # --- explicit transfers, each counted
    def get(self, stream=None, order="C", out=None, blocking=True):
        """A host copy (cupy.ndarray.get)."""
        _sync()
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order)

    def set(self, arr, stream=None):
        """Copy host data in (host-to-device: not a sync)."""
        self._a[...] = arr

    item = _to_host("item")
    tolist = _to_host("tolist")
    __float__ = _to_host("__float__")
    __int__ = _to_host("__int__")
    __bool__ = _to_host("__bool__")
    __complex__ = _to_host("__complex__")
    __index__ = _to_host("__index__")
    __repr__ = lambda self: (_sync(), "array(" + repr(self._a)[6:])[1]  # noqa: E731
    __str__ = lambda self: (_sync(), str(self._a))[1]  # noqa: E731
    __format__ = lambda self, spec: (_sync(), format(self._a if self.ndim else self._a[()], spec))[1]  # noqa: E731

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """NumPy ufuncs on device arrays run as cupy's (host ndarrays among them are refused)."""
        uf = _ufunc(ufunc.__name__)
        if uf is None:
            return NotImplemented
        if "out" in kwargs and isinstance(kwargs["out"], tuple) and len(kwargs["out"]) == 1:
            kwargs["out"] = kwargs["out"][0]
        return uf(*inputs, **kwargs) if method == "__call__" else getattr(uf, method)(*inputs, **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        """NumPy functions on device arrays dispatch to cupy's of the same name, as CuPy does."""
        try:
            return __getattr__(func.__name__)(*args, **kwargs)
        except AttributeError:
            return NotImplemented

    __hash__ = None
    __add__, __radd__, __iadd__ = _binary(np.add), _binary(np.add, True), _inplace(np.add)
    __sub__, __rsub__, __isub__ = _binary(np.subtract), _binary(np.subtract, True), _inplace(np.subtract)
    __mul__, __rmul__, __imul__ = _binary(np.multiply), _binary(np.multiply, True), _inplace(np.multiply)
    __truediv__, __rtruediv__, __itruediv__ = (_binary(np.true_divide), _binary(np.true_divide, True),
                                               _inplace(np.true_divide))
    __floordiv__, __rfloordiv__ = _binary(np.floor_divide), _binary(np.floor_divide, True)
    __mod__, __rmod__ = _binary(np.remainder), _binary(np.remainder, True)
    __pow__, __rpow__, __ipow__ = _binary(np.power), _binary(np.power, True), _inplace(np.power)
    __matmul__, __rmatmul__ = _binary(np.matmul), _binary(np.matmul, True)
    __and__, __rand__, __iand__ = _binary(np.bitwise_and), _binary(np.bitwise_and, True), _inplace(np.bitwise_and)
    __or__, __ror__, __ior__ = _binary(np.bitwise_or), _binary(np.bitwise_or, True), _inplace(np.bitwise_or)
    __xor__, __rxor__ = _binary(np.bitwise_xor), _binary(np.bitwise_xor, True)
    __lt__, __le__, __gt__, __ge__ = _binary(np.less), _binary(np.less_equal), _binary(np.greater), _binary(np.greater_equal)
    __eq__, __ne__ = _binary(np.equal), _binary(np.not_equal)
    __neg__ = lambda self: ndarray(-self._a)  # noqa: E731
    __pos__ = lambda self: ndarray(+self._a)  # noqa: E731
    __abs__ = lambda self: ndarray(abs(self._a))  # noqa: E731
    __invert__ = lambda self: ndarray(~self._a)  # noqa: E731


ndarray.__module__ = "cupy"  # backend.get_array_module tells device arrays by their module ...
ndarray.standin_module = sys.modules[__name__]  # ... and takes this one for ours, even beside a real CuPy


def _whole(key):
    """True for the keys that name a whole array: [:] and [...]."""
    return key is Ellipsis or (isinstance(key, slice) and key == slice(None))


def _index(key):
    """An index for the host storage: device arrays unwrapped; host index arrays are copied in (CuPy
    allows that host-to-device step)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    return key._a if isinstance(key, ndarray) else key


# --- creation and transfers -------------------------------------------------------------------


def _leaves(x):
    """The non-list leaves of a nested list or tuple."""
    if isinstance(x, (list, tuple)):
        return [leaf for v in x for leaf in _leaves(v)]
    return [x]


def _host_in(x):
    """Host data given to a creation call: a device array, a nest of only device arrays (unwrapped),
    or host data; device arrays mixed with host values would need a host read, which CuPy refuses."""
    if isinstance(x, ndarray):
        return x._a
    leaves = _leaves(x) if isinstance(x, (list, tuple)) else []
    on_device = [isinstance(v, ndarray) for v in leaves]
    if any(on_device) and not all(on_device):
        ndarray.__array__(None)  # CuPy's implicit-conversion TypeError
    if any(on_device):
        return np.array([_host_in(v) for v in x])
    return x


def _creation(name):
    fn, sig = getattr(np, name), API["functions"][name]

    def create(a, *args, **kw):
        _check_call(name, sig, (a,) + args, kw)
        kw.pop("blocking", None)
        r = fn(_host_in(a), *args, **kw)
        if not isinstance(a, ndarray):  # host data is copied to the device, never shared with the host
            r = np.array(r, copy=True)
        if r.dtype.kind not in "biufc":
            raise ValueError(f"Unsupported dtype {r.dtype}")
        return ndarray(r)
    create.__name__ = name
    return create


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    """A host copy of a device array (a counted transfer); host data passes through."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def get_array_module(*args):
    """This module for device arrays, else numpy."""
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


# --- ufuncs -----------------------------------------------------------------------------------


class ufunc:
    """A cupy ufunc over host storage: device arrays and scalars only."""

    def __init__(self, name):
        self.name, self._uf, self._sig = name, getattr(np, name), API["ufuncs"].get(name)
        self.nin, self.nout = self._uf.nin, self._uf.nout
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        return _call(self.name, self._uf, self._sig, args, kwargs)

    def __getattr__(self, method):
        if method not in API["ufunc_methods"] or method.startswith("_"):
            raise AttributeError(f"'cupy.ufunc' object has no attribute '{method}'")
        return functools.partial(_call, f"{self.name}.{method}", getattr(self._uf, method),
                                 API["ufunc_methods"][method])


@functools.lru_cache(maxsize=None)
def _ufunc(name):
    return ufunc(name) if name in API["ufuncs"] and isinstance(getattr(np, name, None), np.ufunc) else None


# --- kernels ----------------------------------------------------------------------------------


class ElementwiseKernel(kernel_emulator.ElementwiseKernel):
    """cupy.ElementwiseKernel through the host emulator."""

    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="",
                 no_return=False, return_tuple=False, loop_prep="", after_loop="", options=()):
        super().__init__(in_params, out_params, operation, name)

    def __call__(self, *args, size=None, block_size=None, stream=None):
        r = _wrap(super().__call__(*_dev(args)))
        given = args[len(self.ins):]  # outputs passed in are returned as themselves
        return (given[0] if len(given) == 1 else tuple(given)) if given else r


class ReductionKernel(kernel_emulator.ReductionKernel):
    """cupy.ReductionKernel through the host emulator."""

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name="reduce_kernel",
                 reduce_type=None, reduce_dims=True, preamble="", options=()):
        super().__init__(in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name)

    def __call__(self, *args, out=None, axis=None, keepdims=False, stream=None):
        r = _wrap(super().__call__(*_dev(args), axis=axis, keepdims=keepdims))
        if out is not None:
            out[...] = r
            return out
        return r


# --- cupy.random ------------------------------------------------------------------------------


class Generator:
    """cupy.random.Generator: only the methods CuPy's has (no permutation, normal, choice, shuffle)."""

    def __init__(self, seed=None):
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        sig = API["random.Generator"].get(name, False)
        if sig is False or name.startswith("_"):
            raise AttributeError(f"'cupy.random._generator_api.Generator' object has no attribute '{name}'")
        return lambda *args, **kw: _call(f"Generator.{name}", getattr(self._g, name), sig, args, kw)


def _random_module():
    m = types.ModuleType("cupy.random")
    m.default_rng = lambda seed=None: Generator(seed)
    m.Generator = Generator
    return m


random = _random_module()


# --- cupy.cuda and memory pools: enough for tinyvit's timing and memory reports ------------------


class _Stream:
    def synchronize(self):
        """Nothing is queued on the host."""


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass

    def set_limit(self, size=None, fraction=None):
        pass


def _cuda_module():
    m = types.ModuleType("cupy.cuda")
    stream = _Stream()
    m.get_current_stream = lambda: stream
    m.Stream = types.SimpleNamespace(null=stream)
    m.Device = lambda device=None: types.SimpleNamespace(id=0, synchronize=stream.synchronize)
    m.runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0,
        getDeviceProperties=lambda i: {"name": b"CuPy stand-in (NumPy on the host)", "totalGlobalMem": 0})
    return m


cuda = _cuda_module()
_POOL, _PINNED = _MemoryPool(), _MemoryPool()


def get_default_memory_pool():
    return _POOL


def get_default_pinned_memory_pool():
    return _PINNED


# --- cupyx.scipy.special.erf, for tinyvit.nn.special.erf -------------------------------------------


def special_erf(x):
    """cupyx.scipy.special.erf on a device array (float64 math.erf, cast back)."""
    import math

    host = _dev(x)
    return ndarray(np.vectorize(math.erf, otypes=[np.float64])(host).astype(host.dtype))


# --- everything else: NumPy's function of the same name, where CuPy has that name ---------------


@functools.lru_cache(maxsize=None)
def __getattr__(name):
    if name in API["numpy_aliases"]:
        return getattr(np, name)
    if name in _HOST_IN:
        return _creation(name)
    uf = _ufunc(name)
    if uf is not None:
        return uf
    if name in API["functions"] and callable(getattr(np, name, None)):
        fn, sig = getattr(np, name), API["functions"][name]
        wrapped = functools.wraps(fn)(lambda *args, **kw: _call(name, fn, sig, args, kw))
        return wrapped
    if name in API["functions"] or name in API["constants"]:
        raise AttributeError(f"the CuPy stand-in does not implement cupy.{name} (NumPy has no match)")
    raise AttributeError(f"module 'cupy' has no attribute '{name}'")
