"""What a file holds, told by its first bytes (its suffix only when they say nothing), so a loader can
name a file of the wrong kind instead of reporting it as a corrupt one of its own."""
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
