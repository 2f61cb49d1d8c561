"""What every script shares: error handling, training flags, and the final JSON line."""
import dataclasses
import json
import sys

from .dist import world
from .errors import TinyViTError, describe_os_error
from .train import TrainConfig


def run(main):
    """Call main(); a TinyViTError or an operating-system fault (full disk, no permission, ...)
    becomes one 'error: ...' line on stderr and exit code 2, never a traceback."""
    try:
        code = main()
    except TinyViTError as e:
        _fail(str(e))
    except OSError as e:
        _fail(describe_os_error(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def _fail(message, code=2):
    """One 'error:' line and exit; under MPI (several ranks) the whole job ends, so none waits."""
    w = world()
    prefix = f"rank {w.rank}: " if w.size > 1 and not w.lead else ""
    print(f"error: {prefix}{message}", file=sys.stderr)
    w.abort(code)
    sys.exit(code)


def add_train_args(ap, defaults: TrainConfig):
    """The optimisation flags, with this script's defaults."""
    d = defaults
    ap.add_argument("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step (default {d.batch_size})")
    ap.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    ap.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=d.optimizer,
                    help=f"optimizer (default {d.optimizer})")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay,
                    help=f"weight decay; AdamW skips biases, norms, cls_token, pos_embed (default {d.weight_decay})")
    ap.add_argument("--momentum", type=float, default=d.momentum, help=f"SGD momentum (default {d.momentum})")
    ap.add_argument("--schedule", choices=["constant", "cosine", "exponential"], default=d.schedule,
                    help=f"learning-rate schedule after warmup (default {d.schedule})")
    ap.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                    help=f"linear warmup length in epochs (default {d.warmup_epochs})")
    ap.add_argument("--min-lr", type=float, default=d.min_lr, help=f"final lr of the cosine schedule (default {d.min_lr})")
    ap.add_argument("--gamma", type=float, default=d.gamma, help=f"per-epoch decay of the exponential schedule (default {d.gamma})")
    ap.add_argument("--clip", type=float, default=d.clip, help=f"clip the global grad norm to this; 0 = off (default {d.clip})")
    ap.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                    help=f"label smoothing of the cross-entropy (default {d.label_smoothing})")
    ap.add_argument("--augment", choices=["none", "shift", "crop_flip", "affine"], default=d.augment,
                    help=f"training augmentation (default {d.augment})")
    ap.add_argument("--ema", type=float, default=d.ema, metavar="DECAY",
                    help=f"evaluate and save an exponential moving average of the weights with this decay, e.g. "
                         f"0.999; 0 = off (default {d.ema})")
    ap.add_argument("--seed", type=int, default=d.seed, help=f"seed for init, data order, augmentation, dropout (default {d.seed})")


def train_config(args) -> TrainConfig:
    """The TrainConfig that parsed flags describe."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def add_run_args(ap, out_default):
    """Flags about where and how a run goes (not about the optimisation itself)."""
    ap.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy",
                    help="array backend: numpy (CPU), cupy (CUDA GPU) or auto (cupy when a GPU is usable)")
    ap.add_argument("--data-dir", default=None, help="data root holding mnist/ and cifar10/ (default: $TINYVIT_DATA, else ~/.cache/tinyvit)")
    ap.add_argument("--out", default=out_default, help=f"output folder for checkpoint.npz, model.npz, metrics.jsonl (default {out_default})")
    ap.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue the run saved in this checkpoint.npz")
    ap.add_argument("--limit-train", type=int, default=None, metavar="N", help="train on the first N training images only")
    ap.add_argument("--limit-test", type=int, default=None, metavar="N", help="evaluate on the first N test images only")
    ap.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                    help="stop (with a resumable checkpoint) after this many minutes")
    ap.add_argument("--save-every", type=float, default=10.0, metavar="MIN",
                    help="also write the resumable checkpoint this often within an epoch, so a hard kill "
                         "loses at most this many minutes; 0 = at epoch ends only (default 10)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of results on stdout")


def run_clock(args) -> dict:
    """fit()'s time keywords (seconds) from the --time-limit and --save-every minutes."""
    return {"time_limit": None if args.time_limit is None else 60 * args.time_limit,
            "save_every": 60 * args.save_every if args.save_every > 0 else None}


def report(summary, args, extra=None):
    """Print the run's result: a readable line, or (with --json) one JSON object as the last line."""
    if not world().lead:  # MPI: rank 0 reports
        return
    out = {k: v for k, v in summary.items() if k != "params"}
    out.update(extra or {})
    if args.json:
        print(json.dumps(out))
    else:
        acc = out.get("test_accuracy")
        acc_s = f"{acc * 100:.2f}%" if acc is not None else "n/a"
        print(f"test accuracy {acc_s} after {out['epochs']} epochs, {out['train_seconds']:.0f} s "
              f"({out['images_per_second']:.0f} images/s); checkpoint: {out['checkpoint']}")
