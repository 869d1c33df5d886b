"""The one settings table (lifecycle.settings.VARIABLES): it drives the dataclass defaults, the environment reading
and the variable tables of docs/CONFIGURATION.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lifecycle import settings as S
from lifecycle.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent.parent


def build(env: dict[str, str]) -> Settings:
    return Settings.from_env({"DATA_DIR": "/srv/data", **env}, probe_roots=[])


def test_docs_tables_are_generated_from_the_table() -> None:
    text = S.DOCS.read_text(encoding="utf-8")
    assert S.render_docs(text) == text, f"docs/CONFIGURATION.md differs from the settings table: run {S.DOCS_COMMAND}"
    assert S.docs_sections(text) == list(S.SECTIONS), "each section's table once, in the table's order"
    for var in S.VARIABLES:
        assert f"| `{var.name}` | " in text, var.name


def test_docs_check_cli_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    assert S.main(["--docs", "--check"]) == 0


def test_render_docs_fills_a_stale_block_and_keeps_the_prose() -> None:
    stale = "intro\n<!-- settings:logs -->\n| old | table |\n<!-- /settings -->\noutro\n"
    rendered = S.render_docs(stale)
    assert rendered.startswith("intro\n<!-- settings:logs -->\n| Variable | Default | Description |\n")
    assert rendered.endswith("<!-- /settings -->\noutro\n")
    assert "| `LOG_NAME` | `llama` |" in rendered and "| old |" not in rendered
    with pytest.raises(SettingsError, match="no settings section 'nope'"):
        S.render_docs("<!-- settings:nope -->\n<!-- /settings -->")


def test_unset_environment_gives_the_dataclass_defaults() -> None:
    """from_env with nothing set and the dataclass built by hand take the same default for every field."""
    data = Path("/srv/data")
    assert build({}) == Settings(data_dir=data, models_dir=data / S.MODELS_SUBDIR,
                                 cache_dir=S.default_cache_dir({}, data))


def test_every_field_is_read_from_one_variable() -> None:
    readers = [f for f in dataclasses.fields(Settings) if f.name != "deprecations"]
    assert all("env" in f.metadata for f in readers)
    fields_of = [f.metadata["env"] for f in readers]
    assert len(fields_of) == len(set(fields_of)), "two fields read one variable"
    for var in S.VARIABLES:
        if var.alias_of is not None:
            assert var.alias_of in fields_of and S.VARS[var.alias_of].alias_of is None, var.name
        elif var.read_by is not None:
            assert var.name not in fields_of
            assert var.name in (ROOT / var.read_by).read_text(), f"{var.read_by} does not read {var.name}"
        else:
            assert var.name in fields_of, f"{var.name} sets no Settings field"
        assert var.kind in S._PARSERS and var.section in S.SECTIONS and (var.doc or var.alias_of), var.name
        assert var.default_from is None or var.default_from in S.VARS


def test_defaults_are_written_once_in_the_docs() -> None:
    """The docs' Default cells and `{NAME}` in descriptions come from the table's defaults."""
    assert "| `MAX_CONCURRENT_REQUESTS` | `PARALLEL` |" in S.docs_table("gateway")
    assert "(64 x 8192 bytes)" in S.description(S.VARS["MAX_HEADER_LINE_SIZE"])
    assert "`llama-<WORKER_TYPE>`" in S.description(S.VARS["WORKER_TYPE"])
    assert S.shown_default(S.VARS["BACKEND_PORT"]) == S.shown_default(S.VARS["PORT_BACKEND"]) == "`8080`"
    assert S.shown_default(S.VARS["NGL"]) == "unset (`auto`)"
    assert S.shown_default(S.VARS["AUTH_FAILURE_WINDOW"]) == "`60`"
    assert S.shown_default(S.VARS["CORS_ORIGINS"]) == '`""`'


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "abc"}, "PORT='abc' is not allowed: use an integer 1-65535"),
        ({"PARALLEL": "0"}, "PARALLEL='0' is not allowed: use an integer >= 1"),
        ({"MAX_HEADER_LINE_SIZE": "100"}, "MAX_HEADER_LINE_SIZE='100' is not allowed: use an integer >= 256"),
        ({"AUTH_FAILURE_WINDOW": "0.5"}, "AUTH_FAILURE_WINDOW='0.5' is not allowed: use a number >= 1"),
        ({"QUEUE_TIMEOUT": "nan"}, "QUEUE_TIMEOUT='nan' is not allowed: use a number >= 0.001"),
        ({"NGL": "lots"}, "NGL='lots' is not allowed: use auto (or leave it unset), or an integer >= 0"),
        ({"AUTH_ENABLED": "maybe"},
         "AUTH_ENABLED='maybe' is not a boolean: use true/false, 1/0, yes/no or on/off"),
        ({"MODE": "Both"}, "MODE='Both' is not allowed: use gateway or handler"),
        ({"BACKEND_CRASH_LOOP": "never"}, "BACKEND_CRASH_LOOP='never' is not allowed: use exit or retry"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml' is not allowed: use text or json"),
        ({"MODEL_NAME": "a/b.gguf"}, "MODEL_NAME='a/b.gguf' is not allowed: use a file name; use MODEL_PATH for paths"),
        ({"LOG_NAME": ".."}, "LOG_NAME='..' is not allowed: use a plain folder name"),
        ({"EXTRA_ARGS": "--x 'open"},
         "EXTRA_ARGS=\"--x 'open\" cannot be split like a shell line: No closing quotation"),
        ({"EXTRA_ARGS": "--host 0.0.0.0"}, f"EXTRA_ARGS may not contain --host: {S.REFUSED_BACKEND_FLAGS['--host']}"),
        ({"PASSTHROUGH_ROUTES": "/props,tokenize"},
         "PASSTHROUGH_ROUTES: tokenize is not a plain path such as /props"),
        ({"PORT_HEALTH": "8000"}, "ports must differ: PORT=8000, PORT_HEALTH=8000, PORT_BACKEND=8080"),
    ],
)
def test_error_texts(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        build(env)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCESS_LOG_FORMAT": "xml"}, "ACCESS_LOG_FORMAT='xml' is not allowed: use text or json"),
        ({"BACKEND_PORT": "0"}, "BACKEND_PORT='0' is not allowed: use an integer 1-65535"),
        ({"WORKER_TYPE": "a/b"}, "WORKER_TYPE='a/b' is not allowed: use a plain folder name"),
    ],
)
def test_errors_name_the_variable_that_was_set(env: dict[str, str], message: str) -> None:
    """Before, a bad ACCESS_LOG_FORMAT was reported as LOG_FORMAT and a WORKER_TYPE with a / as LOG_NAME."""
    with pytest.raises(SettingsError) as err:
        build(env)
    assert str(err.value) == message


def test_aliases_are_read_when_the_name_is_unset() -> None:
    assert build({"ACCESS_LOG_FORMAT": "JSON"}).log_format == "json"
    assert build({"ACCESS_LOG_FORMAT": "json", "LOG_FORMAT": "text"}).log_format == "text"
    assert build({"ACCESS_LOG_FORMAT": "json"}).deprecations == ()
    assert build({"BACKEND_PORT": "9090"}).deprecations == ("BACKEND_PORT is deprecated: use PORT_BACKEND",)
    assert build({"BACKEND_PORT": "9090", "PORT_BACKEND": "9191"}).deprecations == ()


def test_derived_defaults() -> None:
    assert build({"PARALLEL": "3"}).max_concurrent_requests == 3
    assert build({"WORKER_TYPE": "coder", "LOG_NAME": "mine"}).log_name == "llama-coder"
    assert build({"MODELS_DIR": "/m"}).models_dir == Path("/m")
    assert build({"MODE": " Handler "}).mode == "handler"
    assert build({"LLAMA_GGUF_CACHE_DIR": "/c"}).cache_dir == Path("/c")
    assert build({"LLAMA_GGUF_IMAGE": "cpu"}).cache_dir == Path("/srv/data") / S.CACHE_SUBDIR
    assert build({"XDG_CACHE_HOME": "/x"}).cache_dir == Path("/x/llama-gguf-inference")


def test_read_one_variable_as_settings_does() -> None:
    assert S.read("PORT_HEALTH", {}) == Settings.__dataclass_fields__["port_health"].default == 8001
    assert S.read("PORT_HEALTH", {"PORT_HEALTH": " 9001 "}) == 9001
    assert S.read("MAX_CONCURRENT_REQUESTS", {"PARALLEL": "3"}) == 3
    assert S.read("BACKEND_PORT", {"BACKEND_PORT": "9"}) == 9
    with pytest.raises(SettingsError, match=r"^PORT_HEALTH='x' is not allowed"):
        S.read("PORT_HEALTH", {"PORT_HEALTH": "x"})


def test_read_bool_takes_the_table_default() -> None:
    assert S.read_bool("AUTH_ENABLED", {}) is True
    assert S.read_bool("DEBUG_SHELL", {}) is False
    assert S.read_bool("NOT_A_SETTING", {}) is False
    assert S.read_bool("NOT_A_SETTING", {"NOT_A_SETTING": "on"}) is True


def test_describe_prints_auto_for_unset_auto_ints() -> None:
    described = build({"CTX": "4096"}).describe()
    assert (described["ngl"], described["ctx"], described["model_name"]) == ("auto", "4096", "")
