"""The backend stays ours: its key only in its environment, nothing inherited configures it, a foreign server on
PORT_BACKEND is never taken for it, passthrough routes open only what is safe, and start-up failures are one line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, Gateway, free_port, wait_gone

FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"
LANES = ["true", "false"]  # both lanes: gateway/fastlane.py and aiohttp's


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def backend_url(gw: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gw.port_backend}{path}"


INHERITED = {"LLAMA_ARG_TOOLS": "all", "LLAMA_ARG_HOST": "0.0.0.0", "LLAMA_ARG_UI_MCP_PROXY": "1",
             "LLAMA_ARG_ENDPOINT_PROPS": "1", "LLAMA_API_KEY": "sk-inherited-0123456789", "AIP_MODE": "PREDICTION",
             "AIP_HTTP_PORT": "1"}


def test_child_environment_has_no_inherited_llama_arg(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"LLAMA_SERVER_BIN": str(FAKE), **INHERITED}, name="env-fake")
    (backend,) = gw.backend_pids()
    env = environ_of(backend)
    assert not [name for name in env if name.startswith(("LLAMA_ARG_", "AIP_"))]
    assert env["LLAMA_API_KEY"] != INHERITED["LLAMA_API_KEY"]
    logs = list((gw.data_dir / "logs" / "llama").glob("*_server_*.log"))
    assert "env names: LLAMA_API_KEY LLAMA_SERVER_BIN\n" in logs[0].read_text()  # what the fake saw itself
    assert "not passed to llama-server" in gw.output() and "LLAMA_ARG_TOOLS" in gw.output()
    assert "sk-inherited" not in gw.output()


def test_inherited_llama_arg_tools_does_not_arm_the_real_backend(make_gateway) -> None:  # type: ignore[no-untyped-def]
    """The issue's case: LLAMA_ARG_TOOLS=all in the environment. llama-server's own /tools (asked directly, with the
    per-boot key) says the feature is off, and /props is not writable."""
    gw: Gateway = make_gateway(INHERITED, name="env-real")
    (backend,) = gw.backend_pids()
    key = {"Authorization": f"Bearer {environ_of(backend)['LLAMA_API_KEY']}"}
    tools = requests.get(backend_url(gw, "/tools"), headers=key, timeout=10)
    assert tools.status_code == 403, tools.text
    assert requests.get(backend_url(gw, "/cors-proxy"), headers=key, timeout=10).status_code == 403
    props = requests.post(backend_url(gw, "/props"), headers=key, json={}, timeout=10)
    assert props.status_code == 501, props.text  # "Start it with `--props`"
    assert requests.get(backend_url(gw, "/v1/models"), headers=key, timeout=10).status_code == 200


def test_sigkill_leaves_no_key_folder_and_auth_still_protects(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    gw: Gateway = make_gateway({"TMPDIR": str(tmp)}, name="sigkill-key")
    (backend,) = gw.backend_pids()
    cmdline = Path(f"/proc/{backend}/cmdline").read_text()
    key = environ_of(backend)["LLAMA_API_KEY"]
    assert "api-key" not in cmdline and key not in cmdline
    assert Path(f"/proc/{backend}/environ").stat().st_mode & 0o077 == 0  # the owner alone reads it
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        assert requests.get(backend_url(gw, "/v1/models"), headers=headers, timeout=5).status_code == 401
    assert requests.get(backend_url(gw, "/v1/models"), headers={"Authorization": f"Bearer {key}"},
                        timeout=5).status_code == 200
    assert requests.get(f"{gw.url}/v1/models", timeout=10).status_code == 200  # the gateway's own key works
    assert gw.proc is not None
    gw.proc.kill()
    gw.proc.wait()
    assert wait_gone(backend)
    assert not list(tmp.glob("llama-gguf-backend-*"))


# --- a foreign server squatting on PORT_BACKEND ----------------------------------------------------------------------


@pytest.fixture
def squatter(request: pytest.FixtureRequest) -> Iterator[int]:
    """A foreign HTTP server on a free port: /health says 200; every other route answers `request.param` (200: an
    open server, 401: one locked with somebody else's key)."""

    class Squatter(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else request.param)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_: object) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Squatter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("squatter", [200, 401], indirect=True)
def test_foreign_server_on_backend_port_is_not_taken_for_ours(squatter: int, tmp_path: Path) -> None:
    """Our child (slow to bind, then failing: the port is taken) is never reported ready on the squatter's word."""
    env = {**os.environ, "DATA_DIR": str(tmp_path), "HOST": "127.0.0.1", "AUTH_ENABLED": "false",
           "PORT": str(free_port()), "PORT_HEALTH": str(free_port()), "PORT_BACKEND": str(squatter),
           "LLAMA_SERVER_BIN": str(FAKE), "FAKE_START_DELAY": "2"}
    proc = subprocess.run([sys.executable, "-m", "gateway"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "not our llama-server" in proc.stderr
    assert "llama-server ready" not in proc.stderr
    assert "exited with code" in proc.stderr and "Traceback (most recent call last):\n" not in proc.stderr.split(
        "last lines:")[0]


# --- PASSTHROUGH_ROUTES: GET only where POST changes state ------------------------------------------------------


@pytest.mark.parametrize("fast_lane", LANES)
def test_passthrough_props_and_slots_are_get_only(make_gateway, fast_lane: str) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"LLAMA_SERVER_BIN": str(FAKE), "FAST_LANE": fast_lane,
                                "PASSTHROUGH_ROUTES": "/props,/slots"}, name=f"pass-{fast_lane}")
    for path in ("/props", "/slots"):
        assert requests.get(gw.url + path, timeout=5).status_code == 200, path
        refused = requests.post(gw.url + path, json={"n_predict": 1}, timeout=5)
        assert refused.status_code == 405, path
        assert "error" in refused.json()
    assert requests.post(gw.url + "/slots/0?action=save", json={"filename": "x"}, timeout=5).status_code == 404


@pytest.mark.parametrize(("name", "value", "said"), [
    *(("PASSTHROUGH_ROUTES", route, route) for route in ("/tools", "/cors-proxy", "/slots/0", "/models/load")),
    *(("EXTRA_ARGS", extra, "EXTRA_ARGS may not contain") for extra in ("--host 0.0.0.0", "--tools=all",
                                                                       "--api-key sk-x", "-n 8")),
])
def test_settings_that_open_the_backend_exit_2_with_one_line(name: str, value: str, said: str, tmp_path: Path) -> None:
    env = {**os.environ, "DATA_DIR": str(tmp_path), name: value}
    proc = subprocess.run([sys.executable, "-m", "gateway"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0] and said in lines[0]


# --- an unwritable DATA_DIR: one line, non-zero exit, in both modes -------------------------------------------------


@pytest.mark.parametrize("mode", ["gateway", "handler"])
def test_unwritable_data_dir_is_one_line(mode: str, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    data = blocker / "data"
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update({"DATA_DIR": str(data), "HOST": "127.0.0.1", "AUTH_ENABLED": "false", "PORT": str(free_port()),
                "PORT_HEALTH": str(free_port()), "PORT_BACKEND": str(free_port()), "LLAMA_SERVER_BIN": str(FAKE),
                "MODEL_PATH": str(model)})
    proc = subprocess.run([sys.executable, "-m", mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert f"DATA_DIR {data} is not writable" in errors[0]


# --- the health port's answers carry X-Request-ID -----------------------------------------------------------------


@pytest.mark.parametrize("fast_lane", LANES)
def test_health_port_answers_carry_request_id(make_gateway, fast_lane: str) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"LLAMA_SERVER_BIN": str(FAKE), "FAKE_MODE": "never_ready", "FAST_LANE": fast_lane},
                               wait_ready=False, name=f"health-rid-{fast_lane}")
    url = f"http://127.0.0.1:{gw.port_health}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            plain = requests.get(url, timeout=2)
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert plain.status_code == 200 and len(plain.headers["X-Request-ID"]) == 24
    assert requests.get(url + "ready", headers={"X-Request-ID": "probe-7"}, timeout=2).headers["X-Request-ID"] \
        == "probe-7"
    assert requests.head(url, headers={"X-Request-ID": "bad id\t"}, timeout=2).headers["X-Request-ID"] == "badid"
    posted = requests.post(url, timeout=2)
    assert posted.status_code == 405 and posted.headers["X-Request-ID"]
