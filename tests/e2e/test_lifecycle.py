"""Start-up, shutdown and bad configuration of the whole process, as a user or a platform sees them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.conftest import ROOT, Gateway, free_port, wait_gone

FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"


def test_sigterm_stops_backend_and_exits_zero(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(name="term")
    (backend,) = gw.backend_pids()
    assert "llama-server" in Path(f"/proc/{backend}/cmdline").read_text()
    assert gw.stop() == 0
    assert wait_gone(backend)


def test_sigkill_of_gateway_leaves_no_orphan_backend(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(name="kill")
    (backend,) = gw.backend_pids()
    assert gw.proc is not None
    gw.proc.kill()
    gw.proc.wait()
    assert wait_gone(backend), "llama-server outlived a SIGKILLed gateway"


def test_server_log_lands_in_worker_folder(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"WORKER_TYPE": "coder"}, name="logs")
    logs = list((gw.data_dir / "logs" / "llama-coder").glob("*_server_*.log"))
    assert len(logs) == 1
    assert logs[0].name[:15].replace("_", "").isdigit()
    assert "llama" in logs[0].read_text(errors="replace")
    boot_logs = list((gw.data_dir / "logs" / "_boot").glob("*.log"))
    assert boot_logs
    assert all(p.stat().st_mode & 0o077 == 0 for p in boot_logs), "boot logs must be private (0600)"


def _run_gateway(tmp_path: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    ports = {"PORT": str(free_port()), "PORT_HEALTH": str(free_port()), "PORT_BACKEND": str(free_port())}
    full = {**os.environ, "DATA_DIR": str(tmp_path), "HOST": "127.0.0.1", "AUTH_ENABLED": "false", **ports, **env}
    return subprocess.run([sys.executable, "-m", "gateway"], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def test_missing_model_names_path_and_what_is_there(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "other-model.Q4_K_M.gguf").write_bytes(b"GGUF")
    proc = _run_gateway(tmp_path, {"MODEL_NAME": "missing.gguf"})
    assert proc.returncode == 1
    assert f"model not found: {models / 'missing.gguf'}" in proc.stderr
    assert "other-model.Q4_K_M.gguf" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_settings_exit_2_with_one_line(tmp_path: Path) -> None:
    for env, name in (({"AUTH_ENABLED": "maybe"}, "AUTH_ENABLED"), ({"PORT": "abc"}, "PORT"), ({"CTX": "-1"}, "CTX")):
        proc = _run_gateway(tmp_path, env)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0]


def test_backend_exit_while_loading_shows_its_log(tmp_path: Path) -> None:
    proc = _run_gateway(tmp_path, {"LLAMA_SERVER_BIN": str(FAKE), "FAKE_MODE": "exit_loading"})
    assert proc.returncode == 1
    assert "exited with code 3 while loading" in proc.stderr
    assert "failed to load model: not a GGUF file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_health_port_is_up_while_the_model_loads(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"LLAMA_SERVER_BIN": str(FAKE), "FAKE_MODE": "never_ready"}, wait_ready=False,
                               name="loading")
    deadline = time.monotonic() + 30
    while True:
        try:
            health = requests.get(f"{gw.url}/health", timeout=2)
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    time.sleep(1)
    health = requests.get(f"{gw.url}/health", timeout=2)
    assert health.status_code == 503
    assert health.json()["backend"] == "loading"
    assert requests.get(f"http://127.0.0.1:{gw.port_health}/", timeout=2).status_code == 200
    # RunPod's load balancer: /ping on PORT_HEALTH is 204 ("initializing", no traffic) until the model is loaded
    assert requests.get(f"http://127.0.0.1:{gw.port_health}/ping", timeout=2).status_code == 204
    chat = requests.post(f"{gw.url}/v1/chat/completions", json={"messages": []}, timeout=5)
    assert chat.status_code == 503
    assert chat.json()["error"]["code"] == "backend_unavailable"
    assert chat.headers["Retry-After"]
    # SIGTERM while loading still exits cleanly and takes the backend with it.
    (backend,) = gw.backend_pids()
    assert gw.stop() == 0
    assert wait_gone(backend)


def test_backend_ignoring_sigterm_is_killed(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"LLAMA_SERVER_BIN": str(FAKE), "FAKE_MODE": "ignore_sigterm",
                                "BACKEND_STOP_TIMEOUT": "1"}, name="stubborn")
    (backend,) = gw.backend_pids()
    assert gw.stop() == 0
    assert wait_gone(backend, timeout=5)


def test_auth_fails_closed_without_keys(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"AUTH_ENABLED": "true"}, name="auth")
    resp = requests.get(f"{gw.url}/v1/models", timeout=5)
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "authentication_error"
    assert requests.get(f"{gw.url}/ping", timeout=5).status_code == 200
    assert requests.get(f"{gw.url}/health", timeout=5).status_code == 200
    assert "no API keys were loaded" in gw.output()


def test_auth_with_keys_file(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import openai

    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\n\nprod:sk-test-0123456789abcdef\nbad-line\n")
    gw: Gateway = make_gateway({"AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(keys)}, name="keys")
    good = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-test-0123456789abcdef", max_retries=0)
    assert good.models.list().data
    bad = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-wrong-0123456789abcdef", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as exc:
        assert exc.status_code == 401
    bare = requests.get(f"{gw.url}/v1/models", headers={"Authorization": "sk-test-0123456789abcdef"}, timeout=5)
    assert bare.status_code == 200
    assert "line 4 skipped" in gw.output()
    assert "sk-test-0123456789abcdef" not in gw.output()


def test_entrypoint_mode_detection() -> None:
    def mode(env: dict[str, str]) -> str:
        base = {k: v for k, v in os.environ.items() if k not in ("MODE", "RUNPOD_WEBHOOK_GET_JOB")}
        out = subprocess.run([sys.executable, "-m", "lifecycle.platform"], cwd=ROOT, env={**base, **env},
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert mode({}) == "gateway"
    assert mode({"RUNPOD_POD_ID": "abc"}) == "gateway"
    assert mode({"RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take/$ID"}) == "handler"
    assert mode({"RUNPOD_WEBHOOK_GET_JOB": "x", "MODE": "gateway"}) == "gateway"
    assert mode({"MODE": "handler"}) == "handler"


def test_entrypoint_debug_shell_prints_settings_and_holds(tmp_path: Path) -> None:
    env = {**os.environ, "DEBUG_SHELL": "true", "DATA_DIR": str(tmp_path), "PATH": f"{Path(sys.executable).parent}"
           f":{os.environ['PATH']}"}
    proc = subprocess.Popen([str(ROOT / "entrypoint.sh")], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        text = ""
        deadline = time.monotonic() + 20
        while "holding" not in text and time.monotonic() < deadline:
            text += proc.stdout.readline()
        assert f"data_dir={tmp_path}" in text
        assert "mode=gateway" in text
        time.sleep(0.5)
        assert proc.poll() is None  # it holds
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _run_gateway(tmp_path, {"PORT": str(port)})
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_entrypoint_picks_serverless_mode_on_the_runpod_queue(tmp_path: Path) -> None:
    env = {**os.environ, "DEBUG_SHELL": "1", "DATA_DIR": str(tmp_path), "RUNPOD_WEBHOOK_GET_JOB": "http://x/$ID?a=b",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(ROOT / "entrypoint.sh")], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        assert "mode=handler" in proc.stdout.readline()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
