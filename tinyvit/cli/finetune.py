"""The fine-tuning command line (scripts/finetune.py, scripts/finetune_cifar.py): flags, each mode's
defaults after parsing, and the run."""
import argparse
import dataclasses
import sys
from pathlib import Path

from ..data.datasets import DataSource
from ..errors import TinyViTError
from ..io.hub import resolve
from ..nn.lora import ALIASES, BIAS, LoraConfig
from ..nn.model import PRESETS
from ..train.config import TrainConfig
from ..train.dist import world
from ..train.finetune import HEAD, MODE_DEFAULTS, run_finetune
from ..train.recipe import ModelSource, Recipe, RunOptions
from .args import (
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
from .report import report

# the other flags' defaults, applied after parsing (and after --resume restored the saved run's);
# img_size None: the weights' own size (a preset's: 224)
FLAG_DEFAULTS = {"mode": "head", "img_size": None, "head_epochs": 1, "head_lr": HEAD.lr, "grad_accum": 1,
                 "feature_batch": 64, "val_split": 0.1, "workers": 2, "strict": False, "drop_path": 0.0,
                 "cache_dtype": "float16", "freeze": "", "grad_checkpointing": False, "bias": "none",
                 "lora_dropout": 0.0, "lora_targets": "qkv", "lora_rslora": False, "lora_dora": False}
TRAIN_BLOCKS = 1  # partial mode's default --train-blocks
# LoRA's lr (full and progressive mode): PEFT's ViT image-classification example trains r = 16 adapters
# at 5e-3 with batch 128; scaled to batch 32, and not tuned on a run here
LORA_LR = 1e-3
LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_rslora", "lora_dora")

# flags that act only in some modes -> (those modes, the value that changes nothing)
TRAINED = ("full", "progressive", "partial")  # the modes that train blocks, through fit
MODE_ONLY = {"augment": (("full", "progressive"), "none"), "drop_path": (TRAINED, 0.0),
             "layer_decay": (TRAINED, 0.0), "ema": (TRAINED, 0.0), "grad_accum": (TRAINED, 1),
             "head_epochs": (("progressive",), None), "head_lr": (("progressive",), None),
             "feature_batch": (("head", "partial"), None), "cache_dir": (("head", "partial"), None),
             "train_blocks": (("partial",), None), "cache_dtype": (("partial",), None),
             "freeze": (("full", "progressive"), ""), "grad_checkpointing": (("full", "progressive"), False)}
WHY_UNUSED = {"head": " (a frozen backbone's features, computed once without augmentation; only the linear head trains)",
              "partial": " (the tokens entering the blocks that train are computed once, without augmentation)"}


def parser(description, data_default=None, out_default="runs/finetune"):
    """The fine-tuning flags (the same for every entry point; data_default None makes --data required)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = FLAG_DEFAULTS
    ap.add_argument("--data", default=None,
                    help="cifar10, pets (Oxford-IIIT Pet, found in or downloaded to the data root), or a folder: "
                         "DIR/train/<class>/* with DIR/val/<class>/* (or test/), or DIR/<class>/*"
                         + (f" (default {data_default})" if data_default else " (required)"))
    ap.add_argument("--weights", default=None, help="pretrained weights: a tinyvit checkpoint, a Google .npz, "
                    "timm/HF .safetensors/.pth/.bin or torchvision .pth, a timm or HF hub folder, or a Hugging Face Hub "
                    "name (timm/NAME, hf-hub:ORG/REPO[@REVISION]: downloaded once into its cache) (converted on the "
                    "fly); leave out with --preset to train from random init")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="random-init model when no --weights")
    ap.add_argument("--mode", choices=["full", "head", "partial", "progressive"], default=None,
                    help="head: frozen backbone, features cached once, linear head trained on them; partial: the "
                         "last --train-blocks blocks, the final norm, pooling and head train on the tokens entering "
                         "them, computed once per image (eval transform: augmentation does not apply) and cached; "
                         "full: everything trains; progressive: the first --head-epochs of the --epochs train the "
                         f"head only, at head mode's lr, then everything with full mode's recipe (default {d['mode']})")
    ap.add_argument("--train-blocks", type=int, default=None, metavar="K",
                    help=f"partial mode: how many of the last blocks train (default {TRAIN_BLOCKS})")
    ap.add_argument("--cache-dtype", choices=["float16", "float32"], default=None,
                    help="partial mode: the cached tokens' dtype on disk, memory-mapped (float16 halves the disk "
                         f"and reads; default {d['cache_dtype']})")
    ap.add_argument("--img-size", type=int, default=None, help="input resolution; position embeddings are "
                    "resampled (said in one line) if it differs from the weights' (default: the weights' own "
                    "size; a --preset's is 224)")
    ap.add_argument("--head-epochs", type=int, default=None,
                    help="progressive mode: how many of the --epochs come first and train only the head, so "
                         f"--epochs 3 --head-epochs 1 is 1 head epoch, then 2 of the whole model "
                         f"(default {d['head_epochs']})")
    ap.add_argument("--head-lr", type=float, default=None, help="progressive mode: lr of the head-only epochs, "
                    f"cosine to --min-lr (default {d['head_lr']}, head mode's)")
    ap.add_argument("--drop-path", type=float, default=None, metavar="RATE",
                    help="stochastic depth in full and progressive mode: block i drops its residual branches "
                         f"per sample with probability RATE * i / (depth - 1), as timm (default {d['drop_path']})")
    ap.add_argument("--freeze", default=None, metavar="PATTERN[,PATTERN]",
                    help="full and progressive mode: the params whose timm names match these shell patterns stay "
                         "frozen, e.g. 'patch_embed.*,blocks.[0-5].*' (no weight gradient, and the backward stops at "
                         "the lowest trained param: a faster step; the optimizer keeps no state for them)")
    ap.add_argument("--grad-checkpointing", action="store_true", default=None,
                    help="full and progressive mode: keep only each block's input in the forward and run the block "
                         "again in the backward (timm's name): the same gradients, bit for bit, for far less memory, "
                         "at the cost of a second forward pass of the blocks")
    ap.add_argument("--grad-accum", type=int, default=None, help=f"micro-batches per optimizer step (default {d['grad_accum']})")
    ap.add_argument("--feature-batch", type=int, default=None,
                    help=f"head and partial mode: images per pass of the frozen part (default {d['feature_batch']})")
    ap.add_argument("--val-split", type=float, default=None, help="folders without train/val: the fraction of "
                    f"each class held out for validation, seeded by --seed (default {d['val_split']})")
    ap.add_argument("--crop-pct", type=float, default=None, help="image files: evaluation centre crop, the "
                    "shorter side resized to img-size / crop-pct (default: the weights' eval transform, else 0.875)")
    ap.add_argument("--workers", type=int, default=None, help="image files: decoding threads, each a batch "
                    f"ahead at most (default {d['workers']})")
    ap.add_argument("--strict", action="store_true", default=None, help="an unreadable image file is an error "
                    "(default: one warning, and the file is skipped)")
    ap.add_argument("--cache-dir", default=None, help="head and partial mode: where backbone features (head) and "
                    "the tokens entering the trained blocks (partial) are cached, keyed on the weights, files and "
                    "transform (default $TINYVIT_CACHE, else ~/.cache/tinyvit/features)")
    add_lora_args(ap)
    add_train_args(ap, MODE_DEFAULTS)
    lr = next(a for a in ap._actions if a.dest == "lr")  # noqa: SLF001 (argparse keeps no public handle)
    lr.help = lr.help[:-1] + f"; {LORA_LR} with --lora-rank or --adapter)"
    add_run_args(ap, out_default)
    return ap


def add_lora_args(ap):
    """LoRA/DoRA (PEFT's settings) and BitFit's --bias, in full and progressive mode."""
    d = FLAG_DEFAULTS
    ap.add_argument("--lora-rank", type=int, default=None, metavar="R",
                    help="full and progressive mode: train LoRA adapters of rank R on --lora-targets and the head; "
                         "everything else stays frozen unless --bias says otherwise (default: no adapters)")
    ap.add_argument("--lora-alpha", type=float, default=None,
                    help="LoRA's alpha: the branch is scaled by alpha / R (default R: a scale of 1)")
    ap.add_argument("--lora-dropout", type=float, default=None,
                    help=f"dropout on the LoRA branch's input in training, PEFT's lora_dropout (default {d['lora_dropout']})")
    ap.add_argument("--lora-targets", default=None, metavar="NAME[,NAME]",
                    help="the block linears that get adapters: qkv, q, k, v (rows of the fused qkv; HF's "
                         "query/q_proj, key/k_proj, value/v_proj), proj (o_proj), fc1, fc2 "
                         f"(default {d['lora_targets']})")
    ap.add_argument("--lora-rslora", action="store_true", default=None,
                    help="rank-stabilised LoRA: scale alpha / sqrt(R) (PEFT's use_rslora)")
    ap.add_argument("--lora-dora", action="store_true", default=None,
                    help="DoRA: a trained magnitude per output row over the adapted weight's row norms (PEFT's use_dora)")
    ap.add_argument("--adapter", default=None, metavar="DIR",
                    help="full and progressive mode: a PEFT adapter folder (LoRA or DoRA; adapter_config.json, "
                         "adapter_model.safetensors) on --weights, whose adapters continue training")
    ap.add_argument("--bias", choices=list(BIAS), default=None,
                    help="full and progressive mode: all trains every bias too (BitFit; PEFT's bias='all'): beside "
                         f"the adapters and head with --lora-rank/--adapter, else beside the head alone "
                         f"(default {d['bias']})")


def lora_config(args):
    """The fresh adapters --lora-rank asks for (None without it); --lora-targets in PEFT's or timm's names."""
    if args.lora_rank is None:
        return None
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      targets=tuple(ALIASES.get(t, t) for t in targets), rslora=args.lora_rslora, dora=args.lora_dora)


def _check_lora(args, typed):
    """LoRA's flags: full and progressive mode only; the --lora-* settings need --lora-rank and clash with
    --adapter (its adapter_config.json says them)."""
    given = sorted(k for k in typed if k.startswith("lora_") and k != "lora_rank")
    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    if (args.lora_rank is not None or args.adapter or args.bias != "none") and args.mode not in ("full", "progressive"):
        raise TinyViTError(f"--lora-rank, --adapter and --bias train in --mode full or progressive, not {args.mode} "
                           "(there the blocks do not run in training)")
    if args.adapter and (args.lora_rank is not None or given):
        raise TinyViTError(f"--adapter {args.adapter}: its adapter_config.json sets the adapters; drop "
                           f"{'--lora-rank' if args.lora_rank is not None else flags}")
    if given and args.lora_rank is None and not args.adapter:
        raise TinyViTError(f"{flags} {'needs' if len(given) == 1 else 'need'} --lora-rank R (the adapters' rank)")
    lora_config(args)  # a bad rank, alpha or target: one line now, not after the data are read


def default_weights(name, note):
    """The weights a script fine-tunes when given neither --weights nor --preset: a Hub name, fetched now (after
    `note`, the run's expected time, on stderr); unreachable, one line naming --weights FILE."""
    print(note, file=sys.stderr)
    try:
        resolve(name)
    except TinyViTError as e:
        raise TinyViTError(f"{e}; or fine-tune weights you have: --weights FILE (e.g. --weights "
                           f"vit_tiny_patch16_224.augreg_in21k_ft_in1k.npz, read from $TINYVIT_WEIGHTS)") from None
    return name


def parse(ap, argv=None, data_default=None, out_default="runs/finetune", weights_default=None):
    """Parse; restore a resumed run's flags; then each mode's defaults for the flags not given; weights_default:
    (Hub name, the note said before fetching it) for a run given neither --weights nor --preset."""
    args = ap.parse_args(argv)
    typed = {k for k in MODE_ONLY if getattr(args, k) is not None}  # by the user, not restored by --resume
    typed_lora = {k for k in LORA_FLAGS if getattr(args, k) is not None}
    args = resume_args(args, "finetune.py")
    args.data = args.data or data_default
    if args.data is None:
        raise TinyViTError("give --data: cifar10, pets, or a folder of class folders (see --help)")
    fill_defaults(args, FLAG_DEFAULTS)
    if args.lr is None and (args.lora_rank is not None or args.adapter) and args.mode in ("full", "progressive"):
        args.lr = LORA_LR  # the adapters start from zero: full mode's lr barely moves them
    fill_defaults(args, {}, MODE_DEFAULTS[args.mode])
    if args.mode == "partial" and args.train_blocks is None:
        args.train_blocks = TRAIN_BLOCKS
    if args.weights is None and args.preset is None:
        if weights_default is None:
            raise TinyViTError("give --weights (pretrained) or --preset NAME (random init)")
        args.weights = default_weights(*weights_default)
    _check_data(args)
    _check_lora(args, typed_lora)
    _say_unused(args, typed)
    return choose_out(args, out_default)


def _check_data(args):
    """A --data that names a file, and a --val-split outside (0, 1), in one line before any work."""
    if args.data in ("cifar10", "pets"):
        return
    d = Path(args.data)
    if d.is_file():
        raise TinyViTError(f"--data {args.data}: a file, not a folder; --data takes cifar10, pets, or a folder "
                           "of class folders (DIR/<class>/<image>, or DIR/train/ and DIR/val/); to classify one "
                           "image, use predict.py")
    split = (d / "train").is_dir() and any((d / n).is_dir() for n in ("val", "valid", "validation", "test"))
    if not split and not 0.0 < args.val_split < 1.0:
        raise TinyViTError(f"--val-split {args.val_split}: the fraction of each class held out for validation in a "
                           "folder without train/ and val/ must be between 0 and 1 (e.g. 0.1); to train on every "
                           "image, split the folder into DIR/train/<class>/ and DIR/val/<class>/ yourself")


def _say_unused(args, typed):
    """One line naming the flags given that have no effect in this mode."""
    unused = [k for k in MODE_ONLY if k in typed and args.mode not in MODE_ONLY[k][0]
              and getattr(args, k) != MODE_ONLY[k][1]]
    if unused and world().lead:
        why = WHY_UNUSED.get(args.mode, "")
        print(f"note: {', '.join('--' + k.replace('_', '-') for k in unused)} "
              f"{'has' if len(unused) == 1 else 'have'} no effect in {args.mode} mode{why}", file=sys.stderr)


def train_settings(args) -> TrainConfig:
    """The mode's recipe with the flags given; progressive's head epochs at head mode's lr."""
    progressive, partial = args.mode == "progressive", args.mode == "partial"
    tc = dataclasses.replace(train_config(args, MODE_DEFAULTS[args.mode]), grad_accum=args.grad_accum,
                             head_epochs=args.head_epochs if progressive else 0,
                             head_lr=args.head_lr if progressive else 0.0,
                             freeze=freeze_patterns(args.freeze), grad_checkpointing=args.grad_checkpointing,
                             bias=args.bias)
    return dataclasses.replace(tc, train_blocks=args.train_blocks, augment="none", freeze=(),
                               grad_checkpointing=False) if partial else tc


def freeze_patterns(text):
    """--freeze's comma-separated shell patterns."""
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def recipe(args) -> Recipe:
    """The fine-tuning recipe the parsed flags describe."""
    return Recipe(mode=args.mode, train_blocks=args.train_blocks or 0, drop_path=args.drop_path or 0.0,
                  feature_batch=args.feature_batch, cache_dir=args.cache_dir, cache_dtype=args.cache_dtype,
                  freeze=freeze_patterns(args.freeze), grad_checkpointing=bool(args.grad_checkpointing),
                  lora=lora_config(args), adapter=args.adapter)


def model_source(args) -> ModelSource:
    """The weights (or preset) the parsed flags start from."""
    return ModelSource(weights=args.weights, preset=args.preset, img_size=args.img_size, crop_pct=args.crop_pct,
                       seed=args.seed)


def data_source(args) -> DataSource:
    """The images the parsed flags name."""
    return DataSource(data=args.data, root=args.data_dir, limit_train=args.limit_train, limit_test=args.limit_test,
                      val_split=args.val_split, split_seed=args.seed, strict=args.strict, workers=args.workers)


def run_options(args) -> RunOptions:
    """Where the run writes and how it is watched."""
    return RunOptions(out=args.out, resume=args.resume, quiet=args.quiet, backend=args.backend, **run_clock(args))


def main(description, data_default=None, out_default="runs/finetune", argv=None, weights_default=None):
    """Entry point of the fine-tuning scripts."""
    args = parse(parser(description, data_default, out_default), argv, data_default, out_default, weights_default)
    try:
        with removed_if_unused(args.out):  # an early failure leaves no empty --out behind
            summary, cfg = run_finetune(recipe(args), model_source(args), data_source(args), train_settings(args),
                                        run_options(args), run_args(args))
    except KeyboardInterrupt:
        if args.mode != "head":
            raise  # outside fit's own stop (or a second Ctrl-C): report.run says it, exit 130
        print("interrupted: head mode writes its model only at the end; run the same command again "
              "(a finished feature pass comes from the feature cache)", file=sys.stderr)
        return 130
    return report(summary, args, {"mode": args.mode, "img_size": cfg.img_size, "backend": args.backend,
                                  "data": args.data, "lora": cfg.lora.to_dict() if cfg.lora else None,
                                  "bias": args.bias})
