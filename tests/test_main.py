"""The `tinyvit` command (tinyvit/cli/main.py), in-process: a subcommand for every command of scripts/, each
the module its script runs; its help, version and names. The installed wheel's command: test_wheel.py."""
import ast
import sys

import pytest
from helpers import SCRIPTS

from tinyvit import __version__
from tinyvit.cli import main as cli
from tinyvit.cli.report import resume_command

MAINTAINER_ONLY = {"gpu_check", "record_cupy_api"}  # run from a checkout only (tinyvit/cli/main.py says why)


def _script_module(path):
    """The tinyvit/cli/commands module whose main scripts/NAME.py imports, or None."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinyvit.cli.commands.") \
                and any(a.name == "main" for a in node.names):
            return node.module
    return None


def test_every_script_is_a_subcommand_running_the_same_main():
    scripts = {p.stem: _script_module(p) for p in SCRIPTS.glob("*.py") if '__name__ == "__main__"' in p.read_text()}
    assert {s for s, m in scripts.items() if m is None} == MAINTAINER_ONLY
    subs = {mod.__name__: name for name, (mod, _) in cli.COMMANDS.items()}
    assert {m for m in scripts.values() if m} == set(subs)  # one subcommand per script, none without one
    for name, (mod, _) in cli.COMMANDS.items():
        assert callable(mod.main) and (SCRIPTS / f"{mod.__name__.rsplit('.', 1)[1]}.py").is_file(), name


def _out(capsys, argv, code=0):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == code
    return capsys.readouterr()


def test_help_lists_each_command_on_one_line(capsys):
    text = _out(capsys, ["--help"]).out
    for name, (_, line) in cli.COMMANDS.items():
        assert f"  {name} " in text and line in text and f"{line}\n" in text, name
    assert _out(capsys, ["--version"]).out.strip() == f"tinyvit {cli.version()}"


def test_the_version_is_the_package_s(monkeypatch):
    def not_installed(name):
        raise cli.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(cli.metadata, "version", not_installed)
    assert cli.version() == __version__


@pytest.mark.parametrize("argv,code,says", [
    ([], 2, "required: SUB"),
    (["nope"], 2, "invalid choice: 'nope'"),
    (["--nope"], 2, "required: SUB"),
])
def test_a_missing_or_unknown_command_is_a_usage_error(capsys, argv, code, says):
    assert says in _out(capsys, argv, code).err


@pytest.mark.parametrize("sub", ["predict", "train-mnist", "finetune", "convert"])
def test_a_subcommand_s_help_names_it_tinyvit_sub(capsys, monkeypatch, sub):
    monkeypatch.setattr(sys, "argv", ["unchanged"])
    text = _out(capsys, [sub, "--help"]).out
    assert text.startswith(f"usage: tinyvit {sub} [-h]") and "--json" in text


def test_a_subcommand_s_bad_flag_is_its_own_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["unchanged"])
    assert "tinyvit predict: error: unrecognized arguments: --nope" in _out(capsys, ["predict", "x.npz", "x.png", "--nope"], 2).err


@pytest.mark.parametrize("argv0,want", [
    ("tinyvit train-mnist", "tinyvit train-mnist --resume out/checkpoint.npz"),
    ("scripts/train_mnist.py", "python scripts/train_mnist.py --resume out/checkpoint.npz"),
])
def test_the_resume_line_names_the_command_that_ran(monkeypatch, argv0, want):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert resume_command(object(), "out/checkpoint.npz") == want
