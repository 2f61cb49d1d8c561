"""Training loop: learning happens, resume is exact, divergence stops cleanly, checkpoints are safe."""
import dataclasses
import json

import numpy as np
import pytest
from helpers import assert_same_train_state, last_json, run_script
from toy_data import TINY, synthetic

from tinyvit import TinyViTError, init_params
from tinyvit.io.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from tinyvit.train.config import TrainConfig
from tinyvit.train.loop import fit
from tinyvit.train.optim import run_schedule, warmup_steps

_synthetic = synthetic


def _run(tmp, tc, cfg=TINY, **kw):
    params = init_params(cfg, seed=tc.seed)
    return fit(params, cfg, tc, np, _synthetic(256, 1), _synthetic(128, 2), tmp, quiet=True, **kw)


def _count_steps(monkeypatch):
    """A list that gains an item per optimizer step fit really runs from now on (calls of _step_grads)."""
    from tinyvit.train import loop

    calls, step_grads = [], loop._step_grads

    def counted(*args, **kw):
        calls.append(1)
        return step_grads(*args, **kw)

    monkeypatch.setattr(loop, "_step_grads", counted)
    return calls


def test_fit_learns_and_writes_outputs(tmp_path):
    tc = TrainConfig(epochs=8, batch_size=32, lr=3e-3, warmup_epochs=0.5)
    s = _run(tmp_path, tc)
    assert s["test_accuracy"] > 0.8  # chance is 0.1 (this seed reaches 0.92): the model really learned
    hist = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == list(range(1, 9)) and hist[-1]["train_loss"] < hist[0]["train_loss"]
    params, cfg, meta = load_checkpoint(s["checkpoint"])
    assert cfg == TINY and meta["test_accuracy"] == s["test_accuracy"]
    assert not load_optimizer_state(s["checkpoint"])  # model.npz is slim
    assert load_optimizer_state(tmp_path / "checkpoint.npz")


@pytest.mark.parametrize("stop_after", [8, 11])  # at the epoch boundary, and mid-epoch
@pytest.mark.parametrize("augment,ema,dropout", [("shift", 0.0, 0.0), ("affine", 0.99, 0.1)])
def test_resume_is_exact(tmp_path, monkeypatch, stop_after, augment, ema, dropout):
    """The resumed run runs only the steps after the checkpoint (a seeded rerun from step 0 would end
    bit-identical too: the count tells them apart) and ends with the straight run's params, optimizer
    state and dropout RNG state (dropout and drop path draw from it in the second case)."""
    cfg = dataclasses.replace(TINY, dropout=dropout, attn_dropout=dropout, drop_path=dropout)
    tc = TrainConfig(epochs=2, batch_size=32, lr=2e-3, augment=augment, label_smoothing=0.1, ema=ema)
    straight = _run(tmp_path / "a", tc, cfg)["params"]
    first = _run(tmp_path / "b", tc, cfg, max_steps=stop_after)
    assert first["stopped_early"] and first["steps"] == first["steps_run"] == stop_after
    steps = _count_steps(monkeypatch)
    resumed = _run(tmp_path / "c", tc, cfg, resume=tmp_path / "b" / "checkpoint.npz")
    assert len(steps) == resumed["steps_run"] == 16 - stop_after
    assert resumed["steps"] == 16 and not resumed["stopped_early"]
    for k, v in straight.items():
        assert np.array_equal(v, resumed["params"][k]), k  # bit-for-bit
    assert_same_train_state(tmp_path / "a" / "checkpoint.npz", tmp_path / "c" / "checkpoint.npz")


@pytest.mark.parametrize("save_every,saved_step", [(0.0, 11), (1e9, 8), (None, 8)])
def test_save_every_bounds_what_a_crash_loses(tmp_path, monkeypatch, save_every, saved_step):
    """A crash at step 12 (mid epoch 2) with a checkpoint due every step keeps step 11; the run
    resumed from it ends bit-identical to an uninterrupted one. Off (or not due): epoch ends only."""
    from tinyvit.train import loop as train
    tc = TrainConfig(epochs=2, batch_size=32, lr=2e-3, augment="shift", clip=1.0)
    straight = _run(tmp_path / "a", tc)["params"]
    calls, clip = [], train.clip_grad_norm

    def crashing_clip(grads, max_norm):
        calls.append(1)
        if len(calls) == 12:
            raise RuntimeError("power cut")  # no stop flag, no final save: as a kill -9
        return clip(grads, max_norm)

    monkeypatch.setattr(train, "clip_grad_norm", crashing_clip)
    with pytest.raises(RuntimeError, match="power cut"):
        _run(tmp_path / "b", tc, save_every=save_every)
    monkeypatch.setattr(train, "clip_grad_norm", clip)
    state = load_checkpoint(tmp_path / "b" / "checkpoint.npz")[2]["train_state"]
    assert state["step"] == saved_step and state["batch"] == saved_step - 8 * state["epoch"]
    steps = _count_steps(monkeypatch)
    resumed = _run(tmp_path / "c", tc, resume=tmp_path / "b" / "checkpoint.npz")
    assert len(steps) == resumed["steps_run"] == 16 - saved_step  # from the checkpoint on, not from step 0
    assert resumed["steps"] == 16 and not resumed["stopped_early"]
    for k, v in straight.items():
        assert np.array_equal(v, resumed["params"][k]), k  # bit-for-bit
    assert_same_train_state(tmp_path / "a" / "checkpoint.npz", tmp_path / "c" / "checkpoint.npz")


def test_resume_with_other_settings_is_refused(tmp_path):
    """Other settings are refused; the same settings go on from step 3."""
    tc = TrainConfig(epochs=2, batch_size=32)
    _run(tmp_path / "b", tc, max_steps=3)
    with pytest.raises(TinyViTError, match="training settings differ"):
        _run(tmp_path / "c", TrainConfig(epochs=2, batch_size=32, lr=0.5), resume=tmp_path / "b" / "checkpoint.npz")
    s = _run(tmp_path / "c", tc, resume=tmp_path / "b" / "checkpoint.npz")
    assert s["steps_run"] == 13 and s["steps"] == 16


def test_divergence_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path):
    tc = TrainConfig(epochs=2, batch_size=32, lr=1e-3)
    _run(tmp_path, tc)  # a good run leaves a checkpoint
    good = (tmp_path / "checkpoint.npz").read_bytes()
    bad = TrainConfig(epochs=3, batch_size=32, lr=1e6, optimizer="sgd", warmup_epochs=0, schedule="constant")
    # a new run (other settings): the older run's checkpoint is not one it could resume from
    with pytest.raises(TinyViTError, match=r"training diverged: loss is (nan|inf).*no checkpoint was written yet"):
        _run(tmp_path, bad)
    assert (tmp_path / "checkpoint.npz").read_bytes() == good


def test_checkpoint_roundtrip_and_bad_files(tmp_path):
    params = init_params(TINY)
    p = save_checkpoint(tmp_path / "m.npz", params, TINY, {"class_names": list("0123456789")})
    back, cfg, meta = load_checkpoint(p)
    assert cfg == TINY and meta["class_names"][3] == "3"
    assert all(np.array_equal(back[k], params[k]) for k in params)
    raw = p.read_bytes()
    cases = {
        "missing.npz": None,
        "empty.npz": b"",
        "truncated.npz": raw[: len(raw) // 2],
        "garbage.npz": b"PK\x03\x04" + bytes(range(256)) * 4,
    }
    for name, data in cases.items():
        f = tmp_path / name
        if data is not None:
            f.write_bytes(data)
        with pytest.raises(TinyViTError, match=name):
            load_checkpoint(f)
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))  # an npz, but not ours
    with pytest.raises(TinyViTError, match="not a tinyvit checkpoint"):
        load_checkpoint(tmp_path / "plain.npz")
    wrong = dict(params, **{"head.weight": np.zeros((3, 32), np.float32)})
    save_checkpoint(tmp_path / "wrong.npz", wrong, TINY)
    with pytest.raises(TinyViTError, match=r"head.weight has shape \(3, 32\)"):
        load_checkpoint(tmp_path / "wrong.npz")
    missing = {k: v for k, v in params.items() if k != "norm.bias"}
    save_checkpoint(tmp_path / "miss.npz", missing, TINY)
    with pytest.raises(TinyViTError, match=r"missing \['norm.bias'\]"):
        load_checkpoint(tmp_path / "miss.npz")


@pytest.mark.e2e
def test_train_mnist_script_smoke_learns(tmp_path, mnist_root):
    """The real script on a 3000-image subset for 4 epochs: far above chance, JSON contract kept."""
    out = last_json(run_script("train_mnist.py", "--limit-train", "3000", "--limit-test", "500", "--epochs", "4",
                               "--batch-size", "32", "--depth", "2", "--patch-size", "7", "--lr", "3e-3",
                               "--warmup-epochs", "0.5", "--augment", "none",
                               "--out", tmp_path, "--json", "--data-dir", mnist_root))
    for key in ("test_accuracy", "epochs", "train_seconds", "images_per_second", "checkpoint"):
        assert key in out
    assert out["epochs"] == 4 and out["test_accuracy"] > 0.5, out  # chance 0.1; this run: ~0.68
    ev = last_json(run_script("evaluate.py", out["checkpoint"], "--dataset", "mnist", "--limit", "500", "--json",
                              "--data-dir", mnist_root, timeout=120))
    assert ev["test_accuracy"] == out["test_accuracy"]


@pytest.mark.e2e
def test_scripts_report_bad_input_in_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    r = run_script("evaluate.py", bad, "--dataset", "mnist", timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "bad.npz" in r.stderr and "Traceback" not in r.stderr


def test_grad_accum_matches_one_big_batch(tmp_path):
    # no dropout, no batch-dependent layer: micro-batches give the same gradient up to rounding.
    # SGD keeps it visible (Adam would blow rounding noise in exactly-zero grads, e.g. the key
    # bias, up to full-size lr * sign(noise) steps)
    tc = dict(epochs=1, batch_size=32, lr=0.05, optimizer="sgd", warmup_epochs=0.25)
    one = _run(tmp_path / "a", TrainConfig(**tc))["params"]
    acc = _run(tmp_path / "b", TrainConfig(**tc, grad_accum=4))["params"]
    for k in one:
        assert np.allclose(one[k], acc[k], rtol=1e-4, atol=1e-6), k
    with pytest.raises(TinyViTError, match="not divisible by grad_accum"):
        _run(tmp_path / "c", TrainConfig(epochs=1, batch_size=32, warmup_epochs=0.25, grad_accum=3))


def test_head_epochs_freeze_the_backbone(tmp_path):
    init = init_params(TINY, seed=0)
    s = _run(tmp_path, TrainConfig(epochs=1, batch_size=32, lr=2e-3, warmup_epochs=0.25, head_epochs=1))
    for k, v in s["params"].items():
        assert np.array_equal(v, init[k]) == (not k.startswith("head.")), k


@pytest.mark.parametrize("epochs,warmup,steps", [(1, 1.0, 0), (2, 3.0, 1), (1, 0.5, 4)])
def test_warmup_not_shorter_than_the_run_is_shortened_and_said(tmp_path, capsys, epochs, warmup, steps):
    """8 steps per epoch: a warmup as long as the run becomes a tenth of it, with one line; a
    shorter one is kept as given."""
    s = _run(tmp_path, TrainConfig(epochs=epochs, batch_size=32, warmup_epochs=warmup))
    assert s["epochs"] == epochs and not s["stopped_early"]
    notes = [line for line in capsys.readouterr().err.splitlines() if "warmup shortened" in line]
    assert len(notes) == (warmup >= epochs), notes
    assert warmup_steps(TrainConfig(epochs=epochs, warmup_epochs=warmup), 8) == (steps if warmup < epochs else 8 * epochs // 10)


def test_resume_with_more_epochs_extends_the_run(tmp_path, monkeypatch):
    """A finished 2-epoch run resumed with epochs=3 goes on from step 16 with the cosine schedule over
    24 steps; cut and resumed again inside the extension, it ends bit-identical to one extension."""
    tc, longer = TrainConfig(epochs=2, batch_size=32, lr=2e-3), TrainConfig(epochs=3, batch_size=32, lr=2e-3)
    _run(tmp_path / "a", tc)
    ckpt = tmp_path / "a" / "checkpoint.npz"
    steps = _count_steps(monkeypatch)
    whole = _run(tmp_path / "b", longer, resume=ckpt)
    assert len(steps) == whole["steps_run"] == 8  # the third epoch only
    assert whole["steps"] == 24 and whole["epochs"] == 3 and not whole["stopped_early"]
    hist = load_checkpoint(whole["checkpoint"])[2]["history"]
    schedule = run_schedule(longer, 8)
    assert [h["epoch"] for h in hist] == [1, 2, 3] and hist[2]["lr"] == schedule(23) and schedule(16) > 10 * tc.min_lr
    assert _run(tmp_path / "c", longer, resume=ckpt, max_steps=3)["steps"] == 19
    steps.clear()
    again = _run(tmp_path / "d", longer, resume=tmp_path / "c" / "checkpoint.npz")
    assert len(steps) == again["steps_run"] == 5
    for k, v in whole["params"].items():
        assert np.array_equal(v, again["params"][k]), k
    assert_same_train_state(tmp_path / "b" / "checkpoint.npz", tmp_path / "d" / "checkpoint.npz")
    with pytest.raises(TinyViTError, match="training settings differ"):  # fewer epochs is not an extension
        _run(tmp_path / "e", TrainConfig(epochs=1, batch_size=32, lr=2e-3), resume=ckpt)


@pytest.mark.parametrize("n,batch_size", [(50, 16), (64, 64)])
def test_evaluate_flip_scores_each_image_plus_its_mirror(xp, n, batch_size):
    from tinyvit.backend import to_device
    from tinyvit.nn.model import vit_forward
    from tinyvit.train.evaluate import evaluate

    params, data = init_params(TINY, seed=3, std=0.3), _synthetic(n, 5)  # large: images matter to the logits
    (x, y), = data.batches(n, np, shuffle=False, dtype=np.float32)  # normalised, (B, 1, 28, 28)
    plain = vit_forward(params, x, TINY, keep_cache=False)[0]
    both = plain + vit_forward(params, np.ascontiguousarray(x[:, :, :, ::-1]), TINY, keep_cache=False)[0]
    assert (both.argmax(1) != plain.argmax(1)).any()  # the mirror changes answers: the check can fail
    dev = to_device(params, xp)
    assert evaluate(dev, TINY, data, xp, batch_size=batch_size, flip=True) == np.mean(both.argmax(1) == y)
    assert evaluate(dev, TINY, data, xp, batch_size=batch_size) == np.mean(plain.argmax(1) == y)


def test_ema_is_evaluated_and_saved(tmp_path):
    """With --ema the final model and the test accuracy are the moving average's, which follows
    ema = d ema + (1 - d) w with timm's warm-up d_t = min(d, (1 + t) / (10 + t))."""
    from tinyvit.train.evaluate import evaluate
    from tinyvit.train.loop import _ema_update

    tc = TrainConfig(epochs=1, batch_size=32, lr=2e-3, ema=0.9, warmup_epochs=0.5)
    s = _run(tmp_path, tc)
    model, _, meta = load_checkpoint(s["checkpoint"])
    last, _, _ = load_checkpoint(tmp_path / "checkpoint.npz")  # the raw weights
    assert meta["ema"] == 0.9 and any(not np.array_equal(model[k], last[k]) for k in model)
    assert evaluate(model, TINY, _synthetic(128, 2), np) == s["test_accuracy"]  # the EMA was scored
    ema = {"w": np.array([1.0])}
    _ema_update(ema, {"w": np.array([3.0])}, 0.75)
    assert ema["w"][0] == 1.5


@pytest.mark.parametrize("stop_after", [11, 13])  # once, and twice within the same epoch
def test_resume_mid_epoch_logs_the_epoch_as_the_uninterrupted_run(tmp_path, stop_after):
    """The interrupted epoch's train loss and accuracy count the steps before the stop too (its
    running tally travels in the checkpoint), so metrics.jsonl matches the uninterrupted run's."""
    tc = TrainConfig(epochs=2, batch_size=32, lr=2e-3, augment="shift")
    _run(tmp_path / "a", tc)
    _run(tmp_path / "b", tc, max_steps=10)
    if stop_after == 13:  # a second stop inside epoch 2: the tally goes on from the first resume's
        _run(tmp_path / "b", tc, resume=tmp_path / "b" / "checkpoint.npz", max_steps=3)
    resumed = _run(tmp_path / "b", tc, resume=tmp_path / "b" / "checkpoint.npz")
    assert resumed["steps"] == 16 and not resumed["stopped_early"]
    straight, got = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                     for d in "ab")
    keys = ("epoch", "step", "lr", "train_loss", "train_accuracy", "test_accuracy")
    assert [[h[k] for k in keys] for h in got] == [[h[k] for k in keys] for h in straight]


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    """A finished run resumed with the same settings: no step, no file rewritten, already_finished."""
    tc = TrainConfig(epochs=1, batch_size=32, lr=2e-3)
    done = _run(tmp_path, tc)
    files = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(tmp_path.iterdir())}
    again = _run(tmp_path, tc, resume=tmp_path / "checkpoint.npz")
    assert again["already_finished"] and again["steps"] == done["steps"] and not again["stopped_early"]
    assert again["test_accuracy"] == done["test_accuracy"] and again["checkpoint"] == done["checkpoint"]
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(tmp_path.iterdir())} == files
    (tmp_path / "model.npz").unlink()  # killed between the last checkpoint and the model: it is written
    again = _run(tmp_path, tc, resume=tmp_path / "checkpoint.npz")
    assert not again["already_finished"] and load_checkpoint(tmp_path / "model.npz")[2]["history"]


def test_freeze_trains_the_rest_alone_and_resumes_exactly(tmp_path):
    """Frozen params end bit-identical to the start, the checkpoint's optimizer state names the trained ones
    alone, and a run stopped and resumed (its patterns read back from the checkpoint) ends as the straight one."""
    init = init_params(TINY, seed=0)
    tc = TrainConfig(epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.25, freeze=("patch_embed.*", "blocks.0.*"))
    straight = _run(tmp_path / "a", tc)["params"]
    frozen = {k for k in init if k.startswith(("patch_embed.", "blocks.0."))}
    assert frozen and all(np.array_equal(straight[k], init[k]) == (k in frozen) for k in init)
    state = load_optimizer_state(tmp_path / "a" / "checkpoint.npz")
    assert {k.split("/", 1)[1] for k in state if k != "step"} == set(init) - frozen
    assert _run(tmp_path / "b", tc, max_steps=11)["stopped_early"]
    resumed = _run(tmp_path / "c", tc, resume=tmp_path / "b" / "checkpoint.npz")["params"]
    assert all(np.array_equal(resumed[k], v) for k, v in straight.items())
    with pytest.raises(TinyViTError, match="training settings differ"):
        _run(tmp_path / "d", TrainConfig(**dict(vars(tc), freeze=("patch_embed.*",))),
             resume=tmp_path / "b" / "checkpoint.npz")
