"""Every script with --backend cupy, end to end on tiny settings: on a GPU through real CuPy, elsewhere
through the CuPy stand-in (TINYVIT_CUPY_STANDIN=1 is set for these runs)."""
import numpy as np
import pytest
from helpers import assert_same_train_state, last_json, run_script

from tinyvit.io.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e


def _cupy_script(name, *args, timeout=600):
    """Run scripts/name with --backend cupy (the stand-in where no GPU is usable); the last JSON line."""
    r = run_script(name, "--backend", "cupy", *args, extra_env={"TINYVIT_CUPY_STANDIN": "1"}, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return last_json(r)


MNIST_RUN = ["--limit-train", "1024", "--limit-test", "256", "--epochs", "2", "--warmup-epochs", "0.5",
             "--batch-size", "32", "--depth", "2", "--patch-size", "7", "--lr", "3e-3", "--augment", "none",
             "--json", "--quiet"]


def test_train_mnist_resume_evaluate_predict_on_cupy(tmp_path, mnist_root):
    """Training learns, a run cut after its first step resumes to the same model, evaluate agrees, predict draws."""
    data = ["--data-dir", mnist_root]
    whole = _cupy_script("train_mnist.py", *MNIST_RUN, *data, "--out", tmp_path / "whole")
    assert whole["test_accuracy"] > 0.3, whole  # chance is 0.1; 64 steps of a fresh 2-block ViT
    cut = tmp_path / "cut"
    part = _cupy_script("train_mnist.py", *MNIST_RUN, *data, "--out", cut, "--time-limit", "0")
    assert part["stopped_early"] and part["steps"] == 1
    resumed = _cupy_script("train_mnist.py", *MNIST_RUN, *data, "--out", cut, "--resume", cut / "checkpoint.npz")
    assert resumed["steps_run"] == whole["steps"] - 1 == 63  # from the checkpoint on, not a rerun from step 0
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert_same_train_state(tmp_path / "whole" / "checkpoint.npz", cut / "checkpoint.npz")
    a, _, _ = load_checkpoint(whole["checkpoint"])
    b, _, _ = load_checkpoint(resumed["checkpoint"])
    assert all(np.array_equal(a[k], b[k]) for k in a)  # bit-exact resume on the CuPy path
    ev = _cupy_script("evaluate.py", whole["checkpoint"], "--limit", "256", "--json", *data)
    assert ev["test_accuracy"] == whole["test_accuracy"]
    from PIL import Image

    img = np.zeros((28, 28), np.uint8)
    img[6:22, 12:16] = 255  # a "1"
    Image.fromarray(img).save(tmp_path / "one.png")
    pred = _cupy_script("predict.py", whole["checkpoint"], tmp_path / "one.png", "--json",
                        "--attention-map", tmp_path / "attn.png")
    assert len(pred["predictions"][0]["top_k"]) == 5
    assert Image.open(tmp_path / "attn.png").size[0] >= 28 and pred["predictions"][0]["attention_map"]


@pytest.mark.parametrize("mode", ["head", "full", "progressive"])
def test_finetune_cifar_on_cupy(tmp_path, mode, cifar_root, ti16):
    """Real ViT-Ti/16 weights at 32 px on a few hundred CIFAR-10 images, every mode."""
    extra = {"head": ["--epochs", "5"], "full": ["--epochs", "1", "--batch-size", "32"],
             "progressive": ["--epochs", "2", "--batch-size", "32", "--grad-accum", "2"]}[mode]
    out = _cupy_script("finetune_cifar.py", "--weights", ti16, "--mode", mode, "--img-size", "32",
                       "--limit-train", "256", "--limit-test", "128", "--out", tmp_path, "--json", "--quiet",
                       "--data-dir", cifar_root, *extra)
    assert out["test_accuracy"] > 0.15, out  # chance is 0.10; measured 0.27 (head), 0.20 (full), 0.27 (progressive)
    _, cfg, meta = load_checkpoint(out["checkpoint"])
    assert cfg.num_classes == 10 and meta["class_names"][0] == "airplane"
    assert meta["test_accuracy"] == out["test_accuracy"]  # the model saved is the one scored


def test_benchmark_runs_on_cupy():
    """The CuPy benchmark runs (no times are claimed for the stand-in)."""
    out = _cupy_script("benchmark.py", "--preset", "mnist", "--batch", "4", "--reps", "1", "--rounds", "1", "--json")
    case = out["cases"][0]
    assert case["forward"]["tinyvit_ms"] > 0 and case["train_step"]["tinyvit_ms"] > 0
