"""Which images a prediction reads: image files, folders (recursive, the extensions the folder dataset
reads, hidden files and folders skipped as it skips them) and text files listing images, one per
line; and their decoding on threads, a batch ahead."""
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

from ..errors import TinyViTError
from .folders import EXTENSIONS, visible_files

LISTS = frozenset({".txt", ".lst", ".list"})  # a text file of image paths, one per line


def _listed(path):
    """The image paths a list file names (blank lines and # comments skipped; relative to the list's
    folder); a file that lists nothing, or no file that exists, is not a list of images."""
    try:
        lines = Path(path).read_text().splitlines()
    except UnicodeDecodeError:
        raise TinyViTError(f"{path}: not a list of images (not a text file); a list holds one image path "
                           f"per line") from None
    except OSError as e:
        raise TinyViTError(f"{path}: cannot read the image list ({e.strerror or e})") from None
    entries = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    found = [Path(path).parent / s for s in entries]
    if not entries:
        raise TinyViTError(f"{path}: lists no images (empty, or only blank lines and # comments)")
    if not any(f.is_file() for f in found):
        raise TinyViTError(f"{path}: not a list of images: none of its {len(entries)} lines names a file "
                           f"(line 1: {entries[0][:60]!r}); a list holds one image path per line, relative to "
                           f"its own folder")
    return found


def expand(paths):
    """Every image the PATH arguments name, in order: a file as it is, a folder's images sorted by path
    (hidden files and folders skipped), a list file's lines. A PATH that does not exist, a folder
    without images or a list naming no file is a TinyViTError."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in visible_files(p) if f.suffix.lower() in EXTENSIONS]
            if not found:
                raise TinyViTError(f"{p}: a folder without images ({', '.join(sorted(EXTENSIONS))})")
            out.extend(found)
        elif p.suffix.lower() in LISTS and p.is_file():
            out.extend(_listed(p))
        elif p.exists() or p.is_symlink():
            out.append(p)
        else:
            raise TinyViTError(f"{p}: no such file or folder")
    return [str(p) for p in out]


def decoded_batches(paths, decode, batch_size, workers=2):
    """(paths, results) per batch of `paths`, each file decoded by decode(path) -> value, or the
    TinyViTError it raised, on `workers` threads; the next batch decodes while the caller uses this one
    (Pillow releases the GIL while it decodes), so memory holds two batches at most."""
    def one(p):
        try:
            return decode(p)
        except TinyViTError as e:
            return e

    chunks = iter([paths[i:i + batch_size] for i in range(0, len(paths), batch_size)])
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = deque()
        for chunk in islice(chunks, 2):
            pending.append((chunk, [pool.submit(one, p) for p in chunk]))
        while pending:
            chunk, futures = pending.popleft()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append((nxt, [pool.submit(one, p) for p in nxt]))
            yield chunk, [f.result() for f in futures]
