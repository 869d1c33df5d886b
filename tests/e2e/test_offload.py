"""Auto GPU offload with the real llama-server and the default model, on this CPU machine: what it is asked (NGL and
CTX unset or set) and what /health reports it chose."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.conftest import Gateway

LANES = ["true", "false"]  # both lanes: gateway/fastlane.py and aiohttp's


def backend_cmdline(gw: Gateway) -> list[str]:
    (pid,) = gw.backend_pids()
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def expected_gpu_layers(shown: dict[str, object]) -> object:
    """0 on a machine without a GPU (this one); every layer where llama-server saw a GPU (bench/gpu_check.sh runs
    these tests there): the default model is about 100 MB."""
    devices = shown["devices"]
    assert isinstance(devices, dict)
    return shown["layers"] if any(not name.startswith("CPU") for name in devices) else 0


def offload_of(gw: Gateway) -> dict[str, object]:
    reply = requests.get(gw.url + "/health", timeout=5)
    assert reply.status_code == 200, reply.text
    return reply.json()["offload"]


@pytest.mark.parametrize("fast_lane", LANES)
def test_unset_ngl_and_ctx_are_fitted_and_reported(make_gateway, fast_lane: str) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"NGL": "", "CTX": "", "FAST_LANE": fast_lane, "PASSTHROUGH_ROUTES": "/props"},
                               name=f"auto-{fast_lane}")
    cmd = backend_cmdline(gw)
    assert cmd[cmd.index("-ngl") + 1] == "auto" and cmd[cmd.index("--fit") + 1] == "on"
    assert "-c" not in cmd
    shown = offload_of(gw)
    assert (shown["ngl"], shown["ctx"], shown["fit"], shown["fit_status"]) == ("auto", "auto", True, "ok")
    assert shown["gpu_layers"] == expected_gpu_layers(shown), shown
    assert isinstance(shown["layers"], int) and shown["layers"] > 0
    n_ctx = shown["n_ctx"]
    assert isinstance(n_ctx, int) and n_ctx > 0
    # CTX unset: the model's trained context, which fits in this machine's memory, so --fit keeps all of it
    assert n_ctx == shown["n_ctx_train"]
    props = requests.get(gw.url + "/props", timeout=5).json()
    assert props["default_generation_settings"]["n_ctx"] == shown["n_ctx_slot"] == n_ctx  # --kv-unified
    memory = shown["device_memory_mib"]
    assert isinstance(memory, dict) and memory and all(kind in ("model", "kv", "compute", "output")
                                                      for kinds in memory.values() for kind in kinds)
    assert "CPU" in shown["devices"]
    assert f"offload: {shown['gpu_layers']}/{shown['layers']} layers on the GPU" in gw.output()  # the one log line


@pytest.mark.parametrize("fast_lane", LANES)
def test_set_ctx_is_exactly_what_runs(make_gateway, fast_lane: str) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"NGL": "", "CTX": "4096", "FAST_LANE": fast_lane, "PASSTHROUGH_ROUTES": "/props"},
                               name=f"ctx-{fast_lane}")
    cmd = backend_cmdline(gw)
    assert cmd[cmd.index("-c") + 1] == "4096"
    shown = offload_of(gw)
    assert (shown["ctx"], shown["n_ctx"], shown["n_ctx_slot"]) == (4096, 4096, 4096)
    assert requests.get(gw.url + "/props", timeout=5).json()["default_generation_settings"]["n_ctx"] == 4096
    assert shown["gpu_layers"] == expected_gpu_layers(shown)


def test_split_kv_reports_the_whole_context(make_gateway) -> None:  # type: ignore[no-untyped-def]
    """With --no-kv-unified llama-server reports n_ctx per slot: offload's n_ctx is still CTX, the whole."""
    gw: Gateway = make_gateway({"NGL": "0", "CTX": "4096", "PARALLEL": "4", "EXTRA_ARGS": "--no-kv-unified",
                                "PASSTHROUGH_ROUTES": "/props"}, name="split")
    shown = offload_of(gw)
    assert (shown["ngl"], shown["gpu_layers"], shown["n_ctx"], shown["n_ctx_slot"]) == (0, 0, 4096, 1024)
    assert requests.get(gw.url + "/props", timeout=5).json()["default_generation_settings"]["n_ctx"] == 1024


def test_server_log_shows_no_random_part_of_the_backend_key(make_gateway) -> None:  # type: ignore[no-untyped-def]
    """At -lv 4 llama-server logs its key's last four characters: they must be the public KEY_TAIL's."""
    import re

    from lifecycle.supervisor import KEY_TAIL

    gw: Gateway = make_gateway({"NGL": "", "CTX": ""}, name="keytail")
    (pid,) = gw.backend_pids()
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    key = next(item.split(b"=", 1)[1].decode() for item in raw if item.startswith(b"LLAMA_API_KEY="))
    (log,) = (gw.data_dir / "logs" / "llama").glob("*_server_*.log")
    text = log.read_text(errors="replace")
    shown = re.findall(r"api_keys: \*+(\S+)", text)
    assert shown == [KEY_TAIL[-4:]], shown
    assert key.endswith(KEY_TAIL) and key[:-len(KEY_TAIL)] not in text
