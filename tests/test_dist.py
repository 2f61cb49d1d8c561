"""Data-parallel training over MPI: 2 ranks equal 1 rank with the same global batch, a 2-rank
checkpoint resumes on 1 rank, a killed or failing rank ends the job within seconds, and the
training script runs under mpiexec. Skipped where mpi4py or an MPI launcher is missing."""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, run, script

from tinyvit.io.checkpoint import load_checkpoint

MPIEXEC = shutil.which("mpiexec") or shutil.which("mpirun")
try:
    import mpi4py  # noqa: F401
except ImportError:
    MPIEXEC = None
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(MPIEXEC is None, reason="mpi4py and an MPI launcher (pip install -e '.[mpi]') needed")]
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI", "PMIX", "TINYVIT_TEST_"))}


def _fit(out, dtype, steps, ranks=1, resume=None, timeout=300, **env):
    cmd = [sys.executable, str(ROOT / "tests" / "mpi_fit.py"), str(out), dtype, str(steps)] + ([str(resume)] if resume else [])
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    return run(cmd, env=ENV, extra_env=env, timeout=timeout)


def _params(out):
    with np.load(Path(out) / "params.npz") as z:
        return {k: z[k] for k in z.files}


def _part(k, v):
    """The key third of qkv.bias has an exactly zero gradient (softmax ignores a shift of every score);
    AdamW turns its float32 rounding noise into lr-sized steps, so it is left out of the comparison."""
    if k.endswith("attn.qkv.bias"):
        d = v.shape[0] // 3
        return np.concatenate([v[:d], v[2 * d:]])
    return v


def _rel(a, b):
    return max(float(np.abs(_part(k, a[k]) - _part(k, b[k])).max() / np.abs(_part(k, b[k])).max()) for k in b)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_two_ranks_equal_one_rank(tmp_path, dtype, tol):
    one, two = _fit(tmp_path / "one", dtype, 5), _fit(tmp_path / "two", dtype, 5, ranks=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert _rel(_params(tmp_path / "two"), _params(tmp_path / "one")) <= tol
    assert two.stdout.count("steps 5") == 1  # only rank 0 reports


def test_two_ranks_on_cupy_reduce_host_staged_buffers(tmp_path):
    """--backend cupy (the stand-in where no GPU is): gradients go through the host and back."""
    env = {"TINYVIT_TEST_BACKEND": "cupy", "TINYVIT_CUPY_STANDIN": "1"}
    one, two = _fit(tmp_path / "one", "float64", 3, **env), _fit(tmp_path / "two", "float64", 3, ranks=2, **env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert _rel(_params(tmp_path / "two"), _params(tmp_path / "one")) <= 1e-12


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path):
    whole = _fit(tmp_path / "whole", "float64", 100)  # 2 epochs of 8 steps
    cut = _fit(tmp_path / "cut", "float64", 5, ranks=2)
    assert whole.returncode == 0 and cut.returncode == 0, cut.stderr[-2000:]
    # at most the 11 steps after the checkpoint: a resume that restarted from step 0 would stop at step 11
    resumed = _fit(tmp_path / "cut", "float64", 11, resume=tmp_path / "cut" / "checkpoint.npz")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "steps 16 run 11 " in resumed.stdout and _rel(_params(tmp_path / "cut"), _params(tmp_path / "whole")) <= 1e-10


@pytest.mark.parametrize("fault", ["TINYVIT_TEST_KILL_RANK", "TINYVIT_TEST_FAIL_RANK"])
def test_a_lost_rank_ends_the_job(tmp_path, fault):
    t = time.perf_counter()
    r = _fit(tmp_path / "run", "float64", 10 ** 6, ranks=2, timeout=120, **{fault: "1"})
    assert r.returncode != 0 and time.perf_counter() - t < 60, r.stderr[-2000:]
    if fault == "TINYVIT_TEST_FAIL_RANK":
        assert "error: rank 1: a test fault on this rank" in r.stderr and "Traceback" not in r.stderr


def test_train_mnist_under_mpiexec_matches_one_rank(tmp_path, mnist_root):
    """The script's 2-rank run ends with the 1-rank run's weights (float32 rounding: 2e-6 measured) and accuracy."""
    cmd = script("train_mnist.py", "--limit-train", "512", "--limit-test", "512", "--epochs", "1", "--batch-size", "64",
                 "--warmup-epochs", "0.2", "--data-dir", mnist_root, "--json", "--quiet")
    runs = []
    for ranks in (1, 2):
        r = run(([MPIEXEC, "-n", "2"] if ranks == 2 else []) + cmd + ["--out", tmp_path / str(ranks)], env=ENV, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        lines = [json.loads(x) for x in r.stdout.strip().splitlines() if x.startswith("{")]
        assert len(lines) == 1  # rank 0 alone reports
        runs.append(lines[0])
    assert runs[0]["steps"] == runs[1]["steps"] == 8
    one, two = (load_checkpoint(tmp_path / str(r) / "model.npz")[0] for r in (1, 2))
    assert _rel(two, one) <= 5e-5 and abs(runs[0]["test_accuracy"] - runs[1]["test_accuracy"]) <= 2 / 512, runs


def test_head_mode_refuses_several_ranks(tmp_path):
    r = run([MPIEXEC, "-n", "2", *script("finetune.py", "--data", tmp_path, "--preset", "vit-ti16", "--mode", "head",
                                         "--out", tmp_path / "o")], env=ENV, timeout=120)
    assert r.returncode != 0 and "--mode head is one process" in r.stderr and "Traceback" not in r.stderr


def test_ranks_error_lines_stay_on_separate_lines(tmp_path, mnist_root):
    """Both ranks see the divergence and print it: each 'error:' starts a line of its own (print's
    text and newline went out as two writes, and the ranks' lines ran together), and the empty
    --out is removed."""
    cmd = script("train_mnist.py", "--limit-train", "256", "--limit-test", "64", "--batch-size", "64", "--depth", "1",
                 "--patch-size", "7", "--lr", "1e6", "--optimizer", "sgd", "--warmup-epochs", "0", "--schedule",
                 "constant", "--epochs", "1", "--quiet", "--data-dir", mnist_root, "--out", tmp_path / "run")
    r = run([MPIEXEC, "-n", "2", *cmd], env=ENV, extra_env={"PYTHONWARNINGS": "ignore"}, timeout=120)
    assert r.returncode != 0 and "training diverged" in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("error:") == sum(line.startswith("error:") for line in r.stderr.splitlines()), r.stderr
    assert not (tmp_path / "run").exists()
