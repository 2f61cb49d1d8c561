"""embed.py's work: the images (files, folders, lists, or CIFAR-10 as cifar10:train / cifar10:test),
their labels from class folders, the backbone's features batch by batch into an embedding folder
(tinyvit.io.embeddings), and the same features for search.py's query images."""
import dataclasses
import time
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..data.batches import ArrayDataset
from ..data.cifar10 import load_cifar10
from ..data.download import data_root
from ..data.folders import Warnings
from ..data.listing import decoded_batches, expand
from ..errors import TinyViTError
from ..io.embeddings import EmbeddingWriter, write_images_csv, write_meta
from ..io.hub import find_local, sha256
from ..nn.blockfeats import vit_block_features
from ..nn.model import vit_features
from ..progress import Progress
from ..train.knn import unit_rows
from .predict import _why, decoder

SPLITS = ("train", "val", "valid", "validation", "test")  # a split folder above the class folders
CIFAR = {"cifar10:train": "train", "cifar10:test": "test"}


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """embed.py's settings (the library never reads an argparse namespace)."""

    checkpoint: str
    paths: tuple
    out: str
    normalize: bool = False
    layers: tuple = ()  # block indices, already checked against the model
    batch_size: int = 64
    workers: int = 2
    strict: bool = False
    max_pixels: int = 64_000_000
    quiet: bool = False
    limit: int = None  # the first `limit` images only (a trial run)


def folder_labels(folder, files):
    """The class of each image below folder: its class folder's name where folder is a tree of class
    folders (<class>/..., or train/<class>/... and val/<class>/...), else '' for every image."""
    rel = [Path(f).relative_to(folder).parts for f in files]
    if any(len(r) < 2 for r in rel):  # images beside the class folders: no classes
        return [""] * len(files)
    split = all(r[0] in SPLITS and len(r) >= 3 for r in rel) and (Path(folder) / "train").is_dir()
    return [r[1] if split else r[0] for r in rel]


def listed_images(paths):
    """[(image path, label)] for predict.py's PATH arguments; a folder's images labelled by folder_labels."""
    out = []
    for p in paths:
        if Path(p).is_dir():
            files = expand([p])
            out.extend(zip(files, folder_labels(p, files)))
        else:
            out.extend((f, "") for f in expand([p]))
    return out


def _features(params, x, cfg, layers):
    """{name: (B, D) on the host}: embeddings (what the head reads) and layer<i> for each block asked for."""
    if not layers:
        return {"embeddings": to_numpy(vit_features(params, x, cfg))}
    got = vit_block_features(params, x, cfg, sorted(set(layers) | {cfg.depth - 1}))
    out = {"embeddings": to_numpy(got[cfg.depth - 1])}
    out.update({f"layer{i}": to_numpy(got[i]) for i in layers})
    return out


def _unit(feats):
    """Each row scaled to unit length (float32)."""
    return {k: unit_rows(v) for k, v in feats.items()}


def cifar_batches(split, t, cfg, batch_size, xp, data_dir=None, limit=None):
    """(n, batches of ([(name, class)], model inputs)) of CIFAR-10's split: whole 32-px images
    resized bilinearly to the model's size, as finetune_cifar.py feeds them, with the checkpoint's mean/std."""
    images, labels, names = load_cifar10(data_root(data_dir), split, limit=limit)
    images, labels = images[:limit], labels[:limit]
    rows = [(f"cifar10:{split}/{i}", names[y]) for i, y in enumerate(labels)]
    data = ArrayDataset(images, labels, t.mean, t.std, img_size=cfg.img_size)
    return len(rows), ((rows[a:a + len(x)], x) for a, (x, _) in
                             zip(range(0, len(rows), batch_size), data.batches(batch_size, xp, shuffle=False)))


def file_batches(items, t, cfg, ec: EmbedConfig, xp, warn):
    """Batches (rows, model inputs) of image files decoded on ec.workers threads a batch ahead; an
    unreadable one named by warn and left out (ec.strict: the error)."""
    decode = decoder(cfg, t, ec.max_pixels, None, None)
    labels = dict(items)
    for chunk, decoded in decoded_batches([p for p, _ in items], decode, ec.batch_size, ec.workers):
        good = []
        for p, r in zip(chunk, decoded):
            if isinstance(r, TinyViTError):
                if len(items) == 1:
                    raise TinyViTError(f"{p}: {_why(r, p)}")
                warn(p, _why(r, p))
            else:
                good.append((p, r[0]))
        yield [(p, labels[p]) for p, _ in good], (xp.asarray(np.concatenate([g[1] for g in good])) if good else None), len(chunk)


def checkpoint_identity(src, meta):
    """meta.json's record of the checkpoint: as given, the file read and its sha256 (a Hub name: its provenance)."""
    out = {"checkpoint": str(src)}
    if meta.get("origin"):
        out["origin"] = meta["origin"]
    path = None if meta.get("origin") else find_local(src)
    if path is not None and Path(path).is_file():
        out["checkpoint_path"] = str(Path(path).resolve())
        out["sha256"] = sha256(path)
    return out


def embed_run(ec: EmbedConfig, params, cfg, meta, t, xp, data_dir=None):
    """Embed every image of ec.paths into ec.out (embeddings.npy, layer<i>.npy, images.csv, meta.json)
    -> the summary dict (images, unreadable, seconds, images/s)."""
    warn = Warnings(ec.strict)
    cifar = [CIFAR[p] for p in ec.paths if p in CIFAR]
    if cifar and len(ec.paths) > 1:
        raise TinyViTError(f"{ec.paths[0]}: cifar10:train / cifar10:test is embedded alone, not with other PATHs")
    if cifar:
        n, batches = cifar_batches(cifar[0], t, cfg, ec.batch_size, xp, data_dir, ec.limit)
        batches = ((r, x, len(r)) for r, x in batches)
        source = {"dataset": "cifar10", "split": cifar[0], "resize": f"whole 32-px image, bilinear to {cfg.img_size}"}
    else:
        items = listed_images(ec.paths)[:ec.limit]
        n, batches = len(items), file_batches(items, t, cfg, ec, xp, warn)
        source = {"paths": list(ec.paths)}
    names = ["embeddings"] + [f"layer{i}" for i in ec.layers]
    out = Path(ec.out)
    writer = EmbeddingWriter(out, names, n, cfg.feature_dim)
    bar = Progress(n, "embed", unit="img", disable=ec.quiet)
    kept, done, t0 = [], 0, time.perf_counter()
    try:
        for got, x, size in batches:
            if x is not None:
                feats = _features(params, x, cfg, ec.layers)
                writer.add(_unit(feats) if ec.normalize else feats)
                kept.extend(got)
            done += size
            bar.update(size, img_s=f"{done / (time.perf_counter() - t0):.1f}")
        bar.close()
        if not kept:
            raise TinyViTError(f"nothing embedded: none of the {n} images could be read (each named above)")
        secs = time.perf_counter() - t0
        finals = writer.finish()
    except BaseException:
        writer.abort()
        raise
    for old in out.glob("layer*.npy"):  # an earlier run's blocks: not this folder's any more
        if old not in finals:
            old.unlink()
    write_images_csv(out / "images.csv", kept)
    record = dict(checkpoint_identity(ec.checkpoint, meta), config=cfg.to_dict(),
                  eval_transform=t.to_dict(), D=cfg.feature_dim, N=len(kept), pooling=cfg.global_pool,
                  normalized=ec.normalize, layers=list(ec.layers), unreadable=warn.count, limit=ec.limit, **source)
    write_meta(out / "meta.json", record)
    return {"out": str(out), "images": len(kept), "unreadable_files": warn.count, "D": cfg.feature_dim,
            "layers": list(ec.layers), "seconds": round(secs, 2), "images_per_second": round(len(kept) / secs, 1)}


def embed_queries(paths, params, cfg, t, xp, batch_size=64, workers=2, normalize=True, max_pixels=64_000_000):
    """search.py's query images as unit-length features -> (images kept, (Q, D) float32); an unreadable
    query is the error."""
    ec = EmbedConfig("", tuple(paths), "", batch_size=batch_size, workers=workers, strict=True, max_pixels=max_pixels)
    images, feats = [], []
    for got, x, _ in file_batches([(p, "") for p in paths], t, cfg, ec, xp, Warnings(True)):
        images.extend(p for p, _ in got)
        feats.append(_features(params, x, cfg, ())["embeddings"])
    f = np.concatenate(feats)
    return images, (_unit({"e": f})["e"] if normalize else f)
