"""What both benchmarks share: child processes that cannot outlive us, port checks, readiness polls, machine facts.

Every child gets PR_SET_PDEATHSIG (the kernel signals it when we die, even by SIGKILL), its own process group
(stop() signals the whole group: SIGTERM, a grace period, SIGKILL), and its output in a log file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
FAKE_SERVER = BENCH / "fake_llama_server.py"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return setup


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    wrapped: bool = False  # started under timeout(1)

    @property
    def pid(self) -> int:
        """The program's own pid, not timeout(1)'s (for py-spy)."""
        if self.wrapped:
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()[0])
        return self.proc.pid


@dataclass
class Processes:
    """Starts children and stops every one of them, in reverse order, when the `with` block ends."""

    log_dir: Path
    grace: float = 5.0
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: Path | None = None, limit: float | None = None) -> Child:
        """`limit`: coreutils timeout(1) SIGTERMs the child after that many seconds, SIGKILLs it 5 s later."""
        log = self.log_dir / f"{name}.log"
        wrapped = limit is not None and shutil.which("timeout") is not None
        if wrapped:
            cmd = ["timeout", "-k", "5", f"{limit:.0f}", *cmd]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd,
                start_new_session=True, preexec_fn=_die_with_parent(),
            )
        child = Child(name, proc, log, wrapped)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        proc = child.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything the child left in its group (llama-server, workers)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_exc: object) -> None:
        for child in reversed(self.children):
            self.stop(child)
        self.children.clear()


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def ensure_free(*ports: int) -> None:
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no clash
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                raise SystemExit(f"port {port} on 127.0.0.1 is in use; pick another --port-base") from None


def http_status(url: str, headers: Mapping[str, str] | None = None, data: bytes | None = None,
                timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(url: str, child: Child, timeout: float) -> None:
    """Poll `url` until it answers 200; fail early, with the child's last log lines, if the child exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise SystemExit(f"{child.name} exited with code {child.proc.returncode}:\n{tail(child.log)}")
        with contextlib.suppress(OSError):
            if http_status(url, timeout=2.0)[0] == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"{child.name} not ready at {url} after {timeout:.0f}s:\n{tail(child.log)}")


def wait_port(port: int, child: Child, timeout: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:port (for servers with no unauthenticated route)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise SystemExit(f"{child.name} exited with code {child.proc.returncode}:\n{tail(child.log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.05)
    raise SystemExit(f"{child.name} not listening on port {port} after {timeout:.0f}s:\n{tail(child.log)}")


def venv_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment with this interpreter's bin folder first on PATH (so `env python3` finds uvloop)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    env.update(extra)
    return env


def require_project_venv() -> None:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise SystemExit(f"run this with the project's venv: .venv/bin/python {sys.argv[0]}") from None


def machine() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def write_json(name: str, data: object) -> Path:
    import json

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def git_commit() -> str:
    """The commit the gateway ran from, with '+dirty' when gateway/ or lifecycle/ differ from it."""

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "gateway", "lifecycle") else "")


def require_files(*pairs: tuple[Path, str]) -> None:
    for path, what in pairs:
        if not path.is_file():
            raise SystemExit(f"{what} not found at {path}: run `make llama-server model` first")
