"""The floor plan: every import inside tinyvit runs down (README, 'Read the code'); a planted upward
import is caught; only backend.py imports CuPy."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tinyvit"
# package -> the tinyvit packages and top-level modules it may import (itself always)
ALLOWED = {
    "errors": set(),
    "backend": {"errors", "testing"},  # the one production-to-test edge: the CuPy stand-in (said in backend.py)
    "cpu": {"backend", "errors"},
    "nn": {"backend", "errors", "cpu"},
    "data": {"backend", "errors", "cpu", "progress"},
    "io": {"backend", "errors", "cpu", "nn", "data"},
    "train": {"backend", "errors", "cpu", "nn", "data", "io", "progress"},
    # the commands (cli/commands/) import the package face and the figures too: both sit below cli
    "cli": {"backend", "errors", "cpu", "nn", "data", "io", "train", "progress", "viz", "__init__"},
    "viz": {"backend", "errors", "data"},
    "progress": set(),
    "testing": {"backend", "errors"},
    "__init__": {"backend", "errors", "cpu", "nn", "data", "io", "train"},
}


def room(path: Path) -> str:
    """The package (or top-level module) a file of tinyvit belongs to."""
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


DYNAMIC = "<a dynamic import>"  # importlib with a computed name: unreadable, so refused


def _room_of(parts):
    """The room of a name inside tinyvit (parts after `tinyvit`): a package or top-level module, else the
    package face (`from tinyvit import load_checkpoint` reads __init__.py, which imports up to train)."""
    return parts[0] if parts and parts[0] in ALLOWED else "__init__"


def _dynamic(node, here):
    """The tinyvit parts importlib.import_module / __import__ is called with; DYNAMIC when not a literal."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        return DYNAMIC
    text = arg.value
    if text.startswith("."):  # relative to this file's package
        level = len(text) - len(text.lstrip("."))
        return list(here[:len(here) - (level - 1)]) + [p for p in text.lstrip(".").split(".") if p]
    return text.split(".")[1:] if text.split(".")[0] == "tinyvit" else None


def imported_rooms(source: str, path: Path):
    """(line, room) for each tinyvit package or top-level module the source imports: import statements
    (relative or absolute; a name from the package itself is its face, __init__), attributes of a bound
    `tinyvit` (`import tinyvit` then `tinyvit.train`), and importlib / __import__ calls."""
    here = path.relative_to(PKG).parent.parts  # the file's package inside tinyvit
    tree = ast.parse(source)
    bound = set()  # local names bound to the tinyvit package itself
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[:len(here) - (node.level - 1)])
            elif node.module and node.module.split(".")[0] == "tinyvit":
                base = []
            else:
                continue
            parts = base + (node.module.split(".")[1 if not node.level else 0:] if node.module else [])
            for p in [parts] if node.module and parts else [parts + [a.name] for a in node.names]:
                yield node.lineno, _room_of(p)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "tinyvit":
                    yield node.lineno, _room_of(parts[1:])
                    if a.asname is None or len(parts) == 1:
                        bound.add(a.asname or "tinyvit")
        elif isinstance(node, ast.Call) and (parts := _dynamic(node, here)) is not None:
            yield node.lineno, parts if parts is DYNAMIC else _room_of(parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            yield node.lineno, _room_of([node.attr])


def violations(source: str, path: Path):
    """The imports of a file that run up (or sideways into a room not allowed), and dynamic ones."""
    r = room(path)
    return [(path.name, line, r, to) for line, to in imported_rooms(source, path)
            if to == DYNAMIC or (to != r and to in ALLOWED and to not in ALLOWED[r])]


def test_every_import_runs_down():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        bad += violations(f.read_text(), f)
    assert not bad, bad


@pytest.mark.parametrize("planted,where", [
    ("from ..train.loop import fit", "nn/model.py"),       # the math does not know the training loop
    ("from ..io.checkpoint import save_checkpoint", "data/batches.py"),  # data knows no files of models
    ("from ..nn.model import ViTConfig", "data/folders.py"),
    ("from ..cli.args import run_args", "train/finetune.py"),  # the library never imports the CLI
    ("from ..train.dist import world", "io/convert.py"),
    ("from ..nn.special import erf", "cpu/threads.py"),  # cpu: only backend and errors
    ("from tinyvit.data import folders", "nn/layers.py"),  # absolute imports are read too
    ("import tinyvit.cli.args", "train/loop.py"),
    ("from tinyvit import load_checkpoint", "data/batches.py"),  # the package face imports io and train
    ("from .. import load_checkpoint", "data/batches.py"),
    ("from ... import load_model", "io/hf_layouts.py"),  # no such level: still the face, never skipped
    ("import tinyvit", "nn/layers.py"),
    ("import tinyvit.errors\nfit = tinyvit.train.loop.fit", "nn/layers.py"),  # the import is allowed, the use is not
    ("import tinyvit as tv\nx = tv.load_checkpoint", "cpu/threads.py"),
    ("import importlib\nloop = importlib.import_module('tinyvit.train.loop')", "nn/model.py"),
    ("from importlib import import_module\nargs = import_module('..cli.args', __package__)", "data/loader.py"),
    ("args = __import__('tinyvit.cli.args')", "io/convert.py"),
    ("import importlib\nm = importlib.import_module(name)", "nn/layers.py"),  # computed: cannot be checked
])
def test_a_planted_upward_import_is_caught(planted, where):
    path = PKG / where
    assert path.is_file()
    assert not violations(path.read_text(), path)
    assert violations(path.read_text() + "\n" + planted + "\n", path)


@pytest.mark.parametrize("allowed,where", [
    ("from tinyvit import errors", "nn/layers.py"),
    ("from tinyvit.nn import layers", "io/convert.py"),
    ("import tinyvit.backend\nxp = tinyvit.backend.get_array_module", "data/batches.py"),
    ("import importlib\nm = importlib.import_module('tinyvit.nn.model')", "train/loop.py"),
    ("from .. import errors", "cli/args.py"),
])
def test_a_downward_import_is_not_flagged(allowed, where):
    path = PKG / where
    assert not violations(path.read_text() + "\n" + allowed + "\n", path)


def test_only_the_backend_imports_cupy():
    for f in sorted(PKG.rglob("*.py")):
        tree = ast.parse(f.read_text())
        mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        if any(m.split(".")[0] in ("cupy", "cupyx") for m in mods):
            assert f.relative_to(PKG).as_posix() in ("backend.py",), f



# --- the library takes dataclasses, never argparse's namespace (tinyvit.cli builds them) ----------

LIBRARY = ("nn", "data", "io", "train")


def namespace_reads(source):
    """(line, code) where a module reads an argparse namespace: argparse imported, or an attribute read
    from a function's parameter named args (the scripts' name for the parsed flags)."""
    tree = ast.parse(source)
    hits = [n for n in ast.walk(tree) if isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)]
    hits += [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "argparse"]
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = fn.args
            if any(p.arg == "args" for p in a.posonlyargs + a.args + a.kwonlyargs):
                hits += [n for n in ast.walk(fn) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                         and n.value.id == "args"]
                hits += [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                         and n.func.id in ("getattr", "vars", "hasattr") and n.args
                         and isinstance(n.args[0], ast.Name) and n.args[0].id == "args"]
    return [(n.lineno, ast.unparse(n)) for n in hits]


def test_the_library_reads_no_argparse_namespace():
    bad = [(f.relative_to(PKG).as_posix(), *hit) for room in LIBRARY for f in sorted((PKG / room).rglob("*.py"))
           for hit in namespace_reads(f.read_text())]
    assert not bad, bad


@pytest.mark.parametrize("planted", [
    "def run(args, tc):\n    return args.mode",
    "def run(cfg, *, args=None):\n    return getattr(args, 'mode', None)",
    "from argparse import Namespace",
    "import argparse",
])
def test_a_planted_namespace_read_is_caught(planted):
    path = PKG / "train" / "finetune.py"
    assert not namespace_reads(path.read_text())
    assert namespace_reads(path.read_text() + "\n" + planted + "\n")


# --- scripts import what a plain import reaches ------------------------------------------------------

SCRIPTS = PKG.parent / "scripts"


def path_edits(source):
    """(line, code) for each use of sys.path or site.addsitedir: a script that edits its import path."""
    tree = ast.parse(source)
    hits = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and (n.value.id, n.attr) in {("sys", "path"), ("site", "addsitedir")}]
    hits += [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module in ("sys", "site")
             and any(a.name in ("path", "addsitedir") for a in n.names)]
    return [(n.lineno, ast.unparse(n)) for n in hits]


def test_no_script_edits_sys_path():
    """A script imports tinyvit as installed and its neighbours in scripts/ (python puts a script's folder
    on the path); the torch rival benchmark.py races (scripts/torch_vit.py) is one of those."""
    bad = [(f.name, *hit) for f in sorted(SCRIPTS.glob("*.py")) for hit in path_edits(f.read_text())]
    assert not bad, bad


@pytest.mark.parametrize("planted", [
    "sys.path.insert(0, str(ROOT))",
    "sys.path[:0] = ['tests']",
    "from sys import path\npath.append('tests')",
    "import site\nsite.addsitedir('tests')",
])
def test_a_planted_sys_path_edit_is_caught(planted):
    assert path_edits("import sys\nfrom pathlib import Path\nROOT = Path('.')\n" + planted + "\n")
