"""How fast this machine decodes an image folder for training, against how fast the model trains.

  python scripts/decode_rate.py DIR [--weights W] [--img-size 224] [--batch-size 32]

Decoding (tinyvit.data.loader, the train and eval transforms, 1 and --workers threads) should be well
above the model's images/s, or the model waits on JPEG decoding. The last line is the verdict: for
training (train transform against a train step) and for inference (eval transform against a forward),
whether decoding on --workers threads keeps up, and how long it takes beside the model's own time.
"""
import argparse
import json
import time

import numpy as np

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.cli.report import run
from tinyvit.data.folders import folder_splits
from tinyvit.data.loader import FolderDataset
from tinyvit.io.convert import adapt, load_model
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward
from tinyvit.nn.model import init_params, preset, vit_backward, vit_forward


def decode_rate(images, size, workers, train):
    """Images per second through FolderDataset.batches (no model)."""
    ds = FolderDataset(images, size, (0.5,) * 3, (0.5,) * 3, workers=workers)
    t, n = time.perf_counter(), 0
    for _, y in ds.batches(32, np, augment="crop_flip" if train else None, shuffle=False):
        n += len(y)
    return n / (time.perf_counter() - t)


def model_rates(params, cfg, batch, reps=3):
    """(train-step, inference) images per second of the model on random input."""
    x = np.random.default_rng(0).standard_normal((batch, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    y = np.arange(batch) % cfg.num_classes

    def step():
        logits, cache = vit_forward(params, x, cfg, train=True)
        vit_backward(cross_entropy_backward(1.0, cross_entropy_forward(logits, y)[1]), cache)

    rates = []
    for fn in (step, lambda: vit_forward(params, x, cfg, keep_cache=False)):
        fn()  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        rates.append(batch * reps / (time.perf_counter() - t))
    return rates


def verdict(decode, model, workers):
    """One clause: whether decode img/s on `workers` threads keeps up with the model's img/s, and its share."""
    share = model / decode  # decoding's time beside the model's, were the two not to overlap
    if share <= 0.5:
        word = "keeps up"
    elif share <= 1:
        word = "barely keeps up (more --workers, or images saved nearer the model's size, would help)"
    else:
        word = "is slower: the model waits on it (more --workers, or images saved nearer the model's size)"
    return (f"decoding {word}: {decode:.0f} img/s on {workers} thread{'s' if workers != 1 else ''} against "
            f"the model's {model:.1f} img/s ({100 * share:.0f}% of its time)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="an image folder (DIR/<class>/* or DIR/train/<class>/*)")
    ap.add_argument("--weights", default=None, help="model to time (default: a random-init vit-ti16)")
    ap.add_argument("--img-size", type=int, default=224, help="input resolution (default 224)")
    ap.add_argument("--batch-size", type=int, default=32, help="model batch (default 32)")
    ap.add_argument("--workers", type=int, default=2, help="decoding threads to compare with one (default 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    images, _ = folder_splits(args.data, 0.1, 0)
    out = {"images": len(images)}
    for w in sorted({1, args.workers}):
        for train in (True, False):
            out[f"decode_{'train' if train else 'eval'}_workers{w}"] = decode_rate(images, args.img_size, w, train)
    if args.weights:
        params, cfg, _ = load_model(args.weights)
    else:
        cfg = preset("vit-ti16")
        params = init_params(cfg)
    params, cfg = adapt(params, cfg, img_size=args.img_size, num_classes=len(images.classes))
    out["model_train_step"], out["model_inference"] = model_rates(params, cfg, args.batch_size)
    w = args.workers
    out["verdict"] = (f"training: {verdict(out[f'decode_train_workers{w}'], out['model_train_step'], w)}; "
                      f"inference: {verdict(out[f'decode_eval_workers{w}'], out['model_inference'], w)}")
    rates = {k: v for k, v in out.items() if k not in ("images", "verdict")}
    print(json.dumps(out) if args.json else "\n".join([f"{'images':28s} {out['images']:8d}",
                                                        *(f"{k:28s} {v:8.1f} img/s" for k, v in rates.items()),
                                                        f"verdict: {out['verdict']}"]))


if __name__ == "__main__":
    run(main)
