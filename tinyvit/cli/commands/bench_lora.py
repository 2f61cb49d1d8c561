"""benchmark.py --lora-rank R: the LoRA train step (adapters and head trained, the rest frozen) beside the
full train step, and with --vs-torch PEFT's LoRA step on the same model in torch, interleaved rounds in one
process, e.g.

  python scripts/benchmark.py --preset vit-ti16 --batch 32 --lora-rank 8 --vs-torch
"""
import numpy as np

from tinyvit import init_params, preset
from tinyvit.backend import to_device
from tinyvit.cli.commands.bench_common import median_time, preset_overrides, stub_torchvision_ops, torch_model, train_step
from tinyvit.errors import TinyViTError
from tinyvit.nn.lora import ALIASES, LINEAR, ROWS, LoraConfig, add_adapters
from tinyvit.nn.lora import trainable_names as lora_trainable


def lora_config(args):
    """--lora-rank, --lora-targets (timm's or PEFT's names) as a LoraConfig."""
    targets = tuple(ALIASES.get(t.strip(), t.strip()) for t in args.lora_targets.split(",") if t.strip())
    return LoraConfig(rank=args.lora_rank, targets=targets)


def _peft_step(cfg, params, x, y, lora, threads):
    """PEFT's LoRA step on the torch model of the same base params (the benchmark's own rival)."""
    import torch

    stub_torchvision_ops()  # transformers (which peft imports) reaches torchvision
    try:
        import peft
    except ModuleNotFoundError as e:
        if e.name != "peft":
            raise
        raise TinyViTError("--lora-rank with --vs-torch races PEFT: pip install peft") from None
    if set(lora.targets) & set(ROWS):
        raise TinyViTError("--lora-rank --vs-torch: PEFT adapts whole linears; name qkv, proj, fc1 or fc2")
    torch.set_num_threads(threads)
    base = {k: np.asarray(v) for k, v in params.items() if ".lora_" not in k}
    model = torch_model(cfg, base, torch.float32)
    modules = "|".join(LINEAR[t].replace(".", r"\.") for t in lora.targets)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=lora.rank, lora_alpha=lora.rank, modules_to_save=["head"],
                                                    target_modules=rf"blocks\.\d+\.({modules})"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.0)
    xt, yt = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(pm(xt), yt).backward()
        opt.step()
    return step


def lora_case(name, batch, args, xp):
    """The full step, the LoRA step and (--vs-torch) PEFT's, interleaved rounds: a dict ready for JSON."""
    if args.dtype != "float32" or args.backend != "numpy" and args.vs_torch:
        raise TinyViTError("--lora-rank times float32 steps (and races PEFT on NumPy's CPU only)")
    lora = lora_config(args)
    cfg = preset(name, **preset_overrides(args))
    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((batch, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
    y_host = rng.integers(0, cfg.num_classes, size=batch)
    base = init_params(cfg, seed=0)
    adapted, acfg = add_adapters(base, cfg, lora)
    params, x, y = to_device(adapted, xp), xp.asarray(x_host), xp.asarray(y_host)
    trained = set(lora_trainable(adapted))
    steps = {"full": train_step(to_device(base, xp), cfg, x, y, None),
             "lora": train_step(params, acfg, x, y, trained)}
    if args.vs_torch:
        steps["peft"] = _peft_step(cfg, base, x_host, y_host, lora, args.threads)
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for what, step in steps.items():
            times[what].append(median_time(step, xp, args.reps))
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    out = {"preset": name, "batch": batch, "backend": args.backend, "lora": lora.to_dict(),
           "trained_params": sum(int(adapted[k].size) for k in trained), "full_step_ms": ms["full"],
           "lora_step_ms": ms["lora"], "ratio_to_full": ms["lora"] / ms["full"]}
    if "peft" in ms:
        out.update(peft_step_ms=ms["peft"], ratio_to_peft=ms["lora"] / ms["peft"])
    return out


def lora_line(r):
    """lora_case's result in one line."""
    line = (f"{r['preset']} batch {r['batch']} on {r['backend']}: train step {r['full_step_ms']:.1f} ms; LoRA rank "
            f"{r['lora']['rank']} on {','.join(r['lora']['targets'])} ({r['trained_params']:,} params trained) "
            f"{r['lora_step_ms']:.1f} ms: {r['ratio_to_full']:.2f}x")
    if "peft_step_ms" in r:
        line += f"; PEFT on torch {r['peft_step_ms']:.1f} ms: ratio {r['ratio_to_peft']:.2f}"
    return line
