"""Weights by name: a Hugging Face Hub repository (`hf-hub:ORG/REPO`, `timm/NAME`, or `ORG/REPO` where no
local path of that name exists, each with an optional `@REVISION`) downloaded into huggingface_hub's cache,
or a bare file name found in $TINYVIT_WEIGHTS. Only what conversion reads is downloaded: config.json,
preprocessor_config.json and one set of weights (safetensors, sharded with their index, else a .bin).

huggingface_hub is imported only when a name is fetched; its cache, progress bars and settings apply
(HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT). Every failure is one TinyViTError line.
"""
import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path

from ..errors import TinyViTError
from .files import atomic_write

PREFIX = "hf-hub:"
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,199}")
WEIGHT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin", ".ckpt")
SIDE_FILES = ("config.json", "preprocessor_config.json")
INDEX = "model.safetensors.index.json"
# the weights tinyvit reads, in the order it prefers them: safetensors first, a pickled .bin only where nothing else
WEIGHTS = ("model.safetensors", INDEX, "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
ENV_WEIGHTS = "TINYVIT_WEIGHTS"
_MAX_SHARDS = 1000


def hub_name(src):
    """(repo, revision or None) when src names a Hub repository, else None (a local path). `hf-hub:` always
    names one; ORG/REPO only when no such path exists, its first part is no local folder and it does not
    end like a weights file."""
    s = str(src)
    if s.startswith(PREFIX):
        repo, _, rev = s[len(PREFIX):].partition("@")
        if not _REPO.fullmatch(repo) or (rev and not _REVISION.fullmatch(rev)):
            raise TinyViTError(f"{s}: not a Hub name (hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION)")
        return repo, rev or None
    repo, _, rev = s.partition("@")
    if not _REPO.fullmatch(repo) or (rev and not _REVISION.fullmatch(rev)) or Path(s).exists() \
            or Path(repo.split("/")[0]).exists() or repo.lower().endswith(WEIGHT_SUFFIXES):
        return None
    return repo, rev or None


def find_local(src):
    """src itself, or a bare file name absent here but present in $TINYVIT_WEIGHTS (said in one line)."""
    p = Path(src)
    folder = os.environ.get(ENV_WEIGHTS)
    if p.exists() or not folder or len(p.parts) != 1:
        return p
    there = Path(folder).expanduser() / p
    if there.exists():
        print(f"note: {p} is not in the current folder; reading {there} (${ENV_WEIGHTS})", file=sys.stderr)
        return there
    return p


def resolve(src):
    """(a local path to read, provenance dict or None): a Hub name fetched into the cache, else find_local."""
    name = hub_name(src)
    if name is None:
        return find_local(src), None
    return fetch(*name)


# --- huggingface_hub ---------------------------------------------------------------------------------


def _hub():
    """huggingface_hub, imported now (a pip hint when it is missing)."""
    try:
        import huggingface_hub
    except ImportError:
        raise TinyViTError("weights by Hub name need huggingface_hub: pip install huggingface_hub "
                           "(or give a downloaded folder or weights file)") from None
    return huggingface_hub


def _settings():
    """(endpoint, cache folder, offline) as huggingface_hub reads them, read now (not at its import)."""
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return endpoint, Path(os.path.expandvars(cache)).expanduser(), offline


def choose(files):
    """The files to download from a repository's file list: the configs it has and one set of weights."""
    files = set(files)
    side = [f for f in SIDE_FILES if f in files]
    for w in WEIGHTS:
        if w in files:
            return side + [w]
    return None


def _why(e):
    """An exception's first line, short."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def _quiet():
    """huggingface_hub's retry warnings off (the failure is said in one line); its own verbosity setting wins."""
    if not os.environ.get("HF_HUB_VERBOSITY"):
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def _refused(e, hub, label, endpoint):
    """The one line for an error of the Hub's (None when it is not one: a network fault)."""
    err = hub.errors
    if isinstance(e, err.GatedRepoError):
        return (f"{label}: is a gated repository: accept its terms on {endpoint}/{label.split('@')[0]}, then set "
                f"HF_TOKEN to a token of that account (or run `hf auth login`)")
    if isinstance(e, err.RevisionNotFoundError):
        return f"{label}: the repository has no revision {label.partition('@')[2] or 'main'!r} (a branch, tag or commit)"
    if isinstance(e, err.RepositoryNotFoundError):
        return (f"{label}: no such repository on {endpoint} (a private one needs HF_TOKEN); a local path "
                f"of that name does not exist either")
    if isinstance(e, err.HfHubHTTPError) and getattr(e, "response", None) is not None:
        code = e.response.status_code
        if code < 500 and code not in (408, 429):
            return f"{label}: the Hub at {endpoint} refused the request (HTTP {code}: {_why(e)})"
    return None


def fetch(repo, revision=None):
    """Download what conversion reads from a Hub repository -> (its snapshot folder, provenance)."""
    hub = _hub()
    endpoint, cache, offline = _settings()
    rev = revision or "main"
    label = f"{repo}@{revision}" if revision else repo
    if offline:
        return _cached(hub, repo, rev, label, cache, "HF_HUB_OFFLINE is set")
    _quiet()
    try:
        info = hub.HfApi(endpoint=endpoint).model_info(repo, revision=rev)
    except Exception as e:  # noqa: BLE001 (the network and the Hub's answers): refused, else unreachable
        line = _refused(e, hub, label, endpoint)
        if line:
            raise TinyViTError(line) from None
        return _cached(hub, repo, rev, label, cache, f"the Hub at {endpoint} cannot be reached ({_why(e)})")
    names = [s.rfilename for s in info.siblings or []]
    files = choose(names)
    if files is None:
        raise TinyViTError(f"{label}: holds no weights tinyvit reads (looked for {', '.join(WEIGHTS)}; it has "
                           f"{', '.join(sorted(names)[:6]) or 'no files'}{'...' if len(names) > 6 else ''})")
    files = _with_shards(hub, repo, info.sha, files, cache, endpoint, label, names)
    for f in files:
        _download(hub, repo, f, info.sha, cache, endpoint, label)
    _remember(cache, repo, rev, info.sha)
    return _snapshot(cache, repo, info.sha, rev, files)


def _remember(cache, repo, rev, sha):
    """refs/REV -> the commit, as huggingface_hub records a branch or tag, so an offline run finds it."""
    ref = _storage(cache, repo) / "refs" / rev
    try:
        if rev != sha and not (ref.is_file() and ref.read_text() == sha):
            atomic_write(ref, lambda f: f.write(sha.encode()))
    except OSError:  # a read-only cache: the download is there, only an offline run will not find it by name
        pass


def _storage(cache, repo):
    """A model repository's folder in huggingface_hub's cache."""
    return cache / f"models--{repo.replace('/', '--')}"


def _download(hub, repo, filename, sha, cache, endpoint, label):
    """One file into the cache (huggingface_hub writes a temporary file and renames it when complete)."""
    try:
        return hub.hf_hub_download(repo, filename, revision=sha, cache_dir=str(cache), endpoint=endpoint)
    except Exception as e:  # noqa: BLE001 (the network, the disk, the Hub's answers): one line each
        line = _refused(e, hub, label, endpoint)
        if line:
            raise TinyViTError(line) from None
        if isinstance(e, OSError) and getattr(e, "errno", None):
            raise  # a full disk, no permission: the script's OSError line
        raise TinyViTError(f"{label}: the download of {filename} failed ({_why(e)}); nothing half-written is kept "
                           f"in {cache}: run again to download it") from None


def _with_shards(hub, repo, sha, files, cache, endpoint, label, names):
    """files with the shards a safetensors index names (the index downloaded first, to read them)."""
    if files[-1] != INDEX:
        return files
    shards = _shards(Path(_download(hub, repo, INDEX, sha, cache, endpoint, label)), label)
    missing = [s for s in shards if s not in names]
    if missing:
        raise TinyViTError(f"{label}: {INDEX} names shards the repository does not hold: {missing[:3]}")
    return files + shards


def _shards(index, label):
    """The shard files a safetensors index names, checked (plain file names, at most _MAX_SHARDS)."""
    try:
        m = json.loads(Path(index).read_text())["weight_map"]
        shards = sorted(set(m.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise TinyViTError(f"{label}: {INDEX} is not a safetensors index ({_why(e)})") from None
    if not shards or len(shards) > _MAX_SHARDS or not all(
            isinstance(s, str) and re.fullmatch(r"[\w.-]+\.safetensors", s) for s in shards):
        raise TinyViTError(f"{label}: {INDEX}'s weight_map names no usable shard files ({str(shards)[:80]})")
    return shards


def _cached(hub, repo, rev, label, cache, why):
    """The snapshot already in the cache for rev (said in one line), or the one-line error naming why not."""
    found = {}
    for f in SIDE_FILES + WEIGHTS:
        p = hub.try_to_load_from_cache(repo, f, cache_dir=str(cache), revision=rev)
        if isinstance(p, str) and os.path.isfile(p):
            found[f] = p
    files = choose(found)
    if files and files[-1] == INDEX:
        try:
            shards = _shards(found[INDEX], label)
            files += shards
            for s in shards:
                p = hub.try_to_load_from_cache(repo, s, cache_dir=str(cache), revision=rev)
                found[s] = p if isinstance(p, str) and os.path.isfile(p) else None
        except TinyViTError:
            files = None
    if not files or not all(found.get(f) for f in files):
        raise TinyViTError(f"{label}: {why}, and the Hugging Face cache ({cache}) holds no complete download of it: "
                           f"run again with the network (HF_HUB_OFFLINE unset), or give a downloaded folder or "
                           f"weights file instead (where the Hub is reachable: hf download {repo} --local-dir DIR)")
    sha = Path(found[files[-1]]).parent.name
    print(f"note: {why}: using {label} from the cache (commit {sha[:12]})", file=sys.stderr)
    return _snapshot(cache, repo, sha, rev, files)


def _snapshot(cache, repo, sha, rev, files):
    """(the snapshot folder, provenance: repository, revision asked, commit, each file's sha256), each
    cached file checked against the sha256 its blob is named by (an LFS file's)."""
    folder = _storage(cache, repo) / "snapshots" / sha
    hashes = {}
    for f in files:
        path = folder / f
        digest = sha256(path)
        blob = Path(os.path.realpath(path)).name
        if re.fullmatch(r"[0-9a-f]{64}", blob) and blob != digest:
            raise TinyViTError(f"{path}: the cached file is corrupt (its sha256 is {digest[:12]}..., the Hub's "
                               f"{blob[:12]}...): delete {os.path.realpath(path)} and run again")
        hashes[f] = digest
    return folder, {"repo": repo, "revision": rev, "commit": sha, "files": hashes}


def sha256(path, chunk=1 << 22):
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
