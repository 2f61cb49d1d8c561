"""The one exception type tinyvit raises for bad input (files, arrays, settings), and how faults from
the operating system are put into one line."""
import errno


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


_OS_HINTS = {  # what a user can do about each fault, after the system's own words
    errno.ENOSPC: "the disk is full: free space, or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space, or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "no permission: check the owner and mode of the path, or write elsewhere",
    errno.EPERM: "not permitted: check the path's owner, mode and attributes",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is in the way",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
    errno.EMFILE: "too many open files (ulimit -n)",
    errno.ENOENT: "it does not exist (was it moved or deleted?)",
}


def describe_os_error(e: OSError, about=None) -> str:
    """One line for an OSError: the path (unless it is `about`, named already), the system's words,
    and what to do about it."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None and str(f) != str(about))
    what = e.strerror or str(e) or type(e).__name__
    hint = _OS_HINTS.get(e.errno)
    return f"{where + ': ' if where else ''}{what}{f' ({hint})' if hint else ''}"
