"""The scripts' shared command line (tinyvit.cli) on the path a new user takes: defaults resolved after
parsing, --resume alone, runs never silently replaced, head mode's rerun and its feature cache."""
import argparse
import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import DATA_HINT, ROOT, WEIGHTS_HINT, assert_same_train_state, class_folders, last_json, load_script, run_script

from tinyvit import TinyViTError, ViTConfig
from tinyvit.cli.args import run_args
from tinyvit.cli.finetune import parse, parser, train_settings
from tinyvit.cli.sizes import add_size_args, input_size
from tinyvit.io.checkpoint import load_checkpoint
from tinyvit.train.finetune import HEAD
from tinyvit.train.optim import run_schedule

# a small, quick MNIST run: 512 images, 2 blocks of patch 7 (8 steps an epoch)
TINY_MNIST = ["--limit-train", "512", "--limit-test", "128", "--depth", "1", "--patch-size", "7", "--quiet", "--json"]


def _mnist(data, *args, cwd=None):
    return run_script("train_mnist.py", *TINY_MNIST, "--data-dir", data, *args, cwd=cwd)


def _folder(root, n=12, classes=("a", "b")):
    """Class folders of noisy colour images, the same file names in each (00.png ...)."""
    return class_folders(root, n, classes, noise=40)


def _head(data, out, *extra):
    return run_script("finetune.py", "--data", data, "--preset", "vit-ti16", "--img-size", "32", "--val-split", "0.25",
                      "--epochs", "20", "--batch-size", "8", "--out", out, *extra)


# --- defaults -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_one_epoch_with_default_settings_runs_and_says_the_warmup_was_shortened(tmp_path, mnist_root):
    r = _mnist(mnist_root, "--epochs", "1", "--batch-size", "16", "--out", tmp_path / "run")  # 32 steps
    assert last_json(r)["epochs"] == 1
    notes = [line for line in r.stderr.splitlines() if "warmup shortened" in line]
    assert notes == ["note: warmup shortened from 1 to 0.09375 epochs (3 steps), a tenth of this 1-epoch run"]


def test_the_shipped_mnist_model_is_what_the_default_command_trains_and_readme_says_so():
    """weights/mnist_vit.npz was trained with exactly train_mnist.py's defaults (seed included), and
    README's results row gives its final test accuracy."""
    defaults = run_args(load_script("train_mnist.py").parse_args(["--out", "unused"]))
    meta = load_checkpoint(ROOT / "weights" / "mnist_vit.npz")[2]
    assert meta["run_args"] == defaults
    assert meta["history"][-1]["test_accuracy"] == meta["test_accuracy"]
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| MNIST from scratch"))
    assert f"**{100 * meta['test_accuracy']:.2f}%**" in row and "`python scripts/train_mnist.py`" in row


@pytest.mark.parametrize("argv,want", [
    (["--epoch", "5"], {"epochs": 5, "lr": HEAD.lr}),  # argparse takes the abbreviation
    (["--batch", "16", "--label", "0.2", "--aug", "crop_flip"], {"batch_size": 16, "label_smoothing": 0.2,
                                                                 "augment": "crop_flip", "epochs": 30}),
    (["--mode", "full", "--lr=1e-4"], {"lr": 1e-4, "epochs": 3, "batch_size": 32, "augment": "crop_flip"}),
])
def test_finetune_flags_typed_are_never_overwritten_by_a_modes_defaults(tmp_path, argv, want):
    args = parse(parser("x"), ["--data", str(tmp_path), "--preset", "vit-ti16", "--out", str(tmp_path / "o"), *argv])
    tc = train_settings(args)
    assert {k: getattr(tc, k) for k in want} == want


@pytest.mark.e2e
def test_finetune_help_states_each_modes_defaults_and_examples_on_their_own_lines():
    r = run_script("finetune.py", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0
    for s in ("training epochs (default 30 in head mode, 3 in full/progressive/partial mode)",
              "peak learning rate (default 0.003 in head mode, 5e-05 in full/progressive mode, 0.0001 in partial mode; "
              "0.001 with --lora-rank or --adapter)",
              "images per step (default 256 in head mode, 32 in full/progressive/partial mode)",
              "training augmentation (default none in head/partial mode, crop_flip in full/progressive mode)"):
        assert s in text, s
    assert "\n  python scripts/finetune.py --data pets --weights W\n" in r.stdout


def test_progressive_head_epochs_train_at_head_modes_lr(tmp_path):
    args = parse(parser("x"), ["--data", str(tmp_path), "--preset", "vit-ti16", "--mode", "progressive",
                               "--epochs", "3", "--out", str(tmp_path / "o")])
    tc = train_settings(args)
    lr = run_schedule(tc, 10)
    assert tc.head_epochs == 1 and lr(0) == HEAD.lr and lr(5) > 1e-3  # the zero head at 3e-3 ...
    assert lr(10) == 0.0 and max(lr(s) for s in range(10, 30)) <= tc.lr  # ... then the full recipe, warmed up


# --- runs are never silently replaced; --resume alone --------------------------------------------


@pytest.mark.e2e
def test_a_second_run_moves_to_a_numbered_folder_and_an_explicit_out_needs_overwrite(tmp_path, mnist_root):
    first = last_json(_mnist(mnist_root, "--epochs", "1", cwd=tmp_path))
    model = Path(tmp_path / first["checkpoint"]).read_bytes()
    r = _mnist(mnist_root, "--epochs", "1", cwd=tmp_path)
    second = last_json(r)
    assert Path(second["checkpoint"]).parent == Path("runs/mnist-2")
    assert r.stderr.splitlines()[0] == "runs/mnist holds a run; this one goes to runs/mnist-2 (--out DIR to choose)"
    assert (tmp_path / "runs" / "mnist" / "model.npz").read_bytes() == model  # the first run is untouched
    r = _mnist(mnist_root, "--epochs", "1", "--out", "runs/mnist", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "runs" / "mnist" / "model.npz").read_bytes() == model
    assert last_json(_mnist(mnist_root, "--epochs", "1", "--out", "runs/mnist", "--overwrite", cwd=tmp_path))["epochs"] == 1


@pytest.mark.e2e
def test_resume_alone_continues_with_the_saved_settings(tmp_path, mnist_root):
    flags = ["--epochs", "2", "--lr", "2e-3", "--dim", "32", "--heads", "2", "--mlp-dim", "64", "--seed", "3"]
    straight = last_json(_mnist(mnist_root, *flags, "--out", tmp_path / "a"))
    cut = last_json(_mnist(mnist_root, *flags, "--out", tmp_path / "b", "--time-limit", "0"))  # stops after one step
    assert cut["stopped_early"] and cut["steps"] == 1
    resumed = last_json(_mnist(mnist_root, "--resume", tmp_path / "b" / "checkpoint.npz"))
    assert resumed["epochs"] == 2 and Path(resumed["checkpoint"]) == tmp_path / "b" / "model.npz"
    assert resumed["steps_run"] == straight["steps"] - 1  # from the checkpoint on, not a rerun from step 0
    want, got = load_checkpoint(straight["checkpoint"])[0], load_checkpoint(resumed["checkpoint"])[0]
    assert all(np.array_equal(want[k], got[k]) for k in want)  # bit for bit, as the uninterrupted run
    assert_same_train_state(tmp_path / "a" / "checkpoint.npz", tmp_path / "b" / "checkpoint.npz")
    r = _mnist(mnist_root, "--resume", tmp_path / "b" / "checkpoint.npz", "--lr", "0.1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "--lr 0.1 differs from the saved run's 0.002" in r.stderr
    r = _mnist(mnist_root, "--resume", tmp_path / "b" / "checkpoint.npz", "--epochs", "3")
    assert last_json(r)["epochs"] == 3 and last_json(r)["steps_run"] == straight["steps"] // 2
    assert "extending the run" in r.stderr
    assert len(load_checkpoint(tmp_path / "b" / "model.npz")[2]["history"]) == 3


# --- head mode: the rerun, the feature cache ---------------------------------------------------


@pytest.mark.e2e
def test_head_mode_rerun_prints_its_summary_from_the_cache(tmp_path):
    data = _folder(tmp_path / "photos")
    first = last_json(_head(data, tmp_path / "run", "--json"))
    assert first["features_cached"] is False
    r = _head(data, tmp_path / "run", "--overwrite")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.startswith(f"test accuracy {first['test_accuracy'] * 100:.2f}% after 20 epochs")
    assert "features from the cache" in r.stdout


@pytest.mark.e2e
def test_feature_cache_misses_when_the_folder_changes(tmp_path):
    """Two class folders swapped (same counts, same file names): the old features must not be used,
    so the reported accuracy is the one evaluate.py measures on the model."""
    data = _folder(tmp_path / "photos")
    first = last_json(_head(data, tmp_path / "r1", "--json"))
    os.rename(data / "a", data / "tmp")
    os.rename(data / "b", data / "a")
    os.rename(data / "tmp", data / "b")
    second = last_json(_head(data, tmp_path / "r2", "--json"))
    assert second["features_cached"] is False
    ev = last_json(run_script("evaluate.py", second["checkpoint"], "--json"))
    assert ev["test_accuracy"] == second["test_accuracy"] and first["test_accuracy"] >= 0.5
    again = last_json(_head(data, tmp_path / "r3", "--json"))  # unchanged now: a hit
    assert again["features_cached"] is True and again["test_accuracy"] == second["test_accuracy"]


@pytest.mark.e2e
def test_unreadable_files_counts_every_file_warned_about(tmp_path):
    data = _folder(tmp_path / "photos")
    (data / "a" / "notes.txt").write_text("not an image")  # by extension
    (data / "a" / "empty.png").write_bytes(b"")  # by header
    png = (data / "b" / "00.png").read_bytes()
    (data / "b" / "cut.png").write_bytes(png[:len(png) // 2])  # only when decoded
    r = _head(data, tmp_path / "run", "--json")
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 3, r.stderr
    assert last_json(r)["unreadable_files"] == 3


# --- what a skipped test tells a new user ----------------------------------------------------------


def test_real_data_skips_say_what_to_set_and_name_no_internal_path():
    assert "TINYVIT_DATA" in DATA_HINT and "download" in DATA_HINT and "TINYVIT_WEIGHTS" in WEIGHTS_HINT
    here = Path(__file__).parent
    for f in sorted([*here.glob("test_*.py"), here / "helpers.py", here / "conftest.py"]):
        for reason in re.findall(r'(?:reason=|pytest\.skip\()(f?"[^"]*")', f.read_text()):
            assert "shared" not in reason and "{TI16}" not in reason and "{REAL}" not in reason, (f.name, reason)


@pytest.mark.e2e
@pytest.mark.parametrize("to", ["timm", "hf"])
def test_finetune_weights_take_a_safetensors_file_as_it_is(tmp_path, to):
    """--weights with a timm .safetensors or an HF folder's model.safetensors (converted in memory):
    the run starts from those weights, with the names and transform the file states."""
    from tinyvit import init_params, preset, save_checkpoint
    from tinyvit.io.export import export

    cfg = preset("vit-ti16", img_size=32, num_classes=3, depth=2)
    meta = {"class_names": ["x", "y", "z"], "mean": [0.4] * 3, "std": [0.3] * 3,
            "eval_transform": {"resize": "shortest_edge", "crop_pct": 0.9, "interpolation": "bicubic",
                               "mean": [0.4] * 3, "std": [0.3] * 3}}
    ckpt = save_checkpoint(tmp_path / "m.npz", init_params(cfg, seed=1), cfg, meta)
    out = tmp_path / ("vit.safetensors" if to == "timm" else "hf")
    export(ckpt, to, out)
    weights = out if to == "timm" else out / "model.safetensors"
    run = last_json(_head(_folder(tmp_path / "photos"), tmp_path / "run", "--json", "--weights", weights,
                          "--epochs", "3"))
    got = load_checkpoint(run["checkpoint"])[2]
    assert got["source_weights"] == str(weights) and got["eval_transform"]["crop_pct"] == 0.9
    assert (got["mean"], got["std"]) == ([0.4] * 3, [0.3] * 3) and got["class_names"] == ["a", "b"]


# --- what a run says about its settings, its end and its folder ------------------------------------


def _tiny_weights(tmp_path, img_size):
    """A one-block ViT-Ti/16-width checkpoint at img_size px, written by the library."""
    from tinyvit import init_params, preset, save_checkpoint
    cfg = preset("vit-ti16", img_size=img_size, num_classes=5, depth=1)
    return save_checkpoint(tmp_path / f"w{img_size}.npz", init_params(cfg, seed=0), cfg)


@pytest.mark.e2e
def test_finetune_keeps_the_weights_own_image_size_and_says_another(tmp_path):
    data, w = _folder(tmp_path / "photos"), _tiny_weights(tmp_path, 48)
    r = run_script("finetune.py", "--data", data, "--weights", w, "--epochs", "2", "--out", tmp_path / "own", "--json")
    assert last_json(r)["img_size"] == 48 and load_checkpoint(tmp_path / "own" / "model.npz")[1].img_size == 48
    assert "resampled" not in r.stderr
    r = run_script("finetune.py", "--data", data, "--weights", w, "--epochs", "2", "--img-size", "32",
                   "--out", tmp_path / "other", "--json")
    assert last_json(r)["img_size"] == 32
    notes = [line for line in r.stderr.splitlines() if "resampled" in line]
    assert notes == [f"note: --img-size 32: the position embeddings of {w} (48 px) are resampled (bilinear) to 32 px"]
    saved = load_checkpoint(tmp_path / "other" / "model.npz")[2]["run_args"]
    assert saved["img_size"] == 32  # what a --resume restores


@pytest.mark.e2e
def test_head_mode_names_the_flags_it_ignores_and_logs_metrics_plot_metrics_reads(tmp_path):
    out = tmp_path / "run"
    r = _head(_folder(tmp_path / "photos"), out, "--augment", "crop_flip", "--ema", "0.99", "--grad-accum", "2",
              "--drop-path", "0.1", "--layer-decay", "0.75", "--json")
    summary = last_json(r)
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: --augment, --drop-path, --layer-decay, --ema, --grad-accum "
                                                   "have no effect in head mode"), r.stderr
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == list(range(1, 21)) and hist[-1]["test_accuracy"] == summary["test_accuracy"]
    assert load_checkpoint(out / "model.npz")[2]["history"] == hist
    p = run_script("plot_metrics.py", out, "--out", tmp_path / "curves.png")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quiet = _head(_folder(tmp_path / "p2"), tmp_path / "r2", "--augment", "none", "--feature-batch", "4")
    assert quiet.returncode == 0 and "note:" not in quiet.stderr  # a no-op value or a head-mode flag: nothing said


@pytest.mark.e2e
def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, mnist_root):
    out = tmp_path / "run"
    first = last_json(_mnist(mnist_root, "--epochs", "1", "--out", out))
    files = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(out.iterdir())}
    r = run_script("train_mnist.py", "--resume", out / "checkpoint.npz", "--data-dir", mnist_root)
    assert r.returncode == 0, r.stderr
    assert f"the run in {out} is finished (1 epoch): nothing was changed" in r.stderr
    assert "warmup" not in r.stderr and "cache" not in r.stdout
    assert r.stdout.startswith(f"test accuracy {first['test_accuracy'] * 100:.2f}% after 1 epochs")
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(out.iterdir())} == files


@pytest.mark.e2e
def test_resume_with_the_other_script_names_the_script_that_wrote_the_run(tmp_path, mnist_root):
    last_json(_mnist(mnist_root, "--epochs", "1", "--out", tmp_path / "m"))
    r = run_script("finetune.py", "--resume", tmp_path / "m" / "checkpoint.npz", "--data", _folder(tmp_path / "photos"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "a run of scripts/train_mnist.py (MNIST from scratch)" in r.stderr
    assert f"python scripts/train_mnist.py --resume {tmp_path / 'm' / 'checkpoint.npz'}" in r.stderr
    last_json(run_script("finetune.py", "--data", tmp_path / "photos", "--weights", _tiny_weights(tmp_path, 32),
                         "--mode", "full", "--epochs", "1", "--batch-size", "8", "--out", tmp_path / "f", "--json"))
    for script in ("train_mnist.py", "finetune_cifar.py"):
        r = run_script(script, "--resume", tmp_path / "f" / "checkpoint.npz", "--json")
        if script == "finetune_cifar.py":  # the same command line as finetune.py: it continues the run
            assert last_json(r)["already_finished"] and "note:" not in r.stderr  # no flag typed, none named
            continue
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "ViTConfig" not in r.stderr, r.stderr
        assert "a run of scripts/finetune.py (fine-tuning)" in r.stderr


@pytest.mark.e2e
def test_val_split_0_a_data_file_and_early_failures_leave_no_out_folder(tmp_path):
    data = _folder(tmp_path / "photos")
    cases = {("--val-split", "0"): "--val-split 0.0: the fraction of each class held out for validation in a "
                                   "folder without train/ and val/ must be between 0 and 1",
             ("--data", data / "a" / "00.png"): "a file, not a folder; --data takes cifar10, pets, or a folder",
             ("--weights", tmp_path / "missing.npz"): "missing.npz"}
    for flags, says in cases.items():
        out = tmp_path / "runs" / "x"
        args = {"--data": data, "--preset": "vit-ti16", "--img-size": "32", "--out": out, flags[0]: flags[1]}
        r = run_script("finetune.py", *[str(v) for kv in args.items() for v in kv])
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
        assert not (tmp_path / "runs").exists()  # nor the parent it would have made


@pytest.mark.e2e
def test_finetune_help_says_progressive_head_epochs_count_within_epochs():
    text = " ".join(run_script("finetune.py", "--help").stdout.split())
    assert "the first --head-epochs of the --epochs train the head only" in text
    assert "--epochs 3 --head-epochs 1 is 1 head epoch, then 2 of the whole model" in text


def test_head_mode_ctrl_c_exits_130_and_says_so(tmp_path, monkeypatch, capsys):
    from tinyvit.cli import finetune as cli
    from tinyvit.train import finetune as ft

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "extract_features", interrupted)
    try:
        code = cli.main("x", argv=["--data", str(_folder(tmp_path / "photos")), "--preset", "vit-ti16", "--img-size",
                                   "32", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cache")])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped main: report.run's bare 'interrupted', no word on what to do")
    assert code == 130 and "interrupted: head mode writes its model only at the end" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class _Rank1:
    """An MPI communicator as rank 1 of 2 sees it (tinyvit.train.dist.World reads only these)."""

    def Get_rank(self):
        return 1

    def Get_size(self):
        return 2


@pytest.mark.parametrize("script", ["train_mnist.py", "finetune.py"])
def test_a_rank_other_than_0_creates_no_out_folder(tmp_path, monkeypatch, script):
    """Rank 0 alone makes --out, so its removal after an early failure is not raced: rank 1 had made it
    too, and where rank 1 got there first, rank 0 found it there, took it for the user's and left it."""
    from tinyvit.train import dist
    from tinyvit.train import finetune as ft

    def stop(*a, **kw):
        raise TinyViTError("stopped after the output folder's check")

    monkeypatch.setattr(dist, "_WORLD", dist.World(_Rank1()))
    monkeypatch.setattr(load_script("train_mnist.py"), "load_mnist", stop)
    monkeypatch.setattr(ft, "start_model", stop)
    argv = ["--data-dir", str(tmp_path)] if script == "train_mnist.py" else \
        ["--data", str(_folder(tmp_path / "photos")), "--preset", "vit-ti16", "--mode", "full"]
    with pytest.raises(TinyViTError, match="stopped after"):
        load_script(script).main(argv=[*argv, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_an_error_line_is_one_write(monkeypatch):
    """Each rank writes its 'error:' line in one write, so ranks sharing a terminal never run two
    lines together (print's text and newline were two writes: 'error: a...error: rank 1: a...')."""
    import io
    import sys

    from tinyvit.cli.report import run

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls = []

        def write(self, s):
            self.calls.append(s)
            return super().write(s)

    err = Writes()
    monkeypatch.setattr(sys, "stderr", err)

    def fail():
        from tinyvit import TinyViTError
        raise TinyViTError("training diverged")

    with pytest.raises(SystemExit) as e:
        run(fail)
    assert e.value.code == 2 and [c for c in err.calls if c] == ["error: training diverged\n"]


@pytest.mark.e2e
def test_finetune_freeze_keeps_the_frozen_weights_and_checkpointing_changes_no_bit(tmp_path):
    """--freeze: the frozen params of model.npz are the source weights' bits and the optimizer holds state for
    the rest alone; --grad-checkpointing (with drop path) ends with the same weights; a pattern that matches
    nothing is one line; head mode says the flags do nothing there."""
    from tinyvit import init_params, preset, save_checkpoint
    from tinyvit.io.checkpoint import load_optimizer_state
    data = _folder(tmp_path / "photos")
    cfg = preset("vit-ti16", img_size=32, num_classes=5, depth=2)
    w = save_checkpoint(tmp_path / "w.npz", init_params(cfg, seed=0), cfg)
    common = ["--data", data, "--weights", w, "--mode", "full", "--epochs", "1", "--batch-size", "8",
              "--drop-path", "0.1", "--freeze", "patch_embed.*,cls_token,pos_embed,blocks.0.*", "--json"]
    runs = {}
    for extra in ([], ["--grad-checkpointing"]):
        out = tmp_path / f"run{len(runs)}"
        last_json(run_script("finetune.py", *common, *extra, "--out", out))
        runs[len(runs)] = load_checkpoint(out / "model.npz")[0]
    source = load_checkpoint(w)[0]
    frozen = {k for k in source if k.startswith(("patch_embed.", "blocks.0.")) or k in ("cls_token", "pos_embed")}
    assert all(np.array_equal(runs[0][k], source[k]) for k in frozen)
    assert not np.array_equal(runs[0]["blocks.1.mlp.fc1.weight"], source["blocks.1.mlp.fc1.weight"])
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    state = load_optimizer_state(tmp_path / "run0" / "checkpoint.npz")
    assert {k.split("/", 1)[1] for k in state if k != "step"} == set(runs[0]) - frozen
    r = run_script("finetune.py", *common[:-3], "--freeze", "blocks.0.*,blocks.5.*", "--out", tmp_path / "bad")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "error: --freeze 'blocks.5.*' matches no parameter of the model" in r.stderr
    r = run_script("finetune.py", "--data", data, "--weights", w, "--epochs", "1", "--freeze", "blocks.0.*",
                   "--grad-checkpointing", "--out", tmp_path / "head")
    assert r.returncode == 0 and "note: --freeze, --grad-checkpointing have no effect in head mode" in r.stderr


def test_img_size_flags_parse_and_refuse_in_one_line():
    """--img-size H,W / --keep-aspect (tinyvit.cli.sizes, shared by predict, evaluate and embed): parsed
    once; a fixed-size model, sides the patches do not tile and bad text are one line each."""
    ap = argparse.ArgumentParser()
    add_size_args(ap)
    with pytest.raises(SystemExit):  # one or the other
        ap.parse_args(["--img-size", "32,48", "--keep-aspect"])
    fixed = ViTConfig(img_size=32, patch_size=16, dim=32, depth=1, heads=2, mlp_dim=64)
    dyn = dataclasses.replace(fixed, dynamic_img_size=True)
    assert input_size(None, False, dyn) is None and input_size("32", False, fixed) is None  # its own size
    assert input_size("32,48", False, dyn).for_image(10, 10) == (32, 48)
    assert input_size("64x32", False, dyn).hw == (64, 32)
    assert input_size(None, True, dyn).for_image(100, 50) == (32, 64)
    for text, flags, cfg, msg in [("32,48", False, fixed, "needs a model that takes any input size"),
                                  (None, True, fixed, "--keep-aspect needs a model"),
                                  ("32,40", False, dyn, "multiple of the patch size 16"),
                                  ("32,a", False, dyn, "must be H,W"), ("0", False, dyn, "must be H,W"),
                                  ("1,2,3", False, dyn, "must be H,W")]:
        with pytest.raises(TinyViTError, match=msg):
            input_size(text, flags, cfg, "m.npz")
