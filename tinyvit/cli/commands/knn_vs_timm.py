"""The k-NN figure's cross-check: CIFAR-10 features of the same pixels from timm's own model (its
VisionTransformer loaded strictly with the checkpoint's weights, forward_head(pre_logits=True)) and from
tinyvit, then the same k-NN accuracy (tinyvit.train.knn) from each. Needs torch and timm.

Examples:
  python scripts/knn_vs_timm.py vit_tiny_patch16_224.augreg_in21k_ft_in1k.npz --train 2000 --test 500
  python scripts/knn_vs_timm.py vit_tiny_patch16_224.augreg_in21k_ft_in1k.npz --train 2000 --test 500 \\
      --tinyvit-train emb/cifar-train --tinyvit-test emb/cifar-test   # tinyvit's rows from embed.py

The first --train training and --test test images, fed as embed.py feeds cifar10:train / cifar10:test
(whole 32-px images resized bilinearly to the model's size, the checkpoint's mean/std). With
--tinyvit-train / --tinyvit-test, tinyvit's features are the first rows of those embed.py folders
instead of a new pass (their images.csv must name the same CIFAR-10 images).
"""
import argparse
import json
import time

import numpy as np

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.cli.commands.bench_common import torch_model
from tinyvit.cli.embed import cifar_batches
from tinyvit.cli.report import run
from tinyvit.data.transform import eval_transform
from tinyvit.errors import TinyViTError
from tinyvit.io.convert import load_model
from tinyvit.io.embeddings import read_embed_dir
from tinyvit.nn.model import vit_features
from tinyvit.train.knn import knn_classify


def features(model, params, cfg, t, split, n, args, folder):
    """(timm's (n, D), tinyvit's (n, D), labels (n,) by class name) of the split's first n images."""
    import torch
    theirs, ours, labels = [], [], []
    _, batches = cifar_batches(split, t, cfg, args.batch_size, np, args.data_dir, n)
    for rows, x in batches:
        with torch.no_grad():
            theirs.append(model.forward_head(model.forward_features(torch.from_numpy(x)), pre_logits=True).numpy())
        if folder is None:
            ours.append(vit_features(params, x, cfg))
        labels += [label for _, label in rows]
    if folder is not None:
        emb, rows, _ = read_embed_dir(folder)
        if len(rows) < n or rows[n - 1][0] != f"cifar10:{split}/{n - 1}":
            raise TinyViTError(f"{folder}: its first {n} rows are not CIFAR-10's {split} images 0 to {n - 1}")
        ours = [np.asarray(emb[:n])]
    return np.concatenate(theirs), np.concatenate(ours), np.array(labels)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the weights (any file or Hub name embed.py takes)")
    ap.add_argument("--train", type=int, default=2000, help="training images used (the first N; default 2000)")
    ap.add_argument("--test", type=int, default=500, help="test images classified (the first N; default 500)")
    ap.add_argument("--k", default="10,20,100,200", help="neighbour counts (default 10,20,100,200)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    ap.add_argument("--data-dir", default=None, help="where cifar10/ is (default $TINYVIT_DATA or ~/.cache/tinyvit)")
    ap.add_argument("--tinyvit-train", default=None, metavar="DIR", help="embed.py folder of cifar10:train to read")
    ap.add_argument("--tinyvit-test", default=None, metavar="DIR", help="embed.py folder of cifar10:test to read")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args(argv)
    ks = [int(v) for v in args.k.split(",")]
    params, cfg, meta = load_model(args.checkpoint)
    t = eval_transform(meta, cfg.in_chans, args.checkpoint)
    import torch
    model = torch_model(cfg, params, torch.float32, rival="timm").eval()
    t0 = time.perf_counter()
    tr = features(model, params, cfg, t, "train", args.train, args, args.tinyvit_train)
    te = features(model, params, cfg, t, "test", args.test, args, args.tinyvit_test)
    classes = sorted(set(tr[2]))
    tr_y, te_y = (np.array([classes.index(c) if c in classes else len(classes) for c in f[2]]) for f in (tr, te))
    res = {"train": args.train, "test": args.test, "seconds": round(time.perf_counter() - t0, 1),
           "max_feature_difference": float(max(np.abs(a[0] - a[1]).max() / np.abs(a[0]).max() for a in (tr, te))),
           "timm": knn_classify(tr[0], tr_y, te[0], te_y, ks, num_classes=len(classes) + 1),
           "tinyvit": knn_classify(tr[1], tr_y, te[1], te_y, ks, num_classes=len(classes) + 1)}
    if args.json:
        print(json.dumps(res))
        return
    print(f"k-NN on CIFAR-10's first {args.train} training / {args.test} test images; largest feature "
          f"difference {res['max_feature_difference']:.1e} (relative to the largest feature)")
    for k in ks:
        a, b = res["tinyvit"][k], res["timm"][k]
        print(f"  k = {k:4d}   tinyvit top-1 {a['top1'] * 100:6.2f}% top-5 {a['top5'] * 100:6.2f}%   "
              f"timm top-1 {b['top1'] * 100:6.2f}% top-5 {b['top5'] * 100:6.2f}%")


if __name__ == "__main__":
    run(main)
