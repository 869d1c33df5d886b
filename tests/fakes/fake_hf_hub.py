"""A fake Hugging Face Hub on 127.0.0.1, for huggingface_hub 2.x with HF_ENDPOINT pointing at it.

It answers what lifecycle.sources asks, the way the Hub does:

    GET  /api/models/{org}/{repo}[/revision/{rev}]   model info: `sha` (the commit) and `siblings` (the files)
    HEAD /{org}/{repo}/resolve/{rev}/{file}          X-Repo-Commit, ETag, X-Linked-Etag (the sha256, LFS files),
                                                     X-Linked-Size; a 302 to /cdn/... like the Hub's LFS redirect
    GET  /{org}/{repo}/resolve/{rev}/{file}          the same 302 (or the bytes, `redirect=False`)
    GET  /cdn/{org}/{repo}/{file}                    the bytes: Content-Length, Accept-Ranges, Range -> 206
    GET  /static/{name}                              a plain file (no sha256 published), for MODEL_URL tests

Errors as the Hub sends them: 404 with `X-Error-Code: RepoNotFound` or `EntryNotFound`; a gated repo answers
401 (no token) or 403 (another token) with `X-Error-Code: GatedRepo` on its files. No xet headers, so
huggingface_hub never tries hf_xet. Modes: `corrupt` (the bytes served differ from the advertised sha256),
`interrupt_once(file, after)` (the next GET of that file closes the connection after `after` bytes), and
`chunk_delay` (seconds between 64 KiB chunks: a slow download). Every request is recorded in `requests`.

Run it by hand to serve a real file: `python -m tests.fakes.fake_hf_hub ORG/REPO FILE.gguf [PORT]`.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024


@dataclass
class FakeFile:
    source: bytes | Path
    corrupt: bool = False
    _sha256: str | None = None

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size

    @property
    def sha256(self) -> str:
        """The sha256 the Hub advertises: the true one, even when `corrupt` bytes are served."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            if isinstance(self.source, bytes):
                digest.update(self.source)
            else:
                with self.source.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) as served (the last byte flipped when corrupt)."""
        if isinstance(self.source, bytes):
            data = self.source[start:end]
        else:
            with self.source.open("rb") as fh:
                fh.seek(start)
                data = fh.read(end - start)
        if self.corrupt and data and end == self.size:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        return data


@dataclass
class FakeRepo:
    files: dict[str, FakeFile]
    sha: str = "c0ffee" + "0" * 34
    token: str | None = None  # gated: files need `Authorization: Bearer <token>`


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    static: dict[str, FakeFile] = field(default_factory=dict)
    redirect: bool = True
    chunk_delay: float = 0.0
    requests: list[Seen] = field(default_factory=list)
    _interrupts: dict[str, int] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- set-up -----------------------------------------------------------------------------------------------

    def add_repo(self, repo: str, files: dict[str, bytes | Path], *, token: str | None = None,
                 corrupt: tuple[str, ...] = ()) -> FakeRepo:
        self.repos[repo] = FakeRepo({name: FakeFile(src, corrupt=name in corrupt) for name, src in files.items()},
                                    token=token)
        return self.repos[repo]

    def add_static(self, name: str, source: bytes | Path) -> str:
        """A plain file at /static/<name>; returns its URL."""
        self.static[name] = FakeFile(source)
        return f"{self.url}/static/{name}"

    def interrupt_once(self, file: str, after: int) -> None:
        """The next GET of a path ending in /<file> sends `after` bytes of the body, then drops the connection."""
        self._interrupts[file] = after

    def file_url(self, repo: str, file: str) -> str:
        return f"{self.url}/{repo}/resolve/main/{file}"

    # --- what happened ----------------------------------------------------------------------------------------

    def gets(self, file: str) -> list[Seen]:
        """The GETs that fetched the bytes of `file` (not the redirects)."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + file)
                    and (r.path.startswith(("/cdn/", "/static/")) or not self.redirect)]

    # --- lifetime ---------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")
_INFO = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?")
_CDN = re.compile(r"/cdn/(?P<repo>[^/]+/[^/]+)/(?P<file>.+)")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    # --- routing ----------------------------------------------------------------------------------------------

    def _handle(self, head: bool) -> None:
        self.close_connection = True
        path = unquote(urlsplit(self.path).path)
        with self.hub._lock:
            self.hub.requests.append(Seen(self.command, path, dict(self.headers.items())))
        if match := _INFO.fullmatch(path):
            return self._info(match["repo"])
        if match := _RESOLVE.fullmatch(path):
            return self._resolve(match["repo"], match["file"], head)
        if match := _CDN.fullmatch(path):
            repo = self.hub.repos.get(match["repo"])
            fake = repo.files.get(match["file"]) if repo else None
            if fake is None:
                return self._error(404, "EntryNotFound", "Entry not found")
            return self._bytes(fake, head, match["file"], repo)
        if path.startswith("/static/") and (fake := self.hub.static.get(path.removeprefix("/static/"))):
            return self._bytes(fake, head, path.rsplit("/", 1)[-1], None)
        return self._error(404, None, "Not found")

    def _info(self, name: str) -> None:
        repo = self.hub.repos.get(name)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        body = json.dumps({
            "_id": "x", "id": name, "modelId": name, "sha": repo.sha, "private": False,
            "gated": "manual" if repo.token else False, "disabled": False, "tags": ["gguf"],
            "siblings": [{"rfilename": file} for file in repo.files],
        }).encode()
        self._send(200, {"Content-Type": "application/json"}, body)

    def _authorized(self, repo: FakeRepo) -> bool:
        if repo.token is None:
            return True
        given = self.headers.get("Authorization", "")
        if not given:
            self._error(401, "GatedRepo", "Access to this model is restricted. You must be authenticated.")
            return False
        if given != f"Bearer {repo.token}":
            self._error(403, "GatedRepo", "Access to this model is restricted and you are not in the list.")
            return False
        return True

    def _resolve(self, name: str, file: str, head: bool) -> None:
        repo = self.hub.repos.get(name)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        fake = repo.files.get(file)
        if fake is None:
            return self._error(404, "EntryNotFound", f"{file} does not exist on \"main\"")
        if not self._authorized(repo):
            return None
        if self.hub.redirect:
            headers = {**self._file_headers(fake, repo), "Location": f"{self.hub.url}/cdn/{name}/{file}",
                       "Content-Length": "0"}
            return self._send(302, headers, b"")
        return self._bytes(fake, head, file, repo)

    # --- answers ----------------------------------------------------------------------------------------------

    def _file_headers(self, fake: FakeFile, repo: FakeRepo | None) -> dict[str, str]:
        if repo is None:
            return {}
        return {"X-Repo-Commit": repo.sha, "ETag": f'"{fake.sha256}"', "X-Linked-Etag": f'"{fake.sha256}"',
                "X-Linked-Size": str(fake.size)}

    def _bytes(self, fake: FakeFile, head: bool, file: str, repo: FakeRepo | None) -> None:
        size = fake.size
        start, end, status = 0, size, 200
        headers = {**self._file_headers(fake, repo), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if (wanted := self.headers.get("Range")) and (match := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)):
            start = int(match[1])
            end = min(size, int(match[2]) + 1) if match[2] else size
            if start >= size:
                return self._send(416, {"Content-Range": f"bytes */{size}"}, b"")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        if head:
            return self._send(status, headers, b"")
        cut = self.hub._interrupts.pop(file, None) if not head else None
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        position = start
        while position < end:
            block = fake.read(position, min(end, position + CHUNK))
            if cut is not None and sent + len(block) > cut:
                self.wfile.write(block[: cut - sent])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            try:
                self.wfile.write(block)
            except OSError:
                return None
            sent += len(block)
            position += len(block)
            if self.hub.chunk_delay:
                time.sleep(self.hub.chunk_delay)
        return None

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": message}).encode())

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)


def main(argv: list[str] | None = None) -> int:
    """Serve one real file as ORG/REPO's only file until Ctrl-C (for trying MODEL_REPO by hand)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m tests.fakes.fake_hf_hub ORG/REPO FILE.gguf [PORT]", file=sys.stderr)
        return 2
    path = Path(args[1])
    hub = FakeHub()
    hub.add_repo(args[0], {path.name: path})
    hub.start(int(args[2]) if len(args) == 3 else 0)
    print(f"HF_ENDPOINT={hub.url} MODEL_REPO={args[0]}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
