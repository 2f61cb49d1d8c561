"""predict.py's work: the images a run reads, decoded on threads a batch ahead, the model's top-k per image
(with attention heat maps when asked), and the predictions written to a CSV or JSONL file."""
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..data.decode import has_colour, image_to_input, open_image
from ..data.folders import Warnings
from ..data.listing import decoded_batches
from ..errors import TinyViTError
from ..io.filekind import NAMES, file_kind
from ..io.files import atomic_write
from ..nn.model import attention_maps, vit_forward
from ..progress import Progress

INVERT = {"auto": None, "yes": True, "no": False}
MODEL_KINDS = ("tinyvit", "npz", "safetensors", "torch")


def softmax(logits):
    """Row-wise softmax in float64 on the host."""
    z = to_numpy(logits).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def decoder(cfg, t, max_pixels, invert, dataset, size=None):
    """path -> (model input (1, C, S, S), or (1, C, H, W) at an InputSize, whether a 1-channel model was
    given a colour image)."""
    def decode(p):
        img = open_image(p, max_pixels, flag="--max-megapixels")
        return image_to_input(img, cfg, t, invert, dataset, p, size), cfg.in_chans == 1 and has_colour(img, p)
    return decode


def by_shape(arrays):
    """The indices of (1, C, H, W) arrays grouped by image shape, in first-seen order (--keep-aspect's
    images differ; one forward pass takes one shape)."""
    groups = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.shape, []).append(i)
    return list(groups.values())


def _why(err, path):
    """An error's message without the path it starts with (Warnings names the path); a model file
    is named as one."""
    try:
        kind = file_kind(path)
    except TinyViTError:
        kind = None
    if kind in MODEL_KINDS:
        return f"{NAMES[kind]}, not an image (predict.py takes the checkpoint first, then images)"
    msg = str(err)
    return msg[len(str(path)) + 2:] if msg.startswith(f"{path}: ") else msg


def write_predictions(out, results, k):
    """preds.csv (image, class_1, probability_1, ...; probabilities to 6 significant digits) or
    preds.jsonl (one --json record per line), atomically."""
    if Path(out).suffix.lower() == ".jsonl":
        text = "".join(json.dumps({"image": r["image"], "top_k": r["top_k"]}) + "\n" for r in results)
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "probability")])
        for r in results:
            w.writerow([r["image"]] + [v for t in r["top_k"] for v in (t["class"], f"{t['probability']:.6g}")])
        text = buf.getvalue()
    atomic_write(out, lambda f: f.write(text.encode()))


def predict_all(paths, params, cfg, t, names, args, xp, rollout=None, size=None):
    """Top-k per readable image, in order -> (results, inputs, heats, unreadable count); with
    --attention-map, rollout(each batch's attention maps) gives the heat maps (the script's
    viz.attention_rollout). One image given that cannot be read is the error. size: an InputSize
    (--img-size, --keep-aspect) for a model that takes any."""
    want_maps, k = args.attention_map is not None, min(args.top_k, cfg.num_classes)
    warn = Warnings(args.strict)
    decode = decoder(cfg, t, int(args.max_megapixels * 1e6), INVERT[args.invert], args.dataset, size)
    bar = Progress(len(paths), "predict", unit="img", disable=args.json or len(paths) <= args.batch_size)
    results, inputs, heats, colour = [], [], [], []
    for chunk, decoded in decoded_batches(paths, decode, args.batch_size, args.workers):
        good = []
        for p, r in zip(chunk, decoded):
            if isinstance(r, TinyViTError):
                if len(paths) == 1:
                    raise TinyViTError(f"{p}: {_why(r, p)}")
                warn(p, _why(r, p))  # --strict: raises, one line, exit 2
            else:
                good.append((p, r[0]))
                if r[1]:
                    colour.append(p)
        done = [None] * len(good)
        for group in by_shape([g[1] for g in good]):
            x = xp.asarray(np.concatenate([good[i][1] for i in group]))  # (B, C, H, W)
            logits, cache = vit_forward(params, x, cfg, keep_cache=want_maps, all_tokens=want_maps)
            for i, prob in zip(group, softmax(logits)):
                top = np.argsort(-prob, kind="stable")[:k]
                done[i] = {"image": good[i][0], "top_k": [{"class": names[j], "index": int(j),
                                                           "probability": float(prob[j])} for j in top]}
            if want_maps:  # maps need every token; kept for the figures (one shape: no --keep-aspect)
                heats.append(rollout(attention_maps(cache)))
                inputs.extend(good[i][1] for i in group)
        results.extend(done)
        bar.update(len(chunk))
    bar.close()
    if colour:
        more = f" and {len(colour) - 1} more" if len(colour) > 1 else ""
        print(f"warning: {colour[0]}{more}: colour image(s) given to a 1-channel model (trained on gray digits): "
              f"it sees their luminance only, so its answers may mean little", file=sys.stderr)
    return results, inputs, (np.concatenate(heats) if heats else None), warn.count
