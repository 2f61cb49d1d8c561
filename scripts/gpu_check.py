"""One command that proves tinyvit's CuPy path on a GPU and writes its figures: report.json and a log.

On a machine with a CUDA GPU (about 8 minutes on one H100/H200): the CuPy test suite, MNIST from
scratch with the GPU recipe under a time cap, benchmark.py --vs-torch for mnist and vit-b16, a short
full fine-tune of ViT-Ti/16 on the CIFAR-10 batches present, and the host reads per step (counted
through the CuPy stand-in). Without a GPU the same steps run on the stand-in, much smaller, and the
report says so: that checks the script itself (CI does).

    python scripts/gpu_check.py --out gpu_report

tinyvit must be importable: installed (pip install -e ".[cuda,test]"), or PYTHONPATH=. from the checkout.

Data: mnist/ (11 MB) and, for the fine-tune, cifar10/cifar-10-batches-bin/ with data_batch_1 and
test_batch (it reads only those: 10,000 training and 2,000 test images) under --data-dir, and the
ViT-Ti/16 .npz (--weights). A step whose files are missing fails with its reason in the report.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from tinyvit.backend import _real_cupy
from tinyvit.cli.report import run
from tinyvit.io.files import prepare_out_dir

ROOT = Path(__file__).resolve().parents[1]

TIMM_TI16 = "vit_tiny_patch16_224.augreg_in21k_ft_in1k.npz"
# MNIST on a GPU: the mnist preset at its full depth (6 blocks), 30 epochs with shift augmentation
# and label smoothing; a first recipe, not yet measured on a GPU (the CPU default, 4 blocks and 24
# epochs, reaches 99.49%)
GPU_MNIST = ["--depth", "6", "--epochs", "30", "--batch-size", "128", "--lr", "3e-3", "--warmup-epochs", "2",
             "--augment", "shift", "--label-smoothing", "0.1"]
SMALL_MNIST = ["--depth", "2", "--epochs", "1", "--batch-size", "32", "--warmup-epochs", "0.5",
               "--limit-train", "1024", "--limit-test", "256"]


class Check:
    """Runs the steps, each a subprocess with a time cap, into one log and one report."""

    def __init__(self, out, gpu, env):
        self.out, self.gpu, self.env = out, gpu, env
        self.log = open(out / "gpu_check.log", "w")
        self.steps = {}

    def run(self, name, cmd, timeout):
        """Run cmd (a script path and args) with the report's environment; return (rc, stdout)."""
        cmd = [sys.executable, *map(str, cmd)]
        self.log.write(f"\n=== {name}: {' '.join(cmd)}\n")
        self.log.flush()
        t = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
            rc, out, err = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", _text(e.stdout), _text(e.stderr) + f"\n(stopped after {timeout} s)"
        secs = time.perf_counter() - t
        self.log.write(out + ("\n--- stderr\n" + err if err else "") + f"\n=== {name}: exit {rc}, {secs:.1f} s\n")
        self.log.flush()
        self.steps[name] = {"ok": rc == 0, "exit": rc, "seconds": round(secs, 1),
                            "command": " ".join(str(c) for c in cmd[1:])}
        return rc, out

    def record(self, name, **figures):
        """Add figures to a step's entry."""
        self.steps[name].update(figures)


def _text(b):
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _last_json(out):
    """The last line of out that parses as a JSON object, or None."""
    for line in reversed(out.strip().splitlines()):
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if isinstance(v, dict):
            return v
    return None


def _pytest_counts(out):
    """{'passed': n, 'failed': n, 'skipped': n, ...} from pytest's closing line."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}


def device_info(gpu):
    """GPU name and versions of what ran."""
    import numpy

    info = {"python": platform.python_version(), "numpy": numpy.__version__, "standin": gpu is None}
    if gpu is not None:
        props = gpu.cuda.runtime.getDeviceProperties(0)
        info.update(gpu=props["name"].decode(errors="replace"), gpu_memory_gib=round(props["totalGlobalMem"] / 2**30, 1),
                    cupy=gpu.__version__, cuda_runtime=gpu.cuda.runtime.runtimeGetVersion(),
                    cuda_driver=gpu.cuda.runtime.driverGetVersion())
    else:
        from tinyvit.testing import cupy_standin

        info.update(gpu=None, cupy_standin_of=cupy_standin.__version__)
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        info["torch"] = None
    return info


def step_tests(c, small):
    """The CuPy cases of the test suite (on the stand-in: the kernels and layers only)."""
    files = ["tests/test_kernels.py", "tests/test_layers.py"] if small else ["tests"]
    rc, out = c.run("tests", ["-m", "pytest", "-q", "-k", "cupy", "-p", "no:cacheprovider", *files], 300)
    c.record("tests", **_pytest_counts(out))


def step_mnist(c, small, data, minutes):
    """MNIST from scratch with the GPU recipe, capped at `minutes`."""
    run_dir = c.out / "mnist"
    recipe = SMALL_MNIST if small else GPU_MNIST + ["--time-limit", minutes]
    rc, out = c.run("mnist", ["scripts/train_mnist.py", "--backend", "cupy", *recipe, "--data-dir", data,
                              "--out", run_dir, "--json", "--quiet"], 60 * minutes + 120)
    s = _last_json(out) or {}
    c.record("mnist", recipe=" ".join(recipe), test_accuracy=s.get("test_accuracy"), epochs=s.get("epochs"),
             train_seconds=s.get("train_seconds"), images_per_second=s.get("images_per_second"),
             stopped_early=s.get("stopped_early"))


def step_benchmark(c, small):
    """benchmark.py --backend cupy (--vs-torch on a GPU) for mnist and vit-b16."""
    cases = [("mnist", 4)] if small else [("mnist", 128), ("vit-b16", 64)]
    for preset, batch in cases:
        name = f"benchmark_{preset}"
        args = ["--reps", "1", "--rounds", "1"] if small else ["--vs-torch", "--reps", "5", "--rounds", "3"]
        rc, out = c.run(name, ["scripts/benchmark.py", "--backend", "cupy", "--preset", preset, "--batch", batch,
                               *args, "--json"], 300)
        case = ((_last_json(out) or {}).get("cases") or [{}])[0]
        c.record(name, batch=batch, **{w: case.get(w) for w in ("forward", "forward_backward", "train_step")},
                 times_claimed=not small)


def step_finetune(c, small, data, weights, minutes):
    """A short full fine-tune of ViT-Ti/16 on CIFAR-10 (224 px on a GPU, 32 px on the stand-in)."""
    if weights is None:
        c.steps["finetune"] = {"ok": False, "exit": None, "why": f"no {TIMM_TI16} found (--weights)"}
        return
    size = ["--img-size", "32", "--limit-train", "256", "--limit-test", "128", "--batch-size", "32"] if small else \
        ["--img-size", "224", "--limit-train", "10000", "--limit-test", "2000", "--batch-size", "128",
         "--lr", "1e-4", "--warmup-epochs", "0.1", "--time-limit", minutes]
    rc, out = c.run("finetune", ["scripts/finetune_cifar.py", "--backend", "cupy", "--mode", "full", "--epochs", "1",
                                 "--weights", weights, *size, "--data-dir", data, "--out", c.out / "finetune",
                                 "--json", "--quiet"], 60 * minutes + 180)
    s = _last_json(out) or {}
    c.record("finetune", settings=" ".join(map(str, size)), test_accuracy=s.get("test_accuracy"),
             images_per_second=s.get("images_per_second"), stopped_early=s.get("stopped_early"))


def step_syncs(c, small):
    """Host reads per train step, optimizer step and inference batch, counted through the stand-in."""
    rc, out = c.run("syncs", [Path(__file__).resolve(), "--_syncs", "small" if small else "full"], 300)
    c.record("syncs", **(_last_json(out) or {}))


def count_syncs(size):
    """(Subprocess) the stand-in's read counts for mnist and ViT-B/16 (2 blocks when small)."""
    import numpy as np

    from tinyvit.backend import to_device
    from tinyvit.nn.model import init_params, preset, vit_forward
    from tinyvit.testing import cupy_standin as cp
    from tinyvit.train.config import TrainConfig
    from tinyvit.train.loop import _step_grads
    from tinyvit.train.optim import clip_grad_norm

    res = {}
    for name, cfg in (("mnist", preset("mnist")),
                      ("vit-b16", preset("vit-b16", **({"depth": 2, "img_size": 64} if size == "small" else {})))):
        params = to_device(init_params(cfg), cp)
        x = cp.asarray(np.random.default_rng(0).normal(size=(2, cfg.in_chans, cfg.img_size, cfg.img_size)),
                       dtype=np.float32)
        y = cp.asarray(np.arange(2))
        tc = TrainConfig(clip=1.0)
        opt = tc.make_optimizer()
        s0 = cp.sync_count()
        _, _, grads = _step_grads(params, x, y, cfg, tc, cp.random.default_rng(0), False)
        clip_grad_norm(grads, tc.clip)
        s1 = cp.sync_count()
        opt.step(params, grads, lr=1e-3)
        s2 = cp.sync_count()
        vit_forward(params, x, cfg, keep_cache=False)
        s3 = cp.sync_count()
        res[name] = {"train_step_forward_backward_clip": s1 - s0, "optimizer_step": s2 - s1,
                     "inference_batch": s3 - s2, "blocks": cfg.depth, "img_size": cfg.img_size}
    from tinyvit.train.loop import DEVICE_READ_EVERY

    res["loop_reads_per_step"] = 1 / DEVICE_READ_EVERY  # the training loop's one read every N steps
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_report", help="folder for report.json, gpu_check.log and the runs' "
                                                         "outputs (default gpu_report)")
    ap.add_argument("--data-dir", default=None, help="data root with mnist/ and cifar10/ (default: $TINYVIT_DATA, "
                                                     "else ~/.cache/tinyvit)")
    ap.add_argument("--weights", default=None, help=f"ViT-Ti/16 weights for the fine-tune (default: {TIMM_TI16} "
                                                    "in $TINYVIT_WEIGHTS or weights/)")
    ap.add_argument("--mnist-minutes", type=float, default=3.5, help="time cap of the MNIST run on a GPU (default 3.5)")
    ap.add_argument("--finetune-minutes", type=float, default=1.0, help="time cap of the fine-tune on a GPU (default 1)")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out (tests,syncs,mnist,benchmark,finetune)")
    ap.add_argument("--_syncs", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._syncs:
        return count_syncs(args._syncs)
    from tinyvit.data.download import data_root

    gpu = _real_cupy()
    small = gpu is None
    out = Path(args.out)
    prepare_out_dir(out)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if small:
        env["TINYVIT_CUPY_STANDIN"] = "1"  # no GPU: every --backend cupy run goes through the stand-in
    data = str(data_root(args.data_dir))
    weights = args.weights or next((str(p) for p in (Path(os.environ.get("TINYVIT_WEIGHTS", ROOT / "weights")) / TIMM_TI16,
                                                     ROOT / "weights" / TIMM_TI16) if p.is_file()), None)
    c = Check(out, gpu, env)
    t0 = time.perf_counter()
    report = {"device": device_info(gpu), "mode": "stand-in (no GPU: small runs, no times claimed)" if small else "gpu"}
    skip = set(filter(None, args.skip.split(",")))
    steps = [("tests", lambda: step_tests(c, small)), ("syncs", lambda: step_syncs(c, small)),
             ("mnist", lambda: step_mnist(c, small, data, args.mnist_minutes)),
             ("benchmark", lambda: step_benchmark(c, small)),
             ("finetune", lambda: step_finetune(c, small, data, weights, args.finetune_minutes))]
    for name, fn in steps:
        if name not in skip:
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            fn()
            report.update(steps=c.steps, seconds=round(time.perf_counter() - t0, 1))
            (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")  # after each step: a cut run keeps it
    report["ok"] = all(s["ok"] for s in c.steps.values())
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    for name, s in c.steps.items():
        print(f"{name:20s} {'ok  ' if s['ok'] else 'FAIL'} {s.get('seconds', 0):7.1f} s", file=sys.stderr)
    print(json.dumps({"ok": report["ok"], "report": str(out / "report.json"), "seconds": report["seconds"]}))
    if not report["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    run(main)
