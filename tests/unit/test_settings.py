from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.settings import Settings, SettingsError


def build(env: dict[str, str], tmp_path: Path | None = None) -> Settings:
    return Settings.from_env({"DATA_DIR": "/srv/data", **env}, probe_roots=[])


def test_defaults_follow_the_seed_contract() -> None:
    s = build({})
    assert s.data_dir == Path("/srv/data")
    assert s.models_dir == Path("/srv/data/models")
    assert s.keys_file == Path("/srv/data/api_keys.txt")
    assert (s.auth_enabled, s.max_requests_per_minute, s.cors_origins) == (True, 100, ())
    assert (s.max_queue_size, s.max_request_body_size, s.max_headers, s.max_header_line_size) == (0, 10485760, 64, 8192)
    # NGL and CTX unset: llama-server fits them to free device memory (they were 99 and 16384)
    assert (s.ngl, s.ctx, s.port, s.port_health, s.port_backend, s.threads) == (None, None, 8000, 8001, 8080, 0)
    assert (s.log_name, s.worker_type, s.debug_shell, s.extra_args) == ("llama", "", False, ())
    assert s.parallel == 8 and s.max_concurrent_requests == 8
    assert s.log_dir == Path("/srv/data/logs/llama")


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"AUTH_ENABLED": "maybe"}, "AUTH_ENABLED"),
        ({"PORT": "abc"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"CTX": "-1"}, "CTX"),
        ({"NGL": "lots"}, "NGL"),
        ({"PARALLEL": "0"}, "PARALLEL"),
        ({"MAX_QUEUE_SIZE": "-3"}, "MAX_QUEUE_SIZE"),
        ({"DEBUG_SHELL": "sure"}, "DEBUG_SHELL"),
        ({"MODE": "both"}, "MODE"),
        ({"EXTRA_ARGS": "--foo 'unterminated"}, "EXTRA_ARGS"),
        ({"MODEL_NAME": "../etc/passwd"}, "MODEL_NAME"),
        ({"BACKEND_STOP_TIMEOUT": "soon"}, "BACKEND_STOP_TIMEOUT"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError) as err:
        build(env)
    assert str(err.value).startswith(f"{name}=")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("YES", True), ("false", False),
                                            ("0", False), ("no", False)])
def test_booleans(raw: str, value: bool) -> None:
    assert build({"AUTH_ENABLED": raw}).auth_enabled is value


def test_worker_type_names_the_log_folder() -> None:
    assert build({"WORKER_TYPE": "coder"}).log_dir == Path("/srv/data/logs/llama-coder")
    assert build({"LOG_NAME": "mine"}).log_dir == Path("/srv/data/logs/mine")


def test_backend_port_alias_is_deprecated_but_works() -> None:
    s = build({"BACKEND_PORT": "9090"})
    assert s.port_backend == 9090
    assert s.deprecations
    assert build({"BACKEND_PORT": "9090", "PORT_BACKEND": "9191"}).port_backend == 9191


def test_ports_must_differ() -> None:
    with pytest.raises(SettingsError, match="ports must differ"):
        build({"PORT": "8001"})


def test_lists_and_args() -> None:
    s = build({"CORS_ORIGINS": "https://a.example, https://b.example,", "EXTRA_ARGS": "--pooling 'mean' -ub 1024"})
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.extra_args == ("--pooling", "mean", "-ub", "1024")


def test_max_concurrent_defaults_to_slots() -> None:
    assert build({"PARALLEL": "8"}).max_concurrent_requests == 8
    assert build({"PARALLEL": "8", "MAX_CONCURRENT_REQUESTS": "2"}).max_concurrent_requests == 2


def test_settings_are_frozen() -> None:
    s = build({})
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_describe_is_printable() -> None:
    described = build({"EXTRA_ARGS": "-fa on"}).describe()
    assert described["extra_args"] == "-fa on"
    assert described["keys_file"] == "/srv/data/api_keys.txt"


def test_describe_leaves_out_a_urls_credentials_and_query() -> None:
    s = Settings.from_env({"DATA_DIR": "/srv/data", "MODELS": "a.gguf,https://h.example/c.gguf?token=zz",
                           "MODEL_URL": "https://user:pw@cdn.example/m.gguf?X-Amz-Signature=abc#sha256=" + "0" * 64},
                          probe_roots=[])
    shown = s.describe()
    assert shown["model_url"] == "https://cdn.example/m.gguf?...#sha256=" + "0" * 64
    assert shown["models"] == "a.gguf https://h.example/c.gguf?..."
    assert "abc" not in str(shown) and "pw" not in str(shown) and "zz" not in str(shown)
