"""CIFAR-10 file formats: binary batches, the official tar.gz, and the python pickles (restricted)."""
import gzip
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import TinyViTError
from .download import _DATA_HINT, fetch

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
RECORD_BYTES = 3073  # 1 label byte + 3 * 32 * 32 pixel bytes
RECORDS_PER_BATCH = 10000  # every official batch file holds 10000 records (tests shrink this)
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
BIN_DIR = "cifar-10-batches-bin"
PY_DIR = "cifar-10-batches-py"
TAR_NAME = "cifar-10-binary.tar.gz"
TAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
TAR_URLS = ["https://www.cs.toronto.edu/~kriz/" + TAR_NAME]
_READ_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError)


def batch_names(split):
    """The batch file stems for 'train' or 'test'."""
    if split not in ("train", "test"):
        raise TinyViTError(f"unknown CIFAR-10 split {split!r}: choose 'train' or 'test'")
    return TRAIN_BATCHES if split == "train" else TEST_BATCHES


def read_maybe_gz(path):
    """All bytes of path, gunzipped when the name ends in .gz."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except _READ_ERRORS as e:
        raise TinyViTError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def parse_records(data, name):
    """uint8 images (N, 3, 32, 32) and int64 labels (N,) from one binary batch's bytes."""
    n_bytes = len(data)
    if n_bytes == 0:
        raise TinyViTError(f"{name}: empty file, expected {RECORDS_PER_BATCH} CIFAR-10 records")
    if n_bytes % RECORD_BYTES:
        raise TinyViTError(f"{name}: {n_bytes} bytes is not a multiple of the {RECORD_BYTES}-byte "
                           f"CIFAR-10 record (truncated or not a CIFAR-10 batch)")
    n = n_bytes // RECORD_BYTES
    if n != RECORDS_PER_BATCH:
        raise TinyViTError(f"{name}: {n} records, expected {RECORDS_PER_BATCH}")
    rec = np.frombuffer(data, np.uint8).reshape(n, RECORD_BYTES)  # (N, 3073)
    labels = rec[:, 0].astype(np.int64)
    return rec[:, 1:].reshape(n, 3, 32, 32), _check_labels(labels, name)


def _check_labels(labels, name):
    """labels as int64, or TinyViTError when any is outside 0..9."""
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError, OverflowError):  # ragged or odd lists in an untrusted pickle
        raise TinyViTError(f"{name}: labels must be a 1-d list of integers") from None
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise TinyViTError(f"{name}: labels must be a 1-d list of integers")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels > 9)
    if bad.any():
        i = int(np.argmax(bad))
        raise TinyViTError(f"{name}: label {labels[i]} at record {i} is outside 0..9")
    return labels


def parse_class_names(text, name):
    """Ten class names from batches.meta.txt (one per line, blank lines ignored)."""
    names = [s.strip() for s in text.decode("utf-8", "replace").splitlines() if s.strip()]
    if len(names) != 10:
        raise TinyViTError(f"{name}: expected 10 class names, one per line, found {len(names)}")
    return names


def read_tar(path, split):
    """(batch bytes in order, meta text or None) from cifar-10-binary.tar.gz, read in memory."""
    want = {f"{s}.bin": None for s in batch_names(split)}
    meta = None
    try:
        with tarfile.open(path, "r:gz") as tf:
            for m in tf:  # stream in file order: no backwards seeks in the gzip stream
                base = m.name.rstrip("/").split("/")[-1]
                if not m.isfile() or (base not in want and base != "batches.meta.txt"):
                    continue
                data = tf.extractfile(m).read()
                if base == "batches.meta.txt":
                    meta = data
                else:
                    want[base] = data
    except _READ_ERRORS as e:
        raise TinyViTError(f"{path}: cannot read the tar.gz ({type(e).__name__}: {e})") from None
    missing = [k for k, v in want.items() if v is None]
    if missing:
        raise TinyViTError(f"{path}: no member {BIN_DIR}/{missing[0]} in the archive")
    return [(f"{path}:{k}", v) for k, v in want.items()], meta


# --- python version: pickles read with an allow-list -----------------------------------------
def _numpy_attr(submodule, name):
    """numpy._core.<submodule>.<name> (NumPy 2) or numpy.core.<submodule>.<name> (NumPy 1)."""
    core = getattr(np, "_core", None)
    if core is None or not hasattr(core, submodule):
        core = np.core
    return getattr(getattr(core, submodule), name)


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode as Python 3 protocol-2 pickles use it for bytes, latin-1 only."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise TinyViTError(f"pickle asks for _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed():
    """The only globals a CIFAR-10 pickle may load: what rebuilds a numpy array."""
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): _latin1_encode}
    for pkg in ("numpy.core", "numpy._core"):
        table[(f"{pkg}.multiarray", "_reconstruct")] = _numpy_attr("multiarray", "_reconstruct")
        table[(f"{pkg}.numeric", "_frombuffer")] = _numpy_attr("numeric", "_frombuffer")
    return table


class RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001
    """Unpickler that refuses every global except those needed to rebuild numpy arrays.

    The pure-Python unpickler: its memo is a dict, where the C one allocates (and zeroes) a table
    as long as the largest memo index in the file, gigabytes for a forged PUT opcode."""

    def __init__(self, file, name):
        super().__init__(file, encoding="bytes")
        self.name = name
        self.table = _allowed()

    def find_class(self, module, name):
        """Return an allow-listed global, else raise TinyViTError."""
        obj = self.table.get((module, name))
        if obj is None:
            raise TinyViTError(f"{self.name}: pickle refers to {module}.{name}, which is not "
                               f"allowed in a CIFAR-10 batch (possibly malicious file)")
        return obj


def load_pickle(path):
    """The object in an untrusted CIFAR-10 pickle, via RestrictedUnpickler."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TinyViTError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise TinyViTError(f"{path}: empty file, expected a CIFAR-10 pickle")
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except TinyViTError:
        raise
    except Exception as e:  # noqa: BLE001 (untrusted bytes): any unpickling failure is a bad file
        msg = " ".join(str(e).split())  # one line: some pickle errors span two
        raise TinyViTError(f"{path}: not a readable CIFAR-10 pickle ({type(e).__name__}: {msg})") from None
    if not isinstance(obj, dict):
        raise TinyViTError(f"{path}: expected a dict in the pickle, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def parse_py_batch(path):
    """uint8 images (N, 3, 32, 32) and int64 labels from one python-version batch pickle."""
    d = load_pickle(path)
    x, labels = d.get("data"), d.get("labels")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise TinyViTError(f"{path}: 'data' must be a uint8 array (N, 3072), got {got}")
    if x.shape[0] != RECORDS_PER_BATCH:
        raise TinyViTError(f"{path}: {x.shape[0]} images, expected {RECORDS_PER_BATCH}")
    if not isinstance(labels, (list, tuple, np.ndarray)) or len(labels) != x.shape[0]:
        raise TinyViTError(f"{path}: 'labels' missing or not one per image")
    return x.reshape(-1, 3, 32, 32), _check_labels(labels, str(path))


def parse_py_meta(path):
    """Ten class names from the python version's batches.meta pickle."""
    names = load_pickle(path).get("label_names")
    if not isinstance(names, list) or len(names) != 10 or \
            not all(isinstance(s, (bytes, str)) for s in names):
        raise TinyViTError(f"{path}: 'label_names' must be a list of 10 strings")
    return [s.decode("utf-8", "replace") if isinstance(s, bytes) else s for s in names]
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)  # train set, per channel (R, G, B)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)


# --- CIFAR-10 -----------------------------------------------------------------------------------
def load_cifar10(root, split="train", download=True, limit=None):
    """CIFAR-10 (images uint8 (N, 3, 32, 32), labels int64 (N,), class names) from <root>/cifar10/.

    Sources, first found wins: cifar-10-batches-bin/*.bin[.gz], cifar-10-binary.tar.gz,
    cifar-10-batches-py/ (pickles, read with an allow-list); else download the binary tar.gz.
    limit=N reads only the binary batches that hold the first N images (and needs only those)."""
    stems = batch_names(split)
    if limit is not None:
        stems = stems[:max(1, -(-int(limit) // RECORDS_PER_BATCH))]
    folder = Path(root) / "cifar10"
    bin_dir, tar_path, py_dir = folder / BIN_DIR, folder / TAR_NAME, folder / PY_DIR
    bins = [next((p for p in (bin_dir / f"{s}.bin", bin_dir / f"{s}.bin.gz") if p.is_file()), None)
            for s in stems]
    if all(bins):
        meta = bin_dir / "batches.meta.txt"
        names = parse_class_names(meta.read_bytes(), meta) if meta.is_file() else None
        return _stack(((p, read_maybe_gz(p)) for p in bins), len(stems)) + (names or CIFAR10_CLASSES,)
    if not tar_path.is_file() and not all((py_dir / s).is_file() for s in stems):
        listed = ", ".join(f"{s}.bin" for s in stems)
        hint = (f"put {BIN_DIR}/{{{listed}}} (each .bin or .bin.gz, plus batches.meta.txt), "
                f"or {TAR_NAME}, in {folder}, {_DATA_HINT} cifar10/")
        if not download:
            raise TinyViTError(f"CIFAR-10 {split} files missing; {hint}")
        fetch(TAR_URLS, tar_path, TAR_MD5, hint)
    if tar_path.is_file():
        batches, meta = read_tar(tar_path, split)
        names = parse_class_names(meta, f"{tar_path}:batches.meta.txt") if meta else None
        return _stack(batches[:len(stems)], len(stems)) + (names or CIFAR10_CLASSES,)
    images = np.empty((len(stems) * RECORDS_PER_BATCH, 3, 32, 32), np.uint8)
    labels = np.empty(len(images), np.int64)
    for i, s in enumerate(stems):
        sl = slice(i * RECORDS_PER_BATCH, (i + 1) * RECORDS_PER_BATCH)
        images[sl], labels[sl] = parse_py_batch(py_dir / s)
    meta = py_dir / "batches.meta"
    return images, labels, parse_py_meta(meta) if meta.is_file() else list(CIFAR10_CLASSES)


def _stack(batches, n_batches):
    """Parse (name, bytes) binary batches into one preallocated (images, labels) pair."""
    r = RECORDS_PER_BATCH
    images = np.empty((n_batches * r, 3, 32, 32), np.uint8)
    labels = np.empty(n_batches * r, np.int64)
    for i, (name, data) in enumerate(batches):
        images[i * r:(i + 1) * r], labels[i * r:(i + 1) * r] = parse_records(data, name)
    return images, labels
