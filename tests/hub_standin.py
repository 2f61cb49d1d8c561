"""A Hugging Face Hub stand-in on 127.0.0.1 for the tests: repositories read from local folders, served with
the endpoints and headers huggingface_hub's model_info, hf_hub_download and snapshot_download use.

- GET /api/models/{repo}/revision/{rev}: the repository's id, commit sha and file list (siblings);
- GET /api/models/{repo}/tree/{rev}: the file list with sizes and LFS sha256s (snapshot_download);
- HEAD/GET /{repo}/resolve/{rev}/{file}: small files answered directly (ETag = git blob sha1, Content-Length,
  X-Repo-Commit); LFS files (weights) redirected to a second origin, the "CDN", with X-Linked-Etag (sha256)
  and X-Linked-Size, as the Hub does; the CDN serves byte ranges (206, Content-Range);
- errors with X-Error-Code: RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo (a gated repository
  answers a request without its token with 401).
Faults: `cut[file] = n` ends every transfer of that file after its first n bytes (the connection dropped);
`cut_once[file] = n` does so once. `requests` logs (method, path, Range header). Nothing listens beyond
127.0.0.1."""
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".npz")


def _git_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    """One repository: files (name -> bytes) at one commit, named by branches and tags (revisions)."""

    def __init__(self, files, revisions=("main",), gated=False):
        self.files = dict(files)
        self.sha = hashlib.sha1(json.dumps(sorted((k, _git_sha1(v)) for k, v in self.files.items())).encode()).hexdigest()
        self.revisions, self.gated = set(revisions), gated

    def knows(self, rev):
        return rev in self.revisions or rev == self.sha

    def lfs(self, name):
        return name.endswith(LFS_SUFFIXES)


class HubStandin:
    """Start with `with HubStandin() as hub:`; hub.add(repo_id, folder) serves a folder; hub.endpoint is HF_ENDPOINT."""

    def __init__(self, token="hf_standin_token"):
        self.repos, self.blobs, self.cut, self.cut_once, self.requests = {}, {}, {}, {}, []
        self.token = token
        self._servers = []

    def add(self, repo_id, folder, **kw):
        """Serve every file of folder (top level) as repository repo_id -> its Repo."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        repo = self.repos[repo_id] = Repo(files, **kw)
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return repo

    def __enter__(self):
        for role in ("hub", "cdn"):
            srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, role))
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(srv)
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        """Stop listening (a later connection is refused)."""
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers = []

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self):
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"


def _handler(hub, role):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body):
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            path = self.path.split("?")[0]
            if role == "cdn":
                return self._blob(path, body)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
            if m:
                return self._api(m.group(1), m.group(2), m.group(3))
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._resolve(*m.groups(), body=body)
            self._error(404, "RepoNotFound")

        def _error(self, code, error_code, commit=None):
            self.send_response(code)
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", error_code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _repo(self, repo_id, rev):
            """The Repo when the request may read it (else the error is sent and None returned)."""
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound")
            if not repo.knows(rev):
                return self._error(404, "RevisionNotFound")
            return repo

        def _json(self, obj):
            data = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _api(self, repo_id, what, rev):
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if what == "revision":
                return self._json({"id": repo_id, "sha": repo.sha, "private": False, "gated": "manual" if repo.gated else False,
                                   "siblings": [{"rfilename": f} for f in sorted(repo.files)]})
            self._json([{"type": "file", "path": f, "size": len(d), "oid": _git_sha1(d),
                         **({"lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                            if repo.lfs(f) else {})} for f, d in sorted(repo.files.items())])

        def _resolve(self, repo_id, rev, name, body):
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._error(401, "GatedRepo")
            data = repo.files.get(name)
            if data is None:
                return self._error(404, "EntryNotFound", repo.sha)
            if repo.lfs(name):
                sha = hashlib.sha256(data).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn}/blobs/{sha}?name={name}")
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("ETag", f'"{_git_sha1(data)}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("ETag", f'"{_git_sha1(data)}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _blob(self, path, body):
            m = re.fullmatch(r"/blobs/([0-9a-f]{64})", path)
            data = hub.blobs.get(m.group(1)) if m else None
            if data is None:
                return self._error(404, "EntryNotFound")
            name = self.path.partition("?name=")[2]
            start = 0
            r = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if r and int(r.group(1)) < len(data):
                start = int(r.group(1))
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            stop = hub.cut.get(name, hub.cut_once.pop(name, None))
            if stop is None:
                self.wfile.write(data[start:])
                return
            self.wfile.write(data[start:max(start, stop)])  # then the connection drops
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

    return Handler
