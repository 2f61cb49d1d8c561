"""Classify images with a tinyvit checkpoint (or any weights file or hub folder scripts/convert_weights.py
reads, converted in memory): top-k classes per image, to the terminal or a CSV / JSONL file, and optional
attention maps.

Examples:
  python scripts/predict.py runs/finetune/model.npz my_cat.jpg
  python scripts/predict.py runs/finetune/model.npz photos/ --output preds.csv --top-k 3
  python scripts/predict.py runs/finetune/model.npz list.txt --output preds.jsonl

Each PATH is an image, a folder (every image below it, recursively: the extensions fine-tuning reads;
hidden files and folders skipped) or a text file (.txt, .lst) listing images one per line (relative to
the list's folder; # comments). Images are decoded on --workers threads a batch ahead of the model (see
tinyvit/data/decode.py for the mode, alpha, resize and inversion rules: alpha is dropped, as timm and
transformers drop it). An unreadable file is named once on stderr and skipped (exit 0); --strict makes
it an error (exit 2), as is a lone image that cannot be read, or none readable among several. --output
preds.csv has the columns image, class_1, probability_1, ..., class_K, probability_K (K = --top-k;
probabilities to 6 significant digits); preds.jsonl one line per image with the keys --json prints
(image, top_k).
--attention-map OUT.png writes a figure per image, side by side: the input as the model sees it
(centre square, resized; inverted or gray where the model's input is), the attention-rollout heat map
(the CLS token's row over the patches, 10th to 99th percentile, bilinear) in the inferno colour map,
the heat map over the dimmed image, and a colour bar. With one image the file is OUT itself; with
several, each goes to OUT's folder as <OUT stem>_<image stem><OUT suffix> (out_digit.png), and a
repeated image stem gets _2, _3, ... appended. The file format follows OUT's suffix (.png, .jpg,
.webp, .bmp, .tiff: any Pillow writes); another suffix, or none, is refused.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

from PIL import Image

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.backend import get_backend, to_device
from tinyvit.cli.args import add_precision_arg
from tinyvit.cli.predict import INVERT, predict_all, write_predictions
from tinyvit.cli.report import run
from tinyvit.cli.sizes import add_size_args, input_size
from tinyvit.cpu.bf16 import check_precision
from tinyvit.data.decode import MAX_PIXELS
from tinyvit.data.listing import expand
from tinyvit.data.transform import eval_transform
from tinyvit.errors import TinyViTError
from tinyvit.io.convert import load_model
from tinyvit.io.files import atomic_write, prepare_out_dir
from tinyvit.io.labels import class_names
from tinyvit.viz import attention_figure, attention_rollout, input_view


def image_format(path):
    """Pillow's writer for path's suffix (PNG for .png, JPEG for .jpg/.jpeg, WEBP, BMP, TIFF, ...)."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt not in Image.SAVE:
        raise TinyViTError(f"{path}: --attention-map needs the suffix of an image format Pillow writes "
                           f"(.png, .jpg, .webp, .bmp, .tiff, ...)")
    return fmt


def map_paths(out, images):
    """Where each image's attention map goes: OUT for one image, OUT-stem_image-stem otherwise; OUT's
    suffix must name a format Pillow writes."""
    out = Path(out)
    image_format(out)
    if len(images) == 1:
        return [out]
    suffix = out.suffix
    paths, seen = [], {}
    for image in images:
        stem = Path(image).stem
        seen[stem] = seen.get(stem, 0) + 1
        tag = stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"
        paths.append(out.with_name(f"{out.stem}_{tag}{suffix}"))
    return paths


def save_png(img, path):
    """Write a Pillow image atomically in the format its suffix names; failures are a TinyViTError naming the file."""
    fmt = image_format(path)
    try:
        atomic_write(path, lambda f: img.save(f, format=fmt))
    except (OSError, ValueError) as e:  # e.g. a mode the format cannot hold
        raise TinyViTError(f"{path}: cannot write the attention map ({getattr(e, 'strerror', None) or e})") from None


def parse_args(argv=None):
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a tinyvit checkpoint (.npz, e.g. weights/mnist_vit.npz), or any weights file "
                    "or hub folder convert_weights.py reads (converted in memory)")
    ap.add_argument("images", nargs="+", metavar="PATH",
                    help="image files (PNG, JPEG, anything Pillow reads), folders of them (recursive), or text "
                         "files (.txt, .lst) listing images one per line")
    ap.add_argument("--top-k", type=int, default=5, metavar="K",
                    help="classes to show per image (default 5, at most the model's class count)")
    ap.add_argument("--output", default=None, metavar="PREDS.csv",
                    help="write the predictions to a .csv (image, class_1, probability_1, ...) or .jsonl file "
                         "instead of the terminal (default: print them)")
    ap.add_argument("--strict", action="store_true", help="an unreadable image is an error (exit 2) "
                    "(default: named once on stderr and skipped)")
    ap.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy",
                    help="array backend: numpy (CPU), cupy (CUDA GPU) or auto (default numpy)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    ap.add_argument("--workers", type=int, default=2, help="decoding threads, a batch ahead of the model (default 2)")
    ap.add_argument("--attention-map", default=None, metavar="OUT.png",
                    help="write a figure of the image, its attention-rollout heat map, the overlay and a "
                         "colour bar to this file (PNG, JPEG, WebP, ... by its suffix) (several images: OUT_<image stem>.png each)")
    ap.add_argument("--invert", choices=list(INVERT), default="auto",
                    help="invert gray levels: auto (MNIST checkpoints only: when the border is brighter "
                         "than the centre, i.e. dark ink on light paper), yes, or no (default auto)")
    ap.add_argument("--max-megapixels", type=float, default=MAX_PIXELS / 1e6, metavar="MP",
                    help=f"refuse images larger than this (default {MAX_PIXELS / 1e6:g})")
    add_size_args(ap)
    add_precision_arg(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args(argv)
    for name, low in (("top_k", 1), ("batch_size", 1), ("workers", 1)):
        if getattr(args, name) < low:
            raise TinyViTError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if not args.max_megapixels > 0:
        raise TinyViTError(f"--max-megapixels must be positive, got {args.max_megapixels}")
    if args.output is not None and Path(args.output).suffix.lower() not in (".csv", ".jsonl"):
        raise TinyViTError(f"{args.output}: --output writes .csv or .jsonl: give it one of those suffixes")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.attention_map is not None:  # a wrong output folder fails before any work
        image_format(args.attention_map)  # a suffix Pillow cannot write fails before any work too
        prepare_out_dir(Path(args.attention_map).parent, "the --attention-map folder")
    if args.output is not None:
        prepare_out_dir(Path(args.output).parent, "the --output folder")
    paths = expand(args.images)
    params, cfg, meta = load_model(args.checkpoint, hint="predict.py takes the checkpoint first, then images")
    if "file_format" not in meta:  # weights converted as they are read: what was guessed, one line each
        for note in meta.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
    if args.attention_map is not None and not cfg.class_token:
        raise TinyViTError(f"{args.checkpoint}: --attention-map follows the class token's attention; this model "
                           f"has no class token ({cfg.global_pool} pooling)")
    size = input_size(args.img_size, args.keep_aspect, cfg, args.checkpoint)
    if size is not None and args.attention_map is not None:
        raise TinyViTError("--attention-map draws the model's own size: not with --img-size or --keep-aspect")
    t = eval_transform(meta, cfg.in_chans, args.checkpoint)  # the one fine-tuning and evaluate.py use
    names = class_names(meta, cfg.num_classes, args.checkpoint) or [str(i) for i in range(cfg.num_classes)]
    args.dataset = meta.get("dataset")
    xp = get_backend(args.backend)
    check_precision(args.precision, xp)
    cfg = dataclasses.replace(cfg, precision=args.precision)
    results, inputs, heats, skipped = predict_all(paths, to_device(params, xp), cfg, t, names, args, xp,
                                                  lambda maps: attention_rollout(maps, cfg.num_prefix_tokens), size)
    if not results:
        raise TinyViTError(f"nothing predicted: none of the {len(paths)} images could be read (each named above)")
    if heats is not None:
        for res, inp, heat, out in zip(results, inputs, heats, map_paths(args.attention_map, [r["image"] for r in results])):
            top = res["top_k"][0]
            title = f"{Path(res['image']).name}: {top['class']} {top['probability'] * 100:.1f}%"
            save_png(attention_figure(input_view(inp[0], t.mean, t.std), heat, title), out)
            res["attention_map"] = str(out)
    if args.output is not None:
        write_predictions(args.output, results, min(args.top_k, cfg.num_classes))
        summary = {"output": str(args.output), "images": len(results), "unreadable_files": skipped}
        print(json.dumps(summary) if args.json else
              f"{len(results)} predictions -> {args.output}" + (f" ({skipped} unreadable skipped)" if skipped else ""))
        return
    if args.json:
        print(json.dumps({"predictions": results, "unreadable_files": skipped}))
        return
    for res in results:
        tops = ", ".join(f"{t['class']} ({t['probability'] * 100:.1f}%)" for t in res["top_k"])
        extra = f"  [attention: {res['attention_map']}]" if "attention_map" in res else ""
        print(f"{res['image']}: {tops}{extra}")


if __name__ == "__main__":
    run(main)
