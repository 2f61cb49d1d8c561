"""Step time and the Allreduce's share when training over MPI ranks (run it under mpiexec).

  TINYVIT_SHARDS=1 mpiexec -n 2 python scripts/mpi_scaling.py    # 2 ranks x 1 thread
  python scripts/mpi_scaling.py                                   # 1 rank x all cores (for comparison)

For each case: the global batch split over the ranks, forward+backward on each rank's part, and the
one Allreduce of the whole gradient; rank 0 prints medians (ms) as one JSON line per case.
"""
import argparse
import json
import time

import numpy as np

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.cli.report import run
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward
from tinyvit.nn.model import count_params, init_params, preset, vit_backward, vit_forward
from tinyvit.train.dist import world


def median_ms(fn, reps):
    """Median wall time of fn() in ms, after one warm-up, every rank in step (a barrier between)."""
    w = world()
    fn()
    times = []
    for _ in range(reps):
        if w.comm is not None:
            w.comm.Barrier()
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return float(np.median(times))


def case(name, batch, reps):
    """Timings of one preset at one global batch."""
    w = world()
    cfg = preset(name)
    params = init_params(cfg)
    local = len(range(batch)[w.part(batch)])
    x = np.random.default_rng(w.rank).standard_normal((local, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
    y = np.arange(local) % cfg.num_classes
    grads = {}

    def step():
        logits, cache = vit_forward(params, x, cfg, train=True)
        grads.update(vit_backward(cross_entropy_backward(local / batch, cross_entropy_forward(logits, y)[1]), cache))

    compute = median_ms(step, reps)
    reduce = median_ms(lambda: w.sum_grads(grads), reps)
    return {"preset": name, "global_batch": batch, "ranks": w.size, "params": count_params(params),
            "compute_ms": compute, "allreduce_ms": reduce, "step_ms": compute + reduce,
            "allreduce_share": reduce / (compute + reduce)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    ap.add_argument("--cases", default="mnist:128,vit-b16:8", help="preset:global_batch,... (default mnist:128,vit-b16:8)")
    args = ap.parse_args()
    for c in args.cases.split(","):
        name, batch = c.split(":")
        r = case(name, int(batch), args.reps)
        if world().lead:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    run(main)
