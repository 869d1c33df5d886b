"""What may reach llama-server: EXTRA_ARGS flags, PASSTHROUGH_ROUTES, the child's environment, DEBUG_SHELL's boolean."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lifecycle.routes import JSON_ROUTES
from lifecycle.settings import (
    NEVER_PUBLIC,
    REFUSED_BACKEND_FLAGS,
    SAFE_PASSTHROUGH_ROUTES,
    Settings,
    SettingsError,
    backend_flag_name,
    main,
    never_public,
    passthrough_methods,
    read_bool,
)
from lifecycle.supervisor import BackendStartError, backend_command, backend_env, config_files, ensure_writable_dir

ROOT = Path(__file__).resolve().parent.parent.parent
ARG_CPP = (Path.home() / ".cache/llama-gguf-inference/src/llama_cpp_python-0.3.36/vendor/llama.cpp/common/arg.cpp")


def build(env: dict[str, str]) -> Settings:
    return Settings.from_env({"DATA_DIR": "/srv/data", **env}, probe_roots=[])


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        ("--host 0.0.0.0", "--host"),
        ("--host=0.0.0.0", "--host"),
        ("-fa on --port 9999", "--port"),
        ("--port=9999", "--port"),
        ("--api-key sk-mine", "--api-key"),
        ("--api_key sk-mine", "--api-key"),  # llama-server reads _ as - in long flags
        ("--api-key-file /tmp/k", "--api-key-file"),
        ("--tools all", "--tools"),
        ("--tools=all", "--tools"),
        ("--tools-runtime docker:x", "--tools-runtime"),
        ("-ag", "-ag"),
        ("--agent", "--agent"),
        ("--mcp-servers-json {}", "--mcp-servers-json"),
        ("--mcp-servers-config /x.json", "--mcp-servers-config"),
        ("--webui-mcp-proxy", "--webui-mcp-proxy"),
        ("--ui-mcp-proxy", "--ui-mcp-proxy"),
        ("--path /", "--path"),
        ("--media-path /", "--media-path"),
        ("--slot-save-path /tmp", "--slot-save-path"),
        ("--slot_save_path=/tmp", "--slot-save-path"),
        ("--props", "--props"),
        ("--rpc 10.0.0.1:50052", "--rpc"),
        ("--ssl-key-file k.pem --ssl-cert-file c.pem", "--ssl-key-file"),
        ("--reuse-port", "--reuse-port"),
        ("--api-prefix /x", "--api-prefix"),
        ("--models-dir /m", "--models-dir"),
        ("--models-preset p.ini", "--models-preset"),
        ("--no-models-autoload", "--no-models-autoload"),
        ("-n 64", "-n"),
        ("-n=64", "-n"),
        ("--n-predict 64", "--n-predict"),
        ("--predict 64", "--predict"),
        ("--log-prompts-dir /tmp/p", "--log-prompts-dir"),
        ("--log_prompts_dir=/tmp/p", "--log-prompts-dir"),
        ("--embeddings --pooling mean", "--embeddings"),
        ("--embedding", "--embedding"),
        ("--rerank", "--rerank"),
        ("--reranking", "--reranking"),
    ],
)
def test_extra_args_that_open_the_backend_are_refused(extra: str, flag: str) -> None:
    with pytest.raises(SettingsError) as err:
        build({"EXTRA_ARGS": extra})
    message = str(err.value)
    assert message.startswith(f"EXTRA_ARGS may not contain {flag}:")
    assert "\n" not in message


def test_n_predict_points_at_max_tokens() -> None:
    with pytest.raises(SettingsError, match="use MAX_TOKENS"):
        build({"EXTRA_ARGS": "-n 16"})


@pytest.mark.parametrize(("extra", "setting"), [("--embeddings", "EMBEDDINGS"), ("--embedding", "EMBEDDINGS"),
                                                ("--rerank", "RERANK"), ("--reranking", "RERANK")])
def test_feature_flags_point_at_their_settings(extra: str, setting: str) -> None:
    with pytest.raises(SettingsError, match=f"use {setting}=true"):
        build({"EXTRA_ARGS": extra})


@pytest.mark.parametrize(("env", "flags"), [({}, []), ({"EMBEDDINGS": "true"}, ["--embeddings"]),
                                            ({"RERANK": "on"}, ["--rerank"]),
                                            ({"EMBEDDINGS": "1", "RERANK": "1"}, ["--embeddings", "--rerank"])])
def test_embeddings_and_rerank_start_llama_server_with_their_flags(env: dict[str, str], flags: list[str]) -> None:
    from lifecycle.supervisor import router_defaults

    settings = build({**env, "EXTRA_ARGS": "--pooling mean"})
    assert (settings.embeddings, settings.rerank) == ("--embeddings" in flags, "--rerank" in flags)
    cmd = backend_command(settings, Path("/bin/llama-server"), Path("/m/model.gguf"))
    assert [arg for arg in cmd if arg in ("--embeddings", "--rerank")] == flags
    assert cmd[-2:] == ["--pooling", "mean"]  # EXTRA_ARGS still last
    options = router_defaults(settings)  # router mode: every model's [*] preset options
    assert {key: options.get(key) for key in ("embeddings", "rerank") if key in options} == \
        {flag[2:]: "true" for flag in flags}


@pytest.mark.parametrize("extra", ["--pooling mean -ub 1024", "-fa on -ctk q8_0", "--no-kv-unified",
                                   "--no-agent", "--no-webui-mcp-proxy", "--no-slots", "--rope-scale -1",
                                   "-np 4 -ngl 10 --alias mine", "--reasoning-budget -1"])
def test_ordinary_extra_args_pass(extra: str) -> None:
    assert build({"EXTRA_ARGS": extra}).extra_args


def test_flag_names_as_llama_server_reads_them() -> None:
    assert backend_flag_name("--API-KEY") == "--API-KEY"  # flags are case-sensitive: llama-server rejects this one
    assert backend_flag_name("--slot_save_path=/x") == "--slot-save-path"
    assert backend_flag_name("-n=3") == "-n"
    assert backend_flag_name("-1") is None and backend_flag_name("-0.5") is None and backend_flag_name("x") is None


@pytest.mark.skipif(not ARG_CPP.is_file(), reason="llama.cpp source not unpacked")
def test_every_refused_flag_is_a_real_llama_server_flag() -> None:
    """A typo in the table would refuse nothing: each name must be one llama.cpp's arg.cpp defines."""
    source = ARG_CPP.read_text()
    for flag in REFUSED_BACKEND_FLAGS:
        assert f'"{flag}"' in source, flag


@pytest.mark.parametrize("route", ["/props", "/slots", "/lora-adapters"])
def test_passthrough_opens_the_safe_list_for_get_only(route: str) -> None:
    assert passthrough_methods(route) == ("GET",)
    assert build({"PASSTHROUGH_ROUTES": route}).passthrough_routes == (route,)


def test_the_safe_list_is_the_documented_one() -> None:
    assert tuple(SAFE_PASSTHROUGH_ROUTES) == ("/props", "/slots", "/lora-adapters")


@pytest.mark.parametrize(
    ("route", "says"),
    [*((route, "is served by default, no need to open it") for route in JSON_ROUTES),
     ("/health", "the gateway answers it itself"), ("/ping", "the gateway answers it itself"),
     ("/metrics", "the gateway answers it itself"), ("/reload", "the gateway answers it itself"),
     ("/v1/models", "the gateway answers it itself"),
     ("/slots/0", "may never be opened: saves, restores or erases"), ("/slots/0/save", "may never be opened"),
     ("/tools", "shell commands"), ("/tools/x", "shell commands"), ("/cors-proxy", "SSRF"),
     ("/models", "router mode"), ("/models/load", "router mode"), ("/models/unload", "router mode"),
     ("/models/sse", "router mode"), ("/v1/stream", "another client's stream"),
     ("/v1/streams/lookup", "oracle"), ("/v1/chat/completions/control", "reasoning short"),
     ("/v1/audio/transcriptions", "multipart"), ("/audio/transcriptions", "/v1/audio/transcriptions"),
     ("/completion", "is not on the safe list: /props, /slots, /lora-adapters"), ("/", "not a plain path"),
     ("/embedding", "not on the safe list"), ("/v1/models/x", "not on the safe list"),
     ("/metrics/x", "not on the safe list"), ("/index.html", "not on the safe list"),
     ("/%74ools", "not a plain path"), ("/slots/../tools", "not a plain path"), ("/x/./y", "not a plain path"),
     ("/a b", "not a plain path"), ("tokenize", "tokenize is not a plain path such as /props")],
)
def test_passthrough_refuses_every_other_route_saying_why(route: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        passthrough_methods(route)
    with pytest.raises(SettingsError) as err:
        build({"PASSTHROUGH_ROUTES": f"/props,{route}"})
    assert str(err.value).startswith(f"PASSTHROUGH_ROUTES: {route} ")
    assert "\n" not in str(err.value)


def test_every_never_public_route_is_refused_and_none_is_safe() -> None:
    for key in NEVER_PUBLIC:
        method, _, path = key.rpartition(" ")
        path = path.replace("<id>", "0")
        assert never_public(path) is None if method else never_public(path) == NEVER_PUBLIC[key], key
        if method:  # a method of a safe route: the route itself opens for GET alone
            assert path in SAFE_PASSTHROUGH_ROUTES and passthrough_methods(path) == ("GET",)
        else:
            assert path not in SAFE_PASSTHROUGH_ROUTES and path not in JSON_ROUTES
            with pytest.raises(ValueError, match="may never be opened"):
                passthrough_methods(path)


def test_child_environment_keeps_only_what_we_set() -> None:
    inherited = {"PATH": "/bin", "HOME": "/root", "HF_TOKEN": "hf_x", "CUDA_VISIBLE_DEVICES": "0",
                 "LLAMA_ARG_TOOLS": "all", "LLAMA_ARG_HOST": "0.0.0.0", "LLAMA_ARG_NO_WEBUI": "1",
                 "LLAMA_API_KEY": "inherited", "AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": "9",
                 "LLAMA_SERVER_ROUTER_PORT": "1", "LLAMA_SERVER_CHILD_MODE": "download", "LLAMA_APP_CMD": "x",
                 "LLAMA_SERVER_SLOTS_DEBUG": "1", "LLAMA_SERVER_SLOTS_N_DIFF": "8", "LLAMA_TRACE": "1",
                 "LLAMA_MEDIA_MARKER": "<m>"}
    env, dropped = backend_env(inherited, "per-boot")
    assert env == {"PATH": "/bin", "HOME": "/root", "HF_TOKEN": "hf_x", "CUDA_VISIBLE_DEVICES": "0",
                   "LLAMA_API_KEY": "per-boot"}
    assert dropped == ["AIP_HTTP_PORT", "AIP_MODE", "LLAMA_APP_CMD", "LLAMA_ARG_HOST", "LLAMA_ARG_NO_WEBUI",
                       "LLAMA_ARG_TOOLS", "LLAMA_MEDIA_MARKER", "LLAMA_SERVER_CHILD_MODE", "LLAMA_SERVER_ROUTER_PORT",
                       "LLAMA_SERVER_SLOTS_DEBUG", "LLAMA_SERVER_SLOTS_N_DIFF", "LLAMA_TRACE"]


@pytest.mark.skipif(not ARG_CPP.is_file(), reason="llama.cpp source not unpacked")
def test_every_debug_switch_llama_server_reads_is_scrubbed() -> None:
    """The getenv() names of tools/server (GET /slots shows prompts with LLAMA_SERVER_SLOTS_DEBUG) are dropped."""
    server = ARG_CPP.parent.parent / "tools" / "server"
    names = {name for path in server.glob("*.cpp")
             for name in re.findall(r'getenv\("([A-Z0-9_]+)"\)', path.read_text(errors="replace"))}
    assert "LLAMA_SERVER_SLOTS_DEBUG" in names
    env, _ = backend_env({name: "1" for name in names}, "k")
    assert set(env) - {"LLAMA_API_KEY"} <= {"HOME"}  # HOME: where it looks for its config file


@pytest.mark.skipif(not ARG_CPP.is_file(), reason="llama.cpp source not unpacked")
def test_every_env_name_llama_server_reads_is_scrubbed() -> None:
    """Every set_env(...) name in arg.cpp but HF_TOKEN and MTMD_BACKEND_DEVICE (which open nothing) is dropped."""
    names = set(re.findall(r'set_env\("([A-Z0-9_]+)"\)', ARG_CPP.read_text()))
    assert len(names) > 100
    env, _ = backend_env({name: "1" for name in names}, "k")
    assert set(env) == {"HF_TOKEN", "MTMD_BACKEND_DEVICE", "LLAMA_API_KEY"} and env["LLAMA_API_KEY"] == "k"


def test_the_key_is_not_on_the_command_line(tmp_path: Path) -> None:
    settings = build({"EMBEDDINGS": "true"})
    cmd = backend_command(settings, Path("/bin/llama-server"), tmp_path / "m.gguf")
    assert not any("api-key" in arg for arg in cmd)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_unwritable_data_dir_is_one_line_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    data = blocker / "data"
    with pytest.raises(BackendStartError) as err:
        ensure_writable_dir(data / "logs" / "llama", data)
    assert str(err.value).startswith(f"DATA_DIR {data} is not writable")
    assert "\n" not in str(err.value)
    ensure_writable_dir(tmp_path / "ok" / "logs", tmp_path / "ok")
    assert (tmp_path / "ok" / "logs").is_dir()


@pytest.mark.parametrize(("raw", "value"), [("on", True), ("ON", True), ("true", True), ("1", True), ("yes", True),
                                            ("off", False), ("false", False), ("0", False), ("no", False),
                                            ("", False)])
def test_one_boolean_rule(raw: str, value: bool) -> None:
    assert read_bool("DEBUG_SHELL", {"DEBUG_SHELL": raw}) is value
    assert build({"DEBUG_SHELL": raw}).debug_shell is value


def test_bool_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEBUG_SHELL", "on")
    assert main(["--bool", "DEBUG_SHELL"]) == 0
    assert capsys.readouterr().out == "true\n"
    monkeypatch.setenv("DEBUG_SHELL", "garbage")
    assert main(["--bool", "DEBUG_SHELL"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: DEBUG_SHELL='garbage' is not a boolean") and err.count("\n") == 1


def test_bool_cli_as_a_process() -> None:
    proc = subprocess.run([sys.executable, "-m", "lifecycle.settings", "--bool", "DEBUG_SHELL"], cwd=ROOT,
                          env={"DEBUG_SHELL": "off", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=30)
    assert (proc.returncode, proc.stdout) == (0, "false\n")


def test_llama_cpp_config_files_are_found(tmp_path: Path) -> None:
    """llama-server reads these under its command line; the supervisor warns about each one that exists."""
    empty = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    assert [path for path in config_files(empty) if path.parts[:2] != ("/", "etc")] == []
    user = tmp_path / "home" / ".config" / "llama.cpp" / "config.ini"
    user.parent.mkdir(parents=True)
    user.write_text("tools = all\n")
    assert user in config_files({"HOME": str(tmp_path / "home")})
    assert user not in config_files({"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")})


def test_lifecycle_does_not_import_aiohttp() -> None:
    code = ("import sys, lifecycle.backend, lifecycle.supervisor, lifecycle.background, lifecycle.crashloop; "
            "sys.exit('aiohttp' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=30).returncode == 0
