"""Run by tests/test_dist.py, with or without mpiexec: a few training steps of a tiny ViT on toy
data; rank 0 saves the resulting params. argv: OUT_DIR DTYPE STEPS [RESUME_CHECKPOINT]."""
import os
import sys

import numpy as np

from tinyvit import init_params
from tinyvit.backend import get_backend, to_numpy
from tinyvit.cli.report import run
from tinyvit.train.config import TrainConfig
from tinyvit.train.dist import world
from tinyvit.train.loop import fit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy_data import TINY as CFG  # noqa: E402
from toy_data import synthetic as data


def _test_faults():
    """TINYVIT_TEST_KILL_RANK=r: rank r is killed (SIGKILL) after 2 s; TINYVIT_TEST_FAIL_RANK=r: it raises."""
    import os
    import signal
    import threading

    from tinyvit.errors import TinyViTError

    rank = world().rank
    if os.environ.get("TINYVIT_TEST_KILL_RANK") == str(rank):
        threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    if os.environ.get("TINYVIT_TEST_FAIL_RANK") == str(rank):
        raise TinyViTError("a test fault on this rank")


def main():
    _test_faults()
    out, dtype, steps = sys.argv[1], np.dtype(sys.argv[2]), int(sys.argv[3])
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    tc = TrainConfig(epochs=2, batch_size=32, lr=2e-3, augment="shift", label_smoothing=0.1, warmup_epochs=0.5)
    xp = get_backend(os.environ.get("TINYVIT_TEST_BACKEND", "numpy"))  # cupy: gradients staged via the host
    s = fit(init_params(CFG, dtype=dtype), CFG, tc, xp, data(256, 1), data(96, 2), out, quiet=True,
            max_steps=steps, resume=resume)
    if world().lead:
        np.savez(f"{out}/params.npz", **to_numpy(s["params"]))
        print(f"steps {s['steps']} run {s['steps_run']} accuracy {s['test_accuracy']}")


if __name__ == "__main__":
    run(main)
