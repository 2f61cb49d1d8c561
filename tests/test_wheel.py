"""tinyvit as users install it: the wheel and sdist `python -m build` makes from a copy of the checkout, the
wheel installed into a fresh venv (its dependencies from the package index; no checkout on the path, no
editable install), whose `tinyvit` command gives what the scripts of the checkout give."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from helpers import ROOT, run_script

from tinyvit import __version__
from tinyvit.cli.main import COMMANDS
from tinyvit.io.checkpoint import load_checkpoint
from tinyvit.io.labels import imagenet_classes
from tinyvit.io.safetensors import write_safetensors
from tinyvit.nn.model import init_params, preset

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# what the wheel must carry besides the modules: the license, and the files modules read beside themselves
DATA = ["tinyvit/io/imagenet_classes.txt", "tinyvit/testing/cupy_api.json"]
LEFT_BEHIND = ("__pycache__", "*.egg-info", "build", "dist", "runs", ".git", ".pytest_cache", "mutants")
MNIST = ROOT / "weights" / "mnist_vit.npz"
DIGIT = ROOT / "docs" / "digit.png"


def _clean_env(**extra):
    """This environment without anything that would put the checkout (or this venv) on the installed one's path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    return dict(env, **extra)


def _run(cmd, cwd, **extra_env):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=_clean_env(**extra_env),
                          timeout=600)


def _ok(r):
    assert r.returncode == 0, (r.args, r.stdout[-2000:], r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel, sdist) built by `python -m build` (the sdist, then the wheel from it) from a copy of the checkout."""
    pytest.importorskip("build", reason="python -m build: pip install build (in the [test] extra)")
    tmp = tmp_path_factory.mktemp("build")
    shutil.copytree(ROOT, tmp / "src", ignore=shutil.ignore_patterns(*LEFT_BEHIND))
    _ok(_run([sys.executable, "-m", "build", "--outdir", tmp / "dist", tmp / "src"], tmp))
    (wheel,), (sdist,) = sorted((tmp / "dist").glob("*.whl")), sorted((tmp / "dist").glob("*.tar.gz"))
    return wheel, sdist


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory):
    """A fresh venv with the wheel installed: its bin/ folder."""
    tmp = tmp_path_factory.mktemp("venv")
    _ok(_run([sys.executable, "-m", "venv", tmp / "env"], tmp))
    bin_ = tmp / "env" / "bin"
    _ok(_run([bin_ / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", built[0]], tmp))
    return bin_


def test_the_wheel_and_sdist_carry_the_license_the_data_and_the_command(built):
    wheel, sdist = built
    dist_info = f"tinyvit-{__version__}.dist-info"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        assert "tinyvit = tinyvit.cli.main:main" in z.read(f"{dist_info}/entry_points.txt").decode()
        for f in DATA:
            assert z.read(f) == (ROOT / f).read_bytes(), f
    assert {f"tinyvit/cli/commands/{m.__name__.rsplit('.', 1)[1]}.py" for m, _ in COMMANDS.values()} <= names
    assert not any(n.startswith(("scripts/", "tests/")) for n in names)
    with tarfile.open(sdist) as t:
        top = f"tinyvit-{__version__}"
        for f in ["LICENSE", "pyproject.toml", "README.md", *DATA]:
            assert t.extractfile(f"{top}/{f}").read() == (ROOT / f).read_bytes(), f
    print(f"wheel {wheel.name}: {wheel.stat().st_size:,} bytes; sdist {sdist.stat().st_size:,} bytes")


def test_the_installed_command_lists_every_subcommand(venv, tmp_path):
    r = _ok(_run([venv / "tinyvit", "--help"], tmp_path))
    assert all(f"  {name} " in r.stdout for name in COMMANDS), r.stdout
    assert _ok(_run([venv / "tinyvit", "--version"], tmp_path)).stdout.strip() == f"tinyvit {__version__}"
    where = _ok(_run([venv / "python", "-c", "import tinyvit; print(tinyvit.__file__)"], tmp_path)).stdout
    assert str(venv.parent) in where and str(ROOT) not in where  # the installed copy, not this checkout's


def _same(sub, script, args, venv, cwd, **env):
    """`tinyvit sub ARGS` in the venv and `python scripts/SCRIPT ARGS` in the checkout: the same stdout."""
    mine = _ok(_run([venv / "tinyvit", sub, *args], cwd, **env))
    theirs = _ok(run_script(script, *args, cwd=cwd, extra_env=env, timeout=300))
    assert mine.stdout == theirs.stdout and mine.stdout.strip(), (mine.stdout, theirs.stdout)
    return mine.stdout


@pytest.mark.parametrize("extra,env", [((), {}), (("--json",), {}),
                                       (("--backend", "cupy", "--json"), {"TINYVIT_CUPY_STANDIN": "1"})],
                         ids=["text", "json", "gpu-standin"])
def test_predict_on_the_shipped_mnist_model_as_the_script(venv, tmp_path, extra, env):
    """The stand-in case runs the CuPy path on the API record the wheel carries (tinyvit/testing/cupy_api.json)."""
    out = _same("predict", "predict.py", [MNIST, DIGIT, *extra], venv, tmp_path, **env)
    if extra:
        assert json.loads(out.splitlines()[-1])


def _tiny_timm_file(path):
    """A small ViT with a 1000-class head in timm's layout and file format (safetensors, format pt)."""
    cfg = preset("vit-ti16", img_size=32, dim=32, depth=1, heads=2, mlp_dim=64, num_classes=1000)
    write_safetensors(path, init_params(cfg, seed=3), {"format": "pt"})
    return path


def test_convert_a_timm_file_as_the_script(venv, tmp_path):
    """The converted checkpoints are the same, with ImageNet's class names from the data the wheel carries
    (a foreign 1000-class head), and predict on them prints those names the same way."""
    src = _tiny_timm_file(tmp_path / "model.safetensors")
    outs = []
    for side in ("wheel", "script"):
        out = tmp_path / side / "m.npz"
        cmd = ["convert", src, "--out", out, "--heads", "2", "--json"]
        r = _ok(_run([venv / "tinyvit", *cmd], tmp_path)) if side == "wheel" else \
            _ok(run_script("convert_weights.py", *cmd[1:], cwd=tmp_path, timeout=120))
        outs.append((json.loads(r.stdout.replace(str(out), "OUT")), load_checkpoint(out)))
    (j1, (p1, c1, m1)), (j2, (p2, c2, m2)) = outs
    assert j1 == j2 and c1 == c2 and sorted(p1) == sorted(p2) and all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert m1["class_names"] == m2["class_names"] == imagenet_classes()
    text = _same("predict", "predict.py", [tmp_path / "wheel" / "m.npz", DIGIT, "--top-k", "3"], venv, tmp_path)
    assert any(name in text for name in imagenet_classes())
