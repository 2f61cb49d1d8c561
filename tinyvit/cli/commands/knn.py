"""k-NN classification of one embed.py folder's images by another's, as DINOv2's eval/knn.py evaluates
frozen features: unit-length features, cosine similarity, each test image's k most similar training
images voting for their class with weight exp(similarity / T) (T = 0.07), top-1 and top-5 accuracy
for each k.

Examples:
  python scripts/embed.py timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k photos/train --out emb/train
  python scripts/embed.py timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k photos/val --out emb/val
  python scripts/knn.py emb/train emb/val --k 10,20,100,200

Both folders need labels (images.csv's label column: embed.py fills it from class folders) and the
same checkpoint. The similarities are computed a block of the training features at a time (the .npy
is memory-mapped), so a million training images fit in bounded memory. A test image whose class has
no training image counts as wrong. Ties between classes go to the class whose name sorts first.
"""
import argparse
import json

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.cli.neighbours import knn_run
from tinyvit.cli.report import run
from tinyvit.errors import TinyViTError


def parse_args(argv=None):
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train_dir", metavar="TRAIN_DIR", help="embed.py's --out folder of the labelled training images")
    ap.add_argument("val_dir", metavar="VAL_DIR", help="embed.py's --out folder of the labelled test images")
    ap.add_argument("--k", default="10,20,100,200", help="neighbour counts, comma-separated (default 10,20,100,200)")
    ap.add_argument("--temperature", type=float, default=0.07, metavar="T",
                    help="the votes' temperature: weight exp(similarity / T) (default 0.07, DINOv2's)")
    ap.add_argument("--features", default="embeddings", metavar="NAME",
                    help="which .npy of the folders: embeddings (default) or layer<I> (embed.py --layers)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args(argv)
    try:
        args.ks = sorted({int(v) for v in args.k.split(",") if v.strip()})
    except ValueError:
        raise TinyViTError(f"--k takes comma-separated integers (e.g. 10,20,100,200), got {args.k!r}") from None
    if not args.ks or args.ks[0] < 1:
        raise TinyViTError(f"--k needs counts of at least 1, got {args.k!r}")
    if not args.temperature > 0:
        raise TinyViTError(f"--temperature must be positive, got {args.temperature}")
    if not (args.features == "embeddings" or (args.features.startswith("layer") and args.features[5:].isdigit())):
        raise TinyViTError(f"--features takes embeddings or layer<I> (e.g. layer8), got {args.features!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    res = knn_run(args.train_dir, args.val_dir, args.ks, args.temperature, args.features)
    if args.json:
        print(json.dumps(res))
        return
    print(f"k-NN (T = {res['T']:g}) of {res['val']} images by {res['train']} ({res['classes']} classes), "
          f"{res['features']}, {res['seconds']:.1f} s")
    for k, acc in res["k"].items():
        print(f"  k = {k:4d}   top-1 {acc['top1'] * 100:6.2f}%   top-5 {acc['top5'] * 100:6.2f}%")
    if res["unseen_val_classes"]:
        print(f"note: classes with no training image (counted wrong): {', '.join(res['unseen_val_classes'][:10])}")


if __name__ == "__main__":
    run(main)
