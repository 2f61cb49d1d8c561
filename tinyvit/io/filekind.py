"""What a file holds, told by its first bytes (its suffix only when they say nothing), so a loader can
name a file of the wrong kind instead of reporting it as a corrupt one of its own; what a folder holds
(a run, a timm or HF hub folder); the key names a weights file holds, read without its tensors."""
import json
import os
import re
import zipfile
from pathlib import Path

from ..errors import TinyViTError, describe_os_error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".ico")
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_SUFFIXES = {".npz": "npz", ".safetensors": "safetensors", ".pth": "torch", ".pt": "torch", ".bin": "torch",
             ".ckpt": "torch"}
NAMES = {"tinyvit": "a tinyvit checkpoint", "npz": "a NumPy .npz archive", "safetensors": "a safetensors file",
         "torch": "a torch .pth file", "image": "an image"}


def head(path, n=16):
    """The first n bytes of a file; a file the system will not let us read is a TinyViTError naming
    the cause (a permission, not a corrupt file)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise TinyViTError(describe_os_error(e)) from None


def file_kind(path):
    """'tinyvit' (a .npz with tinyvit's metadata record), 'npz', 'safetensors', 'torch' (torch.save's
    zip; a legacy pickle by its suffix), 'image', or None when neither the bytes nor the suffix tell."""
    path, b = Path(path), head(path)
    if b.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except Exception:  # noqa: BLE001 (untrusted bytes): not a readable zip, so the suffix decides
            names = None
        if names is not None:
            if any(re.fullmatch(r"[^/]+/data\.pkl", n) for n in names):
                return "torch"
            return "tinyvit" if "__meta__.npy" in names else "npz"
    size = path.stat().st_size if path.is_file() else 0
    if len(b) > 8 and b[8:9] == b"{" and int.from_bytes(b[:8], "little") <= size - 8:  # header length, JSON
        return "safetensors"
    if b.startswith(_IMAGE_MAGIC) or (b[:4] == b"RIFF" and b[8:12] == b"WEBP"):
        return "image"
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else _SUFFIXES.get(suffix)


def folder_kind(path):
    """'run' (a training run's model.npz or checkpoint.npz), 'timm' (a timm hub folder's config.json),
    'hf' (an HF one's, with model_type), or None."""
    path = Path(path)
    if any((path / f).is_file() for f in ("model.npz", "checkpoint.npz")):
        return "run"
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(c, dict):
        return None
    return "hf" if "model_type" in c else "timm" if "architecture" in c or "pretrained_cfg" in c else None


def key_names(path, kind):
    """The tensor names of an .npz (its members) or a .safetensors file (its header), without reading
    the tensors; [] when they cannot be read."""
    try:
        if kind == "npz":
            with zipfile.ZipFile(path) as z:
                return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        if kind == "safetensors":
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(min(n, 100 * 2 ** 20)))
            return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    except Exception:  # noqa: BLE001 (untrusted bytes): the names are only for a message
        return []
    return []


def check_convert(src, out):
    """convert_weights.py's paths: a tinyvit checkpoint needs no conversion, --out is a .npz (a tinyvit
    checkpoint under any other name would mislead), and not the source itself; one line each."""
    src, out = Path(src), Path(out)
    if src.is_file() and file_kind(src) == "tinyvit":
        raise TinyViTError(f"{src}: is already a tinyvit checkpoint: predict.py, evaluate.py and finetune.py "
                           f"--weights take it as it is; for timm, HF or ONNX files run python "
                           f"scripts/export_weights.py {src} --to timm|hf|onnx --out OUT")
    if out.suffix.lower() != ".npz":
        raise TinyViTError(f"{out}: convert_weights.py writes a tinyvit checkpoint (.npz): give --out a name ending "
                           f"in .npz (a .safetensors for timm: scripts/export_weights.py CHECKPOINT --to timm)")
    if out.exists() and src.exists() and os.path.samefile(out, src):
        raise TinyViTError(f"{out}: is the source being converted; choose another --out")
