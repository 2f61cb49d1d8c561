"""notebooks/walkthrough.ipynb: stored clean (no outputs, no execution counts), written against the public
API, and executed top to bottom by a Jupyter kernel, failing on any cell's error.

The runner is nbclient: small, maintained by the Jupyter project, the executor nbconvert itself uses, and
called here as a plain function inside an ordinary test (nbmake would add a pytest plugin that collects
notebooks as tests of their own, with its own options and collection rules)."""
import ast
import json

import pytest
from helpers import DATA_HINT, ROOT, checkout_env, dataset_root

NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"


def _cells(kind):
    return [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == kind]


def _source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_the_notebook_is_stored_without_outputs():
    dirty = [i for i, c in enumerate(_cells("code")) if c.get("outputs") or c.get("execution_count") is not None]
    assert not dirty, f"code cells {dirty} hold outputs or execution counts: clear them before committing"


def test_the_notebook_uses_public_names_only():
    """No private name of tinyvit (a leading underscore) is imported or reached through an attribute."""
    private = []
    for cell in _cells("code"):
        for node in ast.walk(ast.parse(_source(cell))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinyvit"):
                names = [*node.module.split("."), *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [p for a in node.names if a.name.startswith("tinyvit") for p in a.name.split(".")]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("tinyvit", "ref"):
                names = [node.attr]
            else:
                continue
            private += [n for n in names if n.startswith("_")]
    assert not private, private


@pytest.mark.e2e
@pytest.mark.skipif(dataset_root("mnist") is None, reason=DATA_HINT)
def test_the_notebook_runs_top_to_bottom(monkeypatch):
    """Every cell runs without an error in a fresh kernel, from the notebook's folder (as Jupyter runs it);
    part 5 runs where TINYVIT_WEIGHTS holds ViT-Ti/16 and prints a note where it does not."""
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbclient, ipykernel)")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PYTHONPATH", checkout_env()["PYTHONPATH"])  # the kernel imports this checkout's tinyvit
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.execute(nb, cwd=str(NOTEBOOK.parent), kernel_name="python3", timeout=600)  # raises on a cell's error
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
