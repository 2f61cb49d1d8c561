"""Faults from the operating system, made to really happen: a full disk (a small tmpfs), a file-size
limit (RLIMIT_FSIZE), an output path under a file, a read-only file system (a read-only bind mount),
an unreadable data file (root without its read-override capabilities). Each ends a script with one
`error:` line and exit code 2; the last good checkpoint stays whole, resumable, with no temp file left.

The mounts need root in a private mount namespace (unshare -m), the unreadable file setpriv; where
those are missing the tests say so and skip.
"""
import functools
import os
import resource
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import run, script

from tinyvit.io import checkpoint
from tinyvit.io.checkpoint import load_checkpoint

RUN = ["--limit-train", "256", "--limit-test", "64", "--epochs", "2", "--batch-size", "64", "--depth", "1",
       "--patch-size", "7", "--warmup-epochs", "0.5", "--augment", "none", "--json", "--quiet"]
DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


@functools.cache
def _root_can(*cmd):
    """Whether cmd, run as root, exits 0 here (asked once, when a test first needs it)."""
    if os.geteuid() != 0:
        return False
    try:
        return run(cmd, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def private_mounts():
    """Skips unless this process may mount in a private mount namespace (root and unshare -m)."""
    if not _root_can("unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"):
        pytest.skip("needs root and unshare -m (private mounts)")


@pytest.fixture
def no_read_override():
    """Skips unless root may run a command without its read-override capabilities (setpriv)."""
    if not _root_can(*DROP_DAC, "true"):
        pytest.skip("needs root and setpriv to drop the read-override capabilities")


def _one_error_line(r, *words):
    """Exit code 2, no traceback, and one 'error: ...' line holding every word."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def _in_mount(mount, target, cmd, keep=None):
    """cmd inside a private mount namespace where `mount` (mount(8) arguments) is set up on target;
    the target's files are copied to keep afterwards (the mount ends with the namespace)."""
    copy = f"; cp -a {shlex.quote(str(target))}/. {shlex.quote(str(keep))}/" if keep else ""
    sh = f"mount {mount} {shlex.quote(str(target))} && {shlex.join(cmd)}; rc=$?{copy}; exit $rc"
    return run(["unshare", "-m", "sh", "-c", sh])


def _no_temp_files(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tinyvit-probe")]


def _ckpt_step(path):
    return load_checkpoint(path)[2]["train_state"]["step"]


@pytest.mark.e2e
def test_full_disk_mid_run_keeps_the_last_checkpoint(tmp_path, mnist_root, private_mounts):
    """A tmpfs with room for one checkpoint: epoch 1's is written, epoch 2's (beside it) is not."""
    data = ["--data-dir", mnist_root]
    probe = run(script("train_mnist.py", *RUN, *data, "--epochs", "1", "--out", tmp_path / "probe"))
    size = (tmp_path / "probe" / "checkpoint.npz").stat().st_size
    out, keep = tmp_path / "disk", tmp_path / "keep"
    out.mkdir()
    keep.mkdir()
    r = _in_mount(f"-t tmpfs -o size={int(size * 1.5)} tmpfs", out,
                  script("train_mnist.py", *RUN, *data, "--out", out), keep)
    line = _one_error_line(r, "cannot write the checkpoint", "No space left on device",
                           "the last good checkpoint is", "--resume")
    assert probe.returncode == 0 and "(step 4)" in line  # 256 images / 64: 4 steps an epoch
    assert _no_temp_files(keep) == [] and _ckpt_step(keep / "checkpoint.npz") == 4
    done = run(script("train_mnist.py", *RUN, *data, "--out", keep, "--resume", keep / "checkpoint.npz"))
    assert done.returncode == 0, done.stderr[-2000:]


def _fsize_limit(limit):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


@pytest.mark.e2e
def test_file_size_limit_mid_run_keeps_the_resumed_checkpoint(tmp_path, mnist_root):
    """A run cut after its first step resumes under a file-size limit its next checkpoint exceeds."""
    data, out = ["--data-dir", mnist_root], tmp_path / "run"
    cut = run(script("train_mnist.py", *RUN, *data, "--out", out, "--time-limit", "0"))
    assert cut.returncode == 0, cut.stderr[-2000:]
    ckpt = out / "checkpoint.npz"
    before = ckpt.read_bytes()
    resume = script("train_mnist.py", *RUN, *data, "--out", out, "--resume", ckpt)
    r = run(resume, preexec_fn=_fsize_limit(len(before)))  # the epoch-end checkpoint has more history
    _one_error_line(r, "cannot write the checkpoint", "File too large", f"the last good checkpoint is {ckpt}",
                    "(step 1)")
    assert ckpt.read_bytes() == before and _no_temp_files(out) == []
    done = run(resume)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["train_mnist.py", "finetune_cifar.py", "convert_weights.py", "predict.py"])
def test_output_under_a_file_fails_at_start(tmp_path, name):
    """Before any data, weights or image is read (all of them are missing here): seconds, not an epoch."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    missing = tmp_path / "missing"
    args = {"train_mnist.py": ["--out", blocker / "run", "--data-dir", missing],
            "finetune_cifar.py": ["--out", blocker / "run", "--weights", missing / "w.npz", "--data-dir", missing],
            "convert_weights.py": [missing / "w.npz", "--out", blocker / "sub" / "w.npz"],
            "predict.py": [missing / "m.npz", missing / "i.png", "--attention-map", blocker / "sub" / "map.png"]}[name]
    r = run(script(name, *args), timeout=60)
    _one_error_line(r, str(blocker), "Not a directory")


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["train_mnist.py", "convert_weights.py"])
def test_read_only_output_folder_fails_at_start(tmp_path, name, private_mounts):
    ro = tmp_path / "ro"
    ro.mkdir()
    args = {"train_mnist.py": ["--out", ro / "run", "--data-dir", tmp_path / "missing"],
            "convert_weights.py": [tmp_path / "missing.npz", "--out", ro / "w.npz"]}[name]
    r = _in_mount(f"--bind -o ro {shlex.quote(str(ro))}", ro, script(name, *args))
    if "mount" in r.stderr and r.returncode != 2:
        pytest.skip(f"read-only bind mount refused here: {r.stderr.strip()[:200]}")
    _one_error_line(r, str(ro), "Read-only file system")


@pytest.mark.e2e
def test_unreadable_data_and_checkpoint_are_one_line(tmp_path, mnist_root, no_read_override):
    """Files root may not read once its override capabilities are dropped: Permission denied, named."""
    mnist = tmp_path / "data" / "mnist"
    shutil.copytree(mnist_root / "mnist", mnist)
    locked = mnist / "train-labels-idx1-ubyte.gz"
    locked.chmod(0)
    r = run(DROP_DAC + script("train_mnist.py", *RUN, "--data-dir", tmp_path / "data", "--out", tmp_path / "run"))
    _one_error_line(r, str(locked), "Permission denied")
    ckpt = tmp_path / "m.npz"
    checkpoint.save_checkpoint(ckpt, {"w": np.zeros(2, np.float32)}, checkpoint.ViTConfig())
    ckpt.chmod(0)
    r = run(DROP_DAC + script("evaluate.py", ckpt))
    line = _one_error_line(r, str(ckpt), "Permission denied")
    assert "corrupt" not in line


def test_checkpoint_write_is_durable(tmp_path, monkeypatch):
    """The file is fsynced before the rename and its folder after it (a power cut cannot undo 'saved')."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b))[1])
    checkpoint.atomic_write(tmp_path / "f.bin", lambda f: f.write(b"data"))
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
    assert (tmp_path / "f.bin").read_bytes() == b"data" and _no_temp_files(tmp_path) == []
