"""Files written so a crash or a full disk never leaves half of one: atomic, durable writes, and
output folders proved writable before any work."""
import os
import tempfile
import time
from pathlib import Path

from ..errors import TinyViTError, describe_os_error


def atomic_write(path, write_fn):
    """Write a file durably via write_fn(file_object): into a temp file beside it, fsync, os.replace,
    then fsync the folder (as databases do), so a power cut after the return cannot lose it.

    On any failure the temp file is removed and the old file is untouched; an OSError names path.
    Test hook: with $TINYVIT_TEST_SLOW_WRITE set to N, sleep N seconds between writing the temp
    file (.<name>.<random>.tmp) and the rename, so tests can kill a process mid-write."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get("TINYVIT_TEST_SLOW_WRITE"):
            time.sleep(float(os.environ["TINYVIT_TEST_SLOW_WRITE"]))
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new, never half
        tmp = None
        _fsync_folder(path.parent)  # the rename itself reaches the disk
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # e.g. a full disk inside numpy's writer
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def _fsync_folder(folder):
    """fsync a folder's entry list (POSIX; elsewhere a no-op)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_out_dir(path, what="output folder"):
    """Create the folder and prove a file can be written in it, before any work is done; a wrong
    --out then costs seconds, not an epoch. One TinyViTError naming the folder and the cause."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tinyvit-probe.", dir=path)
        try:
            os.write(fd, b"\0" * 4096)  # a full disk refuses data, not an empty file
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise TinyViTError(f"cannot write in {what} {path}: {describe_os_error(e, about=path)}") from None
    return path
