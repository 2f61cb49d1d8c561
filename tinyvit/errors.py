"""The one exception type tinyvit raises for bad input (files, arrays, settings)."""


class TinyViTError(Exception):
    """Bad input or an unusable setting; the message names the file/thing and what is wrong."""


def input_file(path, what="file"):
    """Path of an existing, non-empty regular file; otherwise one TinyViTError naming it."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise TinyViTError(f"{path}: no such {what}")
    if not path.is_file():
        raise TinyViTError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise TinyViTError(f"{path}: file is empty")
    return path
