"""Fine-tune pretrained ViT weights on CIFAR-10: the head on cached features, or the whole model."""
import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
import numpy as np

from tinyvit.backend import get_backend, to_device, to_numpy
from tinyvit.checkpoint import atomic_write, load_checkpoint, prepare_out_dir, save_checkpoint
from tinyvit.cli import add_run_args, add_train_args, report, run, train_config
from tinyvit.convert import adapt, convert
from tinyvit.data import data_root, iterate_batches, load_cifar10
from tinyvit.errors import TinyViTError
from tinyvit.layers import cross_entropy_backward, cross_entropy_forward, linear_backward, linear_forward
from tinyvit.model import vit_features
from tinyvit.optim import make_schedule
from tinyvit.progress import Progress
from tinyvit.train import Dataset, TrainConfig, fit

# Full fine-tune defaults (the seeds' recipe family: Adam-type, small lr); head mode uses --head-lr etc.
DEFAULTS = TrainConfig(epochs=3, batch_size=64, lr=5e-5, optimizer="adamw", weight_decay=0.05,
                       schedule="cosine", warmup_epochs=0.2, min_lr=1e-6, clip=1.0, augment="crop_flip",
                       label_smoothing=0.1, seed=0)


def load_weights(path):
    """A tinyvit checkpoint as is, or any public ViT file converted on the fly -> (params, cfg, meta)."""
    try:
        return load_checkpoint(path)
    except TinyViTError as e:
        if "not a tinyvit checkpoint" not in str(e):
            raise
    return convert(path)


def extract_features(params, cfg, images, labels, mean, std, xp, batch_size, desc):
    """Class-token features (N, D) of the frozen backbone, at cfg.img_size, no augmentation."""
    feats = np.empty((len(labels), cfg.dim), dtype=np.float32)
    bar = Progress(len(labels), desc, unit="img")
    i, t0 = 0, time.perf_counter()
    size = None if images.shape[-1] == cfg.img_size else cfg.img_size
    for x, _ in iterate_batches(images, labels, batch_size, xp, mean=mean, std=std, shuffle=False, img_size=size):
        f = to_numpy(vit_features(params, x, cfg))
        feats[i:i + len(f)] = f
        i += len(f)
        bar.update(len(f), img_s=f"{i / (time.perf_counter() - t0):.1f}")
    bar.close()
    return feats, time.perf_counter() - t0


def cached_features(out, key, *args):
    """extract_features, cached in OUT/features-<key>.npz so a rerun skips the backbone pass."""
    path = Path(out) / f"features-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return z["feats"], 0.0
    feats, secs = extract_features(*args)
    atomic_write(path, lambda f: np.savez(f, feats=feats))
    return feats, secs


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
            total += float(loss)
            step += 1
        if not quiet and (epoch + 1) % max(1, tc.epochs // 10) == 0:
            acc = float((linear_forward(te_f, head["head.weight"], head["head.bias"])[0].argmax(1) == xp.asarray(te_y)).mean())
            print(f"head epoch {epoch + 1}/{tc.epochs}: loss {total / steps_per_epoch:.4f}  test acc {acc:.4f}", file=sys.stderr)
    logits, _ = linear_forward(te_f, head["head.weight"], head["head.bias"])
    return head, float((to_numpy(logits).argmax(1) == te_y).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", required=True, help="pretrained weights: a tinyvit checkpoint, or a Google .npz, "
                    "timm/HF .safetensors/.pth/.bin or torchvision .pth (converted on the fly)")
    ap.add_argument("--mode", choices=["full", "head", "progressive"], default="head",
                    help="head: frozen backbone, features cached once, linear head trained on them; full: "
                         "everything trains; progressive: head only for --head-epochs, then everything (default head)")
    ap.add_argument("--img-size", type=int, default=224, help="input resolution; CIFAR's 32 px are resized "
                    "bilinearly and position embeddings resampled if it differs from the weights' (default 224)")
    ap.add_argument("--head-epochs", type=int, default=1, help="progressive mode: head-only epochs first (default 1)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    ap.add_argument("--feature-batch", type=int, default=64, help="head mode: images per backbone pass (default 64)")
    add_train_args(ap, DEFAULTS)
    add_run_args(ap, "runs/cifar10")
    args = ap.parse_args()
    given = lambda flag: any(a == flag or a.startswith(flag + "=") for a in sys.argv[1:])  # noqa: E731
    if args.mode == "head":  # the head alone: many cheap epochs, a far larger step
        for flag, value in (("--lr", 1e-3), ("--epochs", 30), ("--batch-size", 256), ("--augment", "none")):
            if not given(flag):
                setattr(args, flag[2:].replace("-", "_"), value)
    prepare_out_dir(args.out)  # a wrong --out fails now, not after the feature pass or an epoch

    xp = get_backend(args.backend)
    params, cfg, meta = load_weights(args.weights)
    params, cfg = adapt(params, cfg, img_size=args.img_size, num_classes=10)
    root = data_root(args.data_dir)
    tr_x, tr_y, names = load_cifar10(root, "train", limit=args.limit_train)  # reads only the batches needed
    te_x, te_y, _ = load_cifar10(root, "test", limit=args.limit_test)
    tr_x, tr_y = tr_x[:args.limit_train], tr_y[:args.limit_train]
    te_x, te_y = te_x[:args.limit_test], te_y[:args.limit_test]
    mean, std = tuple(meta.get("mean", (0.5,) * 3)), tuple(meta.get("std", (0.5,) * 3))
    out_meta = {"dataset": "cifar10", "class_names": names, "mean": list(mean), "std": list(std),
                "source_weights": str(args.weights), "mode": args.mode}
    tc = dataclasses.replace(train_config(args), grad_accum=args.grad_accum,
                             head_epochs=args.head_epochs if args.mode == "progressive" else 0)
    if args.mode == "head":
        summary = run_head(params, cfg, tc, xp, (tr_x, tr_y), (te_x, te_y), mean, std, out_meta, args)
    else:
        summary = fit(params, cfg, tc, xp, Dataset(tr_x, tr_y, mean, std, img_size=cfg.img_size),
                      Dataset(te_x, te_y, mean, std, img_size=cfg.img_size), args.out, meta=out_meta,
                      resume=args.resume, quiet=args.quiet,
                      time_limit=None if args.time_limit is None else 60 * args.time_limit)
    report(summary, args, {"mode": args.mode, "img_size": cfg.img_size, "backend": args.backend})


def run_head(params, cfg, tc, xp, train, test, mean, std, meta, args):
    """Head mode: one backbone pass per image (cached), then the linear head on the features."""
    dev = to_device(params, xp)
    key = hashlib.sha1(json.dumps([str(Path(args.weights).resolve()), cfg.img_size, len(train[1]),
                                   len(test[1]), mean, std]).encode()).hexdigest()[:12]
    t0 = time.perf_counter()
    tr_f, s1 = cached_features(args.out, f"train-{key}", dev, cfg, *train, mean, std, xp, args.feature_batch,
                               "features (train)")
    te_f, s2 = cached_features(args.out, f"test-{key}", dev, cfg, *test, mean, std, xp, args.feature_batch,
                               "features (test)")
    head, acc = train_head(tr_f, train[1], te_f, test[1], params["head.weight"], params["head.bias"],
                           tc, xp, args.quiet)
    seconds = time.perf_counter() - t0
    params = dict(params, **{k: to_numpy(v) for k, v in head.items()})
    ckpt = save_checkpoint(Path(args.out) / "model.npz", params, cfg,
                           dict(meta, test_accuracy=acc, train_config=dataclasses.asdict(tc)))
    n_img = len(train[1]) + len(test[1])
    return {"test_accuracy": acc, "epochs": tc.epochs, "train_seconds": seconds,
            "images_per_second": n_img / (s1 + s2) if s1 + s2 > 0 else None,
            "feature_seconds": s1 + s2, "checkpoint": str(ckpt), "stopped_early": False}


if __name__ == "__main__":
    run(main)
