"""Downloads: pinned artefacts from PyPI (pip, sha256-checked), and plain HTTP(S) files fetched once per volume.

download_file() is the one careful HTTP download: an exclusive lock per target (two processes on one volume never
fetch the same file twice: the second waits, then finds it), a `<name>.partial` file resumed with a Range request
(after a dropped connection or a restart), a free-disk-space check before the first byte, a sha256 check when one
is known, and an atomic rename: nothing half-written ever has the final name. Progress goes to the log (logger
`lifecycle.downloads`) and, when stderr is a terminal, to a progress bar.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the image's llama-server build stage has Python but not requests
    import requests

log = logging.getLogger(__name__)


class ProvisionError(RuntimeError):
    """Something we need could not be fetched or built; str() says what to do."""


class DownloadError(ProvisionError):
    """A download failed; str() names the file and the cause. `status`: the HTTP status, when one came back."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DiskSpaceError(DownloadError):
    pass


class ChecksumError(DownloadError):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes, so two start-ups never fetch or build the same thing twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pip_download(requirement: str, filename: str, sha256: str, dest: Path, *, sdist: bool = False) -> Path:
    """Return dest/filename, downloading `requirement` with pip (no dependencies) when missing or corrupt."""
    target = dest / filename
    if target.is_file() and sha256_of(target) == sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp]
        if sdist:
            # Only this package as source: with ":all:" pip would also build its build tools (CMake, ninja) from
            # source just to read the sdist's metadata, which takes far longer than the llama-server build.
            cmd += ["--no-binary", requirement.split("=", 1)[0].strip()]
        cmd.append(requirement)
        print(f"downloading {requirement} with pip ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ProvisionError(f"could not download {requirement} with pip:\n{tail}")
        actual = sha256_of(got)
        if actual != sha256:
            raise ProvisionError(f"{filename}: sha256 {actual} does not match the pinned {sha256}; refusing it")
        got.replace(target)
    return target


# --- HTTP downloads ---------------------------------------------------------------------------------------------

MB = 1_000_000
CHUNK = 1 << 16  # small reads: a dropped connection loses at most one (urllib3 drops a short last read)
RETRIES = 5  # dropped connections in a row (with no new bytes between them) before giving up
DISK_MARGIN = 64 * MB  # free space left over after a download
SHA256 = re.compile(r"[0-9a-f]{64}")


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / MB:.1f} MB"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Progress of one download as log lines (percent, MB/s, ETA): at most one every `interval` seconds, and one
    for each 10% only when that much time has passed; a last line when it is done. A tqdm bar on stderr too when
    stderr is a terminal (`bar=None`: decide so)."""

    def __init__(
        self, label: str, total: int | None, *, initial: int = 0, interval: float = 2.0, quiet_for: float = 30.0,
        bar: bool | None = None, logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.done = label, total, initial
        self.interval, self.quiet_for, self.logger, self.clock = interval, quiet_for, logger, clock
        self.started = self.last = clock()
        self.start_bytes = initial
        self.last_decile = self._decile()
        self.lines: list[str] = []  # what was logged, for the tests
        self._bar: Any = None
        if bar if bar is not None else _stderr_is_tty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=label,
                                 file=sys.stderr, leave=False)
            except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub
                self._bar = None
        resumed = f", resuming at {_size(initial)}" if initial else ""
        self._emit(f"downloading {label} ({_size(total) if total else 'size unknown'}{resumed})")

    def _decile(self) -> int:
        return self.done * 10 // self.total if self.total else 0

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        self.logger.info("%s", line)

    def line(self) -> str:
        """The progress line for now."""
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = (self.done - self.start_bytes) / elapsed
        if self.total:
            eta = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 else ""
            return (f"{self.label}: {self.done * 100 // self.total}% ({_size(self.done)} of {_size(self.total)}) "
                    f"at {rate / MB:.1f} MB/s{eta}")
        return f"{self.label}: {_size(self.done)} at {rate / MB:.1f} MB/s"

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        now = self.clock()
        since = now - self.last
        decile = self._decile()
        if since >= self.interval and (decile > self.last_decile or since >= self.quiet_for):
            self.last, self.last_decile = now, decile
            self._emit(self.line())

    def restart(self) -> None:
        """The server sent the whole file again (it ignored the Range request): count from zero."""
        if self._bar is not None:
            self._bar.reset(total=self.total)
        self.done = self.start_bytes = 0
        self.last_decile = 0

    def close(self, ok: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if ok:
            elapsed = max(self.clock() - self.started, 1e-9)
            self._emit(f"{self.label}: done, {_size(self.done)} in {_duration(elapsed)} "
                       f"({(self.done - self.start_bytes) / elapsed / MB:.1f} MB/s)")


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def check_disk_space(folder: Path, needed: int, label: str) -> None:
    """DiskSpaceError when `folder`'s volume has less than `needed` bytes (plus a margin) free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN > free:
        raise DiskSpaceError(f"not enough disk space for {label} in {folder}: it needs {_size(needed)} more, "
                             f"{_size(free)} is free")


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def lock_path(target: Path) -> Path:
    """The lock of one download target: a hidden file next to it."""
    return target.with_name(f".{target.name}.lock")


def _published_sha256(headers: Mapping[str, str]) -> str | None:
    """The sha256 a server publishes for the file: Hugging Face's X-Linked-Etag (LFS files), or an ETag that is
    a sha256."""
    for name in ("X-Linked-Etag", "ETag"):
        value = (headers.get(name) or "").strip()
        value = value.removeprefix("W/").strip('"').lower()
        if SHA256.fullmatch(value):
            return value
    return None


def download_file(
    url: str, target: Path, *, label: str | None = None, headers: Mapping[str, str] | None = None,
    sha256: str | None = None, size: int | None = None, timeout: float = 30.0,
    session: requests.Session | None = None,
) -> Path:
    """Download `url` to `target` once: locked, resumed, disk-checked, sha256-checked, renamed into place.

    An existing `target` is returned as is. `sha256` (lower-case hex) and `size` are what the caller knows; else
    a sha256 the server publishes is checked. Raises DownloadError (DiskSpaceError, ChecksumError; `status` set for
    an HTTP error answer); a network failure is requests' own exception (RequestException), for the caller to
    name. Authorization headers are not sent on to another host when the server redirects.
    """
    label = label or target.name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(target)):
        if target.is_file():  # another process fetched it while we waited
            log.info("%s: fetched by another process meanwhile", label)
            return target
        import requests

        own = session or requests.Session()
        try:
            _fetch(own, url, target, label, dict(headers or {}), sha256, size, timeout)
        finally:
            if session is None:
                own.close()
    return target


def _fetch(
    session: requests.Session, url: str, target: Path, label: str, headers: dict[str, str], sha256: str | None,
    size: int | None, timeout: float,
) -> None:
    import requests

    partial = partial_path(target)
    if size is not None:  # known beforehand (the Hub's metadata): check before asking for a byte
        check_disk_space(target.parent, size - (partial.stat().st_size if partial.exists() else 0), label)
    failures = 0
    progress: Progress | None = None
    digest = None
    try:
        while True:
            have = partial.stat().st_size if partial.exists() else 0
            if size is not None and have > size:
                partial.unlink()
                have = 0
            request_headers = dict(headers, **({"Range": f"bytes={have}-"} if have else {}))
            request_headers.setdefault("Accept-Encoding", "identity")
            got_bytes = False
            try:
                with session.get(url, headers=request_headers, stream=True, timeout=timeout) as response:
                    if response.status_code == 416 and have:
                        # Nothing left past `have`: the partial file is whole (or wrong; the checksum says which).
                        total = have
                    else:
                        if response.status_code not in (200, 206):
                            raise DownloadError(f"{label}: HTTP {response.status_code} from {_safe(response.url)}",
                                                status=response.status_code)
                        if response.status_code == 200 and have:
                            have = 0  # the server ignored the Range request: start again
                        sha256 = sha256 or _published_sha256(response.headers)
                        total = _total(response, have) or size
                        if size is not None and total is not None and total != size:
                            raise DownloadError(f"{label}: the server sends {total} bytes, {size} expected")
                        if total is not None:
                            check_disk_space(target.parent, total - have, label)
                        if progress is None:
                            progress = Progress(label, total, initial=have)
                        elif have == 0:
                            progress.restart()
                        if digest is None or have == 0:
                            digest = _digest_of(partial, have)
                        with partial.open("r+b" if have else "wb") as out:
                            out.seek(have)
                            out.truncate()
                            for chunk in response.iter_content(CHUNK):
                                out.write(chunk)
                                digest.update(chunk)
                                progress.update(len(chunk))
                                got_bytes = True
                            out.flush()
                            os.fsync(out.fileno())
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                failures = 0 if got_bytes else failures + 1
                if failures >= RETRIES or not (got_bytes or partial.exists()):
                    raise
                log.warning("%s: the connection dropped (%s); resuming", label, type(exc).__name__)
                time.sleep(min(2.0, 0.2 * failures))
                continue
            done = partial.stat().st_size if partial.exists() else 0
            if total is not None and done < total:
                failures = 0 if got_bytes else failures + 1
                if failures >= RETRIES:
                    raise DownloadError(f"{label}: the download stopped at {done} of {total} bytes")
                continue
            break
        if digest is None:
            digest = _digest_of(partial, partial.stat().st_size)
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            partial.unlink(missing_ok=True)
            raise ChecksumError(f"{label}: sha256 {actual} does not match the published {sha256.lower()}; the "
                                "download was deleted")
        os.replace(partial, target)
        _fsync_dir(target.parent)
        if progress is not None:
            progress.close()
            progress = None
        else:
            log.info("%s: done", label)
    finally:
        if progress is not None:
            progress.close(ok=False)


def _digest_of(partial: Path, length: int) -> Any:
    """A sha256 of the first `length` bytes of `partial` (the part a resume keeps)."""
    digest = hashlib.sha256()
    if length:
        with partial.open("rb") as fh:
            remaining = length
            while remaining:
                block = fh.read(min(CHUNK, remaining))
                if not block:
                    break
                digest.update(block)
                remaining -= len(block)
    return digest


def _total(response: requests.Response, have: int) -> int | None:
    """The whole file's size from a 200 (Content-Length) or 206 (Content-Range) answer."""
    if response.status_code == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match is None or int(match[1]) != have:
            raise DownloadError(f"{response.url}: a resumed download came back at the wrong offset")
        return int(match[2]) if match[2] != "*" else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _safe(url: str) -> str:
    """A URL without its query (signed URLs carry secrets there)."""
    return url.split("?", 1)[0]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
