"""scripts/plot_metrics.py: curves from a run folder, a metrics.jsonl or a checkpoint; bad inputs and a
missing matplotlib give one line and exit 2."""
import json

import pytest
from helpers import load_script, run_script
from PIL import Image

from tinyvit import init_params
from tinyvit.io.checkpoint import save_checkpoint
from tinyvit.nn.model import ViTConfig

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason='matplotlib is not installed (pip install -e ".[plot]")')
TINY = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=16)


def _history(n=10):
    """Records as fit writes them: loss falling, accuracies rising, test best at epoch n - 2."""
    recs = []
    for e in range(1, n + 1):
        test = 0.9 + 0.008 * e if e <= n - 2 else 0.9 + 0.008 * (n - 2) - 0.001 * (e - n + 2)
        recs.append({"epoch": e, "step": 100 * e, "lr": 1e-3 / e, "train_loss": 1.5 / e,
                     "train_accuracy": 0.6 + 0.03 * e, "epoch_seconds": 12.5, "test_accuracy": test})
    return recs


def _write_log(path, recs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _script(*args, pythonpath=()):
    return run_script("plot_metrics.py", *args, pythonpath=pythonpath, timeout=120)


def _one_error_line(r):
    """The stderr of a refused run: exit 2, exactly one 'error: ...' line, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _check_png(path, size=(800, 300)):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < len(data) <= 80_000, len(data)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        lo, hi = im.convert("L").getextrema()
        assert lo < 100 and hi > 200  # something drawn on a light background


@pytest.mark.e2e
@needs_mpl
@pytest.mark.parametrize("kind", ["run_dir", "jsonl", "checkpoint", "train_checkpoint"])
def test_writes_png(tmp_path, kind):
    recs = _history()
    run_dir = tmp_path / "my_run"
    if kind in ("run_dir", "jsonl"):
        log = _write_log(run_dir / "metrics.jsonl", recs)
        src = run_dir if kind == "run_dir" else log
    else:
        params = init_params(TINY, seed=0)
        if kind == "checkpoint":  # a finished run's model.npz
            src = save_checkpoint(run_dir / "model.npz", params, TINY, {"history": recs, "test_accuracy": 0.95})
        else:  # an unfinished run's checkpoint.npz keeps the history in train_state
            src = save_checkpoint(run_dir / "checkpoint.npz", params, TINY,
                                  {"train_state": {"epoch": 10, "batch": 0, "step": 1000, "history": recs}})
    out = tmp_path / "out" / "curves.png"
    r = _script(src, "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{out}: 800x300 px, 10 epochs, best test accuracy 96.40% at epoch 8"
    _check_png(out)
    assert not [p for p in out.parent.iterdir() if p.name != "curves.png"]  # no temp file left


@pytest.mark.e2e
@needs_mpl
def test_json_is_one_line_with_the_png_and_the_best_epoch(tmp_path):
    log = _write_log(tmp_path / "run" / "metrics.jsonl", _history())
    r = _script(log, "--out", tmp_path / "c.png", "--dpi", "50", "--json")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1
    assert json.loads(r.stdout) == {"out": str(tmp_path / "c.png"), "width": 400, "height": 150, "epochs": 10,
                                    "best_epoch": 8, "best_test_accuracy": _history()[7]["test_accuracy"]}
    _check_png(tmp_path / "c.png", (400, 150))


@needs_mpl
def test_title_and_edge_cases_in_process(tmp_path):
    mod = load_script("plot_metrics.py")
    log = _write_log(tmp_path / "run7" / "metrics.jsonl", _history(3))
    other = _write_log(tmp_path / "run7" / "mnist_metrics.jsonl", _history(3))
    assert mod.read_run(tmp_path / "run7")[1] == "run7"
    assert mod.read_run(log)[1] == "run7"
    assert mod.read_run(other)[1] == "mnist_metrics"
    fig, best_epoch, best_acc = mod.draw(mod.read_run(log)[0], "t", (8, 3), 100)
    assert fig.get_suptitle() == "t" and best_epoch == 1 and round(best_acc, 2) == 90.8
    one = _write_log(tmp_path / "one.jsonl", _history(1))  # a single epoch still draws
    mod.main([str(one), "--out", str(tmp_path / "one.png"), "--title", "one epoch", "--dpi", "50"])
    with Image.open(tmp_path / "one.png") as im:
        assert im.format == "PNG" and im.size == (400, 150)


@pytest.mark.e2e
def test_help_names_every_flag():
    r = _script("--help")
    assert r.returncode == 0
    for flag in ("--out", "--title", "--width", "--height", "--dpi", "--json", "RUN"):
        assert flag in r.stdout


def _bad(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = json.dumps(_history(1)[0])


BAD_FILES = [
    ("empty", "", "file is empty"),
    ("blank", "\n  \n", "no epoch records"),
    ("broken", GOOD + "\n{\"epoch\": 2, \"train_loss\n", "line 2: not a JSON record"),
    ("not_object", GOOD + "\n[1, 2]\n", "line 2: expected a JSON object, got list"),
    ("missing_keys", json.dumps({"epoch": 1, "step": 5, "train_loss": 0.5}) + "\n",
     "line 1: record lacks train_accuracy, test_accuracy"),
    ("not_number", json.dumps({**_history(1)[0], "train_loss": "x"}) + "\n", "line 1: train_loss = x is not a finite number"),
    ("nan", GOOD.replace('"train_loss": 1.5', '"train_loss": NaN') + "\n", "line 1: train_loss = nan is not a finite number"),
    ("percent", json.dumps({**_history(1)[0], "test_accuracy": 93.1}) + "\n", "test_accuracy = 93.1 is not a fraction"),
    ("epochs_repeat", GOOD + "\n" + GOOD + "\n", "line 2: epoch 1 does not follow epoch 1"),
    ("bad_utf8", None, "line 1: not a JSON record"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("case, text, want", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_metrics_file_one_line(tmp_path, case, text, want):
    if text is None:
        p = tmp_path / "metrics.jsonl"
        p.write_bytes(b'{"epoch": "\xff"}\n')
    else:
        p = _bad(tmp_path, "metrics.jsonl", text)
    line = _one_error_line(_script(p, "--out", tmp_path / "c.png"))
    assert str(p) in line and want in line, line
    assert not (tmp_path / "c.png").exists()


@pytest.mark.e2e
def test_missing_inputs_one_line(tmp_path):
    line = _one_error_line(_script(tmp_path / "nope.jsonl", "--out", tmp_path / "c.png"))
    assert line == f"error: {tmp_path / 'nope.jsonl'}: no such metrics file"
    (tmp_path / "empty_run").mkdir()
    line = _one_error_line(_script(tmp_path / "empty_run", "--out", tmp_path / "c.png"))
    assert line == f"error: {tmp_path / 'empty_run' / 'metrics.jsonl'}: no such metrics file"


@pytest.mark.e2e
def test_bad_checkpoints_one_line(tmp_path):
    params = init_params(TINY, seed=0)
    plain = save_checkpoint(tmp_path / "plain.npz", params, TINY, {})
    line = _one_error_line(_script(plain, "--out", tmp_path / "c.png"))
    assert line == f"error: {plain}: the checkpoint's metadata holds no training history"
    bad = save_checkpoint(tmp_path / "bad.npz", params, TINY, {"history": _history(2)[:1] + [{"epoch": 2}]})
    line = _one_error_line(_script(bad, "--out", tmp_path / "c.png"))
    assert f"{bad}, history record 2: record lacks train_loss" in line
    junk = _bad(tmp_path, "junk.npz", "not a zip")
    assert str(junk) in _one_error_line(_script(junk, "--out", tmp_path / "c.png"))


@pytest.mark.e2e
def test_bad_flags_one_line(tmp_path):
    log = _write_log(tmp_path / "metrics.jsonl", _history(2))
    assert "--dpi must be 20 to 600" in _one_error_line(_script(log, "--dpi", "0"))
    assert "--width and --height" in _one_error_line(_script(log, "--width", "100"))


@pytest.mark.e2e
def test_without_matplotlib_one_line_hint(tmp_path):
    blocker = tmp_path / "no_mpl"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text('raise ImportError("No module named \'matplotlib\' (test stand-in)")\n')
    log = _write_log(tmp_path / "run" / "metrics.jsonl", _history(3))
    r = _script(log, "--out", tmp_path / "c.png", pythonpath=[blocker])
    assert _one_error_line(r) == 'error: plot_metrics.py needs matplotlib: pip install -e ".[plot]"'
    assert not (tmp_path / "c.png").exists()
