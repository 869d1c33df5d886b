"""Auto GPU offload: what llama-server is asked (NGL / CTX unset or set, EXTRA_ARGS) and how what it chose is read
back from its start-up log and GET /props (lifecycle.offload)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from lifecycle import offload
from lifecycle.backend import Backend
from lifecycle.request_rules import Limits
from lifecycle.settings import Settings, SettingsError
from lifecycle.supervisor import KEY_TAIL, Supervisor, backend_command, backend_key

ROOT = Path(__file__).resolve().parent.parent.parent
DATA = Path(__file__).resolve().parent / "data"
CPU_LOG = DATA / "llama_server_cpu_start.log"  # captured from the real llama-server on this CPU machine
CUDA_LOG = DATA / "llama_server_cuda_start.log"  # written from llama.cpp's format strings (see its header)
FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"


def build(env: dict[str, str]) -> Settings:
    return Settings.from_env({"DATA_DIR": "/srv/data", **env}, probe_roots=[])


def command(env: dict[str, str]) -> list[str]:
    return backend_command(build(env), Path("/bin/llama-server"), Path("/m/model.gguf"))


def value(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, cmd
    return cmd[cmd.index(flag) + 1]


# --- the command line ------------------------------------------------------------------------------------------


def test_unset_ngl_and_ctx_let_llama_server_fit_them() -> None:
    cmd = command({})
    assert value(cmd, "-ngl") == "auto"
    assert "-c" not in cmd and "--ctx-size" not in cmd  # llama-server's 0: the model's own, which --fit may shrink
    assert value(cmd, "--fit") == "on"
    assert value(cmd, "-lv") == offload.OFFLOAD_LOG_VERBOSITY
    assert offload.requested(cmd) == {"ngl": "auto", "ctx": "auto", "fit": True}


def test_auto_is_the_same_as_unset() -> None:
    assert build({"NGL": "auto", "CTX": "AUTO"}).ngl is None
    assert command({"NGL": "auto", "CTX": "auto"}) == command({})


@pytest.mark.parametrize(("env", "ngl", "ctx"), [({"NGL": "20", "CTX": "4096"}, "20", "4096"),
                                                 ({"NGL": "0"}, "0", None),
                                                 ({"NGL": "99", "CTX": "16384"}, "99", "16384"),
                                                 ({"CTX": "0"}, "auto", "0")])
def test_set_ngl_and_ctx_are_passed_exactly(env: dict[str, str], ngl: str, ctx: str | None) -> None:
    cmd = command(env)
    assert value(cmd, "-ngl") == ngl
    if ctx is None:
        assert "-c" not in cmd
    else:
        assert value(cmd, "-c") == ctx  # CTX=0 stays 0: the model's own context, which --fit then keeps
    asked = offload.requested(cmd)
    assert asked["ngl"] == (ngl if ngl == "auto" else int(ngl))
    assert asked["ctx"] == ("auto" if ctx is None else int(ctx))


@pytest.mark.parametrize("extra", ["--fit off", "-fit off", "--fit on"])
def test_extra_args_fit_is_theirs(extra: str) -> None:
    cmd = command({"EXTRA_ARGS": extra})
    assert cmd.count("--fit") + cmd.count("-fit") == 1
    assert cmd[-2:] == extra.split()
    assert offload.requested(cmd)["fit"] is (extra.split()[1] == "on")


@pytest.mark.parametrize("extra", ["-lv 3", "--verbosity 2", "--log-verbosity 5", "-v", "--verbose"])
def test_extra_args_verbosity_is_theirs(extra: str) -> None:
    cmd = command({"EXTRA_ARGS": extra})
    assert "-lv" not in cmd[:-len(extra.split())]
    assert cmd[-len(extra.split()):] == extra.split()


def test_extra_args_ngl_and_ctx_win_and_are_reported() -> None:
    """llama-server keeps the last of a repeated flag: EXTRA_ARGS come last, and offload reports what it got."""
    cmd = command({"NGL": "10", "EXTRA_ARGS": "--gpu-layers 12 --ctx-size 2048"})
    assert offload.requested(cmd) == {"ngl": 12, "ctx": 2048, "fit": True}


@pytest.mark.parametrize(("env", "name"), [({"NGL": "lots"}, "NGL"), ({"NGL": "-1"}, "NGL"), ({"CTX": "-1"}, "CTX"),
                                           ({"CTX": "big"}, "CTX")])
def test_bad_ngl_and_ctx_are_one_line_errors(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError) as err:
        build(env)
    assert str(err.value).startswith(f"{name}=") and "auto" in str(err.value) and "\n" not in str(err.value)


def test_dry_penalty_cap_without_ctx() -> None:
    """Limits read settings.ctx as an int: unset (None) and 0 mean the model's own context, not known there."""
    assert Limits.from_settings(build({})).max_dry_penalty_last_n == 1 << 20
    assert Limits.from_settings(build({"CTX": "0"})).max_dry_penalty_last_n == 1 << 20
    assert Limits.from_settings(build({"CTX": "4096"})).max_dry_penalty_last_n == 4096


def test_per_boot_key_ends_in_a_public_tail() -> None:
    """At -lv 4 llama-server logs its key's last four characters: they are KEY_TAIL's, not the random part's."""
    one, two = backend_key(), backend_key()
    assert one != two and one.endswith(KEY_TAIL) and len(KEY_TAIL) >= 4
    assert len(one) - len(KEY_TAIL) >= 43  # 32 random bytes, urlsafe base64
    assert Supervisor(build({}))._api_key.endswith(KEY_TAIL)  # private to lifecycle/


# --- the log and /props -----------------------------------------------------------------------------------------


def test_parse_real_cpu_log() -> None:
    facts = offload.read_server_log(CPU_LOG)
    assert facts.no_gpu and facts.gpu_layers == 0
    assert facts.layers == 31 and facts.n_layer_all == 30  # what -ngl counts: 30 layers + the output layer
    assert (facts.n_ctx, facts.n_ctx_train) == (8192, 8192)
    assert facts.buffers == {"CPU_Mapped": {"model": 92.1}, "CPU": {"output": 0.38, "kv": 180.0, "compute": 21.51}}
    assert facts.devices == {"CPU": {"description": "AMD EPYC", "total_mib": 24105, "free_mib": 24105}}
    assert facts.fit_status == "ok"
    assert "will leave 23811 >= 1024 MiB of system memory, no changes needed" in facts.fit_log


def test_parse_cuda_log_from_llama_cpp_formats() -> None:
    facts = offload.read_server_log(CUDA_LOG)
    assert not facts.no_gpu
    assert (facts.gpu_layers, facts.layers) == (61, 81)  # not the "1/81" printed after "model loaded"
    assert facts.buffers["CUDA0"] == {"model": 110592.0, "kv": 976.0, "compute": 1104.0}
    assert facts.buffers["CPU_Mapped"] == {"model": 34406.25}
    assert facts.buffers["CUDA_Host"] == {"output": 1.0, "compute": 40.01}
    assert facts.devices["CUDA0"] == {"description": "NVIDIA H200", "total_mib": 143156, "free_mib": 142560}
    assert facts.devices["CPU"]["description"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert (facts.n_ctx, facts.n_ctx_train, facts.fit_status) == (4096, 131072, "ok")
    assert "context size reduced from 131072 to 4096 -> need 24200 MiB less memory in total" in facts.fit_log
    assert "- CUDA0 (NVIDIA H200): 61 layers, 141300 MiB used,   1260 MiB free" in facts.fit_log
    assert not any(line.startswith(("set ngl_per_device", "id=0")) for line in facts.fit_log)


@pytest.mark.parametrize("lines", [[], ["garbage", "offloaded many layers", "model buffer size = lots"],
                                   ["0.00.001 I srv  llama_server: model loaded", "offloaded 3/4 layers to GPU"]])
def test_missing_lines_are_null(lines: list[str]) -> None:
    facts = offload.parse_server_log(lines)
    assert facts == offload.LogFacts()
    shown = offload.summary(["x", "-ngl", "auto"], (), facts, None, None)
    assert shown["gpu_layers"] is None and shown["n_ctx"] is None and shown["device_memory_mib"] == {}
    assert "offload: ?/? layers" in offload.describe(shown)


def test_fit_failure_and_long_fit_log() -> None:
    lines = [f"common_params_fit_impl: step {i}" for i in range(100)]
    lines.append("common_fit_params: failed to fit params to free device memory: n_gpu_layers already set by user "
                 "to 99, abort")
    facts = offload.parse_server_log(lines)
    assert facts.fit_status == "failed"
    assert len(facts.fit_log) == offload.MAX_FIT_LINES + 1
    assert facts.fit_log[0] == "step 0" and "more lines in the server log" in facts.fit_log[offload.MAX_FIT_LINES // 2]
    assert facts.fit_log[-1].endswith("already set by user to 99, abort")


def test_read_from_offset_sees_only_this_start(tmp_path: Path) -> None:
    """A restart within the same second appends to the same log file: only its own lines count."""
    path = tmp_path / "server.log"
    path.write_text("load_tensors: offloaded 5/31 layers to GPU\nllama_server: model loaded\n")
    offset = path.stat().st_size
    with path.open("a") as fh:
        fh.write("load_tensors: offloaded 9/31 layers to GPU\n")
    assert offload.read_server_log(path, offset).gpu_layers == 9
    assert offload.read_server_log(tmp_path / "missing.log") == offload.LogFacts()


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"default_generation_settings":{"n_ctx":4096},"total_slots":4}', (4096, 4)),
    (b'{"default_generation_settings":{}}', (None, None)),
    (b'{"default_generation_settings":{"n_ctx":"4096"},"total_slots":true}', (None, None)),
    (b"[1]", (None, None)),
    (b"not json", (None, None)),
])
def test_props_n_ctx(body: bytes, expected: tuple[int | None, int | None]) -> None:
    assert offload.props_n_ctx(body) == expected


def test_n_ctx_is_the_whole_context() -> None:
    """/props gives n_ctx per slot: all of it with --kv-unified (the default), a slot's share without."""
    facts = offload.LogFacts(n_ctx=4096)
    cmd = command({"CTX": "4096"})
    assert offload.summary(cmd, (), facts, 4096, 4)["n_ctx"] == 4096
    split = offload.summary(cmd, ("--no-kv-unified",), facts, 1024, 4)
    assert (split["n_ctx"], split["n_ctx_slot"]) == (4096, 1024)
    assert offload.summary(cmd, (), facts, None, None)["n_ctx"] == 4096  # /props said nothing: the log's
    assert offload.kv_unified(("-no-kvu", "--kv-unified")) and not offload.kv_unified(("-no-kvu",))


def test_health_offload_keys_are_documented() -> None:
    shown = offload.summary(command({}), (), offload.read_server_log(CPU_LOG), 8192, 4)
    json.dumps(shown)
    docs = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    for key in shown:
        assert f"`{key}`" in docs, key


# --- the supervisor records it after every start, restarts included ----------------------------------------------


def test_offload_is_recorded_after_start_and_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FAKE_MODE", "crash_after_ready")
    monkeypatch.setenv("FAKE_CRASH_AFTER", "0.3")
    monkeypatch.setenv("FAKE_CRASH_BOOTS", "1")
    monkeypatch.setenv("FAKE_BOOTS_FILE", str(tmp_path / "boots"))
    from tests.conftest import free_port

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "CTX": "2048", "PARALLEL": "2",
                                  "LLAMA_SERVER_BIN": str(FAKE), "MODEL_PATH": str(tmp_path / "m.gguf"),
                                  "PORT_BACKEND": str(free_port()), "BACKEND_RESTART_DELAY": "0.1"}, probe_roots=[])

    async def scenario() -> tuple[dict[str, object] | None, dict[str, object] | None, int]:
        sup = Backend(settings, poll_interval=0.05)
        await sup.start()
        first = sup.offload
        try:
            async with asyncio.timeout(20):
                while not (sup.restarts == 1 and sup.ready):
                    await asyncio.sleep(0.05)
            return first, sup.offload, sup.restarts
        finally:
            await sup.stop()

    with caplog.at_level(logging.INFO, logger="lifecycle.supervisor"):
        first, second, restarts = asyncio.run(scenario())
    assert first is not None and second is not None and restarts == 1
    assert (first["gpu_layers"], first["layers"], first["n_ctx"], first["ctx"]) == (1, 31, 2048, 2048)
    assert first["device_memory_mib"] == {"CUDA0": {"model": 92.1}} and first["fit_status"] == "ok"
    assert second["gpu_layers"] == 2, "offload must be read again after a restart"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("offload: ")]
    assert len(lines) == 2 and lines[0].startswith("offload: 1/31 layers on the GPU (ngl auto, fit on: ok)")
