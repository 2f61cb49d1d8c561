"""scripts/decode_rate.py: decoding and model rates on an image folder, and a last line that says
whether decoding keeps up with training and with inference."""
import json

import numpy as np
import pytest
from helpers import load_script, run_script
from PIL import Image


def _folder(root, n=6):
    """Two classes of small JPEGs."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


@pytest.mark.parametrize("decode,model,want", [
    (500.0, 20.0, "decoding keeps up: 500 img/s on 2 threads against the model's 20.0 img/s (4% of its time)"),
    (30.0, 20.0, "decoding barely keeps up"),
    (10.0, 20.0, "decoding is slower: the model waits on it"),
])
def test_verdict_says_whether_decoding_keeps_up(decode, model, want):
    assert load_script("decode_rate.py").verdict(decode, model, 2).startswith(want)


@pytest.mark.e2e
def test_the_last_line_is_a_verdict_for_training_and_inference(tmp_path):
    data = _folder(tmp_path / "photos")
    args = (data, "--img-size", "32", "--batch-size", "2", "--workers", "1")
    r = run_script("decode_rate.py", *args, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    train, infer = out["verdict"].split("; ")
    assert train.startswith("training: decoding ") and infer.startswith("inference: decoding ")
    assert f"{out['decode_train_workers1']:.0f} img/s on 1 thread against the model's {out['model_train_step']:.1f}" in train
    r = run_script("decode_rate.py", *args, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[-1].startswith("verdict: training: decoding "), r.stdout
