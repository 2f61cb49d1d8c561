"""Test-set accuracy of a tinyvit checkpoint on MNIST, CIFAR-10, Oxford-IIIT Pet or an image folder.

For a model fine-tuned on a folder (scripts/finetune.py --data DIR), the images are DIR/val/ (or test/)
when DIR has train/ beside it, else the validation split rebuilt exactly as training made it (the seed
and --val-split recorded in the checkpoint). --data may hold some of the model's classes (class
folders matched by name): their images are evaluated, each scored over all the model's classes, and
one line says so; a class folder the model does not know is refused."""
import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from tinyvit.backend import get_backend, to_device
from tinyvit.cli.args import add_precision_arg
from tinyvit.cli.report import run
from tinyvit.cli.sizes import add_size_args, input_size
from tinyvit.cpu.bf16 import check_precision
from tinyvit.data.batches import ArrayDataset
from tinyvit.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, load_cifar10
from tinyvit.data.datasets import image_dataset, image_lists
from tinyvit.data.download import data_root
from tinyvit.data.folders import evaluation_images, relabel, subset
from tinyvit.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist
from tinyvit.data.transform import eval_transform
from tinyvit.errors import TinyViTError
from tinyvit.io.convert import load_model
from tinyvit.io.labels import class_names
from tinyvit.progress import Progress
from tinyvit.train.evaluate import evaluate


def test_set(name, root, cfg, meta, limit, size=None):
    """The test split as an ArrayDataset, normalised as the checkpoint says (dataset defaults otherwise)."""
    if name == "mnist":
        x, y = load_mnist(root, "test")
        mean, std = MNIST_MEAN, MNIST_STD
    else:
        x, y, _ = load_cifar10(root, "test")
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    mean, std = tuple(meta.get("mean", mean)), tuple(meta.get("std", std))
    channels = 1 if x.ndim == 3 else x.shape[1]
    if channels != cfg.in_chans or len(mean) != cfg.in_chans:
        raise TinyViTError(f"the checkpoint expects {cfg.in_chans}-channel images; {name} has {channels}")
    if cfg.num_classes != 10:
        raise TinyViTError(f"the checkpoint has {cfg.num_classes} classes; {name} has 10 (fine-tune it first)")
    hw = (cfg.img_size,) * 2 if size is None else size.for_image(x.shape[-1], x.shape[-2])  # --img-size, --keep-aspect
    return ArrayDataset(x[:limit], y[:limit], mean, std, img_size=None if tuple(x.shape[-2:]) == hw else hw)


def folder_test_set(name, root, cfg, meta, args, size=None):
    """The validation/test split of a folder dataset or Oxford-IIIT Pet, as the checkpoint recorded it;
    a folder of some of the model's classes is evaluated on those (said in one line)."""
    folder = "pets" if name == "pets" else args.data or meta.get("data")
    if not folder:
        raise TinyViTError(f"{args.checkpoint}: no data folder recorded; pass --data DIR")
    if name == "pets":
        images = image_lists("pets", root, workers=args.workers)[1]
    else:
        images = evaluation_images(folder, meta.get("val_split", 0.1), meta.get("split_seed", 0), args.workers)
    names = class_names(meta, cfg.num_classes, args.checkpoint)
    if names is not None:
        images = relabel(images, names, folder)
    elif len(images.classes) != cfg.num_classes:
        raise TinyViTError(f"{args.checkpoint}: records no class names, so class folders are matched to its "
                           f"{cfg.num_classes} outputs by sorted position; {folder} has {len(images.classes)}")
    else:
        print(f"note: {args.checkpoint} records no class names: {folder}'s class folders are matched to its outputs "
              f"by sorted position", file=sys.stderr)
    t = eval_transform(meta, cfg.in_chans, args.checkpoint)  # the one fine-tuning validated with
    images = subset(images, args.limit, meta.get("split_seed", 0))  # the same images finetune's --limit-test took
    seen = np.unique(images.labels)
    if len(seen) < cfg.num_classes:
        shown = ", ".join(images.classes[k] for k in seen[:5]) + (", ..." if len(seen) > 5 else "")
        print(f"note: {folder}: {len(seen)} of the model's {cfg.num_classes} classes ({shown}): evaluated on "
              f"their {len(images)} images, each scored over all {cfg.num_classes} classes", file=sys.stderr)
    return image_dataset(images, size or cfg.img_size, cfg.in_chans, t, args.workers)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint", help="a tinyvit checkpoint (.npz, e.g. weights/mnist_vit.npz) or any weights file "
                    "convert_weights.py reads (converted in memory)")
    ap.add_argument("--dataset", choices=["mnist", "cifar10", "pets", "folder"], default=None,
                    help="test set to use (default: the dataset recorded in the checkpoint)")
    ap.add_argument("--data", default=None, metavar="DIR", help="the image folder of a folder-trained model "
                    "(default: the folder recorded in the checkpoint)")
    ap.add_argument("--workers", type=int, default=2, help="image files: decoding threads (default 2)")
    ap.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy", help="array backend (default numpy)")
    ap.add_argument("--data-dir", default=None, help="data root holding mnist/ and cifar10/ (default: $TINYVIT_DATA, else ~/.cache/tinyvit)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per forward pass (default: about 64k tokens, e.g. 500 for MNIST, 332 at 224 px)")
    ap.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N test images only (folders and "
                    "Pets: a seeded N, the same as fine-tuning's --limit-test took)")
    ap.add_argument("--tta", choices=["none", "flip"], default="none",
                    help="test-time augmentation: flip adds each image's left-right mirror to its score (twice "
                         "the time; for photos, not digits) (default none)")
    add_size_args(ap)
    add_precision_arg(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON line of results")
    args = ap.parse_args()

    params, cfg, meta = load_model(args.checkpoint, hint="evaluate.py takes a model (a checkpoint or weights "
                                   "file); the test set comes from --dataset or --data")
    if "file_format" not in meta:  # weights converted as they are read: what was guessed, one line each
        for note in meta.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
    name = args.dataset or ("folder" if args.data else meta.get("dataset"))
    if name not in ("mnist", "cifar10", "pets", "folder"):
        raise TinyViTError(f"{args.checkpoint}: no dataset recorded; pass --dataset mnist|cifar10|pets or --data DIR")
    size = input_size(args.img_size, args.keep_aspect, cfg, args.checkpoint)
    xp = get_backend(args.backend)
    check_precision(args.precision, xp)  # before any image is read
    cfg = dataclasses.replace(cfg, precision=args.precision)
    if name in ("pets", "folder"):
        data = folder_test_set(name, data_root(args.data_dir), cfg, meta, args, size)
    else:
        data = test_set(name, data_root(args.data_dir), cfg, meta, args.limit, size)
    bar = Progress(len(data.labels), "evaluating", unit="img", disable=args.json)
    t0 = time.perf_counter()
    acc = evaluate(to_device(params, xp), cfg, data, xp, batch_size=args.batch_size, progress=bar,
                   flip=args.tta == "flip")
    bar.close()
    seconds = time.perf_counter() - t0
    result = {"test_accuracy": acc, "dataset": name, "images": len(data.labels), "tta": args.tta, "precision": args.precision,
              "img_size": "keep_aspect" if args.keep_aspect else list(size.hw) if size else cfg.img_size,
              "seconds": seconds, "checkpoint": args.checkpoint}
    print(json.dumps(result) if args.json else f"{name} test accuracy: {acc * 100:.2f}% "
          f"({len(data.labels)} images, {seconds:.1f} s)")


if __name__ == "__main__":
    run(main)
