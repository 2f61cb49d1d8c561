"""Time tinyvit's forward, forward+backward and train step, and (--vs-torch) the same model in PyTorch.

Both run in one process on the same params, dtype, thread count and device, interleaved, and the
medians are compared as a ratio tinyvit/torch (below 1 means tinyvit is faster). PyTorch is only
imported with --vs-torch or --memory: tinyvit itself never needs it.

--precision bf16 runs tinyvit's linears in bfloat16 (oneMKL's GEMM) and, with --vs-torch, torch's model under
torch.autocast('cpu', dtype=torch.bfloat16), e.g.

  python scripts/benchmark.py --preset vit-b16 --batch 8 --precision bf16 --vs-torch

--memory instead measures the peak resident memory of a train step, tinyvit and torch side by side,
with and without gradient checkpointing, each case in a fresh process, e.g.

  python scripts/benchmark.py --memory --preset vit-b16 --batch 8,16,32 --fit-gib 8,16
"""
import argparse
import contextlib
import json
import os

import numpy as np

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit import init_params, preset, vit_backward, vit_forward
from tinyvit.backend import get_backend, to_device
from tinyvit.cli.commands import bench_lora, bench_memory
from tinyvit.cli.commands.bench_common import median_time, preset_overrides, torch_model, train_step
from tinyvit.cli.finetune import freeze_patterns
from tinyvit.cli.report import run
from tinyvit.cpu import bf16
from tinyvit.cpu.features import blas_libraries, hardware, hardware_line
from tinyvit.cpu.threads import batch_shards
from tinyvit.errors import TinyViTError
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward
from tinyvit.train.optim import AdamW, trainable_names

ONNX_CASES = [("vit-ti16", 64), ("vit-b16", 8)]  # the inference cases raced against onnxruntime
DEFAULT_CASES = {"numpy": [("mnist", 128), ("vit-b16", 8)], "cupy": [("vit-b16", 64), ("mnist", 128)]}


def forward_flops(cfg, batch):
    """Multiply-adds x 2 of one forward pass (matmuls and attention products; elementwise ignored).

    These are the full model's FLOPs, every token through every block as torch computes it; tinyvit's
    last block runs the class token alone, so its GFLOP/s are model-FLOP rates, not BLAS rates."""
    n, d, m = cfg.num_patches + cfg.num_prefix_tokens, cfg.dim, cfg.mlp_dim
    per_block = 2 * n * (3 * d * d + d * d + 2 * d * m) + 2 * 2 * n * n * d
    embed = 2 * cfg.num_patches * cfg.in_chans * cfg.patch_size ** 2 * d
    return batch * (cfg.depth * per_block + embed + 2 * d * cfg.num_classes)


def matmul_peak(xp, dtype, n=2048, reps=5):
    """Measured GFLOP/s of one large square matmul on this backend: the practical ceiling."""
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)).astype(dtype))
    return 2 * n ** 3 / median_time(lambda: a @ a, xp, reps) / 1e9


def bf16_matmul_peak(n=2048, reps=5):
    """GFLOP/s of one large square bf16 GEMM with float32 sums (tinyvit.cpu.bf16), its operand pre-rounded."""
    a = bf16.to_bf16(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    return 2 * n ** 3 / median_time(lambda: bf16.gemm_bf16(a, a), np, reps) / 1e9


def torch_matmul_peak(dtype, device, n=2048, reps=5, bf16=False):
    """The same large matmul in torch (in bfloat16 with bf16): its BLAS (MKL/oneDNN on CPU) sets torch's ceiling."""
    import torch

    a = torch.tensor(np.random.default_rng(0).standard_normal((n, n)).astype(dtype), device=device)
    a = a.bfloat16() if bf16 else a
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def mm():
        a @ a
        sync()

    return 2 * n ** 3 / median_time(mm, np, reps) / 1e9


def tinyvit_fns(cfg, params, x, y):
    """forward / forward+backward / train step closures for tinyvit."""
    opt = AdamW(lr=1e-4)

    def fwd():
        return vit_forward(params, x, cfg, train=True)

    def fwd_bwd():
        logits, cache = vit_forward(params, x, cfg, train=True)
        _, ce = cross_entropy_forward(logits, y)
        return vit_backward(cross_entropy_backward(1.0, ce), cache)

    def step():
        opt.step(params, fwd_bwd())

    return {"forward": fwd, "forward_backward": fwd_bwd, "train_step": step}


def torch_fns(cfg, params, x, y, device, rival="auto", bf16=False):
    """The same closures for the torch model (timm's names and math), same params; with bf16 its forwards under
    torch.autocast('cpu', dtype=torch.bfloat16), the backward outside it (as torch's docs advise)."""
    import torch

    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    dtype = torch.float32 if x.dtype == np.float32 else torch.float64
    model = torch_model(cfg, {k: np.asarray(v) for k, v in params.items()}, dtype, rival).to(device)
    xt, yt = torch.tensor(np.asarray(x), device=device), torch.tensor(np.asarray(y), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with cast():
            loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss.backward()

    def step():
        fwd_bwd()
        opt.step()

    def fwd():
        with cast():
            return model(xt)

    return {"forward": fwd, "forward_backward": fwd_bwd, "train_step": step}


def blas_info():
    """Which BLAS libraries, versions and kernels run here, NumPy's first, with their threads, or why unknown."""
    libs = blas_libraries()
    return libs if libs is not None else {"error": "pip install threadpoolctl to see which BLAS kernel ran"}


def hardware_info(args):
    """The CPU's features, the BLAS and kernel NumPy runs, the bf16 GEMM, and the rivals' builds: a dict."""
    rivals = {}
    if args.vs_torch:
        import torch

        rivals["torch"] = f"{torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()})"
    if args.vs_onnxruntime:
        import onnxruntime

        rivals["onnxruntime"] = onnxruntime.__version__
    return hardware(bf16.describe(), **rivals)


def onnxruntime_fn(cfg, params, x, threads):
    """onnxruntime on tinyvit's own ONNX export of the same params: all graph optimisations, `threads` threads."""
    import onnxruntime as ort

    from tinyvit.io.onnx_export import onnx_model

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    model = onnx_model({k: np.asarray(v) for k, v in params.items()}, cfg, {})
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"pixel_values": np.asarray(x, np.float32)}
    return lambda: sess.run(["logits"], feed)


def bench_onnxruntime(cfg, host, x_host, args, xp):
    """Inference (eval mode, no cache) of tinyvit against onnxruntime, interleaved rounds: a dict."""
    params, x = to_device(host, xp), xp.asarray(x_host)
    ours = lambda: vit_forward(params, x, cfg, keep_cache=False)  # noqa: E731
    theirs = onnxruntime_fn(cfg, host, x_host, args.threads)
    ts, tt = [], []
    for _ in range(args.rounds):
        ts.append(median_time(ours, xp, args.reps))
        tt.append(median_time(theirs, np, args.reps))
    a, b = 1e3 * float(np.median(ts)), 1e3 * float(np.median(tt))
    return {"tinyvit_ms": a, "onnxruntime_ms": b, "ratio": a / b, "images_per_second": x_host.shape[0] / a * 1e3}


def bench_case(name, batch, args, xp):
    """All timings for one (preset, batch) case: a dict ready for JSON."""
    dtype = np.float32 if args.dtype == "float32" else np.float64
    cfg = preset(name, **preset_overrides(args), precision=args.precision)
    host = init_params(cfg, seed=0, dtype=dtype)
    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((batch, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype)
    y_host = rng.integers(0, cfg.num_classes, size=batch)
    ours = tinyvit_fns(cfg, to_device(host, xp), xp.asarray(x_host), xp.asarray(y_host))
    theirs = None
    if args.vs_torch:
        import torch

        torch.set_num_threads(args.threads)
        device = "cuda" if xp is not np else "cpu"
        if device == "cuda":  # TF32 off on both sides: CuPy's default cuBLAS math is full float32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        theirs = torch_fns(cfg, host, x_host, y_host, device, args.rival, args.precision == "bf16")
    flops = forward_flops(cfg, batch)
    peak = matmul_peak(xp, dtype)
    out = {"preset": name, "batch": batch, "dtype": args.dtype, "precision": args.precision, "backend": args.backend,
           "blas": blas_info(),
           "rival": args.rival,
           "threads": args.threads, "matmul_peak_gflops": peak, "forward_gflop": flops / 1e9,
           "tinyvit_shards": len(batch_shards(batch, xp) or [None])}  # data-parallel shards per batch
    if theirs:
        out["torch_matmul_peak_gflops"] = torch_matmul_peak(dtype, device)
    if args.precision == "bf16":
        out["bf16_matmul_peak_gflops"] = bf16_matmul_peak()
        if theirs:
            out["torch_bf16_matmul_peak_gflops"] = torch_matmul_peak(dtype, device, bf16=True)
    if args.vs_onnxruntime:
        out["inference"] = bench_onnxruntime(cfg, host, x_host, args, xp)
        if not args.vs_torch:
            return out
    for what, mult in (("forward", 1), ("forward_backward", 3), ("train_step", 3)):
        ts, tt = [], []
        for _ in range(args.rounds):  # interleave: each round times ours, then torch's
            ts.append(median_time(ours[what], xp, args.reps))
            if theirs:
                tt.append(median_time(theirs[what], xp, args.reps))
        rec = {"tinyvit_ms": 1e3 * float(np.median(ts)), "images_per_second": batch / float(np.median(ts)),
               "gflops": mult * flops / float(np.median(ts)) / 1e9}
        rec["fraction_of_matmul_peak"] = rec["gflops"] / peak
        if theirs:
            rec["torch_ms"] = 1e3 * float(np.median(tt))
            rec["ratio"] = rec["tinyvit_ms"] / rec["torch_ms"]
        out[what] = rec
    return out


def freeze_case(name, batch, args, xp):
    """The train step with the --freeze patterns' params frozen (tinyvit.train.optim.trainable_names) beside
    the full step, interleaved rounds: a dict ready for JSON."""
    dtype = np.float32 if args.dtype == "float32" else np.float64
    cfg = preset(name, **preset_overrides(args))
    params = to_device(init_params(cfg, seed=0, dtype=dtype), xp)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((batch, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype))
    y = xp.asarray(rng.integers(0, cfg.num_classes, size=batch))
    trained = trainable_names(params, freeze_patterns(args.freeze))
    steps = {what: train_step(params, cfg, x, y, names) for what, names in (("full", None), ("frozen", trained))}
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for what, step in steps.items():
            times[what].append(median_time(step, xp, args.reps))
    full, frozen = (1e3 * float(np.median(times[k])) for k in ("full", "frozen"))
    return {"preset": name, "batch": batch, "dtype": args.dtype, "backend": args.backend, "freeze": args.freeze,
            "trained_params": sum(int(params[k].size) for k in trained), "params": sum(int(v.size) for v in params.values()),
            "full_step_ms": full, "frozen_step_ms": frozen, "ratio": frozen / full}


def _batches(text):
    """--batch: one size or several, comma-separated."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a batch size or several, e.g. 8 or 8,16,32") from None
    if any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes are positive")
    return sizes


def memory(cases, args):
    """--memory: the peaks of every case (fresh processes), as a table or one JSON line."""
    sides = [s for s in args.memory.split(",") if s]
    if not sides or any(s not in bench_memory.SIDES for s in sides):
        raise TinyViTError(f"--memory {args.memory}: name tinyvit, torch or both (tinyvit,torch)")
    res = bench_memory.memory_table(cases, sides, args)
    if args.json:
        print(json.dumps(res))
    else:
        bench_memory.print_table(res, sides, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="one preset to time (default: the backend's default cases)")
    ap.add_argument("--batch", type=_batches, default=None, help="batch size for --preset, or several "
                    "(8,16,32: one case each) (default 8)")
    ap.add_argument("--img-size", type=int, default=None, help="input size for --preset (default: the preset's; "
                    "e.g. 224 for dinov2-s14, whose preset is timm's 518)")
    ap.add_argument("--patch-size", type=int, default=None, help="patch size for --preset (default: the preset's; "
                    "e.g. 14 to race vit-s16 at dinov2-s14's token count)")
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="array backend (default numpy)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="compute dtype (default float32)")
    ap.add_argument("--vs-torch", action="store_true", help="also time the same model in PyTorch, interleaved")
    ap.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                    help="bf16: tinyvit's linears in bfloat16 with float32 sums (NumPy, oneMKL: pip install -e "
                         "\".[mkl]\"), torch's model under torch.autocast('cpu', dtype=torch.bfloat16); time steps "
                         "only (not --memory, --freeze), --dtype float32 (default float32)")
    ap.add_argument("--vs-onnxruntime", action="store_true",
                    help="time inference against onnxruntime on tinyvit's own ONNX export (all graph "
                         "optimisations, --threads threads), interleaved; without --vs-torch, inference alone, "
                         "for vit-ti16 batch 64 and vit-b16 batch 8 unless --preset is given")
    ap.add_argument("--rival", choices=["auto", "timm"], default="auto",
                    help="--vs-torch's model: auto (the tests' torch ViT for the 2020 ViT, timm's own model for the "
                         "rest of the family) or timm (timm's model for every preset) (default auto)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    ap.add_argument("--memory", nargs="?", const="tinyvit,torch", default=None, metavar="SIDES",
                    help="instead of times: the peak resident memory of a train step (AdamW) in a fresh process per "
                         "case, for tinyvit and torch (or the SIDES named: tinyvit, torch), each with and without "
                         "gradient checkpointing (torch.utils.checkpoint on torch's side)")
    ap.add_argument("--fit-gib", type=lambda v: [float(g) for g in v.split(",")], default=[8.0, 16.0],
                    metavar="GIB", help="--memory with 2 or more --batch sizes: the largest batch whose peak fits "
                                        "each of these sizes, on the line through the measured peaks (default 8,16)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--freeze", default=None, metavar="PATTERN[,PATTERN]",
                    help="time the train step of --preset (default vit-b16) with the params matching these shell "
                         "patterns over timm's names frozen, beside the full step, e.g. "
                         "'patch_embed.*,cls_token,pos_embed,blocks.[0-9].*' (no other timing)")
    ap.add_argument("--lora-rank", type=int, default=None, metavar="R",
                    help="time --preset's (default vit-ti16) train step with LoRA adapters of rank R and the head "
                         "trained beside the full step, and with --vs-torch PEFT's (no other timing)")
    ap.add_argument("--lora-targets", default="qkv", metavar="NAME[,NAME]",
                    help="--lora-rank's adapted linears: qkv, proj, fc1, fc2 (default qkv)")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._probe:
        return bench_memory.probe(args, preset_overrides(args))
    default = ONNX_CASES if args.vs_onnxruntime and not args.vs_torch else DEFAULT_CASES[args.backend]
    cases = [(args.preset, b) for b in args.batch or [8]] if args.preset else default
    if args.precision == "bf16" and (args.memory or args.freeze or args.lora_rank or args.dtype != "float32"):
        raise TinyViTError("--precision bf16 times float32 models' steps: not with --memory, --freeze, --lora-rank "
                           "or --dtype float64")
    if args.memory:
        return memory(cases, args)
    xp = get_backend(args.backend)
    bf16.check_precision(args.precision, xp)
    info = hardware_info(args)  # which CPU features and BLAS ran every figure below, in one line
    if not args.json:
        print(hardware_line(info), flush=True)
    if args.lora_rank is not None:
        r = bench_lora.lora_case(args.preset or "vit-ti16", (args.batch or [32])[0], args, xp)
        print(json.dumps(dict(r, hardware=info)) if args.json else bench_lora.lora_line(r))
        return
    if args.freeze:
        r = freeze_case(args.preset or "vit-b16", (args.batch or [8])[0], args, xp)
        print(json.dumps(dict(r, hardware=info)) if args.json else
              f"{r['preset']} batch {r['batch']} {r['dtype']} on {r['backend']}: train step {r['full_step_ms']:.1f} ms; "
              f"with --freeze {r['freeze']} ({r['trained_params']:,} of {r['params']:,} params trained) "
              f"{r['frozen_step_ms']:.1f} ms: {r['ratio']:.2f}x")
        return
    results = [bench_case(name, batch, args, xp) for name, batch in cases]
    if args.json:
        print(json.dumps({"hardware": info, "cases": results}))
        return
    for r in results:
        print(f"{r['preset']} batch {r['batch']} {r['dtype']}{' (linears in bf16)' * (r['precision'] == 'bf16')} "
              f"on {r['backend']} ({r['threads']} threads), "
              f"tinyvit in {r['tinyvit_shards']} shard(s), matmul peak {r['matmul_peak_gflops']:.0f} GFLOP/s"
              + (f" (torch's: {r['torch_matmul_peak_gflops']:.0f})" if "torch_matmul_peak_gflops" in r else "")
              + (f", bf16 GEMM peak {r['bf16_matmul_peak_gflops']:.0f}" if "bf16_matmul_peak_gflops" in r else "")
              + (f" (torch's: {r['torch_bf16_matmul_peak_gflops']:.0f})" if "torch_bf16_matmul_peak_gflops" in r else ""))
        blas = r["blas"][0] if isinstance(r["blas"], list) and r["blas"] else r["blas"]
        print(f"  BLAS: {json.dumps(blas)}")
        if "inference" in r:
            m = r["inference"]
            print(f"  inference         tinyvit {m['tinyvit_ms']:9.1f} ms  {m['images_per_second']:8.1f} img/s  "
                  f"onnxruntime {m['onnxruntime_ms']:9.1f} ms  ratio {m['ratio']:.2f}")
        for what in ("forward", "forward_backward", "train_step"):
            if what not in r:
                continue
            m = r[what]
            line = f"  {what:17s} tinyvit {m['tinyvit_ms']:9.1f} ms  {m['images_per_second']:8.1f} img/s  " \
                   f"{m['gflops']:6.1f} GFLOP/s ({100 * m['fraction_of_matmul_peak']:4.1f}% of peak)"
            if "ratio" in m:
                line += f"  torch {m['torch_ms']:9.1f} ms  ratio {m['ratio']:.2f}"
            print(line)
        if "memory" in r:
            print("  memory:", json.dumps(r["memory"]))


if __name__ == "__main__":
    run(main)
