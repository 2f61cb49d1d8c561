"""What the tests share, as plain functions and constants (conftest.py holds the fixtures): where the real
data and weights are and what a skip says without them, one way to start a script or a fresh interpreter,
the malicious pickles, and an error measure.

A test that starts a process (run, run_script, run_python, subprocess, mpiexec) carries the `e2e` marker:
`pytest -m "not e2e"` is the fast tier. tests/test_layout_tests.py checks both."""
import builtins
import importlib
import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyvit.backend import to_numpy

ROOT = Path(__file__).resolve().parents[1]  # the checkout: scripts/, tinyvit/, README.md
SCRIPTS = ROOT / "scripts"


# --- the real data and weights ------------------------------------------------------------------

# what a skipped real-data test tells a user to set (a fresh clone has neither)
DATA_HINT = ("real MNIST / CIFAR-10 not found: set TINYVIT_DATA to a folder holding mnist/ and cifar10/ "
             "(python scripts/train_mnist.py and finetune_cifar.py download them to ~/.cache/tinyvit: "
             "then TINYVIT_DATA=~/.cache/tinyvit)")
TI16_FILE = "vit_tiny_patch16_224.augreg_in21k_ft_in1k.npz"
WEIGHTS_HINT = (f"pretrained ViT-Ti/16 weights not found: set TINYVIT_WEIGHTS to a folder holding {TI16_FILE} "
                "(docs/usage.md, 'Example files', says where it comes from)")


def _beside_the_checkout(env, name):
    """$env when set, else CI's read-only folder beside the checkout (../shared/name)."""
    value = os.environ.get(env)
    return Path(value) if value else ROOT.parent / "shared" / name


def shared_data_dir():
    """The data root of $TINYVIT_DATA (CI: the read-only data beside the checkout); None when absent."""
    p = _beside_the_checkout("TINYVIT_DATA", "data")
    return p if p.is_dir() else None


def dataset_root(name):
    """The data root holding name/ (mnist, cifar10): what --data-dir and the loaders take; None when absent."""
    root = shared_data_dir()
    return root if root is not None and (root / name).is_dir() else None


def ti16_weights():
    """The real ViT-Ti/16 file in $TINYVIT_WEIGHTS (CI: beside the checkout); None when absent."""
    f = _beside_the_checkout("TINYVIT_WEIGHTS", "weights") / TI16_FILE
    return f if f.is_file() else None


# markers for the files that cannot take a fixture; a test prefers the mnist_root / cifar_root / ti16 fixtures
needs_data = pytest.mark.skipif(shared_data_dir() is None, reason=DATA_HINT)
needs_ti16 = pytest.mark.skipif(ti16_weights() is None, reason=WEIGHTS_HINT)


# --- processes ------------------------------------------------------------------------------------


def checkout_env(env=None, extra_env=None, pythonpath=()):
    """env (os.environ when None) with extra_env on top, and pythonpath then this checkout first on
    PYTHONPATH: the scripts import this checkout's tinyvit, not an installed copy."""
    out = dict(os.environ if env is None else env, **(extra_env or {}))
    path = [*map(str, pythonpath), str(ROOT), *out.get("PYTHONPATH", "").split(os.pathsep)]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in path if p))  # in order, once each
    return out


def run(cmd, *, cwd=None, env=None, extra_env=None, pythonpath=(), timeout=300, **kw):
    """cmd (a list; items made str) to completion: text stdout/stderr captured, the environment as
    checkout_env makes it. Extra keywords go to subprocess.run (preexec_fn ...)."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=checkout_env(env, extra_env, pythonpath), **kw)


def script(name, *args):
    """The command line of scripts/name with args, run by this Python."""
    return [sys.executable, str(SCRIPTS / name), *map(str, args)]


def load_script(name):
    """The module whose main scripts/name runs (tinyvit/cli/commands/NAME.py: the script's parser and code,
    also `tinyvit SUB`), to call its functions in-process."""
    return importlib.import_module(f"tinyvit.cli.commands.{Path(name).stem}")


def run_script(name, *args, **kw):
    """scripts/name with args to completion (run's keywords: cwd, env, extra_env, pythonpath, timeout)."""
    return run(script(name, *args), **kw)


def run_python(code, **kw):
    """python -c code in a fresh interpreter (run's keywords)."""
    return run([sys.executable, "-c", code], **kw)


def assert_same_train_state(a, b):
    """Two training checkpoints hold the same position, dropout RNG state and optimizer state (bit for bit)."""
    from tinyvit.io.checkpoint import load_checkpoint, load_optimizer_state
    (sa, oa), (sb, ob) = [(load_checkpoint(f)[2]["train_state"], load_optimizer_state(f)) for f in (a, b)]
    keys = ("epoch", "batch", "step", "rng")
    assert [sa[k] for k in keys] == [sb[k] for k in keys], (a, b)
    assert sorted(oa) == sorted(ob) and all(np.array_equal(oa[k], ob[k]) for k in oa), (a, b)


def last_json(r):
    """The last stdout line of a run that succeeded, as JSON (the scripts' --json summary)."""
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- malicious pickles ----------------------------------------------------------------------------

# how unpickling an Evil creates its marker file; the called function's name is in what a refusal says
EVIL_ROUTES = ("os.system", "builtins.exec", "builtins.eval", "builtins.open", "subprocess.call")


class Evil:
    """Unpickling this without restrictions creates the marker file, through the route `how`."""

    def __init__(self, how, marker):
        assert how in EVIL_ROUTES, how
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        code = f"open({self.marker!r}, 'w').close()"
        return {"os.system": (os.system, (f"touch {shlex.quote(self.marker)}",)),
                "builtins.exec": (builtins.exec, (code,)),
                "builtins.eval": (builtins.eval, (code,)),
                "builtins.open": (builtins.open, (self.marker, "w")),
                "subprocess.call": (subprocess.call, (["touch", self.marker],))}[self.how]


def evil_pickle(how, marker, protocol=2, wrap=None):
    """The pickled bytes of wrap(Evil) (the payload alone when wrap is None)."""
    evil = Evil(how, marker)
    return pickle.dumps(evil if wrap is None else wrap(evil), protocol=protocol)


def evil_pickles(how, marker):
    """The payload at top level and nested in a state dict, as protocols 0 (GLOBAL), 2 and 4 (STACK_GLOBAL)."""
    return [evil_pickle(how, marker, p, wrap) for p in (0, 2, 4)
            for wrap in (None, lambda e: {"state_dict": {"head.weight": e, "epoch": 3}})]


# --- numbers --------------------------------------------------------------------------------------


def torch_gelu(x, kind):
    """torch's GELU of tinyvit's kind: exact ('erf'), tanh form ('tanh'), CLIP's x sigmoid(1.702 x) ('quick')."""
    import torch  # only the torch-backed tests call this
    if kind == "quick":
        return x * torch.sigmoid(1.702 * x)
    return torch.nn.functional.gelu(x, approximate="none" if kind == "erf" else "tanh")


def rel_err(a, b, floor=1e-12):
    """max |a - b| / max(max |b|, floor): relative to the reference b, absolute when b is ~0."""
    a = to_numpy(a).astype(np.float64)
    b = to_numpy(b).astype(np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = np.max(np.abs(b)) if b.size else 0.0
    diff = np.max(np.abs(a - b)) if a.size else 0.0
    return diff / max(scale, floor)


# --- a tiny embedding setup (embed.py, knn.py, search.py) -----------------------------------------


def tiny_photos(root):
    """(a tiny random-weight checkpoint, photos/ with train/<class>/ (3 each) and val/<class>/ (2 each) of
    classes a (reddish) and b (bluish), one broken file in train/a/) written under root."""
    from PIL import Image

    from tinyvit import ViTConfig, init_params, save_checkpoint
    cfg = ViTConfig(img_size=16, patch_size=8, in_chans=3, num_classes=3, dim=16, depth=2, heads=2, mlp_dim=32)
    meta = {"eval_transform": {"mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0}}
    save_checkpoint(root / "model.npz", init_params(cfg, seed=3), cfg, meta)
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            (root / "photos" / split / c).mkdir(parents=True)
            for i in range(n):
                tint = np.array([200, 40, 40] if c == "a" else [40, 40, 200], np.uint8)
                px = np.clip(tint + rng.integers(-30, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / "photos" / split / c / f"{i}.png")
    (root / "photos" / "train" / "a" / "broken.png").write_bytes(b"not a png")
    return root / "model.npz", root / "photos"


def class_folders(root, n=12, classes=("a", "b"), noise=40):
    """Class folders of noisy colour images (24x30 px; the first class reddish, the others bluish), the same
    file names in each (00.png ...), seeded: the same pixels on every call."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            base = np.array([200, 40, 40]) if k == 0 else np.array([40, 40, 200])
            a = np.clip(base + rng.normal(0, noise, (24, 30, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / c / f"{i:02d}.png")
    return root
