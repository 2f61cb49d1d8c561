"""Train a ViT on MNIST from random init with tinyvit (NumPy on CPU, or CuPy on a GPU)."""
import argparse

from tinyvit import init_params, preset
from tinyvit.backend import get_backend
from tinyvit.cli.args import (
    add_run_args,
    add_train_args,
    choose_out,
    fill_defaults,
    removed_if_unused,
    resume_args,
    run_args,
    run_clock,
    train_config,
)
from tinyvit.cli.report import report, run
from tinyvit.data.batches import ArrayDataset
from tinyvit.data.download import data_root
from tinyvit.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist
from tinyvit.data.transform import EvalTransform
from tinyvit.nn.model import PRESETS
from tinyvit.train.config import TrainConfig
from tinyvit.train.dist import world
from tinyvit.train.loop import fit

# Defaults: what plain `python scripts/train_mnist.py` runs (see README for the figures): the mnist
# preset (patch 4, width 64, 4 heads) with 4 blocks instead of 6, 24 epochs of batch 128, sized to
# end inside 15 minutes on a 2-core CPU (more epochs of 4 blocks beat fewer of 6 or 3 there: see
# docs/performance.md); pass --depth 6 for the preset's full depth.
DEFAULT_DEPTH = 4
DEFAULTS = TrainConfig(epochs=24, batch_size=128, lr=4e-3, optimizer="adamw", weight_decay=0.05,
                       schedule="cosine", warmup_epochs=1.0, min_lr=1e-5, label_smoothing=0.1,
                       augment="shift", seed=0)


ARCH_DEFAULTS = {"preset": "mnist", "dropout": 0.0, "depth": DEFAULT_DEPTH, "init_std": 0.07}


def parse_args(argv=None):
    """The command line, with a resumed run's saved flags and then the defaults filled in."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model preset (default mnist)")
    ap.add_argument("--dropout", type=float, default=None, help="dropout rate in the blocks (default 0)")
    ap.add_argument("--depth", type=int, default=None,
                    help=f"transformer blocks (default {DEFAULT_DEPTH}; the mnist preset itself has 6)")
    for name in ("patch-size", "dim", "heads", "mlp-dim"):
        ap.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name.replace('-', '_')}")
    ap.add_argument("--gelu", choices=["erf", "tanh"], default=None, help="override the preset's GELU (exact erf or tanh)")
    ap.add_argument("--init-std", type=float, default=None,
                    help="std of the trunc-normal init of linear weights (default 0.07, about torch's default "
                         "for width 64; timm's 0.02 learns far slower from scratch at this width)")
    add_train_args(ap, DEFAULTS)
    add_run_args(ap, "runs/mnist")
    args = fill_defaults(resume_args(ap.parse_args(argv), "train_mnist.py"), ARCH_DEFAULTS, DEFAULTS)
    return choose_out(args, "runs/mnist")


def main(argv=None):
    args = parse_args(argv)
    with removed_if_unused(args.out):  # an early failure leaves no empty --out behind
        summary = train(args)
    return report(summary, args, {"backend": args.backend, "preset": args.preset, "precision": args.precision})


def train(args):
    """The run the parsed flags describe -> fit's summary."""
    world().out_dir(args.out)  # a wrong --out fails now, not after an epoch
    tc = train_config(args, DEFAULTS)
    xp = get_backend(args.backend)
    root = data_root(args.data_dir)
    tr_x, tr_y = load_mnist(root, "train")
    te_x, te_y = load_mnist(root, "test")
    tr_x, tr_y = tr_x[:args.limit_train], tr_y[:args.limit_train]
    te_x, te_y = te_x[:args.limit_test], te_y[:args.limit_test]
    arch = {k: getattr(args, k) for k in ("patch_size", "dim", "depth", "heads", "mlp_dim", "gelu")}
    cfg = preset(args.preset, img_size=28, in_chans=1, num_classes=10, dropout=args.dropout,
                 **{k: v for k, v in arch.items() if v is not None})
    params = init_params(cfg, seed=tc.seed, std=args.init_std)
    t = EvalTransform(MNIST_MEAN, MNIST_STD, crop_pct=1.0, invert="auto")  # the whole square; dark ink on light inverted
    meta = {"dataset": "mnist", "class_names": [str(i) for i in range(10)], "mean": list(MNIST_MEAN),
            "std": list(MNIST_STD), "eval_transform": t.to_dict(), "run_args": run_args(args)}
    return fit(params, cfg, tc, xp,
               ArrayDataset(tr_x, tr_y, MNIST_MEAN, MNIST_STD), ArrayDataset(te_x, te_y, MNIST_MEAN, MNIST_STD),
               args.out, meta=meta, resume=args.resume, quiet=args.quiet, **run_clock(args))


if __name__ == "__main__":
    run(main)
