"""Fine-tuning, shared by scripts/finetune.py (any dataset) and scripts/finetune_cifar.py (CIFAR-10):
pretrained weights (or a preset from random init), a new head, then the head on cached features
or the whole model through tinyvit.train.fit."""
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..backend import get_backend, to_device, to_numpy
from ..cpu.bf16 import check_precision
from ..data.datasets import DataSource, load_data
from ..data.transform import eval_transform
from ..errors import TinyViTError, describe_os_error
from ..io.checkpoint import save_checkpoint
from ..io.convert import adapt, load_model
from ..io.files import atomic_write
from ..io.peft import apply_adapter
from ..nn.layers import cross_entropy_backward, cross_entropy_forward
from ..nn.lora import add_adapters
from ..nn.model import init_params, preset, vit_features
from ..nn.pool import head_backward, head_forward
from ..progress import Progress
from .cache import cached_tokens, feature_cache_dir, feature_key
from .config import TrainConfig
from .dist import world
from .loop import fit
from .optim import make_schedule, warmup_steps
from .recipe import ModelSource, Recipe, RunOptions

# Full fine-tune defaults (Adam-type, small lr). Batch 32: as fast per image as 64 on 2 cores, with
# twice the steps, so 3 epochs of CIFAR-10 at 224 px fit in 3 hours there (docs/performance.md)
DEFAULTS = TrainConfig(epochs=3, batch_size=32, lr=5e-5, optimizer="adamw", weight_decay=0.05,
                       schedule="cosine", warmup_epochs=0.2, min_lr=1e-6, clip=1.0, augment="crop_flip",
                       label_smoothing=0.1, seed=0)
# head mode, chosen on 5,000 held-out training features of CIFAR-10 (docs/performance.md): label
# smoothing costs a linear probe ~0.4 points there, and lr 3e-3 edges out 1e-3
HEAD = dataclasses.replace(DEFAULTS, lr=3e-3, epochs=30, batch_size=256, augment="none", label_smoothing=0.0)
# partial mode: full's recipe on the cached tokens (no augmentation applies to them), at twice its lr
# for the new head and the few blocks that train
PARTIAL = dataclasses.replace(DEFAULTS, lr=1e-4, augment="none")
MODE_DEFAULTS = {"head": HEAD, "full": DEFAULTS, "progressive": DEFAULTS, "partial": PARTIAL}


def start_model(src: ModelSource, whole_images=False):
    """(params, cfg, meta, eval transform) of src's weights, or of its preset from random init;
    whole_images: the data are small whole images (CIFAR-10), resized bilinearly unless a crop_pct is given."""
    if src.weights is not None:
        params, cfg, meta = load_model(src.weights, hint="--weights takes a model file")
    else:
        cfg = preset(src.preset, **({"img_size": src.img_size} if src.img_size else {}))
        params, meta = init_params(cfg, seed=src.seed), {}
    if cfg.in_chans != 3:
        raise TinyViTError(f"fine-tuning takes 3-channel models; these weights have {cfg.in_chans}")
    t = eval_transform(meta, 3, src.weights or "--preset", src.crop_pct)
    if whole_images and src.crop_pct is None:  # trained on whole 32 px images, resized bilinearly
        t = dataclasses.replace(t, resize="shortest_edge", crop_pct=1.0, interpolation="bilinear")
    return params, cfg, meta, t


def run_finetune(recipe: Recipe, model: ModelSource, data: DataSource, tc: TrainConfig, run: RunOptions,
                 saved_args: dict):
    """The whole run: the recipe on the model and data with the optimisation tc, its files as run says;
    saved_args: the flags saved for --resume -> (summary, cfg)."""
    if recipe.mode in ("head", "partial") and world().size > 1:
        raise TinyViTError(f"--mode {recipe.mode} is one process (a pass of the frozen part, then its cache trains): "
                           "run it without mpirun, or use --mode full or progressive across ranks")
    world().out_dir(run.out)  # a wrong --out fails now, not after the feature pass or an epoch
    xp = get_backend(run.backend)
    check_precision(tc.precision, xp)  # bf16 refused now, not after the feature pass
    params, cfg, meta, t = start_model(model, whole_images=data.data == "cifar10")
    if recipe.adapter:  # before the new head: a same-class adapter keeps its trained head (modules_to_save)
        params, cfg = continued_adapter(recipe.adapter, params, cfg)
    cfg = dataclasses.replace(cfg, drop_path=recipe.drop_path)  # training only
    size, resample = model.img_size or cfg.img_size, meta.get("resample", "bilinear")  # the weights' own size
    if size != cfg.img_size and world().lead:
        print(f"note: --img-size {size}: the position embeddings of {model.weights or model.preset} "
              f"({cfg.img_size} px) are resampled ({resample}) to {size} px", file=sys.stderr)
    saved_args = dict(saved_args, img_size=size)  # a --resume restores the size this run used
    train, test, names, info = load_data(data, size, cfg.in_chans, t)
    params, cfg = adapt(params, cfg, img_size=size, num_classes=len(names),
                        resample=resample)  # as the weights' own library resamples
    if recipe.lora is not None:  # PEFT's init: A Kaiming-uniform, B zero (the model starts unchanged)
        params, cfg = add_adapters(params, cfg, recipe.lora, seed=model.seed)
    out_meta = dict(info, class_names=list(names), mean=list(t.mean), std=list(t.std), eval_transform=t.to_dict(),
                    mode=recipe.mode, run_args=saved_args,
                    source_weights=str(model.weights) if model.weights else f"random init ({model.preset})",
                    **({"source_origin": meta["origin"]} if meta.get("origin") else {}))  # a Hub name's provenance
    if recipe.mode == "head":
        summary = run_head(params, cfg, tc, xp, train, test, out_meta, recipe, run)
    elif recipe.mode == "partial":
        summary = run_partial(params, cfg, tc, xp, train, test, out_meta, recipe, run)
    else:
        summary = fit(params, cfg, tc, xp, train, test, run.out, meta=out_meta, resume=run.resume,
                      quiet=run.quiet, time_limit=run.time_limit, save_every=run.save_every)
    if hasattr(train, "decoded"):
        summary["images_decoded"] = train.decoded + test.decoded
        summary["unreadable_files"] = train.warn.count  # every file named in a warning, once
    return summary, cfg


def continued_adapter(folder, params, cfg):
    """(params, cfg) of the base with a PEFT adapter folder's adapters (and its lora_dropout), to train on;
    its notes said in a line each."""
    params, cfg, notes = apply_adapter(folder, params, cfg)
    if world().lead:
        for n in notes:
            print(f"note: --adapter {folder}: {n}", file=sys.stderr)
    return params, cfg


def run_partial(params, cfg, tc, xp, train, test, meta, recipe: Recipe, run: RunOptions):
    """Partial mode: the tokens entering block depth - K computed once per image (cached), then fit
    trains the last K blocks, the final norm, the pooling and the head on them; the rest stays as it came."""
    k = recipe.train_blocks
    if not 1 <= k <= cfg.depth:
        raise TinyViTError(f"--train-blocks {k}: this model has {cfg.depth} blocks: give 1 to {cfg.depth}")
    stop, folder, dev = cfg.depth - k, feature_cache_dir(recipe.cache_dir), to_device(params, xp)
    tr, s1 = cached_tokens(folder, "train", dev, cfg, train, stop, recipe.cache_dtype, xp, recipe.feature_batch, run.quiet)
    te, s2 = cached_tokens(folder, "test", dev, cfg, test, stop, recipe.cache_dtype, xp, recipe.feature_batch, run.quiet)
    del dev
    summary = fit(params, cfg, dataclasses.replace(tc, train_blocks=k), xp, tr, te, run.out, meta=meta,
                  resume=run.resume, quiet=run.quiet, time_limit=run.time_limit, save_every=run.save_every)
    return dict(summary, token_seconds=s1 + s2, tokens_cached=s1 + s2 == 0)


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


def cached_features(folder, name, params, cfg, data, *args, **kw):
    """extract_features, cached in FOLDER/<name>-<feature_key>.npz so a rerun skips the backbone pass
    -> (features, labels, seconds of the pass; 0 from the cache)."""
    path = Path(folder) / f"{name}-{feature_key(params, cfg, data)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                feats, labels = z["feats"], z["labels"]
            if len(labels) == len(data.labels) and feats.shape == (len(labels), cfg.feature_dim):
                return feats, labels, 0.0
        except Exception:  # noqa: BLE001 (a damaged cache file is recomputed and replaced)
            pass
    feats, labels, secs = extract_features(params, cfg, data, *args, **kw)
    try:
        atomic_write(path, lambda f: np.savez(f, feats=feats, labels=labels))
    except OSError as e:  # the cache only saves time: the run goes on without it
        print(f"warning: cannot cache the features in {path}: {describe_os_error(e, about=path)}", file=sys.stderr)
    return feats, labels, secs


def _head_of(params):
    """The head's parameters: head.*, and head_dist.* when distilled."""
    return {k: v for k, v in params.items() if k.startswith(("head.", "head_dist."))}


def train_head(tr_f, tr_y, te_f, te_y, head, cfg, tc, xp, quiet):
    """Softmax regression on fixed features (the new head, or both heads of a distilled ViT) with the
    run's optimizer and schedule, in its precision -> (head, test accuracy, history: one record per epoch, as fit logs)."""
    cfg = dataclasses.replace(cfg, precision=tc.precision)  # the features were made in float32 (cached for either)
    head = {k: xp.asarray(v) for k, v in head.items()}
    opt = tc.make_optimizer()
    n = len(tr_y)
    steps_per_epoch = max(1, n // tc.batch_size)
    sched = make_schedule(tc.schedule, tc.lr, tc.epochs * steps_per_epoch, warmup_steps(tc, steps_per_epoch, True),
                          steps_per_epoch, tc.gamma, tc.min_lr)
    tr_f, tr_y, te_f, te_y = xp.asarray(tr_f), xp.asarray(tr_y), xp.asarray(te_f), xp.asarray(te_y)
    step, history = 0, []
    for epoch in range(tc.epochs):
        t0 = time.perf_counter()
        order = xp.asarray(np.random.default_rng([tc.seed, epoch]).permutation(n))
        total, correct, seen = 0.0, 0, 0
        for s in range(steps_per_epoch):
            idx = order[s * tc.batch_size:(s + 1) * tc.batch_size]
            logits, c = head_forward(head, tr_f[idx], cfg)
            loss, ce = cross_entropy_forward(logits, tr_y[idx], tc.label_smoothing)
            lr = sched(step)
            opt.step(head, head_backward(cross_entropy_backward(1.0, ce), c, need_dx=False)[1], lr=lr)
            total = total + loss * len(idx)  # summed on the device: one read per epoch below
            correct = correct + (logits.argmax(1) == tr_y[idx]).sum()
            seen, step = seen + len(idx), step + 1
        acc = float((head_forward(head, te_f, cfg)[0].argmax(1) == te_y).mean())
        history.append({"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": float(total) / seen,
                        "train_accuracy": int(correct) / seen, "epoch_seconds": time.perf_counter() - t0,
                        "test_accuracy": acc})
        if not quiet and (epoch + 1) % max(1, tc.epochs // 10) == 0:
            print(f"head epoch {epoch + 1}/{tc.epochs}: loss {history[-1]['train_loss']:.4f}  test acc {acc:.4f}",
                  file=sys.stderr)
    return head, history[-1]["test_accuracy"], history


def run_head(params, cfg, tc, xp, train, test, meta, recipe: Recipe, run: RunOptions):
    """Head mode: one backbone pass per image (cached), then the linear head on the features."""
    dev = to_device(params, xp)
    folder = feature_cache_dir(recipe.cache_dir)
    t0 = time.perf_counter()
    tr_f, tr_y, s1 = cached_features(folder, "train", dev, cfg, train, xp, recipe.feature_batch,
                                     "features (train)", quiet=run.quiet)
    te_f, te_y, s2 = cached_features(folder, "test", dev, cfg, test, xp, recipe.feature_batch,
                                     "features (test)", quiet=run.quiet)
    head, acc, history = train_head(tr_f, tr_y, te_f, te_y, _head_of(params), cfg, tc, xp, run.quiet)
    seconds = time.perf_counter() - t0
    params = dict(params, **{k: to_numpy(v) for k, v in head.items()})
    log = "".join(json.dumps(rec) + "\n" for rec in history).encode()  # as fit's: plot_metrics.py reads it
    atomic_write(Path(run.out) / "metrics.jsonl", lambda f: f.write(log))
    ckpt = save_checkpoint(Path(run.out) / "model.npz", params, cfg,
                           dict(meta, test_accuracy=acc, history=history, train_config=dataclasses.asdict(tc)))
    n_img = len(tr_y) + len(te_y)
    return {"test_accuracy": acc, "epochs": tc.epochs, "train_seconds": seconds,
            "images_per_second": n_img / (s1 + s2) if s1 + s2 > 0 else None,
            "feature_seconds": s1 + s2, "features_cached": s1 + s2 == 0, "checkpoint": str(ckpt),
            "stopped_early": False}
