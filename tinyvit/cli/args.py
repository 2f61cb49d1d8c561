"""The flags every training script shares, resolved after parsing: each mode's defaults, a resumed
run's saved settings, and an output folder that never silently replaces a run."""
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from ..errors import TinyViTError
from ..io.checkpoint import read_meta
from ..train.config import TrainConfig
from ..train.dist import world


def _default_text(name, defaults):
    """The default of a TrainConfig field for --help: one value, or each mode's ({'head': tc, ...})."""
    if isinstance(defaults, TrainConfig):
        return f"default {getattr(defaults, name)}"
    by_value = {}
    for mode, tc in defaults.items():
        by_value.setdefault(getattr(tc, name), []).append(mode)
    if len(by_value) == 1:
        return f"default {next(iter(by_value))}"
    return "default " + ", ".join(f"{v} in {'/'.join(m)} mode" for v, m in by_value.items())


TRAIN_FLAGS = {  # TrainConfig field -> (argparse keywords, help text)
    "epochs": (dict(type=int), "training epochs"),
    "batch_size": (dict(type=int), "images per step"),
    "lr": (dict(type=float), "peak learning rate"),
    "optimizer": (dict(choices=["adam", "adamw", "sgd"]), "optimizer"),
    "weight_decay": (dict(type=float), "weight decay; AdamW skips biases, norms, LayerScale, tokens, pos_embed, "
                                       "the attention pool's latent"),
    "momentum": (dict(type=float), "SGD momentum"),
    "schedule": (dict(choices=["constant", "cosine", "exponential"]), "learning-rate schedule after warmup"),
    "warmup_epochs": (dict(type=float), "linear warmup length in epochs (shortened to a tenth of a run "
                                        "that is not longer than it)"),
    "min_lr": (dict(type=float), "final lr of the cosine schedule"),
    "gamma": (dict(type=float), "per-epoch decay of the exponential schedule"),
    "clip": (dict(type=float), "clip the global grad norm to this; 0 = off"),
    "label_smoothing": (dict(type=float), "label smoothing of the cross-entropy"),
    "augment": (dict(choices=["none", "shift", "crop_flip", "affine"]), "training augmentation"),
    "ema": (dict(type=float, metavar="DECAY"), "evaluate and save an exponential moving average of the "
                                               "weights with this decay, e.g. 0.999; 0 = off"),
    "layer_decay": (dict(type=float), "layer-wise lr decay: the head at the base lr, each earlier block times "
                                      "this, the embeddings last (e.g. 0.75, as BEiT, MAE and DINOv2 fine-tune); 0 = off"),
    "seed": (dict(type=int), "seed for init, data order, augmentation, dropout"),
    "precision": (dict(choices=["float32", "bf16"]), "bf16: the linears' matrix products in bfloat16 with float32 "
                  "sums, the rest (weights, optimizer state, norms, softmax, GELU, loss) in float32 (NumPy only; "
                  "needs oneMKL: pip install -e \".[mkl]\"; refused where it would not pay, on a CPU without "
                  "AVX512-BF16 or AMX or oneMKL on AMD, unless TINYVIT_BF16_ANY_CPU=1); --resume keeps it"),
}


def add_precision_arg(ap):
    """--precision for a script that runs a model without training it (the training scripts' is a TRAIN_FLAGS)."""
    ap.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                    help=TRAIN_FLAGS["precision"][1].replace("; --resume keeps it", "") + " (default float32)")


def add_train_args(ap, defaults):
    """The optimisation flags. Each parses to None when not given, so a script can tell what the user
    typed: train_config fills in the defaults (a TrainConfig, or {mode: TrainConfig} for --help)."""
    for name, (kw, text) in TRAIN_FLAGS.items():
        ap.add_argument("--" + name.replace("_", "-"), default=None, help=f"{text} ({_default_text(name, defaults)})", **kw)


def fill_defaults(args, defaults: dict, train: TrainConfig = None):
    """Give each flag not typed (None) its default: from `defaults`, and the optimisation flags from
    `train`; args then holds the run's real settings (args.seed is the seed used)."""
    if train is not None:
        defaults = dict(defaults, **{k: getattr(train, k) for k in TRAIN_FLAGS})
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def train_config(args, defaults: TrainConfig) -> TrainConfig:
    """The TrainConfig that parsed flags describe, defaults where a flag was not given."""
    given = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k, None) is not None}
    return dataclasses.replace(defaults, **given)


def add_run_args(ap, out_default):
    """Flags about where and how a run goes (not about the optimisation itself)."""
    ap.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy",
                    help="array backend: numpy (CPU), cupy (CUDA GPU) or auto (cupy when a GPU is usable)")
    ap.add_argument("--data-dir", default=None, help="data root holding mnist/ and cifar10/ (default: $TINYVIT_DATA, else ~/.cache/tinyvit)")
    ap.add_argument("--out", default=None, help=f"output folder for checkpoint.npz, model.npz, metrics.jsonl (default "
                    f"{out_default}, or {out_default}-2, -3, ... when it holds a run; with --resume, the checkpoint's folder)")
    ap.add_argument("--overwrite", action="store_true", help="let --out name a folder that holds a run, replacing it")
    ap.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue the run saved in this checkpoint.npz "
                    "with its saved settings (flags given again must agree; a larger --epochs extends the run)")
    ap.add_argument("--limit-train", type=int, default=None, metavar="N", help="train on the first N training images only")
    ap.add_argument("--limit-test", type=int, default=None, metavar="N", help="evaluate on the first N test images only")
    ap.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                    help="stop (with a resumable checkpoint) after this many minutes")
    ap.add_argument("--save-every", type=float, default=10.0, metavar="MIN",
                    help="also write the resumable checkpoint this often within an epoch, so a hard kill "
                         "loses at most this many minutes; 0 = at epoch ends only (default 10)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of results on stdout")


# flags about where and how a run is watched, not what it computes: never saved, never compared
RUN_ONLY = frozenset({"resume", "out", "overwrite", "quiet", "json", "time_limit", "save_every", "backend",
                      "data_dir", "workers", "feature_batch", "cache_dir", "grad_checkpointing"})


# flags saved in the checkpoint's train config alone (resume_args reads them there): run_args stays what
# the runs before them saved, the shipped MNIST model's among them
TRAIN_CONFIG_ONLY = frozenset({"precision"})


def run_args(args) -> dict:
    """The flags that define a run, as saved in its checkpoints so --resume can restore them."""
    return {k: v for k, v in vars(args).items() if k not in RUN_ONLY | TRAIN_CONFIG_ONLY}


def _flag(name):
    return "--" + name.replace("_", "-")


# the scripts that write resumable runs, by a flag only each one's run_args hold
WRITERS = {"finetune.py": ("mode", "fine-tuning"), "train_mnist.py": ("init_std", "MNIST from scratch")}


def _writer(meta):
    """The script (a WRITERS key) whose run a checkpoint holds; None when its metadata does not say."""
    saved = meta.get("run_args")
    return next((s for s, (flag, _) in WRITERS.items() if isinstance(saved, dict) and flag in saved), None)


def resume_args(args, script=None):
    """With --resume CKPT: each flag not given takes the saved run's value; a given one must agree,
    except a larger --epochs, which extends the run (said on stderr). --out defaults to CKPT's folder.
    script (a WRITERS key): a run another script wrote is refused with that script's command."""
    if args.resume is None:
        return args
    meta = read_meta(args.resume)
    state = meta.get("train_state")
    if not isinstance(state, dict) or not isinstance(state.get("train_config"), dict):
        raise TinyViTError(f"{args.resume}: holds no training state (a model-only file cannot be resumed)")
    writer = _writer(meta)
    if script is not None and writer is not None and writer != script:
        raise TinyViTError(f"{args.resume}: a run of scripts/{writer} ({WRITERS[writer][1]}), which this script does not continue; "
                           f"continue it with: python scripts/{writer} --resume {args.resume}")
    saved = {k: v for k, v in state["train_config"].items() if k in TRAIN_FLAGS}
    saved.update(meta.get("run_args") if isinstance(meta.get("run_args"), dict) else {})
    for k, v in saved.items():
        if not hasattr(args, k):
            continue
        given = getattr(args, k)
        if given is None or given is False:  # not typed: the saved run's value
            setattr(args, k, v)
        elif json.loads(json.dumps(given)) != v:
            if k == "epochs" and isinstance(v, int) and given > v:
                print(f"extending the run in {args.resume} from {v} to {given} epochs: the learning-rate schedule "
                      f"is stretched over the new length (the run goes on from its current step)", file=sys.stderr)
            else:
                raise TinyViTError(f"{_flag(k)} {given} differs from the saved run's {v!r} ({args.resume}): "
                                   f"leave it out to continue that run, or start a new one without --resume")
    if args.out is None:
        args.out = str(Path(args.resume).parent)
    return args


def holds_run(folder) -> bool:
    """True when the folder holds a run's model or checkpoint."""
    return any((Path(folder) / f).exists() for f in ("model.npz", "checkpoint.npz"))


def choose_out(args, out_default):
    """args.out for a new run: the default moves to the next free numbered folder when it holds a run
    (said on stderr); an explicit --out holding one needs --overwrite."""
    if args.resume is not None:
        return args
    if args.out is None:
        out, n = Path(out_default), 1
        while holds_run(out):
            n += 1
            out = Path(f"{out_default}-{n}")
        if n > 1 and world().lead:
            print(f"{out_default} holds a run; this one goes to {out} (--out DIR to choose)", file=sys.stderr)
        args.out = str(out)
    elif holds_run(args.out) and not args.overwrite:
        raise TinyViTError(f"{args.out}: holds a run (model.npz or checkpoint.npz); pass --overwrite to replace it, "
                           f"--resume {Path(args.out) / 'checkpoint.npz'} to continue it, or another --out")
    return args


@contextlib.contextmanager
def removed_if_unused(out):
    """Around a run: when it fails (or is interrupted) before writing anything in --out, the folders
    it created for --out are removed again, so an early failure leaves no empty --out behind."""
    out = Path(out).absolute()
    created = [p for p in (out, *out.parents) if not p.exists()] if world().lead else []  # deepest first
    try:
        yield
    except BaseException:
        for p in created:
            try:
                p.rmdir()  # only an empty folder: anything the run wrote stays
            except OSError:
                break
        raise


def run_clock(args) -> dict:
    """fit()'s time keywords (seconds) from the --time-limit and --save-every minutes."""
    return {"time_limit": None if args.time_limit is None else 60 * args.time_limit,
            "save_every": 60 * args.save_every if args.save_every > 0 else None}
