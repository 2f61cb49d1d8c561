"""Classify image files with a tinyvit checkpoint (or any weights file scripts/convert_weights.py reads,
converted in memory): top-k classes per image, optional attention maps.

Every image is read (see tinyvit/images.py for the mode, alpha, resize and inversion rules) before
anything is printed: one unreadable file stops the run with a one-line error (exit 2).
--attention-map OUT.png writes a figure per image, side by side: the input as the model sees it
(centre square, resized; inverted or gray where the model's input is), the attention-rollout heat map
(the CLS token's row over the patches, 10th to 99th percentile, bilinear) in the inferno colour map,
the heat map over the dimmed image, and a colour bar. With one image the file is OUT itself; with
several, each goes to OUT's folder as <OUT stem>_<image stem><OUT suffix> (out_digit.png), and a
repeated image stem gets _2, _3, ... appended. The file format follows OUT's suffix (.png, .jpg,
.webp, .bmp, .tiff: any Pillow writes); another suffix, or none, is refused.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.backend import get_backend, to_device, to_numpy
from tinyvit.cli.report import run
from tinyvit.data.decode import MAX_PIXELS, has_colour, image_to_input, open_image
from tinyvit.data.transform import eval_transform
from tinyvit.errors import TinyViTError
from tinyvit.io.convert import load_model
from tinyvit.io.files import atomic_write, prepare_out_dir
from tinyvit.io.labels import class_names
from tinyvit.nn.model import attention_maps, vit_forward
from tinyvit.viz import attention_figure, attention_rollout, input_view

INVERT = {"auto": None, "yes": True, "no": False}


def softmax(logits):
    """Row-wise softmax in float64 on the host."""
    z = to_numpy(logits).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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


def read_inputs(paths, cfg, t, max_pixels, invert, dataset):
    """Each file decoded once -> the model inputs (1, C, S, S), and one warning when a 1-channel
    (digit) model is given colour images: it sees only their luminance."""
    xs, colour = [], []
    for p in paths:
        img = open_image(p, max_pixels)
        xs.append(image_to_input(img, cfg, t, invert, dataset, p))
        if cfg.in_chans == 1 and has_colour(img, p):
            colour.append(p)
    if colour:
        more = f" and {len(colour) - 1} more" if len(colour) > 1 else ""
        print(f"warning: {colour[0]}{more}: colour image(s) given to a 1-channel model (trained on gray digits): "
              f"it sees their luminance only, so its answers may mean little", file=sys.stderr)
    return xs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a tinyvit checkpoint (.npz, e.g. weights/mnist_vit.npz) or any weights file "
                    "convert_weights.py reads (converted in memory)")
    ap.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, anything Pillow reads)")
    ap.add_argument("--top-k", type=int, default=5, metavar="K",
                    help="classes to show per image (default 5, at most the model's class count)")
    ap.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy",
                    help="array backend: numpy (CPU), cupy (CUDA GPU) or auto (default numpy)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    ap.add_argument("--attention-map", default=None, metavar="OUT.png",
                    help="write a figure of the image, its attention-rollout heat map, the overlay and a "
                         "colour bar to this file (PNG, JPEG, WebP, ... by its suffix) (several images: OUT_<image stem>.png each)")
    ap.add_argument("--invert", choices=list(INVERT), default="auto",
                    help="invert gray levels: auto (MNIST checkpoints only: when the border is brighter "
                         "than the centre, i.e. dark ink on light paper), yes, or no (default auto)")
    ap.add_argument("--max-megapixels", type=float, default=MAX_PIXELS / 1e6, metavar="MP",
                    help=f"refuse images larger than this (default {MAX_PIXELS / 1e6:g})")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args()
    if args.top_k < 1:
        raise TinyViTError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise TinyViTError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.max_megapixels > 0:
        raise TinyViTError(f"--max-megapixels must be positive, got {args.max_megapixels}")

    if args.attention_map is not None:  # a wrong output folder fails before any work
        image_format(args.attention_map)  # a suffix Pillow cannot write fails before any work too
        prepare_out_dir(Path(args.attention_map).parent, "the --attention-map folder")
    params, cfg, meta = load_model(args.checkpoint, hint="predict.py takes the checkpoint first, then images")
    t = eval_transform(meta, cfg.in_chans, args.checkpoint)  # the one fine-tuning and evaluate.py use
    names = class_names(meta, cfg.num_classes, args.checkpoint) or [str(i) for i in range(cfg.num_classes)]
    invert, dataset = INVERT[args.invert], meta.get("dataset")
    max_pixels = int(args.max_megapixels * 1e6)
    want_maps = args.attention_map is not None
    xs = read_inputs(args.images, cfg, t, max_pixels, invert, dataset)  # (1, C, S, S) each
    xp = get_backend(args.backend)
    params = to_device(params, xp)

    probs, heats = [], []
    for i in range(0, len(xs), args.batch_size):
        x = xp.asarray(np.concatenate(xs[i:i + args.batch_size]))  # (B, C, S, S)
        logits, cache = vit_forward(params, x, cfg, keep_cache=want_maps, all_tokens=want_maps)  # maps need every token
        probs.append(softmax(logits))
        if want_maps:
            heats.append(attention_rollout(attention_maps(cache)))  # (B, g, g)
    probs = np.concatenate(probs)  # (n, classes)

    k = min(args.top_k, cfg.num_classes)
    results = []
    for path, p in zip(args.images, probs):
        top = np.argsort(-p, kind="stable")[:k]
        results.append({"image": path, "top_k": [{"class": names[j], "index": int(j), "probability": float(p[j])}
                                                 for j in top]})
    if want_maps:
        heats = np.concatenate(heats)
        for res, inp, heat, out in zip(results, xs, heats, map_paths(args.attention_map, args.images)):
            top = res["top_k"][0]
            title = f"{Path(res['image']).name}: {top['class']} {top['probability'] * 100:.1f}%"
            save_png(attention_figure(input_view(inp[0], t.mean, t.std), heat, title), out)
            res["attention_map"] = str(out)

    if args.json:
        print(json.dumps({"predictions": results}))
        return
    for res in results:
        tops = ", ".join(f"{t['class']} ({t['probability'] * 100:.1f}%)" for t in res["top_k"])
        extra = f"  [attention: {res['attention_map']}]" if want_maps else ""
        print(f"{res['image']}: {tops}{extra}")


if __name__ == "__main__":
    run(main)
