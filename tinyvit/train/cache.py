"""The caches of the frozen part of a model: head mode's features and partial mode's tokens, in one
folder shared by runs, each file keyed on what it depends on (a changed folder is a miss, a rerun a hit)."""
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..data.batches import TokenDataset
from ..errors import TinyViTError, describe_os_error
from ..io.files import atomic_write
from ..nn.partial import vit_tokens
from ..progress import Progress

# the parameters before the first block (the embedding, its tokens, norm_pre)
EMBEDDING = ("patch_embed.", "cls_token", "dist_token", "reg_token", "pos_embed", "norm_pre.")


def feature_cache_dir(cache_dir=None) -> Path:
    """cache_dir (--cache-dir), else $TINYVIT_CACHE, else ~/.cache/tinyvit/features (shared by runs, any --out)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("TINYVIT_CACHE"):
        return Path(os.environ["TINYVIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tinyvit" / "features"


def feature_key(params, cfg, data, what="float32") -> str:
    """What a feature pass depends on: the backbone's weights (names, shapes, bytes), the model's
    config, what is stored (`what`), and the data's fingerprint (files, labels, transform)."""
    h = hashlib.blake2b(digest_size=12)
    for k in sorted(params):
        if not k.startswith("head."):  # the features come before the head
            v = np.ascontiguousarray(to_numpy(params[k]))
            h.update(f"{k}{v.dtype}{v.shape}".encode())
            h.update(v)
    h.update(json.dumps([cfg.to_dict(), what, data.fingerprint()]).encode())
    return h.hexdigest()


def below(name, stop) -> bool:
    """True for a parameter the tokens entering block `stop` depend on: the embedding and blocks[:stop]."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) < stop
    return name.startswith(EMBEDDING)


def token_key(params, cfg, data, stop, dtype) -> str:
    """feature_key of the tokens entering block `stop`: the weights below it only (the blocks that train
    do not change the key, so a resumed run finds its cache), the config without its training-only rate."""
    lower = {k: v for k, v in params.items() if below(k, stop)}
    return feature_key(lower, dataclasses.replace(cfg, drop_path=0.0), data, f"tokens entering block {stop}, {dtype}")


def _load_tokens(path, labels_path, cfg, data, dtype):
    """The cached TokenDataset at path, or None when it is missing, damaged or not what this run needs."""
    if not (path.is_file() and labels_path.is_file()):
        return None
    try:
        labels = np.load(labels_path, allow_pickle=False)
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        T = cfg.num_patches + cfg.num_prefix_tokens
        if (tokens.dtype == np.dtype(dtype) and tokens.shape[1:] == (T, cfg.dim) and labels.ndim == 1
                and 0 < len(labels) <= min(len(tokens), len(data.labels))):
            return TokenDataset(tokens[:len(labels)], labels)
    except Exception:  # noqa: BLE001 (a damaged cache file is recomputed and replaced)
        pass
    return None


def cached_tokens(folder, name, params, cfg, data, stop, dtype, xp, batch_size, quiet=False):
    """The tokens entering block `stop` of every image in data (eval transform, no augmentation), stored
    as dtype in FOLDER/<name>-tokens-<token_key>.npy and memory-mapped from there -> (TokenDataset,
    seconds of the pass; 0 from the cache)."""
    key = token_key(params, cfg, data, stop, dtype)
    path, labels_path = Path(folder) / f"{name}-tokens-{key}.npy", Path(folder) / f"{name}-tokens-{key}-labels.npy"
    hit = _load_tokens(path, labels_path, cfg, data, dtype)
    if hit is not None:
        return hit, 0.0
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        labels, secs = _extract_tokens(tmp, params, cfg, data, stop, dtype, xp, batch_size, f"tokens ({name})", quiet)
        atomic_write(labels_path, lambda f: np.save(f, labels))
        os.replace(tmp, path)  # last: a whole token file is always a finished one
    except OSError as e:
        raise TinyViTError(f"cannot cache the tokens in {path}: {describe_os_error(e, about=path)}; partial mode "
                           f"trains from this cache: give --cache-dir DIR on a disk with room for it") from None
    finally:
        tmp.unlink(missing_ok=True)
    return TokenDataset(np.load(path, mmap_mode="r", allow_pickle=False)[:len(labels)], labels), secs


def _extract_tokens(file, params, cfg, data, stop, dtype, xp, batch_size, desc, quiet):
    """Write the tokens entering block `stop` into a new .npy at file -> (their labels, seconds)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    T = cfg.num_patches + cfg.num_prefix_tokens
    out = np.lib.format.open_memmap(file, mode="w+", dtype=np.dtype(dtype), shape=(len(data.labels), T, cfg.dim))
    labels, n, t0 = [], 0, time.perf_counter()
    bar = Progress(len(data.labels), desc, unit="img", disable=quiet)
    for x, y in data.batches(batch_size, xp, shuffle=False):
        t = to_numpy(vit_tokens(params, x, cfg, stop))
        out[n:n + len(t)] = t  # cast to the cache's dtype as it is written
        labels.append(to_numpy(y))
        n += len(t)
        bar.update(len(t), img_s=f"{n / (time.perf_counter() - t0):.1f}")
    bar.close()
    out.flush()
    del out
    if not n:
        raise TinyViTError(f"{desc}: no image could be read")
    return np.concatenate(labels).astype(np.int64), time.perf_counter() - t0
