"""An embedding folder (scripts/embed.py writes it, knn.py and search.py read it): embeddings.npy
(float32 (N, D)), layer<i>.npy beside it for intermediate blocks, images.csv (index, image, label) and
meta.json. Each .npy grows memory-mapped under a temporary name and takes its final name only when
complete."""
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from ..errors import TinyViTError
from .files import atomic_write

CSV_COLUMNS = ["index", "image", "label"]


def _shrink(path, rows):
    """Cut a float32 (N, D) .npy file to its first `rows` rows in place (header rewritten; the file
    copied when the shorter header cannot keep the data's offset)."""
    m = npy.open_memmap(path, mode="r")
    offset, d = m.offset, m.shape[1]
    del m
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (rows, d)})
    if len(buf.getvalue()) == offset:
        with open(path, "r+b") as f:
            f.write(buf.getvalue())
            f.truncate(offset + rows * d * 4)
        return
    src = npy.open_memmap(path, mode="r")
    tmp = Path(str(path) + ".cut")
    dst = npy.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, d))
    for a in range(0, rows, 1 << 14):
        dst[a:a + (1 << 14)] = src[a:a + (1 << 14)]
    dst.flush()
    del src, dst
    os.replace(tmp, path)


class EmbeddingWriter:
    """Rows of one or more float32 (N, D) arrays, appended batch by batch into .npy files memory-mapped
    under temporary names; finish() trims them to the rows written and renames them, abort() removes them."""

    def __init__(self, folder, names, n, d):
        self.folder, self.n, self.rows = Path(folder), n, 0
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tmp = {name: self.folder / f".{name}.npy.partial" for name in names}
        self.maps = {name: npy.open_memmap(p, mode="w+", dtype=np.float32, shape=(max(n, 1), d))
                     for name, p in self.tmp.items()}

    def add(self, feats: dict):
        """Append one batch: {name: (B, D) array on the host}."""
        b = len(next(iter(feats.values())))
        for name, x in feats.items():
            self.maps[name][self.rows:self.rows + b] = x
        self.rows += b

    def finish(self):
        """Flush, trim to the rows written, rename each to <name>.npy; -> the final paths."""
        for m in self.maps.values():
            m.flush()
        self.maps = {}
        out = []
        for name, p in self.tmp.items():
            if self.rows < max(self.n, 1):
                _shrink(p, self.rows)
            final = self.folder / f"{name}.npy"
            os.replace(p, final)
            out.append(final)
        self.tmp = {}
        return out

    def abort(self):
        """Remove the temporary files (a cut run leaves nothing that looks finished)."""
        self.maps = {}
        for p in self.tmp.values():
            p.unlink(missing_ok=True)
        self.tmp = {}


def write_images_csv(path, rows):
    """images.csv: index, image, label (label empty where the images have no class folder)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for i, (image, label) in enumerate(rows):
        w.writerow([i, image, label or ""])
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_meta(path, meta):
    """meta.json, atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))


def read_embed_dir(folder, name="embeddings"):
    """(embeddings (N, D) float32, memory-mapped; [(image, label)] of images.csv; meta.json's dict) of
    an embed.py folder; name picks layer<i> instead. A missing or inconsistent file is a TinyViTError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TinyViTError(f"{folder}: no such folder (expected the --out folder of embed.py)")
    path = folder / f"{name}.npy"
    if not path.is_file():
        partial = (folder / f".{name}.npy.partial").exists()
        raise TinyViTError(f"{path}: missing" + (" (an embed.py run was cut before it finished: run it again)"
                                                 if partial else " (expected the --out folder of embed.py)"))
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise TinyViTError(f"{path}: not a readable .npy file ({e})") from None
    if x.ndim != 2 or x.dtype != np.float32:
        raise TinyViTError(f"{path}: expected float32 (N, D) embeddings, found {x.dtype} {x.shape}")
    rows = _read_csv(folder / "images.csv")
    if len(rows) != len(x):
        raise TinyViTError(f"{folder / 'images.csv'}: {len(rows)} rows for the {len(x)} embeddings of {path}")
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise TinyViTError(f"{folder / 'meta.json'}: missing or not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise TinyViTError(f"{folder / 'meta.json'}: not a JSON object")
    return x, rows, meta


def _read_csv(path):
    """[(image, label)] of images.csv, its columns checked."""
    try:
        with open(path, newline="") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TinyViTError(f"{path}: missing or unreadable ({e})") from None
    if not table or table[0] != CSV_COLUMNS:
        raise TinyViTError(f"{path}: expected the columns {','.join(CSV_COLUMNS)}")
    if any(len(r) != 3 for r in table[1:]):
        raise TinyViTError(f"{path}: every row needs 3 columns ({','.join(CSV_COLUMNS)})")
    return [(r[1], r[2]) for r in table[1:]]
