"""Downloads with md5 checks, atomic placement and a progress line; where datasets live (the data root)."""
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

from ..errors import TinyViTError

_NET_ERRORS = (OSError, http.client.HTTPException, ValueError)  # URLError/timeouts are OSError
_DATA_HINT = "or point --data-dir / TINYVIT_DATA at the folder that holds"


def data_root(data_dir=None) -> Path:
    """data_dir if given, else $TINYVIT_DATA, else $XDG_CACHE_HOME/tinyvit or ~/.cache/tinyvit."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("TINYVIT_DATA"):
        return Path(os.environ["TINYVIT_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "tinyvit"


# --- download -----------------------------------------------------------------------------------
def _progress(done, total, name):
    """One stderr progress line, rewritten in place."""
    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
    sys.stderr.write(f"\rdownloading {name}: {size}")
    sys.stderr.flush()


def _download_one(url, dest, md5):
    """Stream url into a temp file beside dest, check its md5, then os.replace it into place."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    shown = None
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=30) as resp:
            headers = getattr(resp, "headers", None)
            total = int(headers.get("Content-Length") or 0) if headers is not None else 0
            done = 0
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if done * 20 // max(total, 1) != shown or not total:
                    shown = done * 20 // max(total, 1)
                    _progress(done, total, dest.name)
        if h.hexdigest() != md5:
            raise ValueError(f"md5 mismatch from {url}: got {h.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        if shown is not None:
            sys.stderr.write("\n")  # end the progress line, also when the download broke off
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(urls, dest, md5, hint):
    """Download dest (from the first mirror in urls that works, md5-checked, atomically); return it.

    On failure raise one TinyViTError: which mirrors failed and `hint` (what to put where)."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TinyViTError(f"cannot create {dest.parent} ({e.strerror or e}); {hint}") from None
    reasons = []
    for base in urls:
        url = base if base.endswith(dest.name) else base + dest.name
        try:
            _download_one(url, dest, md5)
            return dest
        except _NET_ERRORS as e:
            reasons.append(f"{url}: {getattr(e, 'reason', None) or e}")
    raise TinyViTError(f"cannot download {dest.name} ({'; '.join(reasons)}); {hint}")
