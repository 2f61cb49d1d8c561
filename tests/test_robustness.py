"""Robustness: no code from a file ever runs, killed and interrupted runs resume bit-for-bit,
non-finite numbers are caught with a clear message, and the fp32 layers stay finite at extremes."""
import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, Evil, assert_same_train_state, checkout_env, evil_pickles, run, run_python, run_script, script

from tinyvit import TinyViTError, ViTConfig, init_params, vit_forward
from tinyvit.data import cifar10
from tinyvit.data.batches import ArrayDataset
from tinyvit.io.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from tinyvit.io.convert import convert, load_state
from tinyvit.io.torchzip import load_torch_zip
from tinyvit.nn.layers import gelu_backward, gelu_forward, layernorm_backward, layernorm_forward, softmax_forward
from tinyvit.train.config import TrainConfig
from tinyvit.train.evaluate import evaluate
from tinyvit.train.loop import fit

CFG = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=16)
R = 2  # CIFAR records per batch in the synthetic files
QUIET_FP = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow/NaN provoked on purpose


# --- 1. no code from a file ever runs -----------------------------------------------------------
# four routes of helpers.Evil (the payloads; evil_pickles gives each at top level and nested, protocols 0, 2, 4)
HOWS = ["os.system", "builtins.exec", "builtins.eval", "subprocess.call"]


def fake_torch_zip(path, pkl):
    """A torch.save-style zip whose archive/data.pkl is pkl."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    return path


def evil_npz(path, how, marker, key):
    """A real checkpoint with array `key` replaced by an object array: np.savez pickles it into the .npy."""
    params = init_params(CFG)
    save_checkpoint(path, params, CFG, opt_state={"step": np.array(1), "exp_avg/head.bias": params["head.bias"]})
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[key] = np.array([Evil(how, marker), 1], dtype=object)
    np.savez(path, **arrays)
    return path


def cifar_py(root, batch=None, meta=None):
    """cifar10/cifar-10-batches-py with every batch = batch bytes (a valid one when None), and meta."""
    folder = root / "cifar10" / cifar10.PY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    x = np.zeros((R, 3072), np.uint8)
    good = pickle.dumps({b"data": x, b"labels": [1] * R}, protocol=2)
    for s in cifar10.TRAIN_BATCHES + cifar10.TEST_BATCHES:
        (folder / s).write_bytes(good if batch is None else batch)
    (folder / "batches.meta").write_bytes(meta if meta is not None else pickle.dumps(
        {b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2))
    return root


# entry point -> (container, loader(path or data root))
ENTRIES = {
    "load_torch_zip-pth": (".pth", load_torch_zip),
    "load_torch_zip-bin": (".bin", load_torch_zip),
    "load_state-pth": (".pth", load_state),
    "load_state-pt": (".pt", load_state),
    "load_state-ckpt": (".ckpt", load_state),
    "load_state-bin": (".bin", load_state),
    "convert-pth": (".pth", convert),
    "convert-bin-hf": (".bin", lambda p: convert(p, fmt="hf")),
    "load_checkpoint": (".npz", load_checkpoint),
    "load_optimizer_state": (".npz", load_optimizer_state),
    "load_state-npz": (".npz", load_state),
    "convert-npz": (".npz", convert),
    "load_cifar10-train": ("cifar-batch", lambda root: cifar10.load_cifar10(root, "train", download=False)),
    "load_cifar10-test": ("cifar-batch", lambda root: cifar10.load_cifar10(root, "test", download=False)),
    "load_cifar10-meta": ("cifar-meta", lambda root: cifar10.load_cifar10(root, "test", download=False)),
    "cifar.load_pickle": ("pickle", cifar10.load_pickle),
}


def _evil_files(container, how, marker, tmp):
    """Every malicious variant of a container: (path or data root, what the refusal must name)."""
    name = how.split(".")[1]  # os.system pickles as posix.system; the function name is always there
    if container == ".npz":
        return [(evil_npz(tmp / f"evil{i}.npz", how, marker, key), "pickle")
                for i, key in enumerate(["param/cls_token", "__meta__", "opt/step"])]
    out = []
    for i, pkl in enumerate(evil_pickles(how, marker)):
        if container == "pickle":
            (tmp / f"p{i}").write_bytes(pkl)
            out.append((tmp / f"p{i}", name))
        elif container == "cifar-batch":
            out.append((cifar_py(tmp / f"root{i}", batch=pkl), name))
        elif container == "cifar-meta":
            out.append((cifar_py(tmp / f"root{i}", meta=pkl), name))
        else:
            out.append((fake_torch_zip(tmp / f"evil{i}{container}", pkl), name))
    return out


@pytest.mark.parametrize("how", HOWS)
def test_payloads_are_live(how, tmp_path):
    """The payloads do run when loaded without restrictions, so the tests below can fail."""
    marker = tmp_path / "marker"
    for pkl in evil_pickles(how, marker):
        pickle.loads(pkl)
        assert marker.exists()
        marker.unlink()
    path = evil_npz(tmp_path / "evil.npz", how, tmp_path / "npz-marker", "param/cls_token")
    with np.load(path, allow_pickle=True) as z:
        z["param/cls_token"]
    assert (tmp_path / "npz-marker").exists()
    fake_torch_zip(tmp_path / "evil.pth", evil_pickles(how, marker)[3])
    with zipfile.ZipFile(tmp_path / "evil.pth") as zf:
        pickle.loads(zf.read("archive/data.pkl"))
    assert marker.exists()


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_no_code_from_a_file_ever_runs(entry, how, tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "RECORDS_PER_BATCH", R)
    monkeypatch.chdir(tmp_path)  # where a relative "touch MARKER" would land too
    marker = tmp_path / "MARKER"
    container, load = ENTRIES[entry]
    for path, need in _evil_files(container, how, marker, tmp_path):
        with pytest.raises(TinyViTError) as info:
            load(path)
        msg = str(info.value)
        assert "\n" not in msg and need in msg, msg  # refused for the right reason
        assert not marker.exists(), f"{entry} ran the {how} payload in {path}"


def _mnist_dir(root, n=8):
    """A tiny MNIST (gz IDX, train and test) so scripts get past data loading."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    x, y = np.zeros((n, 28, 28), np.uint8), np.arange(n, dtype=np.uint8) % 10
    for pre in ("train", "t10k"):
        (folder / f"{pre}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">4I", 2051, n, 28, 28) + x.tobytes()))
        (folder / f"{pre}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">2I", 2049, n) + y.tobytes()))
    return root


SCRIPTS = {  # the argument lists; {npz} {pth} {bin} {good} {mnist} {cifar} {out} are filled in
    "evaluate-npz": ["evaluate.py", "{npz}", "--dataset", "mnist", "--data-dir", "{mnist}"],
    "evaluate-cifar-pickle": ["evaluate.py", "{good}", "--dataset", "cifar10", "--data-dir", "{cifar}"],
    "convert-pth": ["convert_weights.py", "{pth}", "--out", "{out}"],
    "convert-bin": ["convert_weights.py", "{bin}", "--format", "hf", "--out", "{out}"],
    "convert-npz": ["convert_weights.py", "{npz}", "--out", "{out}"],
    "train_mnist-resume": ["train_mnist.py", "--resume", "{npz}", "--data-dir", "{mnist}", "--batch-size", "4",
                           "--epochs", "1", "--depth", "1", "--patch-size", "7", "--out", "{out}", "--quiet"],
}


@pytest.mark.e2e
@pytest.mark.parametrize("i, case", list(enumerate(SCRIPTS)), ids=list(SCRIPTS))
def test_scripts_refuse_malicious_files(i, case, tmp_path):
    how = HOWS[i % len(HOWS)]  # every payload reaches some script
    marker = tmp_path / "MARKER"
    pkl = evil_pickles(how, marker)[3]  # protocol 2, nested in a state dict
    c32 = ViTConfig(img_size=32, patch_size=16, in_chans=3, num_classes=10, dim=8, depth=1, heads=2, mlp_dim=16)
    good = save_checkpoint(tmp_path / "good.npz", init_params(c32), c32, {"dataset": "cifar10"})
    fill = {"npz": evil_npz(tmp_path / "evil.npz", how, marker, "param/cls_token"),
            "pth": fake_torch_zip(tmp_path / "evil.pth", pkl), "bin": fake_torch_zip(tmp_path / "pytorch_model.bin", pkl),
            "good": good, "mnist": _mnist_dir(tmp_path / "data"), "cifar": cifar_py(tmp_path / "cdata", batch=pkl),
            "out": tmp_path / "out.npz" if case.startswith("convert") else tmp_path / "run"}
    args = [a.format(**fill) for a in SCRIPTS[case]]
    r = run_script(*args, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()


@pytest.mark.e2e
def test_forged_memo_index_allocates_nothing(tmp_path):
    """A 5-byte LONG_BINPUT with index 2**27 makes the C unpickler allocate and zero a 1 GiB memo
    table; our unpicklers keep the memo in a dict. Measured as the peak RSS of a fresh process
    (VmHWM: ru_maxrss would include the forking pytest's own RSS)."""
    code = f"""
import io, pickle, resource, struct, sys, zipfile
from pathlib import Path
import numpy as np
from tinyvit import TinyViTError
from tinyvit.data import cifar10 as cifar
from tinyvit.io.torchzip import load_torch_zip
tmp = Path({str(tmp_path)!r})
bomb = b"\\x80\\x02]r" + struct.pack("<I", 1 << 27) + b"0"  # EMPTY_LIST, LONG_BINPUT 2**27, POP
(tmp / "batch").write_bytes(bomb + pickle.dumps({{b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}}, 2)[2:])
with zipfile.ZipFile(tmp / "m.pth", "w") as zf:
    zf.writestr("archive/data.pkl", bomb + pickle.dumps({{"epoch": 3}}, 2)[2:])
assert cifar.load_pickle(tmp / "batch")["labels"] == [1, 2]
assert load_torch_zip(tmp / "m.pth") == {{"epoch": 3}}
hwm = [s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM:")]
print(int(hwm[0].split()[1]) // 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    r = run_python(code, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 500, f"peak RSS {r.stdout.split()[-1]} MiB"


# --- 2. killed and interrupted runs -----------------------------------------------------------
def _cmd(out, data):
    return script("train_mnist.py", "--limit-train", "512", "--limit-test", "128",
                  "--batch-size", "64", "--depth", "1", "--patch-size", "7", "--dim", "32", "--heads", "2",
                  "--mlp-dim", "64", "--epochs", "3", "--augment", "none",  # pinned: no drift with the preset
                  "--quiet", "--json", "--data-dir", data, "--out", out)


def _env(**extra):
    """One BLAS thread: on a busy 2-core box OpenBLAS's spinning threads make these tiny GEMMs ~40x
    slower; the reference and every resumed run use the same setting, so bits still compare."""
    return checkout_env(extra_env=dict(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", **extra))


def _final_params(out):
    return load_checkpoint(out / "model.npz")[0]


def _wait_for(cond, proc, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def _proc_state(pid):
    """The process's state letter from /proc (T: stopped), or 'gone'."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _frozen_with_whole_temp(p, out):
    """Stop p (SIGSTOP, then wait until the kernel says it is stopped) and look: a checkpoint temp file
    that loads whole -> True, p left stopped; otherwise p goes on (SIGCONT) -> False. No clock decides."""
    if not list(out.glob(".checkpoint.npz.*.tmp")):
        return False
    os.kill(p.pid, signal.SIGSTOP)
    while p.poll() is None and _proc_state(p.pid) not in ("t", "T", "gone"):
        time.sleep(0.001)
    for tmp in out.glob(".checkpoint.npz.*.tmp"):
        try:
            load_checkpoint(tmp)
            return True
        except (TinyViTError, OSError):
            pass
    os.kill(p.pid, signal.SIGCONT)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_root):
    """The uninterrupted run: final params and per-epoch history."""
    out = tmp_path_factory.mktemp("reference")
    r = run(_cmd(out, mnist_root), env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return _final_params(out), [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()], out


def _resume_and_compare(out, data, reference, keys=("epoch", "step", "train_loss", "test_accuracy")):
    """Resume from out/checkpoint.npz (in out, stale temp files and all) and match the reference:
    params bit-for-bit, metrics.jsonl's records (one per epoch), the optimizer and RNG state; and only
    the steps after the checkpoint ran (a rerun from step 0 would match all of that too)."""
    saved = load_checkpoint(out / "checkpoint.npz")[2]["train_state"]["step"]
    r = run(_cmd(out, data) + ["--resume", out / "checkpoint.npz"], env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["stopped_early"] is False and summary["steps_run"] == summary["steps"] - saved == 24 - saved
    ref_params, ref_hist, ref_out = reference
    assert_same_train_state(out / "checkpoint.npz", ref_out / "checkpoint.npz")
    params = _final_params(out)
    for k, v in ref_params.items():
        assert np.array_equal(params[k], v), k  # bit-for-bit
    hist = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [[h[k] for k in keys] for h in hist] == [[h[k] for k in keys] for h in ref_hist]


@pytest.mark.e2e
def test_sigkill_mid_checkpoint_write(reference, tmp_path, mnist_root):
    """SIGKILL between writing a checkpoint's temp file and renaming it: the previous checkpoint
    stays intact, the stale temp file does not disturb --resume, and the result is exact."""
    out = tmp_path / "run"
    env = _env(TINYVIT_TEST_SLOW_WRITE="1.0")
    p = subprocess.Popen(_cmd(out, mnist_root), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoint.npz"
    try:
        # a whole temp file while a good checkpoint exists: the next checkpoint is written, not yet renamed
        mid_write = _wait_for(lambda: ckpt.exists() and _frozen_with_whole_temp(p, out), p)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        _, err = p.communicate()
    assert mid_write, err.decode()
    assert p.returncode == -signal.SIGKILL
    _, _, meta = load_checkpoint(ckpt)  # intact
    (stale,) = out.glob(".checkpoint.npz.*.tmp")
    done = meta["train_state"]["epoch"]
    assert meta["train_state"]["batch"] == 0 and 1 <= done < 3 and not (out / "model.npz").exists()
    assert load_checkpoint(stale)[2]["train_state"]["epoch"] == done + 1  # the killed write was the next one
    _resume_and_compare(out, mnist_root, reference)


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_epoch_saves_and_resumes_exactly(reference, tmp_path, mnist_root, sig):
    """Ctrl-C (or SIGTERM) during epoch 2: a mid-epoch checkpoint, a clean exit, an exact resume."""
    out = tmp_path / "run"
    env = _env(TINYVIT_TEST_SLOW_WRITE="0.5")  # a checkpoint's temp file waits 0.5 s for its rename
    p = subprocess.Popen(_cmd(out, mnist_root), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the signal lands while epoch 1's checkpoint is being written (a step, not the clock, then reads the
        # flag: epoch 2's first); sent during a step, it could be epoch 2's last and stop at the epoch's end
        first = _wait_for(lambda: list(out.glob(".checkpoint.npz.*.tmp")), p)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    assert first and p.returncode == 128 + sig, stderr  # 130 for Ctrl-C: `train && export` stops here
    assert "stopping after this step" in stderr and "Traceback" not in stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["stopped_early"] is True and result["interrupted"] == sig.name
    state = load_checkpoint(out / "checkpoint.npz")[2]["train_state"]
    assert 0 < state["batch"] < 512 // 64 and 1 <= state["epoch"] < 3, state  # mid-epoch, resumable
    assert not (out / "model.npz").exists()
    said = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert said == [f"interrupted ({sig.name}) at step {state['step']}, after {state['epoch']} epoch{'s' * (state['epoch'] != 1)} finished: "
                    f"the run is saved in {out / 'checkpoint.npz'}; continue it with: python "
                    f"{script('train_mnist.py')[1]} --resume {out / 'checkpoint.npz'} --data-dir {mnist_root}"]
    # params are exact, and so is the resumed epoch's log: its tally before the stop was saved
    _resume_and_compare(out, mnist_root, reference,
                        keys=("epoch", "step", "lr", "train_loss", "train_accuracy", "test_accuracy"))


@pytest.mark.e2e
def test_ctrl_c_in_head_mode_exits_130_and_says_what_to_do(tmp_path):
    """Head mode has no checkpoint: Ctrl-C (here during its feature pass or head epochs, after the
    note on --img-size) exits 130 as a training run does, with one line saying so, and no result line."""
    from PIL import Image

    from tinyvit import preset
    for c in "ab":
        (tmp_path / "photos" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / "photos" / c / f"{i}.png")
    cfg = preset("vit-ti16", img_size=48, num_classes=3, depth=1)
    w = save_checkpoint(tmp_path / "w.npz", init_params(cfg), cfg)
    cmd = script("finetune.py", "--data", tmp_path / "photos", "--weights", w, "--img-size", "32", "--epochs", "1000000",
                 "--batch-size", "2", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run")
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stderr.readline()  # the note, before any image is read; a million head epochs follow
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    assert first.startswith("note: --img-size 32") and p.returncode == 130, first + stderr
    assert stderr.splitlines()[-1].startswith("interrupted: head mode writes its model only at the end")
    assert stdout == "" and "Traceback" not in stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("corrupt", [
    lambda st: "not a dict",
    lambda st: {k: v for k, v in st.items() if k != "epoch"},
    lambda st: dict(st, train_config={**st["train_config"], "bogus": 1}),
    lambda st: dict(st, rng={"bit_generator": "MT19937"}),
    lambda st: dict(st, epoch="2"),
    lambda st: dict(st, tally={"loss_sum": float("nan"), "correct": 1, "seen": 8, "seconds": 0.1}),
], ids=["not-a-dict", "no-epoch", "unknown-setting", "bad-rng", "epoch-not-int", "bad-tally"])
def test_resume_from_corrupt_training_state(corrupt, tmp_path):
    tc = TrainConfig(epochs=2, batch_size=8)
    x = np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8)
    ds = ArrayDataset(x, np.arange(16) % 3, (0.5,), (0.25,))
    fit(init_params(CFG), CFG, tc, np, ds, ds, tmp_path, quiet=True, max_steps=1)
    params, _, meta = load_checkpoint(tmp_path / "checkpoint.npz")
    meta["train_state"] = corrupt(meta["train_state"])
    save_checkpoint(tmp_path / "bad.npz", params, CFG, meta, load_optimizer_state(tmp_path / "checkpoint.npz"))
    with pytest.raises(TinyViTError, match=r"bad\.npz: corrupt training state"):
        fit(init_params(CFG), CFG, tc, np, ds, ds, tmp_path / "b", quiet=True, resume=tmp_path / "bad.npz")


# --- 3. numerical faults ------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("key", ["pos_embed", "blocks.0.attn.qkv.weight", "head.bias"])
def test_checkpoint_with_nonfinite_params_is_refused(value, key, tmp_path):
    params = init_params(CFG)
    params[key].flat[1] = value
    path = save_checkpoint(tmp_path / "nan.npz", params, CFG)
    with pytest.raises(TinyViTError, match=rf"nan\.npz: {key} holds NaN or Inf"):
        load_checkpoint(path)


def _toy(n=32, dtype=np.uint8, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, (n, 8, 8)).astype(dtype)
    return x, np.arange(n) % 3


@QUIET_FP
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_fit_stops_on_nonfinite_pixels(value, tmp_path):
    x, y = _toy(dtype=np.float32)
    x[5, 3, 3] = value  # float images are accepted as they are: vit_forward checks its input
    ds = ArrayDataset(x, y, (0.5,), (0.25,))
    with pytest.raises(TinyViTError, match=r"images contain NaN or Inf"):
        fit(init_params(CFG), CFG, TrainConfig(epochs=1, batch_size=8, warmup_epochs=0), np, ds, ds, tmp_path, quiet=True)


@pytest.mark.parametrize("mean, std", [((0.5,), (0.0,)), ((0.5,), (-1.0,)), ((np.nan,), (0.25,)), ((0.5,), (np.inf,))])
def test_bad_normalisation_is_refused(mean, std, tmp_path):
    x, y = _toy()
    ds = ArrayDataset(x, y, mean, std)
    with pytest.raises(TinyViTError, match="mean/std"):
        fit(init_params(CFG), CFG, TrainConfig(epochs=1, batch_size=8, warmup_epochs=0), np, ds, ds, tmp_path, quiet=True)


@QUIET_FP
def test_evaluate_refuses_nonfinite_logits():
    x, y = _toy(dtype=np.float32)
    x[3] = np.nan
    with pytest.raises(TinyViTError, match="NaN or Inf"):  # argmax would silently call them class 0
        evaluate(init_params(CFG), CFG, ArrayDataset(x, y, (0.5,), (0.25,)), np, batch_size=8)


@QUIET_FP
def test_vit_forward_refuses_nonfinite_images():
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(TinyViTError, match="NaN or Inf"):
        vit_forward(init_params(CFG), x, CFG)
    x[0, 0, 0, 0] = -np.inf
    with pytest.raises(TinyViTError, match="NaN or Inf"):
        vit_forward(init_params(CFG), x, CFG)


# --- 4. fp32 layers at the extremes -------------------------------------------------------------
def _rows(v, d=64):
    """Rows of fp32 values around magnitude v: constant, alternating sign, a ramp, one spike."""
    ramp = np.linspace(-1, 1, d)
    spike = np.zeros(d)
    spike[7] = 1
    return np.stack([np.full(d, 1.0), np.resize([1.0, -1.0], d), ramp, spike, -ramp]).astype(np.float32) * np.float32(v)


EXTREMES = [1e4, -1e4, 3e38, -3e38, 1e-30]


@QUIET_FP
@pytest.mark.parametrize("v", EXTREMES)
def test_softmax_finite_at_extremes(v):
    x = _rows(v)
    y, _ = softmax_forward(x.copy())
    x64 = x.astype(np.float64)
    ref = np.exp(x64 - x64.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    assert y.dtype == np.float32 and np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, atol=1e-6)


@QUIET_FP
@pytest.mark.parametrize("kind", ["erf", "tanh"])
@pytest.mark.parametrize("v", EXTREMES)
def test_gelu_finite_at_extremes(v, kind):
    x = _rows(v)
    y, cache = gelu_forward(x, kind)
    assert y.dtype == np.float32 and np.isfinite(y).all()
    big = np.abs(x) >= 100
    assert np.array_equal(y[big & (x > 0)], x[big & (x > 0)]) and (y[big & (x < 0)] == 0).all()
    if kind == "erf" or abs(v) < 1e19:  # tanh backward at 3e38: see the xfail below
        assert np.isfinite(gelu_backward(np.ones_like(x), cache)).all()


@QUIET_FP
def test_gelu_tanh_backward_finite_at_fp32_max():
    _, cache = gelu_forward(_rows(3e38), "tanh")
    assert np.isfinite(gelu_backward(np.ones((5, 64), np.float32), cache)).all()


@pytest.mark.parametrize("case", ["1e4", "-1e4", "1e18", "-1e18", "tiny-variance", "zero-variance",
                                  "offset-tiny-variance"])
@QUIET_FP
def test_layernorm_finite_at_extremes(case):
    """Finite, and |x_hat| <= sqrt(D) as it must be; exact (to fp32 rounding) where fp32 can be: at
    1e18 and at 1000 +- 1e-3 float32 itself cannot hold the centred values (torch's fp32 agrees)."""
    d = 64
    rng = np.random.default_rng(0)
    if case == "tiny-variance":
        x = rng.standard_normal((4, d)) * 1e-20
    elif case == "zero-variance":
        x = np.full((4, d), 1.2345)
    elif case == "offset-tiny-variance":
        x = 1000 + rng.standard_normal((4, d)) * 1e-3
    else:
        x = _rows(float(case))
    x = x.astype(np.float32)
    w, b = (1 + rng.standard_normal(d)).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    y, _ = layernorm_forward(x.copy(), w, b, 1e-6)
    ref = torch.layer_norm(torch.from_numpy(x).double(), (d,), torch.from_numpy(w).double(),
                           torch.from_numpy(b).double(), 1e-6).numpy()
    assert y.dtype == np.float32 and np.isfinite(y).all()
    assert (np.abs((y - b) / w) <= np.sqrt(d) * (1 + 1e-5)).all()
    if case in ("1e4", "-1e4", "tiny-variance", "zero-variance"):
        np.testing.assert_allclose(y, ref, atol=1e-4)


@QUIET_FP
def test_layernorm_finite_at_fp32_max():
    x = _rows(3e38)
    y, cache = layernorm_forward(x.copy(), np.ones(64, np.float32), np.zeros(64, np.float32), 1e-6)
    assert np.isfinite(y).all()
    # the same as the rows scaled down to a safe range, normalised in float64
    ref, _ = layernorm_forward(x.astype(np.float64) / 2.0 ** 100, np.ones(64), np.zeros(64), 1e-6)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    dx, _, _ = layernorm_backward(np.ones((5, 64), np.float32), cache)
    assert np.isfinite(dx).all()
