"""benchmark.py --memory: the peak resident memory of a train step, tinyvit and torch side by side, with
and without gradient checkpointing, each case in a fresh process; and the largest batch that fits a
memory size, extrapolated from the peaks measured at several batch sizes.

Not a command: scripts/benchmark.py imports it (python puts a script's folder on the path)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

from tinyvit import init_params, preset
from tinyvit.backend import get_backend, synchronize, to_device
from tinyvit.cli.commands.bench_common import torch_model
from tinyvit.train.config import TrainConfig

SIDES = ("tinyvit", "torch")
STEPS = 1  # measured; the optimizer's state is made before it (a zero-lr step on zero gradients), as in a
# run's later steps


def tinyvit_checkpointing():
    """(ViTConfig or TrainConfig field, where) of tinyvit's gradient checkpointing, or None when this
    tinyvit has none yet (the column is then marked not available)."""
    from tinyvit.nn.config import ViTConfig

    for kind in (TrainConfig, ViTConfig):
        if "grad_checkpointing" in {f.name for f in dataclasses.fields(kind)}:
            return kind
    return None


def _status_mib(field):
    """VmRSS (now) or VmHWM (peak) of this process in MiB, from /proc/self/status.

    Not getrusage's ru_maxrss: Linux carries that across exec, so a probe forked from a big parent
    would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _tinyvit_step(cfg, params, x, y, checkpointing):
    """One AdamW train step as the training loop runs it (tinyvit.train.loop), checkpointing on or off."""
    from tinyvit.train import loop

    tc = TrainConfig(lr=1e-4, optimizer="adamw")
    if checkpointing:
        kind = tinyvit_checkpointing()
        if kind is TrainConfig:
            tc = dataclasses.replace(tc, grad_checkpointing=True)
        else:
            cfg = dataclasses.replace(cfg, grad_checkpointing=True)
    opt, rng = tc.make_optimizer(), np.random.default_rng(0)
    opt.step(params, {k: v * 0 for k, v in params.items()}, lr=0.0)  # the optimizer's state, made now

    def step():
        _, _, grads = loop._step_grads(params, x, y, cfg, tc, rng, False)
        opt.step({k: params[k] for k in grads}, grads, lr=tc.lr)

    return step


def _torch_step(cfg, host, x, y, device, rival, checkpointing):
    """One AdamW train step of the torch rival (bench_common.torch_model), torch.utils.checkpoint on or off."""
    import torch


    dtype = torch.float32 if x.dtype == np.float32 else torch.float64
    model = torch_model(cfg, host, dtype, rival).to(device)
    model.set_grad_checkpointing(checkpointing)
    xt, yt = torch.tensor(x, device=device), torch.tensor(y, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    for p in model.parameters():  # the optimizer's state, made now
        p.grad = torch.zeros_like(p)
    opt.step()
    model.zero_grad(set_to_none=True)
    for group in opt.param_groups:
        group["lr"] = 1e-4

    def step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()

    return step


def probe(args, overrides):
    """(In a fresh process) STEPS train step(s) of one side; print its peak memory as one JSON line."""
    side, checkpointing = args._probe.split(":")[0], args._probe.endswith(":ckpt")
    xp = get_backend(args.backend)
    dtype = np.float32 if args.dtype == "float32" else np.float64
    cfg = preset(args.preset, **overrides)
    host = init_params(cfg, seed=0, dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch[0], cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype)
    y = rng.integers(0, cfg.num_classes, size=args.batch[0])
    if side == "torch":
        import torch

        torch.set_num_threads(args.threads)
        step = _torch_step(cfg, host, x, y, "cuda" if xp is not np else "cpu", args.rival, checkpointing)
    else:
        step = _tinyvit_step(cfg, to_device(host, xp), xp.asarray(x), xp.asarray(y), checkpointing)
    del host
    try:  # start the peak (VmHWM) afresh here, so setup's transients (param copies) do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _status_mib("VmRSS")
    for _ in range(STEPS):
        step()
    synchronize(xp)
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "step_mib": peak - base, "before_mib": base}))


def measure(name, batch, side, checkpointing, args):
    """The peak of one case from a fresh `benchmark.py --_probe` process -> dict (or {'error': why})."""
    if side == "tinyvit" and checkpointing and tinyvit_checkpointing() is None:
        return {"error": "not available: this tinyvit has no grad_checkpointing setting"}
    cmd = [sys.executable, "-m", "tinyvit.cli.commands.benchmark",
           "--_probe", f"{side}:{'ckpt' if checkpointing else 'plain'}", "--preset", name, "--batch", str(batch),
           *(["--img-size", str(args.img_size)] if args.img_size else []),
           *(["--patch-size", str(args.patch_size)] if args.patch_size else []), "--rival", args.rival,
           "--backend", args.backend, "--dtype", args.dtype, "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "probe failed"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def largest_batch(points, gib):
    """The largest batch whose peak fits `gib` GiB, on the line through (batch, peak MiB) points (least
    squares; extrapolated beyond them) -> int, or None with fewer than 2 points."""
    if len(points) < 2:
        return None
    b, m = np.array(points, dtype=np.float64).T
    slope, intercept = np.polyfit(b, m, 1)
    return max(0, int((gib * 1024 - intercept) // slope)) if slope > 0 else None


def memory_table(cases, sides, args):
    """Every case's peaks (each side, checkpointing off and on) and, per preset with 2 or more batch
    sizes, the largest batch fitting each --fit-gib size -> dict ready for JSON."""
    rows = []
    for name, batch in cases:
        row = {"preset": name, "batch": batch}
        for side in sides:
            for ckpt in (False, True):
                row[f"{side}{'_ckpt' if ckpt else ''}"] = measure(name, batch, side, ckpt, args)
        rows.append(row)
    fits = []
    for name in dict.fromkeys(n for n, _ in cases):
        for col in [f"{s}{c}" for s in sides for c in ("", "_ckpt")]:
            pts = [(r["batch"], r[col]["peak_mib"]) for r in rows if r["preset"] == name and "peak_mib" in r[col]]
            if len(pts) >= 2:
                fits.append({"preset": name, "side": col, "measured_batches": [p[0] for p in pts],
                             **{f"largest_batch_{g:g}gib": largest_batch(pts, g) for g in args.fit_gib}})
    return {"memory": rows, "fits": fits, "steps": STEPS,
            "measure": "peak resident set (VmHWM) of a fresh process over its train steps, after setup"}


def print_table(res, sides, args):
    """The table: peak MiB per case and side, then the extrapolated largest batches."""
    cols = [f"{s}{c}" for s in sides for c in ("", "_ckpt")]
    print(f"peak resident memory of a train step (AdamW, {STEPS} step after the optimizer state is made, {args.dtype}, fresh process per case), MiB")
    print(f"{'preset':10s} {'batch':>5s} " + " ".join(f"{c:>14s}" for c in cols))
    for r in res["memory"]:
        cells = [f"{r[c]['peak_mib']:14.0f}" if "peak_mib" in r[c] else f"{'n/a':>14s}" for c in cols]
        print(f"{r['preset']:10s} {r['batch']:5d} " + " ".join(cells))
    for c in cols:
        for r in res["memory"]:
            if "error" in r[c]:
                print(f"  {c} n/a ({r['preset']} batch {r['batch']}): {r[c]['error']}")
                break
    for f in res["fits"]:
        sizes = ", ".join(f"{g:g} GiB: {f[f'largest_batch_{g:g}gib']}" for g in args.fit_gib)
        print(f"largest batch ({f['preset']}, {f['side']}; a line through batches "
              f"{', '.join(map(str, f['measured_batches']))}, extrapolated): {sizes}")
