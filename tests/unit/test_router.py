"""lifecycle.router: planning MODELS, the model rule, the preset file, waiting for a model to load."""

from __future__ import annotations

import asyncio
import configparser
import json
from pathlib import Path

import pytest

from lifecycle.downloads import ProvisionError
from lifecycle.request_rules import Limits, RequestRejected, admit_body
from lifecycle.router import ModelLoadFailed, ModelSet, Router, ServedModel, model_id, plan, preset_text
from lifecycle.settings import Settings, SettingsError
from lifecycle.supervisor import router_command, router_defaults, write_preset
from lifecycle.upstream import Reply


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"DATA_DIR": str(tmp_path), "LLAMA_GGUF_CACHE_DIR": str(tmp_path / "cache"), **env},
                             probe_roots=[])


def files(tmp_path: Path, *names: str) -> Path:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    for name in names:
        (models / name).write_bytes(b"GGUF")
    return models


def by_name(s: Settings):  # type: ignore[no-untyped-def]
    def resolve(ref: str) -> Path:
        path = s.models_dir / ref
        if not path.is_file():
            raise ProvisionError(f"model not found: {path}")
        return path
    return resolve


def test_model_ids_drop_gguf_and_the_shard_suffix() -> None:
    assert model_id(Path("alpha.gguf")) == "alpha"
    assert model_id(Path("Big-Q4_K_M-00001-of-00003.gguf")) == "Big-Q4_K_M"
    assert model_id(Path("x.Q4_1.gguf")) == "x.Q4_1"


def test_all_serves_every_model_file_but_projectors_and_later_shards(tmp_path: Path) -> None:
    files(tmp_path, "b.gguf", "a.gguf", "mmproj-a.gguf", "big-00001-of-00002.gguf", "big-00002-of-00002.gguf",
          "notes.txt")
    s = settings(tmp_path, MODELS="all")
    models = plan(s, by_name(s))
    assert models.ids == ("a", "b", "big")
    assert models.default == "a"


def test_choose_by_id_file_name_alias_or_any(tmp_path: Path) -> None:
    models = ModelSet((ServedModel("a", Path("/m/a.gguf"), ("first",)), ServedModel("b", Path("/m/b.gguf"))), "b")
    assert models.choose("a").id == "a"
    assert models.choose("a.gguf").id == "a"
    assert models.choose("first").id == "a"
    for default in ("any", "", None):
        assert models.choose(default).id == "b"
    with pytest.raises(RequestRejected) as unknown:
        models.choose("gpt-4o")
    assert unknown.value.status == 404 and unknown.value.code == "model_not_found" and unknown.value.param == "model"
    assert "available models: a, b" in str(unknown.value)
    with pytest.raises(RequestRejected) as bad:
        models.choose(7)
    assert bad.value.status == 400


def test_admit_body_rewrites_the_model_to_its_id_only_when_it_differs(tmp_path: Path) -> None:
    models = ModelSet((ServedModel("a", Path("/m/a.gguf")),), "a")
    limits = Limits(max_tokens=100, max_slots=4, max_dry_penalty_last_n=1000, models=models)
    raw = b'{"model": "a", "prompt": "hi"}'
    assert admit_body(raw, limits).raw is raw and admit_body(raw, limits).model == "a"
    sent = admit_body(b'{"model": "a.gguf", "prompt": "hi"}', limits)
    assert json.loads(sent.raw)["model"] == "a" and sent.model == "a"
    assert json.loads(admit_body(b'{"prompt": "hi"}', limits).raw)["model"] == "a"
    # one model: the field is not read at all
    single = Limits(max_tokens=100, max_slots=4, max_dry_penalty_last_n=1000)
    assert admit_body(b'{"model": "whatever", "prompt": "hi"}', single).model is None


def test_names_that_clash_and_an_unknown_default_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="means both"):
        ModelSet((ServedModel("a", Path("/m/a.gguf"), ("b",)), ServedModel("b", Path("/m/b.gguf"))), "a")
    files(tmp_path, "a.gguf")
    s = settings(tmp_path, MODELS="all", DEFAULT_MODEL="zzz")
    with pytest.raises(SettingsError, match="DEFAULT_MODEL='zzz'"):
        plan(s, by_name(s))
    s = settings(tmp_path, MODELS="all", DEFAULT_MODEL="a.gguf")
    assert plan(s, by_name(s)).default == "a"  # a file name or alias means its id


def test_all_stands_alone_and_entries_are_model_references(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="stands alone"):
        settings(tmp_path, MODELS="all,a.gguf")
    with pytest.raises(SettingsError, match="MODELS="):
        settings(tmp_path, MODELS="ftp://example.com/x.gguf")


def test_an_empty_models_dir_is_one_clear_error(tmp_path: Path) -> None:
    files(tmp_path)
    s = settings(tmp_path, MODELS="all")
    with pytest.raises(ProvisionError, match=r"no \.gguf files in MODELS_DIR"):
        plan(s, by_name(s))


def preset(tmp_path: Path, text: str) -> Settings:
    files(tmp_path, "alpha.gguf", "beta.gguf")
    (tmp_path / "models.ini").write_text(text)
    return settings(tmp_path, MODELS="alpha.gguf,beta.gguf", MODELS_PRESET=str(tmp_path / "models.ini"))


def test_a_preset_applies_to_its_model_and_can_add_one(tmp_path: Path) -> None:
    extra = tmp_path / "draft.gguf"
    extra.write_bytes(b"GGUF")
    s = preset(tmp_path, f"version = 1\n[*]\nc = 8192\n[alpha.gguf]\nalias = al, first\nc = 4096\n"
                         f"load-on-startup = true\n[draft]\nmodel = {extra}\n")
    models = plan(s, by_name(s))
    assert models.ids == ("alpha", "beta", "draft")
    assert models.choose("al").id == "alpha" and models.choose("first").id == "alpha"
    ini = configparser.ConfigParser(interpolation=None)
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read_string("[top]\n" + preset_text(models, router_defaults(s)))
    assert ini["*"]["c"] == "8192" and ini["*"]["n-gpu-layers"] == "auto" and ini["*"]["fit"] == "on"
    assert ini["alpha"]["model"] == str((tmp_path / "models" / "alpha.gguf").resolve())
    assert ini["alpha"]["c"] == "4096" and ini["alpha"]["load-on-startup"] == "true"
    assert ini["draft"]["model"] == str(extra.resolve())


@pytest.mark.parametrize(("text", "says"), [
    ("[alpha]\nhost = 0.0.0.0\n", "may not contain --host"),
    ("[*]\napi-key = x\n", "may not contain --api-key"),
    ("[alpha]\ntools = all\n", "may not contain --tools"),
    ("[alpha]\nLLAMA_ARG_PORT = 1\n", "environment variable"),
    ("[alpha]\nmodel = /etc/passwd\n", "is set by MODELS"),
    ("[nothing]\nc = 1\n", "names none of the served models"),
    ("[alpha\n", "cannot be read"),
])
def test_a_bad_preset_is_refused_naming_file_section_and_key(tmp_path: Path, text: str, says: str) -> None:
    s = preset(tmp_path, text)
    with pytest.raises(SettingsError, match=says):
        plan(s, by_name(s))


def test_the_router_command_line_and_preset_file(tmp_path: Path) -> None:
    files(tmp_path, "alpha.gguf")
    s = settings(tmp_path, MODELS="all", MODELS_MAX="1", MODEL_IDLE_TIMEOUT="30", MAX_TOKENS="64",
                 EXTRA_ARGS="--jinja")
    path = write_preset(s, plan(s, by_name(s)))
    assert path.is_file() and "[alpha]" in path.read_text()
    cmd = router_command(s, Path("/bin/llama-server"), path)
    assert cmd[cmd.index("--models-preset") + 1] == str(path)
    assert cmd[cmd.index("--models-max") + 1] == "1"
    assert cmd[cmd.index("--sleep-idle-seconds") + 1] == "30"
    assert cmd[cmd.index("-n") + 1] == "64" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "-m" not in cmd and cmd[-1] == "--jinja" and "--metrics" in cmd


class FakeRouter:
    """The router's GET /models and POST /models/load: `script` is the statuses the next looks return."""

    def __init__(self, script: list[dict[str, object]]) -> None:
        self.script, self.loads = script, 0

    async def request(self, method: str, path: str, body: bytes | None = None, **_: object) -> Reply:
        if method == "POST":
            self.loads += 1
            return Reply(200, "application/json", b'{"success": true}')
        status = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return Reply(200, "application/json", json.dumps({"data": [{"id": "a", "status": status}]}).encode())

    async def close(self) -> None:
        pass


def test_wait_ready_loads_an_unloaded_model_once_and_waits_for_it() -> None:
    fake = FakeRouter([{"value": "unloaded"}, {"value": "loading"}, {"value": "loading"}, {"value": "loaded"}])
    router = Router(lambda: fake)  # type: ignore[arg-type,return-value]
    assert asyncio.run(router.wait_ready("a", float("inf"))) is True
    assert fake.loads == 1


def test_wait_ready_gives_up_at_the_deadline_and_reports_a_failed_load() -> None:
    slow = FakeRouter([{"value": "loading"}])
    assert asyncio.run(Router(lambda: slow).wait_ready("a", 0.0)) is False  # type: ignore[arg-type,return-value]
    failed = FakeRouter([{"value": "unloaded"}, {"value": "loading"},
                         {"value": "unloaded", "failed": True, "exit_code": 1}])
    with pytest.raises(ModelLoadFailed, match="exit code 1"):
        asyncio.run(Router(lambda: failed).wait_ready("a", float("inf")))  # type: ignore[arg-type,return-value]
