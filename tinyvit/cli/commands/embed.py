"""Embed images with a checkpoint's backbone: the features its head reads, one row per image, for k-NN
(scripts/knn.py), search (scripts/search.py) or your own linear probe.

Examples:
  python scripts/embed.py timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k photos/train --out emb/train
  python scripts/embed.py runs/finetune/model.npz photos/ list.txt --out emb/all --normalize --layers 8,11
  python scripts/embed.py vit_tiny_patch16_224.augreg_in21k_ft_in1k.npz cifar10:train --out emb/cifar-train

Each PATH is as predict.py takes it: an image, a folder (every image below it, recursively) or a text
file listing images; cifar10:train and cifar10:test are CIFAR-10's splits (read from --data-dir or
$TINYVIT_DATA, downloaded otherwise; whole 32-px images resized bilinearly to the model's size).
DIR/embeddings.npy: float32 (N, D), what the head reads (the pooled, normed features); --normalize
scales each row to unit length. DIR/images.csv: index, image, label (the class folder's name where a
folder PATH is a tree of class folders, <class>/ or train/<class>/ and val/<class>/; else empty).
DIR/meta.json: the checkpoint and its sha256, config, eval transform, D, N, pooling, normalized.
--layers 8,11 also writes layer8.npy and layer11.npy: those blocks' outputs (0-based, negative from
the end) through the final norm, pooled as the head pools. The .npy files grow memory-mapped under
temporary names (.embeddings.npy.partial) and take their names only when complete; an unreadable
image is named once and skipped (absent from images.csv), --strict makes it an error (exit 2).
"""
import argparse
import json
import sys

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.backend import get_backend, to_device
from tinyvit.cli.embed import EmbedConfig, embed_run
from tinyvit.cli.report import run
from tinyvit.data.decode import MAX_PIXELS
from tinyvit.data.transform import eval_transform
from tinyvit.errors import TinyViTError
from tinyvit.io.convert import load_model
from tinyvit.io.files import prepare_out_dir
from tinyvit.nn.blockfeats import block_indices


def int_list(text, flag):
    """'8,11' -> [8, 11]; anything else is a TinyViTError naming the flag."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TinyViTError(f"{flag} takes comma-separated integers (e.g. 8,11), got {text!r}") from None


def parse_args(argv=None):
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a tinyvit checkpoint, any weights file or hub folder convert_weights.py "
                    "reads, or a Hub name (timm/NAME, ORG/REPO)")
    ap.add_argument("images", nargs="+", metavar="PATH",
                    help="image files, folders of them (recursive), text files listing images, or "
                         "cifar10:train / cifar10:test")
    ap.add_argument("--out", required=True, metavar="DIR", help="the folder for embeddings.npy, images.csv, meta.json")
    ap.add_argument("--normalize", action="store_true", help="scale every row to unit length (default: as the head reads them)")
    ap.add_argument("--layers", default=None, metavar="I,J",
                    help="also write layer<I>.npy for these blocks (0-based; -1 the last): the block's output "
                         "through the final norm, pooled as the head pools")
    ap.add_argument("--limit", type=int, default=None, metavar="N",
                    help="embed the first N images only (a trial run; default all)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    ap.add_argument("--workers", type=int, default=2, help="decoding threads, a batch ahead of the model (default 2)")
    ap.add_argument("--strict", action="store_true", help="an unreadable image is an error (exit 2) "
                    "(default: named once on stderr and skipped)")
    ap.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy",
                    help="array backend: numpy (CPU), cupy (CUDA GPU) or auto (default numpy)")
    ap.add_argument("--data-dir", default=None, help="where cifar10/ is (default $TINYVIT_DATA or ~/.cache/tinyvit)")
    ap.add_argument("--max-megapixels", type=float, default=MAX_PIXELS / 1e6, metavar="MP",
                    help=f"refuse images larger than this (default {MAX_PIXELS / 1e6:g})")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text (and no progress bar)")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise TinyViTError(f"--limit must be at least 1, got {args.limit}")
    for name in ("batch_size", "workers"):
        if getattr(args, name) < 1:
            raise TinyViTError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.max_megapixels > 0:
        raise TinyViTError(f"--max-megapixels must be positive, got {args.max_megapixels}")
    return args


def main(argv=None):
    args = parse_args(argv)
    layers = int_list(args.layers, "--layers") if args.layers is not None else []
    prepare_out_dir(args.out, "the --out folder")
    params, cfg, meta = load_model(args.checkpoint, hint="embed.py takes the checkpoint first, then images")
    if "file_format" not in meta:  # weights converted as they are read: what was guessed, one line each
        for note in meta.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
    ec = EmbedConfig(args.checkpoint, tuple(args.images), args.out, args.normalize,
                     tuple(block_indices(layers, cfg.depth)) if layers else (), args.batch_size, args.workers,
                     args.strict, int(args.max_megapixels * 1e6), args.json, args.limit)
    xp = get_backend(args.backend)
    t = eval_transform(meta, cfg.in_chans, args.checkpoint)
    summary = embed_run(ec, to_device(params, xp), cfg, meta, t, xp, args.data_dir)
    if args.json:
        print(json.dumps(summary))
        return
    extra = f" (+ {', '.join(f'layer{i}.npy' for i in ec.layers)})" if ec.layers else ""
    print(f"{summary['images']} images x {summary['D']} -> {args.out}/embeddings.npy{extra} in "
          f"{summary['seconds']:.1f} s ({summary['images_per_second']:.1f} images/s)"
          + (f", {summary['unreadable_files']} unreadable skipped" if summary["unreadable_files"] else ""))


if __name__ == "__main__":
    run(main)
