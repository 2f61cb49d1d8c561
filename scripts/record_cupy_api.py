"""Record the names and signatures of the CuPy API from a real installed CuPy, for the CuPy stand-in.

Run where CuPy is installed (no GPU needed): python scripts/record_cupy_api.py [--out FILE]
The stand-in (tinyvit/testing/cupy_standin.py) refuses any function, method or keyword absent
from this list, as real CuPy would.
"""
import argparse
import ast
import inspect
import json
import re
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tinyvit" / "testing" / "cupy_api.json"


def _from_doc(obj):
    """A signature from the first line of a Cython docstring ('name(a, b=1) -> T'), or None."""
    line = (getattr(obj, "__doc__", None) or "").strip().splitlines()[:1]
    m = re.match(r"^[\w.]*\((.*)\)\s*(->.*)?$", line[0]) if line else None
    if not m:
        return None
    try:
        args = ast.parse(f"def f({m.group(1).replace(chr(92), '')}): pass").body[0].args
    except SyntaxError:
        return None
    return _from_ast(args)


def _from_ast(a):
    """{'params': [...], 'varargs': bool, 'varkw': bool} from an ast.arguments."""
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return {"params": [n for n in names if n != "self"], "varargs": a.vararg is not None,
            "varkw": a.kwarg is not None}


def signature(obj):
    """The recorded form of obj's signature; None when it has none we can read (taken as open)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return _from_doc(obj)
    kinds = inspect.Parameter
    return {"params": [p.name for p in sig.parameters.values() if p.name != "self"
                       and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)],
            "varargs": any(p.kind == kinds.VAR_POSITIONAL for p in sig.parameters.values()),
            "varkw": any(p.kind == kinds.VAR_KEYWORD for p in sig.parameters.values())}


def members(obj, public_only=True):
    """{name: signature or None} for obj's callables, and its other attributes as a sorted list."""
    calls, attrs = {}, []
    for name in dir(obj):
        if public_only and name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            continue
        try:
            v = getattr(obj, name)
        except Exception:  # noqa: BLE001 (a property that needs a device)
            attrs.append(name)
            continue
        if inspect.ismodule(v):
            continue
        if callable(v):
            calls[name] = signature(v)
        else:
            attrs.append(name)
    return calls, sorted(attrs)


def record():
    """The whole API record as a JSON-able dict."""
    import cupy
    import cupyx.scipy.special
    import numpy

    funcs, consts = members(cupy)
    ufuncs = {k: _from_doc(getattr(cupy, k)) for k in funcs if isinstance(getattr(cupy, k), cupy.ufunc)}
    nd_methods, nd_attrs = members(cupy.ndarray)
    rnd_funcs, _ = members(cupy.random)
    gen_methods, _ = members(cupy.random.Generator)
    uf_methods, _ = members(cupy.ufunc)
    special, _ = members(cupyx.scipy.special)
    aliases = sorted(n for n in dir(cupy) if not n.startswith("_") and getattr(cupy, n) is getattr(numpy, n, None))
    return {"cupy_version": cupy.__version__, "numpy_version": numpy.__version__,
            "python": sys.version.split()[0], "functions": funcs, "constants": consts, "ufuncs": ufuncs,
            "ufunc_methods": uf_methods, "ndarray_methods": nd_methods, "ndarray_attributes": nd_attrs,
            "random": rnd_funcs, "random.Generator": gen_methods, "cupyx.scipy.special": special,
            "numpy_aliases": aliases}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write the JSON (default {DEFAULT_OUT.name} "
                                                                   "in tinyvit/testing)")
    args = ap.parse_args()
    try:
        rec = record()
    except ImportError as e:
        sys.exit(f"error: CuPy is not installed here ({e}); pip install cupy-cuda12x")
    args.out.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    print(f"recorded CuPy {rec['cupy_version']}: {len(rec['functions'])} functions, "
          f"{len(rec['ndarray_methods'])} ndarray methods -> {args.out}")


if __name__ == "__main__":
    main()
