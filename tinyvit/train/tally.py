"""An epoch's running loss and accuracy, summed on the device and read to the host every few steps."""
import time

import numpy as np

from ..backend import get_array_module, to_numpy
from .dist import World

DEVICE_READ_EVERY = 10  # on CuPy, steps between host reads of the loss (each read stalls the GPU)


class Tally:
    """An epoch's summed loss and correct count, added where they were computed (on the GPU under
    CuPy) and read to the host in one transfer every `every` steps."""

    def __init__(self, every, world=None):
        self.every, self.pending, self.unread, self.unread_n = every, None, 0, 0
        self.world = world or World()
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self.t0 = time.perf_counter()

    def add(self, loss, correct, n):
        """Count one step: its mean loss and correct count (0-d arrays) over n images."""
        xp = get_array_module(loss)
        v = xp.stack([loss.astype(xp.float64) * n, correct.astype(xp.float64)])  # (loss sum, correct)
        self.pending = v if self.pending is None else self.pending + v
        self.unread, self.unread_n = self.unread + 1, self.unread_n + n

    def due(self) -> bool:
        """True when `every` steps wait to be read."""
        return self.unread >= self.every

    def read(self) -> float:
        """Bring the waiting sums to the host (one transfer); return their mean loss (nan/inf kept)."""
        if self.pending is None:
            return 0.0
        sums = np.append(to_numpy(self.pending).astype(np.float64), self.unread_n)
        loss_sum, correct, seen = (float(v) for v in self.world.sum_(sums))  # every rank's steps
        seen = int(seen)
        self.pending, self.unread, self.unread_n = None, 0, 0
        self.loss_sum, self.correct, self.seen = self.loss_sum + loss_sum, self.correct + int(correct), self.seen + seen
        return loss_sum / max(seen, 1)

    def mean_loss(self) -> float:
        """Mean loss per image over the steps read so far."""
        return self.loss_sum / max(self.seen, 1)

    def state(self) -> dict:
        """The sums read so far and the epoch's seconds so far, JSON-able (for a mid-epoch checkpoint)."""
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "seconds": time.perf_counter() - self.t0}

    def restore(self, state) -> float:
        """Continue from state(): the sums carry on; returns the seconds the epoch had run."""
        self.loss_sum, self.correct, self.seen = state["loss_sum"], state["correct"], state["seen"]
        self.t0 -= state["seconds"]
        return state["seconds"]
