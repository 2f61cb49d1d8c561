"""knn.py's and search.py's work over embed.py folders: labels as class indices, k-NN accuracy per k,
and the nearest images of query images or rows, written as predict.py writes predictions."""
import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from ..errors import TinyViTError
from ..io.convert import load_model
from ..io.embeddings import read_embed_dir
from ..io.files import atomic_write
from ..io.hub import sha256
from ..train.knn import knn_classify, topk_cosine, unit_rows


def _labels(rows, folder):
    """The label strings of an embed.py folder's images.csv; an unlabelled image is the error."""
    missing = next((img for img, label in rows if not label), None)
    if missing is not None:
        raise TinyViTError(f"{Path(folder) / 'images.csv'}: {missing} has no label: k-NN needs images embedded "
                           f"from class folders (<class>/ or train/<class>/)")
    return [label for _, label in rows]


def _same_model(meta_a, meta_b, a, b):
    """Two folders' embeddings must come from the same weights and have the same width."""
    if meta_a.get("D") != meta_b.get("D"):
        raise TinyViTError(f"{b}: its embeddings are {meta_b.get('D')} wide, {a}'s {meta_a.get('D')}: embed both "
                           f"with the same checkpoint")
    if meta_a.get("sha256") and meta_b.get("sha256") and meta_a["sha256"] != meta_b["sha256"]:
        raise TinyViTError(f"{b}: embedded with another checkpoint than {a} (sha256 differs)")


def knn_run(train_dir, val_dir, ks, T=0.07, features="embeddings"):
    """{"k": {k: {"top1", "top5"}}, "train", "val", "classes", "seconds"} of the k-NN classifier
    (tinyvit.train.knn) from train_dir's labelled features on val_dir's."""
    tr, tr_rows, tr_meta = read_embed_dir(train_dir, features)
    va, va_rows, va_meta = read_embed_dir(val_dir, features)
    _same_model(tr_meta, va_meta, train_dir, val_dir)
    tr_names, va_names = _labels(tr_rows, train_dir), _labels(va_rows, val_dir)
    classes = sorted(set(tr_names))
    index = {c: i for i, c in enumerate(classes)}
    tr_y = np.array([index[c] for c in tr_names], np.int64)
    va_y = np.array([index.get(c, len(classes)) for c in va_names], np.int64)  # unseen classes: never right
    t0 = time.perf_counter()
    acc = knn_classify(tr, tr_y, va, va_y, ks, T, len(classes) + 1)
    return {"k": acc, "train": len(tr), "val": len(va), "classes": len(classes),
            "unseen_val_classes": sorted(set(va_names) - set(classes)), "T": T, "features": features,
            "seconds": round(time.perf_counter() - t0, 2)}


def query_model(meta, folder):
    """(params, cfg, model meta) of the checkpoint an embed.py folder was made with, checked by its sha256."""
    src = meta.get("checkpoint_path") if Path(str(meta.get("checkpoint_path"))).is_file() else meta.get("checkpoint")
    if not src:
        raise TinyViTError(f"{Path(folder) / 'meta.json'}: names no checkpoint to embed the queries with")
    if meta.get("sha256") and Path(src).is_file() and sha256(src) != meta["sha256"]:
        raise TinyViTError(f"{src}: changed since {folder} was embedded (sha256 differs): embed the folder again")
    return load_model(src, hint="the checkpoint recorded in meta.json")


def nearest(bank, rows, queries, top_k, exclude=None):
    """[[(image, row index, similarity)] per query], most similar first; exclude[i]: a row query i skips (itself)."""
    extra = 0 if exclude is None else 1
    sims, idx = topk_cosine(unit_rows(queries), bank, top_k + extra)
    out = []
    for q, (s, i) in enumerate(zip(sims, idx)):
        keep = [(rows[j][0], int(j), float(v)) for v, j in zip(s, i) if exclude is None or j != exclude[q]]
        out.append(keep[:top_k])
    return out


def write_neighbours(out, results):
    """results [(query, [(image, index, similarity)])] to a .csv (query, image_1, similarity_1, ...) or
    .jsonl file (one line per query), atomically."""
    if Path(out).suffix.lower() == ".jsonl":
        text = "".join(json.dumps(as_record(q, hits)) + "\n" for q, hits in results)
    else:
        k = max((len(h) for _, h in results), default=0)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["query"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("image", "similarity")])
        for q, hits in results:
            w.writerow([q] + [v for img, _, s in hits for v in (img, f"{s:.6g}")])
        text = buf.getvalue()
    atomic_write(out, lambda f: f.write(text.encode()))


def as_record(query, hits):
    """One query's JSON record."""
    return {"query": query, "neighbours": [{"image": img, "index": j, "similarity": s} for img, j, s in hits]}
