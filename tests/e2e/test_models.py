"""Several models at once (MODELS), against the real llama-server in router mode and copies of the real default GGUF
under two names: requests alternate between them with MODELS_MAX=1 (each one loads its model, unloading the other),
in both lanes, with the official openai client; unknown models are a 404; /v1/models, /health and /metrics show the
statuses; admin load, unload and refresh need an admin key."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from lifecycle.model import DEFAULT_MODEL_FILE, default_model
from lifecycle.settings import default_cache_dir
from tests.conftest import Gateway

ADMIN = "sk-models-admin-0123456789"
USER = "sk-models-user-0123456789"
ALPHA_ONLY = "sk-models-alpha-only-0123456789"
CHAT = [{"role": "user", "content": "Hi"}]
# The fast lane takes plain requests; a query string sends the same request down aiohttp's lane.
LANES = {"fast": "", "aiohttp": "?lane=aiohttp"}


def auth(key: str = USER) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def gguf() -> Path:
    import os

    return default_model(default_cache_dir(os.environ))


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, gguf: Path) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("models")
    models = data / "models"
    models.mkdir()
    for name in ("alpha.gguf", "beta.gguf"):
        shutil.copyfile(gguf, models / name)
    keys = data / "api_keys.txt"
    keys.write_text(f"ops:{ADMIN} admin=true\napp:{USER}\nalpha-only:{ALPHA_ONLY} models=alpha.gguf\n")
    keys.chmod(0o600)
    gw = Gateway(data, {"MODELS": "all", "MODELS_MAX": "1", "CTX": "2048", "PARALLEL": "2",
                        "AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(keys), "MAX_REQUESTS_PER_MINUTE": "10000",
                        "QUEUE_TIMEOUT": "120"}).start()
    yield gw
    gw.stop()


def chat(gw: Gateway, model: object, lane: str = "", **extra: object) -> requests.Response:
    body = {"messages": CHAT, "max_tokens": 2, **extra}
    if model is not ...:
        body["model"] = model
    return requests.post(f"{gw.url}/v1/chat/completions{LANES.get(lane, lane)}", json=body, headers=auth(),
                         timeout=120)


def statuses(gw: Gateway) -> dict[str, str]:
    listed = requests.get(f"{gw.url}/v1/models", headers=auth(), timeout=10)
    assert listed.status_code == 200
    return {entry["id"]: entry["status"] for entry in listed.json()["data"]}


@pytest.mark.parametrize("lane", list(LANES))
def test_requests_alternate_between_two_models_with_one_loaded_at_a_time(routed: Gateway, lane: str) -> None:
    for model in ("alpha", "beta", "alpha", "beta"):
        answer = chat(routed, model, lane)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == model
        assert statuses(routed)[model] == "loaded"
    # MODELS_MAX=1: the other one was unloaded to make room
    assert statuses(routed) == {"alpha": "unloaded", "beta": "loaded"}


def test_a_model_is_named_by_id_file_name_or_any(routed: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{routed.url}/v1", api_key=USER, max_retries=0)
    assert client.chat.completions.create(model="alpha.gguf", messages=CHAT, max_tokens=2).model == "alpha"
    # any, empty or missing: the default model, the first listed
    assert client.chat.completions.create(model="any", messages=CHAT, max_tokens=2).model == "alpha"
    assert chat(routed, "").json()["model"] == "alpha"
    assert chat(routed, ...).json()["model"] == "alpha"
    # a stream for a model that is not loaded waits for it to load, and answers
    with client.chat.completions.create(model="beta", messages=CHAT, max_tokens=2, stream=True) as stream:
        chunks = list(stream)
    assert chunks and all(chunk.model == "beta" for chunk in chunks)


@pytest.mark.parametrize("lane", list(LANES))
def test_an_unknown_model_is_a_404_listing_the_models(routed: Gateway, lane: str) -> None:
    answer = chat(routed, "gpt-4o", lane)
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "alpha" in error["message"] and "beta" in error["message"]
    client = openai.OpenAI(base_url=f"{routed.url}/v1", api_key=USER, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)


def test_models_list_and_retrieve_show_status_and_gguf_metadata(routed: Gateway, gguf: Path) -> None:
    client = openai.OpenAI(base_url=f"{routed.url}/v1", api_key=USER, max_retries=0)
    listed = {model.id: model for model in client.models.list()}
    assert set(listed) == {"alpha", "beta"}
    entry = client.models.retrieve("beta").model_dump()
    assert entry["status"] in ("loaded", "loading", "sleeping", "unloaded")
    assert entry["aliases"] == ["beta.gguf"]
    meta = entry["gguf"]
    assert meta["architecture"] == "llama" and meta["quantization"] == "Q4_1"
    assert meta["context_length"] == 8192 and meta["size_bytes"] == gguf.stat().st_size
    assert 100_000_000 < meta["parameters"] < 200_000_000
    assert client.models.retrieve("any").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_health_and_metrics_show_each_model(routed: Gateway) -> None:
    assert chat(routed, "beta").status_code == 200
    health = requests.get(f"{routed.url}/health", timeout=10).json()
    assert health["models"]["beta"]["status"] == "loaded"
    assert health["models"]["alpha"]["status"] == "unloaded"
    text = requests.get(f"{routed.url}/metrics", headers={**auth(), "Accept": "text/plain"}, timeout=10).text
    assert 'gateway_model_state{model="beta",state="loaded"} 1.0' in text
    assert 'gateway_model_state{model="alpha",state="unloaded"} 1.0' in text
    assert any(line.startswith("gateway_requests_total{") and 'model="beta"' in line for line in text.splitlines())
    # the loaded model's own llama-server series, labelled with its id
    assert any(line.startswith("llamacpp:") and 'model="beta"' in line for line in text.splitlines())
    # the load balancers' gauges: the loaded model's slots, through the router's /slots?model=beta (none for alpha)
    assert 'gateway_slots_total{model="beta"} 2.0' in text and 'gateway_running_requests{model="beta"} 0.0' in text
    assert 'gateway_kv_cache_utilization{model="beta"} 0.0' in text
    assert 'gateway_queued_requests{model="beta"} 0.0' in text and 'model="alpha"} ' not in \
        "".join(line for line in text.splitlines() if line.startswith(("gateway_slots", "gateway_queued")))
    load = requests.get(f"{routed.url}/metrics", headers=auth(), timeout=10).json()["load"]
    assert list(load) == ["beta"] and load["beta"]["slots_total"] == 2 and load["beta"]["n_ctx"] == 2048


def test_admin_actions_need_an_admin_key_and_are_logged(routed: Gateway) -> None:
    load = f"{routed.url}/admin/models/load"
    refused = requests.post(load, json={"model": "alpha"}, headers=auth(USER), timeout=10)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
    assert requests.post(load, json={"model": "alpha"}, timeout=10).status_code == 401
    assert requests.post(load, json={"model": "nope"}, headers=auth(ADMIN), timeout=10).status_code == 404
    loaded = requests.post(load, json={"model": "alpha"}, headers=auth(ADMIN), timeout=30)
    assert loaded.status_code == 200, loaded.text
    deadline = time.monotonic() + 60
    while statuses(routed)["alpha"] != "loaded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    unloaded = requests.post(f"{routed.url}/admin/models/unload", json={"model": "alpha.gguf"},
                             headers=auth(ADMIN), timeout=30)
    assert unloaded.status_code == 200 and unloaded.json()["model"] == "alpha"
    deadline = time.monotonic() + 30
    while statuses(routed)["alpha"] != "unloaded":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    log = (routed.data_dir / "gateway.out").read_text(errors="replace")
    assert "admin: load model alpha by key_id=ops" in log and "admin: unload model alpha by key_id=ops" in log
    assert "refused: key_id=app is not an admin key" in log


def test_refresh_serves_a_file_added_later(routed: Gateway, gguf: Path) -> None:
    refresh = f"{routed.url}/admin/models/refresh"
    assert requests.post(refresh, headers=auth(USER), timeout=10).status_code == 403
    shutil.copyfile(gguf, routed.data_dir / "models" / "gamma.gguf")
    try:
        answer = requests.post(refresh, headers=auth(ADMIN), timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["added"] == ["gamma"] and "gamma" in answer.json()["models"]
        assert "gamma" in statuses(routed)
        assert chat(routed, "gamma").json()["model"] == "gamma"
    finally:
        (routed.data_dir / "models" / "gamma.gguf").unlink()
        requests.post(refresh, headers=auth(ADMIN), timeout=60)
    assert "gamma" not in statuses(routed)


def test_a_model_that_fails_to_load_is_a_clear_503(tmp_path: Path, gguf: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(gguf, models / "good.gguf")
    (models / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing else
    gw = Gateway(tmp_path, {"MODELS": "good.gguf,broken.gguf", "MODELS_MAX": "1", "CTX": "2048",
                            "PARALLEL": "1", "QUEUE_TIMEOUT": "60"}).start()
    try:
        answer = requests.post(f"{gw.url}/v1/chat/completions", json={"model": "broken", "messages": CHAT,
                                                                      "max_tokens": 2}, timeout=90)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "model_load_failed"
        assert "broken" in answer.json()["error"]["message"]
        # the other model still answers
        ok = requests.post(f"{gw.url}/v1/chat/completions", json={"model": "good", "messages": CHAT,
                                                                  "max_tokens": 2}, timeout=90)
        assert ok.status_code == 200 and ok.json()["model"] == "good"
    finally:
        gw.stop()


def test_models_unset_keeps_one_model_and_its_answers(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway()
    listed = requests.get(f"{gw.url}/v1/models", timeout=10).json()
    assert listed["data"][0]["id"] == DEFAULT_MODEL_FILE  # llama-server's own list, as before
    assert "models" not in requests.get(f"{gw.url}/health", timeout=10).json()
    # any model name is served by the one model (no 404), as before
    answer = requests.post(f"{gw.url}/v1/chat/completions", json={"model": "whatever", "messages": CHAT,
                                                                   "max_tokens": 2}, timeout=60)
    assert answer.status_code == 200
    one = requests.get(f"{gw.url}/v1/models/any", timeout=10)
    assert one.status_code == 200 and one.json()["id"] == DEFAULT_MODEL_FILE
    assert requests.get(f"{gw.url}/v1/models/{DEFAULT_MODEL_FILE}", timeout=10).status_code == 200
    assert requests.post(f"{gw.url}/admin/models/load", json={"model": "x"}, timeout=10).status_code == 404


@pytest.mark.parametrize(("env", "preset", "says"), [
    ({"MODELS": "all"}, None, "no .gguf files in MODELS_DIR"),
    ({"MODELS": "one.gguf,two.gguf"}, None, "model not found"),
    ({"MODELS": "all", "DEFAULT_MODEL": "nope"}, None, "DEFAULT_MODEL='nope' is none of the served models"),
    ({"MODELS": "all"}, "[alpha]\nhost = 0.0.0.0\n", "may not contain --host"),
    ({"MODELS": "all"}, "[alpha]\nLLAMA_ARG_HOST = 0.0.0.0\n", "not its environment variable"),
    ({"MODELS": "all"}, "[zeta]\nc = 1024\n", "names none of the served models"),
])
def test_bad_models_settings_stop_with_one_line(tmp_path: Path, gguf: Path, env: dict[str, str],
                                                 preset: str | None, says: str) -> None:
    from tests.e2e.test_lifecycle import _run_gateway

    (tmp_path / "models").mkdir()
    if env.get("DEFAULT_MODEL") or preset:
        shutil.copyfile(gguf, tmp_path / "models" / "alpha.gguf")
    if preset:
        (tmp_path / "models.ini").write_text(preset)
        env = {**env, "MODELS_PRESET": str(tmp_path / "models.ini")}
    proc = _run_gateway(tmp_path, env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr


def test_serverless_jobs_pick_their_model_the_same_way(tmp_path: Path, gguf: Path) -> None:
    from tests.conftest import free_port
    from tests.e2e.test_serverless import handler_env, runsync, start_handler, stop, wait_api

    models = tmp_path / "models"
    models.mkdir()
    for name in ("alpha.gguf", "beta.gguf"):
        shutil.copyfile(gguf, models / name)
    port = free_port()
    env = handler_env(tmp_path, MODELS="all", MODELS_MAX="1", CTX="2048", PARALLEL="2")
    proc = start_handler(tmp_path, ["--rp_serve_api", "--rp_api_port", str(port)], env)
    try:
        api = wait_api(proc, port, tmp_path)
        routed = runsync(api, {"openai_route": "/v1/chat/completions",
                               "openai_input": {"model": "beta", "messages": CHAT, "max_tokens": 2}})
        assert routed["output"][0]["model"] == "beta"
        default = runsync(api, {"openai_route": "/v1/chat/completions",
                                "openai_input": {"messages": CHAT, "max_tokens": 2}})
        assert default["output"][0]["model"] == "alpha"
        native = runsync(api, {"messages": CHAT, "model": "beta.gguf", "sampling_params": {"max_tokens": 2}})
        assert native["status"] == "COMPLETED" and native["output"][0]["usage"]["completion_tokens"] > 0
        unknown = runsync(api, {"prompt": "Hi", "model": "gpt-4o", "sampling_params": {"max_tokens": 2}})
        assert "model 'gpt-4o' does not exist; available models: alpha, beta" in json.dumps(unknown)
        wrong = runsync(api, {"openai_route": "/v1/chat/completions",
                              "openai_input": {"model": "nope", "messages": CHAT}})
        assert "openai_input.model 'nope' does not exist" in json.dumps(wrong)
    finally:
        stop(proc)


def test_presets_aliases_and_idle_sleep(tmp_path: Path, gguf: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("alpha.gguf", "beta.gguf"):
        shutil.copyfile(gguf, models / name)
    (tmp_path / "models.ini").write_text("version = 1\n[*]\nctx-size = 1024\n[beta.gguf]\nalias = b2, second\n"
                                         "ctx-size = 512\n")
    gw = Gateway(tmp_path, {"MODELS": "all", "MODELS_MAX": "2", "MODEL_IDLE_TIMEOUT": "2", "PARALLEL": "1",
                            "MODELS_PRESET": str(tmp_path / "models.ini"), "DEFAULT_MODEL": "second"}).start()
    try:
        def post(model: str) -> requests.Response:
            return requests.post(f"{gw.url}/v1/chat/completions", json={"model": model, "messages": CHAT,
                                                                         "max_tokens": 2}, timeout=60)

        assert post("b2").json()["model"] == "beta"  # an alias from the preset
        assert post("any").json()["model"] == "beta"  # DEFAULT_MODEL names it by an alias
        entry = requests.get(f"{gw.url}/v1/models/beta", timeout=10).json()
        assert sorted(entry["aliases"]) == ["b2", "beta.gguf", "second"]
        assert entry["meta"]["n_ctx"] == 512  # the model's own preset section won over [*]
        assert post("alpha").status_code == 200
        assert requests.get(f"{gw.url}/v1/models/alpha", timeout=10).json()["meta"]["n_ctx"] == 1024
        # MODEL_IDLE_TIMEOUT: idle models go to sleep, and the next request wakes them
        deadline = time.monotonic() + 30
        while requests.get(f"{gw.url}/v1/models/alpha", timeout=10).json()["status"] != "sleeping":
            assert time.monotonic() < deadline, "alpha never went to sleep"
            time.sleep(0.5)
        assert post("alpha").json()["model"] == "alpha"
    finally:
        gw.stop()


@pytest.mark.parametrize("lane", LANES)
def test_a_key_scoped_to_one_model_sees_and_uses_only_that_one(routed: Gateway, lane: str) -> None:
    """`models=alpha.gguf` (a file name: a model is matched by its id, file name and aliases): beta is refused
    before anything is loaded for it, and the list shows alpha alone."""
    beta = requests.post(f"{routed.url}/v1/chat/completions{LANES[lane]}", headers=auth(ALPHA_ONLY), timeout=30,
                         json={"model": "beta", "messages": CHAT, "max_tokens": 2})
    assert beta.status_code == 403 and beta.json()["error"]["code"] == "model_not_allowed"
    assert beta.json()["error"]["message"] == "this API key may not use the model beta; it may use: alpha.gguf"
    listed = requests.get(f"{routed.url}/v1/models", headers=auth(ALPHA_ONLY), timeout=30).json()
    assert [entry["id"] for entry in listed["data"]] == ["alpha"]
    assert {entry["id"] for entry in requests.get(f"{routed.url}/v1/models", headers=auth(), timeout=30)
            .json()["data"]} == {"alpha", "beta"}
    one = requests.get(f"{routed.url}/v1/models/beta", headers=auth(ALPHA_ONLY), timeout=30)
    assert one.status_code == 403 and one.json()["error"]["code"] == "model_not_allowed"
