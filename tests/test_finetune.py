"""Fine-tuning (tinyvit.train.finetune) through its command line: seeded runs of every mode give the
same weights bit for bit as the code before the recipe dataclasses (digests recorded then)."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from tinyvit import init_params
from tinyvit.cli.finetune import main
from tinyvit.io.checkpoint import load_checkpoint, save_checkpoint
from tinyvit.nn.model import ViTConfig

TINY = ViTConfig(img_size=32, patch_size=8, in_chans=3, num_classes=5, dim=32, depth=3, heads=2, mlp_dim=64)


def _folder(root, n=8, classes=("a", "b")):
    """Class folders of noisy colour images (24x30 px)."""
    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            base = np.array([200, 40, 40]) if k == 0 else np.array([40, 40, 200])
            a = np.clip(base + rng.normal(0, 60, (24, 30, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / c / f"{i:02d}.png")
    return root


@pytest.fixture
def tiny_run(tmp_path, monkeypatch, capsys):
    """run(*flags) -> (the run's JSON summary, its model.npz params): the fine-tuning command in-process
    on a tiny folder and tiny weights, two shards fixed (the digests do not depend on the core count)."""
    monkeypatch.setenv("TINYVIT_SHARDS", "2")
    data = _folder(tmp_path / "data")
    weights = save_checkpoint(tmp_path / "w.npz", init_params(TINY, seed=1), TINY, meta={})
    n = [0]

    def run(*flags, out=None, source=("--data", data, "--val-split", "0.25")):
        n[0] += 1
        out = out or tmp_path / f"run{n[0]}"
        argv = [*map(str, source), "--weights", str(weights), "--batch-size", "4",
                "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--quiet", "--json", *map(str, flags)]
        capsys.readouterr()
        assert main("x", argv=argv) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return summary, load_checkpoint(out / "model.npz")[0]

    return run


def digest(params) -> str:
    """sha256 over the params' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(params):
        v = np.ascontiguousarray(params[k])
        h.update(f"{k}{v.dtype}{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()


# recorded on the code before the fine-tuning recipe became dataclasses (argparse's namespace then
# travelled into tinyvit.train): the same seeded runs give the same bytes
DIGESTS = {
    "head": "42daad4b42cbb852a248ca737b8bc94c92bf09989f4703cf9891b1fd2842e5e6",
    "full": "1029cb4eed7e1e7bb5886d695f4735b3dfecb6ba8e6eaf87565aa0b0eccc7225",
    "progressive": "8ed81e31fd4f7f9dc15626f17b31c324cd88b13ff114fbfe098a5c03a11e6982",
    "cifar10": "307bb51d2fbe337eb491d14a1f500c8fc3723a74310017bcd9c00d578884eaa5",
}
FLAGS = {
    "head": ["--mode", "head", "--epochs", "3"],
    "full": ["--mode", "full", "--epochs", "2", "--drop-path", "0.1", "--augment", "crop_flip", "--seed", "3"],
    "progressive": ["--mode", "progressive", "--epochs", "2", "--head-epochs", "1", "--layer-decay", "0.75"],
    "cifar10": ["--mode", "full", "--epochs", "1", "--limit-train", "16", "--limit-test", "8"],
}


@pytest.mark.parametrize("mode", list(FLAGS))
def test_seeded_runs_give_the_recorded_weights(tiny_run, mode, request):
    source = {}
    if mode == "cifar10":
        source = {"source": ("--data", "cifar10", "--data-dir", request.getfixturevalue("cifar_root"))}
    summary, params = tiny_run(*FLAGS[mode], **source)
    assert digest(params) == DIGESTS[mode]
