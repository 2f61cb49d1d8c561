"""The tests' own floor plan, read with ast: a test that starts a process carries the `e2e` marker (so
`pytest -m "not e2e"` is the fast tier) and only such tests carry it; no test module does work when it is
collected; test files are named after what they test. Planted examples show each check can fail."""
import ast
import builtins
from functools import cache
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PKG = TESTS.parent / "tinyvit"
SCRIPTS = TESTS.parent / "scripts"

# calls that start a process; a function that makes one (helpers.run_script, a test's own _fit ...) starts one too
SPAWN = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
         "subprocess.getoutput", "subprocess.getstatusoutput", "os.system", "os.popen", "os.fork", "os.forkpty",
         "pty.spawn", "multiprocessing.Process", "asyncio.create_subprocess_exec", "asyncio.create_subprocess_shell",
         "nbclient.execute"}  # nbclient.execute starts a Jupyter kernel
SPAWN_PREFIXES = ("os.spawn", "os.exec", "os.posix_spawn")
E2E = "pytest.mark.e2e"

# what a module may call while it is collected: constructors of constants, paths, skip conditions' inputs, configs
IMPORT_TIME_CALLS = {
    *(f"builtins.{n}" for n in ("int", "float", "str", "bool", "bytes", "dict", "list", "tuple", "set", "frozenset",
                                "range", "len", "sorted", "reversed", "enumerate", "zip", "min", "max", "sum", "abs",
                                "round", "repr", "isinstance", "issubclass", "getattr", "hasattr", "map", "filter",
                                "any", "all", "chr", "ord", "object")),
    "pathlib.Path", "os.environ.get", "os.getenv", "os.path.join", "os.path.dirname", "os.path.abspath",
    "shutil.which", "importlib.util.find_spec", "json.dumps", "functools.partial", "functools.cache",
    "functools.lru_cache", "re.compile", "pytest.param", "pytest.importorskip", "pytest.fixture",
    "numpy.float16", "numpy.float32", "numpy.float64", "numpy.int32", "numpy.int64", "numpy.uint8", "numpy.dtype",
}
IMPORT_TIME_PREFIXES = ("pytest.mark.",)
CONFIGS = {"ViTConfig", "LoraConfig", "preset", "TrainConfig", "EvalTransform"}  # tinyvit's settings dataclasses: fields, no arrays
PURE_METHODS = {"resolve", "items", "keys", "values", "get", "format", "join", "split", "rsplit", "replace",
                "strip", "rstrip", "lstrip", "encode", "decode", "startswith", "endswith", "lower", "upper",
                "with_suffix", "with_name", "joinpath", "copy", "append", "extend", "update", "index", "count"}
CONDITIONS = {"pytest.mark.skipif", "pytest.mark.xfail"}  # their arguments may ask the machine anything

# modules imported while tests are collected (mpi_fit.py is a script run by test_dist.py), and the ones of
# scripts/ they import (through pyproject.toml's pythonpath)
COLLECTED = ["conftest.py", "helpers.py", "toy_data.py"]
COLLECTED_SCRIPTS = ["torch_vit.py"]

# test files not named after one tinyvit module or script, and what they cover instead
CROSS_CUTTING = {
    "test_bf16_model": "--precision bf16 through nn's layers and model, train's fit and the flag, against torch's autocast",
    "test_convert_families": "io.convert and io.families on the files timm writes for each family",
    "test_cupy_scripts": "every script with --backend cupy, end to end",
    "test_docs": "README, docs/ and the scripts' --help against the checkout: paths, modules, links, --json",
    "test_export_families": "io.export's timm hub folder, loaded back by timm, for each family",
    "test_faults": "faults from the operating system, through the scripts",
    "test_finetune_families": "scripts/finetune.py and evaluate.py on each family's timm hub folder",
    "test_fuzz": "every file loader, fuzzed",
    "test_gradcheck": "the whole model's backward by finite differences",
    "test_labels_figures": "io.labels, viz and scripts/show_patches.py",
    "test_layout": "tinyvit's import floor plan",
    "test_layout_tests": "the tests' own floor plan",
    "test_notebook": "notebooks/walkthrough.ipynb, stored clean and executed top to bottom",
    "test_nvrtc": "nn.kernels as NVRTC compiles them",
    "test_robustness": "untrusted files, killed runs, non-finite numbers across the package",
    "test_scripts": "the fine-tuning and benchmark scripts end to end",
    "test_shards": "cpu.threads' batch shards and cpu.blas together",
    "test_wheel": "the built wheel and sdist, the wheel installed in a fresh venv: its tinyvit command and data",
}


def dotted(node):
    """a.b.c for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def is_fixture(fn):
    return any(dotted(d.func if isinstance(d, ast.Call) else d) == "pytest.fixture" for d in fn.decorator_list)


class Module:
    """One test module's source, read for what it imports, defines, marks and runs."""

    def __init__(self, name, source):
        self.name, self.tree = name, ast.parse(source)
        self.aliases = {}  # local name -> the dotted name it was imported as
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        self.defs = {n.name: n for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.classes = {n.name: n for n in self.tree.body if isinstance(n, ast.ClassDef)}

    def resolve(self, name):
        """The dotted name a call's target stands for: through imports; builtins as builtins.NAME."""
        head, _, rest = name.partition(".")
        if head in self.aliases:
            return self.aliases[head] + ("." + rest if rest else "")
        if head not in self.defs and head not in self.classes and hasattr(builtins, head):
            return "builtins." + name
        return name

    # --- who starts a process --------------------------------------------------------------------

    def spawner_why(self, node, known):
        """The first call in node that starts a process (directly or through a function that does), or None."""
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            name = dotted(call.func)
            if name is None:
                continue
            if name in known:
                return f"{name} -> {known[name]}"
            full = self.resolve(name)
            if full in SPAWN or full.startswith(SPAWN_PREFIXES):
                return full
            mod, _, fn = full.rpartition(".")
            if mod and (TESTS / f"{mod}.py").is_file() and fn in spawners(mod):
                return f"{full} -> {spawners(mod)[fn]}"
        return None

    def spawners(self):
        """module-level function -> how it starts a process, for those that do."""
        if hasattr(self, "_spawners"):
            return self._spawners
        why, changed = {}, True
        while changed:
            changed = False
            for name, fn in self.defs.items():
                if name not in why and (w := self.spawner_why(fn, why)):
                    why[name], changed = w, True
        self._spawners = why
        return why

    def spawning_fixtures(self, inherited):
        """fixture name -> how it starts a process: its body, or a fixture it requests (conftest's included)."""
        own = {n: fn for n, fn in self.defs.items() if is_fixture(fn)}
        fx = {k: v for k, v in inherited.items() if k not in own}
        body, changed = self.spawners(), True
        while changed:
            changed = False
            for name, fn in own.items():
                if name in fx:
                    continue
                w = body.get(name) or next((f"fixture {a.arg} -> {fx[a.arg]}" for a in fn.args.args if a.arg in fx), None)
                if w:
                    fx[name], changed = w, True
        return fx

    def tests(self):
        """(name, function node, marks on its class or None) for every test function."""
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                yield node.name, node, []
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                marks = list(node.decorator_list) + self.pytestmark(node.body)
                for fn in node.body:
                    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name.startswith("test"):
                        yield f"{node.name}::{fn.name}", fn, marks

    def pytestmark(self, body):
        """The marks a `pytestmark = ...` in body sets."""
        out = []
        for node in body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
                v = node.value
                out += list(v.elts) if isinstance(v, (ast.List, ast.Tuple)) else [v]
        return out

    def is_e2e(self, mark):
        name = dotted(mark.func if isinstance(mark, ast.Call) else mark)
        return name is not None and self.resolve(name) == E2E

    def autouse(self, fixtures):
        """The fixtures among these that this module defines with autouse=True."""
        return [n for n, fn in self.defs.items() if n in fixtures and is_fixture(fn)
                and any("autouse=True" in ast.unparse(d) for d in fn.decorator_list)]

    def e2e_report(self, conftest_fixtures, conftest_autouse=()):
        """(unmarked tests that start a process, marked tests that start none), as 'file::test: why' lines."""
        body, fx = self.spawners(), self.spawning_fixtures(conftest_fixtures)
        autouse = [*conftest_autouse, *self.autouse(fx)]
        module_marks = self.pytestmark(self.tree.body)
        unmarked, needless, spawning = [], [], []
        for name, fn, class_marks in self.tests():
            why = (body.get(fn.name) if not class_marks else self.spawner_why(fn, body)) \
                or next((f"fixture {a.arg} -> {fx[a.arg]}" for a in fn.args.args if a.arg in fx), None) \
                or next((f"autouse fixture {a} -> {fx[a]}" for a in autouse), None)
            marked = any(self.is_e2e(m) for m in [*fn.decorator_list, *class_marks, *module_marks])
            spawning.append(bool(why))
            if why and not marked:
                unmarked.append(f"{self.name}.py::{name}: starts a process ({why}) without @pytest.mark.e2e")
            elif marked and not why:
                needless.append(f"{self.name}.py::{name}: marked e2e but starts no process"
                                + (" (the module's pytestmark marks it)" if any(map(self.is_e2e, module_marks)) else ""))
        if spawning and all(spawning) and not any(map(self.is_e2e, module_marks)):
            needless.append(f"{self.name}.py: every test starts a process: mark the module (pytestmark = pytest.mark.e2e)")
        return unmarked, needless

    # --- work at collection time ------------------------------------------------------------------

    def call_ok(self, call, seen):
        """Whether a call made at import is cheap: an allowed constructor, a pure method, a config, a
        skip condition, or a function of this module that makes only such calls itself."""
        name = dotted(call.func)
        full = self.resolve(name) if name else None
        if full in CONDITIONS:
            return True
        if full and (full in IMPORT_TIME_CALLS or full.startswith(IMPORT_TIME_PREFIXES)):
            return True
        if full and full.startswith("tinyvit") and full.rsplit(".", 1)[-1] in CONFIGS:
            return True
        if isinstance(call.func, ast.Attribute) and call.func.attr in PURE_METHODS:
            return True
        if name in self.defs and name not in self.aliases:
            if name in seen:
                return True
            return not self.import_time_calls(self.defs[name].body, seen | {name})
        return False

    def import_time_calls(self, nodes, seen=frozenset()):
        """The calls in nodes (run at import) that are not cheap: (line, source) pairs. Lambdas' bodies
        and nested functions do not run; skipif/xfail conditions are not looked into."""
        bad, stack = [], list(nodes)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Lambda):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # only its decorators and defaults run
                stack += node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d]
                continue
            if isinstance(node, ast.Call):
                if not self.call_ok(node, seen):
                    bad.append((node.lineno, ast.unparse(node.func)))
                    continue
                name = dotted(node.func)
                if name and self.resolve(name) in CONDITIONS:
                    continue
            stack += [c for c in ast.iter_child_nodes(node) if c is not None]
        return bad

    def collection_work(self, body=None):
        """'file:line: what' for each module-level statement that does more than define constants."""
        out = []
        for node in self.tree.body if body is None else body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                continue  # a docstring
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                exprs = node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d]
            elif isinstance(node, ast.ClassDef):
                out += self.collection_work(node.body)
                exprs = node.decorator_list + node.bases
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                exprs = [node.value] if node.value is not None else []
            elif isinstance(node, ast.Try):
                out += self.collection_work(node.body + node.orelse + node.finalbody
                                            + [s for h in node.handlers for s in h.body])
                continue
            elif isinstance(node, ast.If):
                out += self.collection_work(node.body + node.orelse)
                exprs = [node.test]
            else:
                out.append(f"{self.name}.py:{node.lineno}: {type(node).__name__.lower()} statement "
                           f"`{ast.unparse(node).splitlines()[0][:80]}` runs at import")
                continue
            out += [f"{self.name}.py:{line}: calls {what} at import" for line, what in self.import_time_calls(exprs)]
        return out


@cache
def module(name):
    return Module(name, (TESTS / f"{name}.py").read_text())


@cache
def spawners(name):
    return module(name).spawners()


def conftest_fixtures():
    return module("conftest").spawning_fixtures({})


def report(name):
    fx = conftest_fixtures()
    return module(name).e2e_report(fx, module("conftest").autouse(fx))


def _test_files():
    return sorted(p.stem for p in TESTS.glob("test_*.py"))


# --- the checks ------------------------------------------------------------------------------------


def test_every_test_that_starts_a_process_is_marked_e2e():
    unmarked = [line for name in _test_files() for line in report(name)[0]]
    assert not unmarked, "\n".join(unmarked)


def test_e2e_marks_only_tests_that_start_a_process():
    """A module marks e2e as a whole (pytestmark) when, and only when, every test in it starts a process."""
    needless = [line for name in _test_files() for line in report(name)[1]]
    assert not needless, "\n".join(needless)


def test_no_module_does_work_when_collected():
    """Module level holds imports, definitions and constants (literals, Path(...), configs, marks and their
    skip conditions): no model built, no file read, no process started while pytest collects."""
    work = [line for name in _test_files() + [c.removesuffix(".py") for c in COLLECTED]
            for line in module(name).collection_work()]
    work += [line for c in COLLECTED_SCRIPTS
             for line in Module(c.removesuffix(".py"), (SCRIPTS / c).read_text()).collection_work()]
    assert not work, "\n".join(work)


def test_the_e2e_marker_is_declared(pytestconfig):
    markers = pytestconfig.getini("markers")
    assert any(m.startswith("e2e:") for m in markers), markers


def _names_in_tinyvit_and_scripts():
    names = {p.stem for p in PKG.rglob("*.py") if p.stem != "__init__"} | {p.name for p in PKG.rglob("*") if p.is_dir()}
    return names | {p.stem for p in SCRIPTS.glob("*.py")}


def test_test_files_are_named_after_what_they_test():
    """tests/test_<name>.py: a tinyvit module or package, or a script; else listed in CROSS_CUTTING."""
    names = _names_in_tinyvit_and_scripts()
    unnamed = [f for f in _test_files() if f.removeprefix("test_") not in names and f not in CROSS_CUTTING]
    assert not unnamed, f"name these after the module they test, or list them in CROSS_CUTTING: {unnamed}"
    stale = [f for f in CROSS_CUTTING if f not in _test_files() or f.removeprefix("test_") in names]
    assert not stale, f"CROSS_CUTTING entries that no longer apply: {stale}"


# --- each check catches a planted fault ------------------------------------------------------------

PLANTED = {
    "subprocess": ("import subprocess, sys\n\ndef test_x():\n    subprocess.run([sys.executable, '-V'])\n", 1),
    "helper": ("from helpers import run_script\n\ndef test_x():\n    run_script('predict.py', '--help')\n", 1),
    "own-helper": ("import subprocess\n\ndef _go():\n    return subprocess.Popen(['true'])\n\n\n"
                   "def _twice():\n    return _go(), _go()\n\n\ndef test_x():\n    _twice()\n", 1),
    "fixture": ("import os\nimport pytest\n\n@pytest.fixture\ndef served():\n    os.system('true')\n\n\n"
                "def test_x(served):\n    pass\n", 1),
    "marked": ("import pytest\nfrom helpers import run\n\n@pytest.mark.e2e\ndef test_x():\n    run(['true'])\n", 0),
    "module-marked": ("import pytest\nfrom helpers import run_python\npytestmark = [pytest.mark.e2e]\n\n"
                      "def test_x():\n    run_python('1')\n", 0),
    "no-process": ("def test_x():\n    assert 1\n", 0),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_a_planted_unmarked_process_is_caught(case):
    source, n_unmarked = PLANTED[case]
    assert len(Module("test_planted", source).e2e_report(conftest_fixtures())[0]) == n_unmarked


def test_a_planted_needless_mark_is_caught():
    src = "import pytest\npytestmark = pytest.mark.e2e\n\ndef test_x():\n    assert 1\n"
    assert len(Module("test_planted", src).e2e_report({})[1]) == 1
    src = "import pytest\nfrom helpers import run\n\n@pytest.mark.e2e\ndef test_x():\n    run(['true'])\n"
    assert "mark the module" in Module("test_planted", src).e2e_report({})[1][0]


@pytest.mark.parametrize("line", [
    "PARAMS = init_params(CFG)",  # a model built at import
    "TEXT = (ROOT / 'README.md').read_text()",  # a file read at import
    "DATA = np.load('x.npz')",
    "sys.path.insert(0, '.')",  # a statement with an effect
    "for i in range(3):\n    CASES.append(i)",
    "CASES = [json.loads(p.read_text()) for p in ROOT.glob('*.json')]",
    "CAN = _probe()",  # a function of the module that does work
])
def test_planted_collection_work_is_caught(line):
    src = ("import json, sys\nfrom pathlib import Path\nimport numpy as np\nfrom tinyvit import init_params, ViTConfig\n"
           "ROOT = Path(__file__).resolve().parents[1]\nCFG = ViTConfig(img_size=8)\nCASES = []\n\n"
           "def _probe():\n    return (ROOT / 'x').read_bytes()\n\n" + line + "\n")
    assert Module("test_planted", src).collection_work()


def test_constants_skip_conditions_and_pure_helpers_pass():
    src = ("import os, shutil\nimport pytest\nfrom pathlib import Path\nfrom tinyvit import preset\n"
           "ROOT = Path(__file__).resolve().parents[1]\nMPI = shutil.which('mpiexec')\n"
           "N = int(os.environ.get('N', 3))\nCFG = preset('mnist', depth=1)\n"
           "needs = pytest.mark.skipif(not (ROOT / 'x').is_file(), reason='x')\n"
           "try:\n    import torch\nexcept ImportError:\n    torch = None\n\n"
           "def _ids(n):\n    return [f'case{i}' for i in range(n)]\n\n"
           "IDS = _ids(N)\nCASES = {k: (lambda: open(k)) for k in IDS}\n\n"
           "@pytest.mark.parametrize('k', sorted(CASES))\ndef test_x(k):\n    pass\n")
    assert Module("test_planted", src).collection_work() == []
