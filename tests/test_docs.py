"""What README, docs/ and the scripts' --help say about the checkout holds: every file and module they
name exists, every link resolves, and every command a user runs takes --json."""
import functools
import importlib
import re

import pytest
from helpers import ROOT, SCRIPTS, run_script

DOCS = ["README.md", "CONTRIBUTING.md", "docs/architecture.md", "docs/correctness.md", "docs/distributed.md",
        "docs/performance.md", "docs/usage.md"]
# a file of the checkout, named by its path (not inside another path such as ~/.cache/tinyvit/...)
PATH = re.compile(r"(?<![\w./~-])((?:tinyvit|scripts|tests|docs)/[\w/.-]*\.(?:py|md|png|jsonl|json|txt))\b")
MODULE = re.compile(r"(?<![\w./~-])(tinyvit(?:\.[A-Za-z_]\w*)+)")
LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")
# scripts for maintainers, each with its own output: no --json flag to claim
MAINTAINER_TOOLS = {"fit_erf": "prints the coefficients to paste into the source",
                    "record_cupy_api": "writes tinyvit/testing/cupy_api.json",
                    "gpu_check": "always ends with one JSON line and writes report.json",
                    "mpi_scaling": "always prints one JSON line per case"}


def _commands():
    """The scripts that are commands (a __main__ block), by stem; modules they import are not."""
    return sorted(p.stem for p in SCRIPTS.glob("*.py") if '__name__ == "__main__"' in p.read_text())


@functools.cache
def _help(stem):
    r = run_script(f"{stem}.py", "--help", timeout=60)
    assert r.returncode == 0 and r.stdout, (stem, r.stderr)
    return r.stdout


def _anchors(text):
    """The anchors GitHub gives a page's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def _broken_links(text, page):
    """Relative links in text (of the file page) whose file, or heading (#anchor), is not there."""
    bad = []
    for target, anchor in LINK.findall(text):
        if "://" in target:
            continue
        to = page.parent / target if target else page
        if not to.exists() or (anchor and to.suffix == ".md" and anchor not in _anchors(to.read_text())):
            bad.append(f"{target}#{anchor}" if anchor else target)
    return bad


def _missing_paths(text):
    return sorted({p for p in PATH.findall(text) if not (ROOT / p).exists()})


def _missing_modules(text):
    """Dotted tinyvit names (modules, or names inside them) that do not resolve."""
    bad = set()
    for name in set(MODULE.findall(text)):
        parts = name.rstrip(".").split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                functools.reduce(getattr, parts[i:], obj)
            except AttributeError:
                bad.add(name)
            break
    return sorted(bad)


@pytest.mark.e2e
def test_every_path_and_module_a_help_text_names_exists():
    bad = {s: _missing_paths(_help(s)) + _missing_modules(_help(s)) for s in _commands()}
    assert not {s: v for s, v in bad.items() if v}


def test_the_docs_list_is_every_page():
    assert sorted(DOCS[2:]) == sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_module_and_link_in_the_docs_exists(doc):
    text = (ROOT / doc).read_text()
    assert not _missing_paths(text) + _missing_modules(text) + _broken_links(text, ROOT / doc)


@pytest.mark.e2e
def test_every_users_command_takes_json():
    """README: the commands print their result as one JSON line with --json (maintainer tools aside)."""
    assert set(MAINTAINER_TOOLS) <= set(_commands())
    assert not [s for s in _commands() if s not in MAINTAINER_TOOLS and "--json" not in _help(s)]


@pytest.mark.parametrize("text,missing", [
    ("see tinyvit/images.py and `tinyvit/nn/model.py`", ["tinyvit/images.py"]),
    ("cached in ~/.cache/tinyvit/features.py, or docs/nothing.md", ["docs/nothing.md"]),
    ("tinyvit.data.loader and tinyvit.load_image, not tinyvit.data.nothing", ["tinyvit.data.nothing"]),
])
def test_a_planted_missing_path_is_caught(text, missing):
    assert _missing_paths(text) + _missing_modules(text) == missing


def test_a_planted_broken_link_is_caught():
    text = "[a](docs/usage.md#example-files) [b](docs/usage.md#no-such-part) [c](docs/none.md) [d](https://x.org/y)"
    assert _broken_links(text, ROOT / "README.md") == ["docs/usage.md#no-such-part", "docs/none.md"]


def test_readme_is_a_users_page_of_at_most_200_lines():
    """Details go to docs/usage.md and the other pages; README keeps the tour."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
