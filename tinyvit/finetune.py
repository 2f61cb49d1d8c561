"""Fine-tuning, shared by scripts/finetune.py (any dataset) and scripts/finetune_cifar.py (CIFAR-10):
pretrained weights (or a preset from random init), a new head, then the head on cached features
or the whole model through tinyvit.train.fit."""
import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from .backend import get_backend, to_device, to_numpy
from .checkpoint import atomic_write, load_checkpoint, prepare_out_dir, save_checkpoint
from .cli import add_run_args, add_train_args, report, run_clock, train_config
from .convert import adapt, convert
from .data import data_root, load_cifar10
from .dist import world
from .errors import TinyViTError
from .folders import Warnings, folder_splits, pets_splits, subset
from .layers import cross_entropy_backward, cross_entropy_forward, linear_backward, linear_forward
from .loader import FolderDataset
from .model import PRESETS, init_params, preset, vit_features
from .optim import make_schedule
from .progress import Progress
from .train import Dataset, TrainConfig, fit

# Full fine-tune defaults (Adam-type, small lr); head mode overrides lr, epochs, batch and augment.
# Batch 32: on a 2-core CPU as fast per image as 64 (17.9 vs 17.3 img/s, ViT-Ti/16 at 224 px) with
# twice the steps; 3 epochs of CIFAR-10 at 224 px then fit in 3 hours there (docs/performance.md)
DEFAULTS = TrainConfig(epochs=3, batch_size=32, lr=5e-5, optimizer="adamw", weight_decay=0.05,
                       schedule="cosine", warmup_epochs=0.2, min_lr=1e-6, clip=1.0, augment="crop_flip",
                       label_smoothing=0.1, seed=0)
# chosen on 5,000 held-out training features of CIFAR-10 (docs/performance.md): label smoothing
# costs a linear probe ~0.4 points there, and lr 3e-3 edges out 1e-3
HEAD_DEFAULTS = (("--lr", 3e-3), ("--epochs", 30), ("--batch-size", 256), ("--augment", "none"),
                 ("--label-smoothing", 0.0))


def parser(description, data_default=None, out_default="runs/finetune"):
    """The fine-tuning flags (the same for every entry point; data_default None makes --data required)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", default=data_default, required=data_default is None,
                    help="cifar10, pets (Oxford-IIIT Pet, found in or downloaded to the data root), or a folder: "
                         "DIR/train/<class>/* with DIR/val/<class>/* (or test/), or DIR/<class>/*"
                         + (f" (default {data_default})" if data_default else ""))
    ap.add_argument("--weights", default=None, help="pretrained weights: a tinyvit checkpoint, or a Google .npz, "
                    "timm/HF .safetensors/.pth/.bin or torchvision .pth (converted on the fly); leave out with "
                    "--preset to train from random init")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="random-init model when no --weights")
    ap.add_argument("--mode", choices=["full", "head", "progressive"], default="head",
                    help="head: frozen backbone, features cached once, linear head trained on them; full: "
                         "everything trains; progressive: head only for --head-epochs, then everything (default head)")
    ap.add_argument("--img-size", type=int, default=224, help="input resolution; position embeddings are "
                    "resampled if it differs from the weights' (default 224)")
    ap.add_argument("--head-epochs", type=int, default=1, help="progressive mode: head-only epochs first (default 1)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    ap.add_argument("--feature-batch", type=int, default=64, help="head mode: images per backbone pass (default 64)")
    ap.add_argument("--val-split", type=float, default=0.1, help="folders without train/val: the fraction of "
                    "each class held out for validation, seeded by --seed (default 0.1)")
    ap.add_argument("--crop-pct", type=float, default=0.875, help="image files: evaluation centre crop, "
                    "the shorter side resized to img-size / crop-pct (default 0.875, as timm)")
    ap.add_argument("--workers", type=int, default=2, help="image files: decoding threads, each a batch "
                    "ahead at most (default 2)")
    ap.add_argument("--strict", action="store_true", help="an unreadable image file is an error (default: "
                    "one warning, and the file is skipped)")
    add_train_args(ap, DEFAULTS)
    add_run_args(ap, out_default)
    return ap


def parse(ap, argv=None):
    """Parse, then give head mode its defaults for the flags the user did not set."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    given = lambda flag: any(a == flag or a.startswith(flag + "=") for a in argv)  # noqa: E731
    if args.mode == "head":  # the head alone: many cheap epochs, a far larger step
        for flag, value in HEAD_DEFAULTS:
            if not given(flag):
                setattr(args, flag[2:].replace("-", "_"), value)
    if args.weights is None and args.preset is None:
        raise TinyViTError("give --weights (pretrained) or --preset NAME (random init)")
    return args


def load_weights(path):
    """A tinyvit checkpoint as is, or any public ViT file converted on the fly -> (params, cfg, meta)."""
    try:
        return load_checkpoint(path)
    except TinyViTError as e:
        if "not a tinyvit checkpoint" not in str(e):
            raise
    return convert(path)


def load_data(args, cfg, mean, std):
    """(train, test datasets, class names, metadata about the data) for --data."""
    if args.data == "cifar10":
        root = data_root(args.data_dir)
        tr_x, tr_y, names = load_cifar10(root, "train", limit=args.limit_train)  # only the batches needed
        te_x, te_y, _ = load_cifar10(root, "test", limit=args.limit_test)
        train = Dataset(tr_x[:args.limit_train], tr_y[:args.limit_train], mean, std, img_size=cfg.img_size)
        test = Dataset(te_x[:args.limit_test], te_y[:args.limit_test], mean, std, img_size=cfg.img_size)
        return train, test, list(names), {"dataset": "cifar10"}
    warn = Warnings(args.strict)
    if args.data == "pets":
        tr, te = pets_splits(data_root(args.data_dir), strict=args.strict, workers=args.workers)
        info = {"dataset": "pets", "split_seed": args.seed}  # seeds the --limit subsets
    else:
        tr, te = folder_splits(args.data, args.val_split, args.seed, args.strict, args.workers)
        info = {"dataset": "folder", "data": str(Path(args.data).resolve()), "val_split": args.val_split,
                "split_seed": args.seed}
    tr, te = subset(tr, args.limit_train, args.seed), subset(te, args.limit_test, args.seed)
    make = lambda lst: FolderDataset(lst, cfg.img_size, mean, std, cfg.in_chans, args.crop_pct,  # noqa: E731
                                     args.workers, warn)
    return make(tr), make(te), tr.classes, dict(info, crop_pct=args.crop_pct)


def run_finetune(args):
    """The whole run for parsed flags; returns the summary report() prints."""
    if args.mode == "head" and world().size > 1:
        raise TinyViTError("--mode head is one process (a feature pass, then seconds of head training): "
                           "run it without mpirun, or use --mode full or progressive across ranks")
    prepare_out_dir(args.out)  # a wrong --out fails now, not after the feature pass or an epoch
    xp = get_backend(args.backend)
    if args.weights is not None:
        params, cfg, meta = load_weights(args.weights)
        mean, std = tuple(meta.get("mean", (0.5,) * 3)), tuple(meta.get("std", (0.5,) * 3))
    else:
        cfg = preset(args.preset, img_size=args.img_size)
        params, meta, mean, std = init_params(cfg, seed=args.seed), {}, (0.5,) * 3, (0.5,) * 3
    if cfg.in_chans != 3:
        raise TinyViTError(f"fine-tuning takes 3-channel models; these weights have {cfg.in_chans}")
    train, test, names, info = load_data(args, dataclasses.replace(cfg, img_size=args.img_size), mean, std)
    params, cfg = adapt(params, cfg, img_size=args.img_size, num_classes=len(names))
    out_meta = dict(info, class_names=list(names), mean=list(mean), std=list(std), mode=args.mode,
                    source_weights=str(args.weights) if args.weights else f"random init ({args.preset})")
    tc = dataclasses.replace(train_config(args), grad_accum=args.grad_accum,
                             head_epochs=args.head_epochs if args.mode == "progressive" else 0)
    if args.mode == "head":
        summary = run_head(params, cfg, tc, xp, train, test, out_meta, args)
    else:
        summary = fit(params, cfg, tc, xp, train, test, args.out, meta=out_meta, resume=args.resume,
                      quiet=args.quiet, **run_clock(args))
    if hasattr(train, "decoded"):
        summary["images_decoded"] = train.decoded + test.decoded
        summary["unreadable_files"] = len(train.images.bad) + len(test.images.bad)
    return summary, cfg


def main(description, data_default=None, out_default="runs/finetune", argv=None):
    """Entry point of the fine-tuning scripts."""
    args = parse(parser(description, data_default, out_default), argv)
    summary, cfg = run_finetune(args)
    report(summary, args, {"mode": args.mode, "img_size": cfg.img_size, "backend": args.backend,
                           "data": args.data})


# --- head mode: one backbone pass, then a linear head on the cached features ----------------------


def extract_features(params, cfg, data, xp, batch_size, desc, quiet=False):
    """Class-token features (N, D) of the frozen backbone and their labels, eval transform only."""
    feats, labels = [], []
    bar = Progress(len(data.labels), desc, unit="img", disable=quiet)
    n, t0 = 0, time.perf_counter()
    for x, y in data.batches(batch_size, xp, shuffle=False):
        feats.append(to_numpy(vit_features(params, x, cfg)))
        labels.append(to_numpy(y))
        n += len(feats[-1])
        bar.update(len(feats[-1]), img_s=f"{n / (time.perf_counter() - t0):.1f}")
    bar.close()
    if not feats:
        raise TinyViTError(f"{desc}: no image could be read")
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels), time.perf_counter() - t0


def cached_features(out, key, *args, **kw):
    """extract_features, cached in OUT/features-<key>.npz so a rerun skips the backbone pass."""
    path = Path(out) / f"features-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return z["feats"], z["labels"], 0.0
    feats, labels, secs = extract_features(*args, **kw)
    atomic_write(path, lambda f: np.savez(f, feats=feats, labels=labels))
    return feats, labels, secs


def train_head(tr_f, tr_y, te_f, te_y, w, b, tc, xp, quiet):
    """Softmax regression on fixed features (the new head) with the run's optimizer and schedule."""
    head = {"head.weight": xp.asarray(w), "head.bias": xp.asarray(b)}
    opt = tc.make_optimizer()
    n = len(tr_y)
    steps_per_epoch = max(1, n // tc.batch_size)
    sched = make_schedule(tc.schedule, tc.lr, tc.epochs * steps_per_epoch,
                          round(tc.warmup_epochs * steps_per_epoch), steps_per_epoch, tc.gamma, tc.min_lr)
    tr_f, tr_y, te_f = xp.asarray(tr_f), xp.asarray(tr_y), xp.asarray(te_f)
    step = 0
    for epoch in range(tc.epochs):
        order = xp.asarray(np.random.default_rng([tc.seed, epoch]).permutation(n))
        total = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * tc.batch_size:(s + 1) * tc.batch_size]
            logits, c = linear_forward(tr_f[idx], head["head.weight"], head["head.bias"])
            loss, ce = cross_entropy_forward(logits, tr_y[idx], tc.label_smoothing)
            _, gw, gb = linear_backward(cross_entropy_backward(1.0, ce), c, need_dx=False)
            opt.step(head, {"head.weight": gw, "head.bias": gb}, lr=sched(step))
            total = total + loss  # summed on the device: one read per report below
            step += 1
        if not quiet and (epoch + 1) % max(1, tc.epochs // 10) == 0:
            acc = float((linear_forward(te_f, head["head.weight"], head["head.bias"])[0].argmax(1) == xp.asarray(te_y)).mean())
            print(f"head epoch {epoch + 1}/{tc.epochs}: loss {float(total) / steps_per_epoch:.4f}  test acc {acc:.4f}",
                  file=sys.stderr)
    logits, _ = linear_forward(te_f, head["head.weight"], head["head.bias"])
    return head, float((to_numpy(logits).argmax(1) == te_y).mean())


def run_head(params, cfg, tc, xp, train, test, meta, args):
    """Head mode: one backbone pass per image (cached), then the linear head on the features."""
    dev = to_device(params, xp)
    key = hashlib.sha1(json.dumps([str(args.weights and Path(args.weights).resolve()), cfg.img_size,
                                   args.data, len(train.labels), len(test.labels), meta["mean"], meta["std"],
                                   meta.get("crop_pct"), meta.get("val_split"), args.seed]).encode()).hexdigest()[:12]
    t0 = time.perf_counter()
    tr_f, tr_y, s1 = cached_features(args.out, f"train-{key}", dev, cfg, train, xp, args.feature_batch,
                                     "features (train)", quiet=args.quiet)
    te_f, te_y, s2 = cached_features(args.out, f"test-{key}", dev, cfg, test, xp, args.feature_batch,
                                     "features (test)", quiet=args.quiet)
    head, acc = train_head(tr_f, tr_y, te_f, te_y, params["head.weight"], params["head.bias"], tc, xp, args.quiet)
    seconds = time.perf_counter() - t0
    params = dict(params, **{k: to_numpy(v) for k, v in head.items()})
    ckpt = save_checkpoint(Path(args.out) / "model.npz", params, cfg,
                           dict(meta, test_accuracy=acc, train_config=dataclasses.asdict(tc)))
    n_img = len(tr_y) + len(te_y)
    return {"test_accuracy": acc, "epochs": tc.epochs, "train_seconds": seconds,
            "images_per_second": n_img / (s1 + s2) if s1 + s2 > 0 else None,
            "feature_seconds": s1 + s2, "checkpoint": str(ckpt), "stopped_early": False}
