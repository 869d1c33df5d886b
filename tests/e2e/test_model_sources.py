"""Models named by source, served by the real gateway and llama-server: MODEL_REPO and MODEL_URL against a local
stand-in for Hugging Face (tests/fakes/fake_hf_hub.py) that serves the real default GGUF. A download cut off
mid-file resumes; the next start needs no network; a model in the Hugging Face cache layout is served with the
hub stopped; a gated repo without a token and a corrupt file stop the start with one line; MODELS mixes a repo
with a file in MODELS_DIR."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from lifecycle.model import DEFAULT_MODEL_FILE, default_model
from lifecycle.settings import default_cache_dir
from tests.conftest import Gateway, free_port
from tests.e2e.test_lifecycle import _run_gateway
from tests.fakes.fake_hf_hub import FakeHub

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
HUB_ENV = {"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}


@pytest.fixture(scope="module")
def gguf() -> Path:
    return default_model(default_cache_dir(os.environ))


@pytest.fixture
def hub(gguf: Path) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo(REPO, {DEFAULT_MODEL_FILE: gguf, "SmolLM2-135M-Instruct.F16.gguf": b"GGUF-not-this-one",
                             "README.md": b"# a model card\n"})
        yield fake


def answers(gw: Gateway, model: str = "any") -> dict[str, object]:
    reply = requests.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": model}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_model_repo_is_downloaded_resumed_and_then_served_without_network(tmp_path: Path, hub: FakeHub,
                                                                          gguf: Path) -> None:
    hub.interrupt_once(DEFAULT_MODEL_FILE, after=gguf.stat().st_size // 3)
    hub.chunk_delay = 0.003  # about 4 s for the file: long enough for progress lines
    env = {**HUB_ENV, "MODEL_REPO": f"{REPO}:Q4_1", "HF_ENDPOINT": hub.url}
    gw = Gateway(tmp_path, env).start()
    try:
        answers(gw)
        fetched = hub.gets(DEFAULT_MODEL_FILE)
        assert len(fetched) == 2 and fetched[1].headers.get("Range", "").startswith("bytes=")  # resumed
        log = (tmp_path / "gateway.out").read_text(errors="replace")
        assert "% (" in log and "MB/s, ETA" in log  # progress lines
    finally:
        gw.stop()
    kept = list((tmp_path / "models").rglob(DEFAULT_MODEL_FILE))
    assert len(kept) == 1 and kept[0].read_bytes() == gguf.read_bytes()
    assert not list((tmp_path / "models").rglob("*.partial"))
    hub.stop()  # the next start finds it in MODELS_DIR: no network at all
    again = Gateway(tmp_path, {**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}).start()
    try:
        answers(again)
    finally:
        again.stop()


def test_a_model_in_the_hugging_face_cache_is_served_with_the_hub_stopped(tmp_path: Path, gguf: Path) -> None:
    cache = tmp_path / "hf-cache"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (cache / f"models--{REPO.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text("a" * 40)
    shutil.copyfile(gguf, snapshot / DEFAULT_MODEL_FILE)
    env = {**HUB_ENV, "MODEL_REPO": REPO, "HF_HUB_CACHE": str(cache),
           "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    gw = Gateway(tmp_path / "data", env).start()
    try:
        answers(gw)
        assert not (tmp_path / "data" / "models").exists() or not list((tmp_path / "data" / "models").rglob("*.gguf"))
    finally:
        gw.stop()


def test_model_url_is_downloaded_and_served(tmp_path: Path, hub: FakeHub) -> None:
    url = hub.add_static(DEFAULT_MODEL_FILE, default_model(default_cache_dir(os.environ)))
    gw = Gateway(tmp_path, {**HUB_ENV, "MODEL_URL": url}).start()
    try:
        answers(gw)
    finally:
        gw.stop()
    assert (tmp_path / "models" / DEFAULT_MODEL_FILE).is_file()


def test_a_gated_repo_without_a_token_stops_the_start_with_one_line(tmp_path: Path, gguf: Path) -> None:
    with FakeHub() as hub:
        hub.add_repo(REPO, {DEFAULT_MODEL_FILE: gguf}, token="hf_secret_token_123")
        proc = _run_gateway(tmp_path, {**HUB_ENV, "MODEL_REPO": REPO, "HF_ENDPOINT": hub.url}, timeout=120)
    assert proc.returncode == 1
    assert "HF_TOKEN" in proc.stderr and REPO in proc.stderr and "Traceback" not in proc.stderr


def test_a_corrupt_download_is_refused_and_nothing_is_left_under_its_name(tmp_path: Path, gguf: Path) -> None:
    with FakeHub() as hub:
        hub.add_repo(REPO, {DEFAULT_MODEL_FILE: gguf}, corrupt=(DEFAULT_MODEL_FILE,))
        proc = _run_gateway(tmp_path, {**HUB_ENV, "MODEL_REPO": REPO, "HF_ENDPOINT": hub.url}, timeout=120)
    assert proc.returncode == 1
    assert "sha256" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "models").rglob(DEFAULT_MODEL_FILE))


def test_models_mixes_a_repo_and_a_file_in_models_dir(tmp_path: Path, hub: FakeHub, gguf: Path) -> None:
    (tmp_path / "models").mkdir(parents=True)
    shutil.copyfile(gguf, tmp_path / "models" / "local.gguf")
    env = {**HUB_ENV, "MODELS": f"{REPO}:Q4_1,local.gguf", "HF_ENDPOINT": hub.url, "MODELS_MAX": "1",
           "CTX": "2048", "PARALLEL": "1"}
    gw = Gateway(tmp_path, env).start()
    try:
        repo_model = DEFAULT_MODEL_FILE.removesuffix(".gguf")
        assert answers(gw, repo_model)["model"] == repo_model
        assert answers(gw, "local")["model"] == "local"
        assert answers(gw)["model"] == repo_model  # the first listed is the default
    finally:
        gw.stop()
