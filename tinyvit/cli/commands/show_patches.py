"""Draw how a ViT reads an image: the image cut into its patch grid, beside the sequence of patches.

The image's centre square is resized to --size (bicubic: model_view in tinyvit/viz.py, decoding in
tinyvit/data/decode.py; predict.py's eval transform may crop tighter, e.g. timm's crop_pct), then drawn twice: on the left with thin gridlines between the patches, on
the right as the flattened patch sequence in raster order (row by row, left to right; the order the
patch embedding feeds the transformer), wrapped into rows, each tile numbered. Tiles hold the
image's own pixels (magnified by --scale, nearest neighbour). Pillow only; the PNG is written atomically.

Example:
  python scripts/show_patches.py photo.jpg --patch 16 --out patches.png
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.cli.report import run
from tinyvit.data.decode import MAX_PIXELS, open_image
from tinyvit.errors import TinyViTError
from tinyvit.io.files import atomic_write, prepare_out_dir
from tinyvit.viz import MIN_PANEL, font, model_view

MAX_PATCHES = 4096  # a bigger sequence makes an unreadable figure
MAX_FIGURE_PIXELS = 100_000_000
_M, _GAP, _TITLE, _LABEL, _TILE_GAP, _NUM = 10, 20, 22, 18, 5, 11  # margins, text rows, tile spacing


def auto_scale(size, patch):
    """Magnification so the image is at least MIN_PANEL px and a tile at least 16 px."""
    return max(1, -(-MIN_PANEL // size), -(-16 // patch))


def layout(size, patch, scale, columns):
    """Where everything goes: {'image': (x, y), 'tiles': [(x, y) of tile k], 'size': (W, H)}."""
    g = size // patch
    n, t = g * g, patch * scale
    rows = -(-n // columns)
    top = _M + _TITLE + _LABEL
    x0 = _M + size * scale + _GAP
    pitch_x, pitch_y = t + _TILE_GAP, t + _NUM + _TILE_GAP
    tiles = [(x0 + (k % columns) * pitch_x, top + (k // columns) * pitch_y) for k in range(n)]
    width = x0 + columns * pitch_x - _TILE_GAP + _M
    height = top + max(size * scale, rows * pitch_y) + _M
    return {"image": (_M, top), "tiles": tiles, "size": (width, height)}


def patch_figure(view, patch, scale, columns, title):
    """The figure for a uint8 (S, S, 3) view: gridded image, numbered tiles in raster order, labels."""
    S = view.shape[0]
    g, t = S // patch, patch * scale
    lay = layout(S, patch, scale, columns)
    fig = Image.new("RGB", lay["size"], (255, 255, 255))
    big = Image.fromarray(view, mode="RGB").resize((S * scale, S * scale), Image.Resampling.NEAREST)
    grid = Image.new("RGBA", big.size, (0, 0, 0, 0))
    gd = ImageDraw.Draw(grid)
    for k in range(1, g):  # thin half-transparent white lines on the patch borders
        gd.line([(k * t, 0), (k * t, S * scale - 1)], fill=(255, 255, 255, 170))
        gd.line([(0, k * t), (S * scale - 1, k * t)], fill=(255, 255, 255, 170))
    fig.paste(Image.alpha_composite(big.convert("RGBA"), grid).convert("RGB"), lay["image"])
    d, small = ImageDraw.Draw(fig), font(9)
    for k, (x, y) in enumerate(lay["tiles"]):
        i, j = divmod(k, g)
        tile = view[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]  # (P, P, 3)
        fig.paste(Image.fromarray(np.ascontiguousarray(tile), mode="RGB").resize((t, t), Image.Resampling.NEAREST),
                  (x, y))
        label = str(k)
        d.text((x + (t - d.textlength(label, font=small)) / 2, y + t), label, fill=(90, 90, 90), font=small)
    f = font(12)
    d.text((_M, _M), title, fill=(0, 0, 0), font=font(14))
    d.text((_M, _M + _TITLE), f"image cut into {g}x{g} patches", fill=(0, 0, 0), font=f)
    d.text((lay["tiles"][0][0], _M + _TITLE), f"the sequence of {g * g} flattened patches, raster order "
           f"(0 = top left, {g * g - 1} = bottom right)", fill=(0, 0, 0), font=f)
    return fig


def parse_args(argv=None):
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", help="image file (PNG, JPEG, anything Pillow reads)")
    ap.add_argument("--patch", type=int, default=16, help="patch side in pixels (default 16)")
    ap.add_argument("--size", type=int, default=224,
                    help="model input size: the centre square is resized to this (default 224); a multiple of --patch")
    ap.add_argument("--out", default="patches.png", help="PNG to write (default patches.png)")
    ap.add_argument("--scale", type=int, default=None,
                    help=f"pixel magnification of image and tiles (default: the smallest making the image "
                         f">= {MIN_PANEL} px and a tile >= 16 px)")
    ap.add_argument("--columns", type=int, default=None,
                    help="tiles per row of the sequence (default: twice the patches per image row)")
    ap.add_argument("--max-megapixels", type=float, default=MAX_PIXELS / 1e6, metavar="MP",
                    help=f"refuse images larger than this (default {MAX_PIXELS / 1e6:g})")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line instead of text")
    return ap.parse_args(argv)


def main(argv=None):
    """Check the settings, read the image, draw and write the figure; one summary line."""
    args = parse_args(argv)
    if args.patch < 1 or args.size < 1:
        raise TinyViTError(f"--patch and --size must be positive, got {args.patch} and {args.size}")
    if args.size % args.patch:
        raise TinyViTError(f"--size {args.size} is not a multiple of --patch {args.patch}")
    g = args.size // args.patch
    if g * g > MAX_PATCHES:
        raise TinyViTError(f"{g}x{g} = {g * g} patches: over {MAX_PATCHES}, the figure would be unreadable")
    scale = auto_scale(args.size, args.patch) if args.scale is None else args.scale
    columns = min(g * g, 2 * g) if args.columns is None else args.columns
    if not 1 <= scale <= 16:
        raise TinyViTError(f"--scale must be 1 to 16, got {scale}")
    if not 1 <= columns <= g * g:
        raise TinyViTError(f"--columns must be 1 to {g * g} (the patch count), got {columns}")
    w, h = layout(args.size, args.patch, scale, columns)["size"]
    if w * h > MAX_FIGURE_PIXELS:
        raise TinyViTError(f"the figure would be {w}x{h} px, over {MAX_FIGURE_PIXELS // 10**6} megapixels: "
                           f"lower --scale or --size")
    if not args.max_megapixels > 0:
        raise TinyViTError(f"--max-megapixels must be positive, got {args.max_megapixels}")
    out = Path(args.out)
    prepare_out_dir(out.parent, "the --out folder")
    img = open_image(args.image, int(args.max_megapixels * 1e6), draft_size=2 * args.size, flag="--max-megapixels")
    view = model_view(img, args.size)  # (S, S, 3) uint8, as predict.py prepares it
    P = args.patch
    title = f"{Path(args.image).name}: {args.size}x{args.size} px -> {g}x{g} = {g * g} patches of {P}x{P} px"
    fig = patch_figure(view, args.patch, scale, columns, title)
    atomic_write(out, lambda f: fig.save(f, format="PNG", optimize=True))
    if args.json:
        print(json.dumps({"out": str(out), "width": fig.width, "height": fig.height, "size": args.size,
                          "patch": args.patch, "patches": g * g, "columns": columns}))
        return
    print(f"{out}: {fig.width}x{fig.height} px, {g * g} patches of {args.patch}x{args.patch} px in {columns} columns")


if __name__ == "__main__":
    run(main)
