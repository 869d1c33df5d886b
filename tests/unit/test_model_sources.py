"""Model sources (lifecycle.sources): Hugging Face repos against a fake Hub on 127.0.0.1, the Hugging Face and
RunPod caches, MODELS_DIR, URLs, resumed and locked downloads, the error messages and the pull CLI."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lifecycle import downloads, sources
from lifecycle.downloads import ChecksumError, DiskSpaceError, DownloadError, download_file
from lifecycle.model import main as model_main
from lifecycle.model import resolve_model
from lifecycle.settings import Settings
from lifecycle.sources import ModelNotFound, ModelSourceError, resolve_reference
from tests.fakes.fake_hf_hub import FakeHub

ROOT = Path(__file__).resolve().parent.parent.parent
REPO = "org/model-GGUF"
FOLDER = "org--model-GGUF"


def gguf(size: int = 300_000, seed: int = 0) -> bytes:
    return b"GGUF" + random.Random(seed).randbytes(size - 4)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    return sha(path.read_bytes())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(autouse=True)
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No token, no xet, no progress bars, no real RunPod cache; the Hub is a dead port until a test starts one."""
    import huggingface_hub.constants as hf_constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint())
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(sources, "RUNPOD_HF_CACHE", tmp_path / "no-runpod-volume")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"DATA_DIR": str(tmp_path / "data"), **env}, probe_roots=[])


def models(tmp_path: Path) -> Path:
    return tmp_path / "data" / "models"


# --- choosing the file ----------------------------------------------------------------------------------------------


def test_quant_tag_picks_that_file(hub: FakeHub, tmp_path: Path) -> None:
    files = {"model-Q4_K_M.gguf": gguf(seed=1), "model-Q4_K.gguf": gguf(seed=2), "model-Q8_0.gguf": gguf(seed=3),
             "README.md": b"# hi"}
    hub.add_repo(REPO, files)
    path = resolve_reference(f"{REPO}:q4_k", settings(tmp_path))
    assert path == models(tmp_path) / FOLDER / "model-Q4_K.gguf"
    assert file_sha(path) == sha(files["model-Q4_K.gguf"])
    assert len(hub.gets("model-Q4_K.gguf")) == 1 and not hub.gets("model-Q4_K_M.gguf")


def test_no_tag_takes_the_only_gguf(hub: FakeHub, tmp_path: Path) -> None:
    data = gguf()
    hub.add_repo(REPO, {"model.Q4_0.gguf": data, "mmproj-model-f16.gguf": gguf(seed=5), "README.md": b"x"})
    path = resolve_reference(REPO, settings(tmp_path))
    assert path.name == "model.Q4_0.gguf" and file_sha(path) == sha(data)


def test_several_ggufs_without_a_tag_are_listed(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, {"a-Q4_0.gguf": gguf(), "b-Q8_0.gguf": gguf()})
    with pytest.raises(ModelSourceError) as err:
        resolve_reference(REPO, settings(tmp_path))
    message = str(err.value)
    assert REPO in message and "a-Q4_0.gguf" in message and "b-Q8_0.gguf" in message and ":QUANT" in message
    assert not (models(tmp_path) / FOLDER).exists() or not list((models(tmp_path) / FOLDER).iterdir())


def test_unknown_quant_lists_the_files(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, {"a-Q4_0.gguf": gguf()})
    with pytest.raises(ModelSourceError, match=r"no GGUF file with Q5_K_M .*a-Q4_0\.gguf"):
        resolve_reference(f"{REPO}:Q5_K_M", settings(tmp_path))


def test_model_file_names_the_exact_file(hub: FakeHub, tmp_path: Path) -> None:
    files = {"a-Q4_0.gguf": gguf(seed=1), "sub/b-Q8_0.gguf": gguf(seed=2)}
    hub.add_repo(REPO, files)
    path = resolve_model(settings(tmp_path, MODEL_REPO=REPO, MODEL_FILE="sub/b-Q8_0.gguf"))
    assert path == models(tmp_path) / FOLDER / "sub" / "b-Q8_0.gguf"
    assert file_sha(path) == sha(files["sub/b-Q8_0.gguf"])
    # the same as a reference
    assert resolve_reference(f"{REPO}/sub/b-Q8_0.gguf", settings(tmp_path)) == path


def test_split_model_brings_every_shard(hub: FakeHub, tmp_path: Path) -> None:
    shards = {f"Q4_K_M/model-Q4_K_M-0000{i}-of-00003.gguf": gguf(seed=i) for i in (1, 2, 3)}
    hub.add_repo(REPO, {**shards, "model-Q8_0.gguf": gguf(seed=9)})
    path = resolve_reference(f"{REPO}:Q4_K_M", settings(tmp_path))
    assert path == models(tmp_path) / FOLDER / "Q4_K_M" / "model-Q4_K_M-00001-of-00003.gguf"
    for name, data in shards.items():
        assert file_sha(models(tmp_path) / FOLDER / name) == sha(data)


# --- downloads: resume, checksum, disk, locks -----------------------------------------------------------------------


def test_interrupted_download_resumes(hub: FakeHub, tmp_path: Path) -> None:
    data = gguf(400_000)
    hub.add_repo(REPO, {"model-Q4_0.gguf": data})
    hub.interrupt_once("model-Q4_0.gguf", after=150_000)
    path = resolve_reference(REPO, settings(tmp_path))
    gets = hub.gets("model-Q4_0.gguf")
    assert len(gets) == 2
    assert "Range" not in gets[0].headers
    start = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 150_000
    assert file_sha(path) == sha(data)
    assert not list(path.parent.glob("*.partial"))


def test_a_partial_file_left_by_a_restart_is_resumed(hub: FakeHub, tmp_path: Path) -> None:
    data = gguf(300_000)
    hub.add_repo(REPO, {"model-Q4_0.gguf": data})
    target = models(tmp_path) / FOLDER / "model-Q4_0.gguf"
    target.parent.mkdir(parents=True)
    downloads.partial_path(target).write_bytes(data[:120_000])
    assert resolve_reference(REPO, settings(tmp_path)) == target
    assert [g.headers.get("Range") for g in hub.gets("model-Q4_0.gguf")] == ["bytes=120000-"]
    assert file_sha(target) == sha(data)


def test_corrupt_download_is_refused_and_deleted(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, {"model-Q4_0.gguf": gguf()}, corrupt=("model-Q4_0.gguf",))
    with pytest.raises(ChecksumError) as err:
        resolve_reference(REPO, settings(tmp_path))
    assert "model-Q4_0.gguf" in str(err.value) and "sha256" in str(err.value)
    folder = models(tmp_path) / FOLDER
    assert not (folder / "model-Q4_0.gguf").exists()
    assert not list(folder.glob("*.partial"))


def test_not_enough_disk_space(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, {"model-Q4_0.gguf": gguf()})
    real = downloads.shutil.disk_usage
    monkeypatch.setattr(downloads.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=1_000_000))
    with pytest.raises(DiskSpaceError) as err:
        resolve_reference(REPO, settings(tmp_path))
    message = str(err.value)
    assert "not enough disk space" in message and "model-Q4_0.gguf" in message and "1.0 MB is free" in message
    assert not hub.gets("model-Q4_0.gguf"), "checked before the download starts"
    assert not (models(tmp_path) / FOLDER / "model-Q4_0.gguf").exists()


def test_not_enough_disk_space_for_a_url(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a size known beforehand, the answer's Content-Length is checked before the body is read."""
    url = hub.add_static("big.gguf", gguf())
    real = downloads.shutil.disk_usage
    monkeypatch.setattr(downloads.shutil, "disk_usage", lambda path: real(path)._replace(free=2_000_000))
    with pytest.raises(DiskSpaceError, match=r"big\.gguf .*it needs 0\.3 MB more, 2\.0 MB is free"):
        resolve_reference(url, settings(tmp_path))
    assert not list(models(tmp_path).glob("big.gguf*"))


def test_one_download_for_two_threads(hub: FakeHub, tmp_path: Path) -> None:
    data = gguf(500_000)
    url = hub.add_static("m.gguf", data)
    hub.chunk_delay = 0.01
    target = tmp_path / "m.gguf"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(download_file(url, target))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [target, target] and file_sha(target) == sha(data)
    assert len(hub.gets("m.gguf")) == 1


def test_two_processes_pull_once(hub: FakeHub, tmp_path: Path) -> None:
    data = gguf(600_000)
    hub.add_repo(REPO, {"model-Q4_K_M.gguf": data})
    hub.chunk_delay = 0.02  # about 0.2 s: both processes are in it at once
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data")}
    cmd = [sys.executable, "-m", "lifecycle.model", "pull", f"{REPO}:Q4_K_M"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    target = models(tmp_path) / FOLDER / "model-Q4_K_M.gguf"
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == str(target)
    assert len(hub.gets("model-Q4_K_M.gguf")) == 1
    assert file_sha(target) == sha(data)


# --- the errors -----------------------------------------------------------------------------------------------------


def test_gated_repo_needs_hf_token(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = gguf()
    hub.add_repo(REPO, {"model-Q4_0.gguf": data}, token="hf_secret_token_123")
    with pytest.raises(ModelSourceError) as err:
        resolve_reference(REPO, settings(tmp_path))
    assert "HF_TOKEN" in str(err.value) and REPO in str(err.value) and "model-Q4_0.gguf" in str(err.value)

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ModelSourceError, match="HF_TOKEN is set but the Hub refused it"):
        resolve_reference(REPO, settings(tmp_path))

    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_123")
    path = resolve_reference(REPO, settings(tmp_path))
    assert file_sha(path) == sha(data)
    headers = {k.lower(): v for k, v in hub.gets("model-Q4_0.gguf")[-1].headers.items()}
    assert headers["authorization"] == "Bearer hf_secret_token_123"
    assert "hf_secret_token_123" not in caplog.text and "hf_wrong" not in caplog.text


def test_missing_repo(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as err:
        resolve_reference("org/nope-GGUF:Q4_0", settings(tmp_path))
    assert "org/nope-GGUF" in str(err.value) and "no such repo" in str(err.value) and "HF_TOKEN" in str(err.value)


def test_missing_file_lists_the_ggufs(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, {"a-Q4_0.gguf": gguf(), "README.md": b"x"})
    with pytest.raises(ModelSourceError) as err:
        resolve_model(settings(tmp_path, MODEL_REPO=REPO, MODEL_FILE="b-Q4_0.gguf"))
    message = str(err.value)
    assert REPO in message and "b-Q4_0.gguf" in message and "a-Q4_0.gguf" in message and "README" not in message


def test_file_gone_between_listing_and_download(hub: FakeHub, tmp_path: Path) -> None:
    """A 404 from the file itself (the listing said it is there) names the file and the repo's GGUFs."""
    hub.add_repo(REPO, {"a-Q4_0.gguf": gguf()})
    hub.repos[REPO].files["b-Q4_0.gguf"] = hub.repos[REPO].files["a-Q4_0.gguf"]
    original = hub.repos[REPO].files

    class Listing(dict):  # the listing shows b, the file answers 404
        def get(self, key, default=None):  # type: ignore[no-untyped-def]
            return None if key == "b-Q4_0.gguf" else super().get(key, default)

    hub.repos[REPO].files = Listing(original)
    with pytest.raises(ModelSourceError, match=r"org/model-GGUF/b-Q4_0\.gguf: no such file .*a-Q4_0\.gguf"):
        resolve_reference(f"{REPO}/b-Q4_0.gguf", settings(tmp_path))


def test_hub_unreachable(tmp_path: Path) -> None:
    endpoint = os.environ["HF_ENDPOINT"]
    with pytest.raises(ModelSourceError) as err:
        resolve_reference(f"{REPO}:Q4_0", settings(tmp_path))
    message = str(err.value)
    assert REPO in message and "cannot reach the Hub" in message and endpoint.removeprefix("http://") in message
    assert "connection refused" in message


def test_bad_reference() -> None:
    with pytest.raises(ModelSourceError, match="bad model reference"):
        resolve_reference("org/repo:Q4/x.gguf", Settings.from_env({"DATA_DIR": "/nonexistent"}, probe_roots=[]))


def test_missing_file_in_models_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="in MODELS_DIR"):
        resolve_reference("x.gguf", settings(tmp_path))


# --- no network: the caches and MODELS_DIR --------------------------------------------------------------------------


def hf_cache_layout(cache: Path, repo: str, files: dict[str, bytes], rev: str = "abc123") -> Path:
    """A Hugging Face cache as huggingface_hub writes it: blobs, refs/main, snapshot symlinks."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    for name, data in files.items():
        blob = folder / "blobs" / sha(data)
        blob.write_bytes(data)
        link = folder / "snapshots" / rev / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return folder / "snapshots" / rev


def test_hf_hub_cache_is_used_with_no_network(tmp_path: Path) -> None:
    data = gguf()
    snapshot = hf_cache_layout(tmp_path / "hf", REPO, {"model-Q4_K_M.gguf": data, "model-Q8_0.gguf": gguf(seed=2)})
    path = resolve_reference(f"{REPO}:Q4_K_M", settings(tmp_path, HF_HUB_CACHE=str(tmp_path / "hf")))
    assert path == snapshot / "model-Q4_K_M.gguf" and file_sha(path) == sha(data)
    assert not models(tmp_path).exists()  # nothing copied, nothing fetched (the Hub is a dead port)


def test_runpod_model_cache_is_used_with_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = hf_cache_layout(tmp_path / "runpod", REPO, {"model.gguf": gguf()})
    monkeypatch.setattr(sources, "RUNPOD_HF_CACHE", tmp_path / "runpod")
    assert resolve_reference(REPO, settings(tmp_path)) == snapshot / "model.gguf"
    # HF_HUB_CACHE, when set, is looked in instead
    with pytest.raises(ModelSourceError, match="cannot reach"):
        resolve_reference(REPO, settings(tmp_path, HF_HUB_CACHE=str(tmp_path / "elsewhere")))


def test_hf_cache_split_model_must_be_whole(tmp_path: Path) -> None:
    hf_cache_layout(tmp_path / "hf", REPO, {"m-00001-of-00002.gguf": gguf()})
    with pytest.raises(ModelSourceError, match="cannot reach"):
        resolve_reference(REPO, settings(tmp_path, HF_HUB_CACHE=str(tmp_path / "hf")))


def test_second_resolve_finds_models_dir_copy_with_the_hub_stopped(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.add_repo(REPO, {"model-Q4_K_M.gguf": gguf(), "model-Q8_0.gguf": gguf(seed=1)})
        first = resolve_reference(f"{REPO}:Q4_K_M", settings(tmp_path))
    assert resolve_reference(f"{REPO}:Q4_K_M", settings(tmp_path)) == first
    assert resolve_model(settings(tmp_path, MODEL_REPO=f"{REPO}:Q4_K_M")) == first


# --- URLs -----------------------------------------------------------------------------------------------------------


def test_model_url_download_checks_the_hub_sha256_and_resumes(hub: FakeHub, tmp_path: Path) -> None:
    data = gguf(350_000)
    hub.add_repo(REPO, {"model-Q4_0.gguf": data})
    hub.interrupt_once("model-Q4_0.gguf", after=100_000)
    path = resolve_model(settings(tmp_path, MODEL_URL=hub.file_url(REPO, "model-Q4_0.gguf")))
    assert path == models(tmp_path) / "model-Q4_0.gguf" and file_sha(path) == sha(data)
    gets = hub.gets("model-Q4_0.gguf")
    assert len(gets) == 2 and gets[1].headers["Range"].startswith("bytes=")
    # the next start needs no network
    hub.stop()
    assert resolve_model(settings(tmp_path, MODEL_URL="http://127.0.0.1:9/model-Q4_0.gguf")) == path


def test_model_url_with_a_sha256_fragment(hub: FakeHub, tmp_path: Path) -> None:
    data = gguf()
    url = hub.add_static("plain.gguf", data)
    with pytest.raises(ChecksumError):
        resolve_reference(f"{url}#sha256={'0' * 64}", settings(tmp_path))
    assert not list(models(tmp_path).glob("plain.gguf*"))
    assert file_sha(resolve_reference(f"{url}#sha256={sha(data)}", settings(tmp_path))) == sha(data)


def test_model_url_errors(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"static/absent\.gguf: HTTP 404"):
        resolve_reference(f"{hub.url}/static/absent.gguf", settings(tmp_path))
    with pytest.raises(ModelSourceError, match=r"cannot reach 127\.0\.0\.1"):
        resolve_reference(f"{dead_endpoint()}/x.gguf", settings(tmp_path))


# --- the pull CLI ---------------------------------------------------------------------------------------------------


def test_pull_cli(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    for name in ("MODEL_NAME", "MODEL_PATH", "MODEL_REPO", "MODEL_FILE", "MODEL_URL", "MODELS_DIR"):
        monkeypatch.delenv(name, raising=False)
    hub.add_repo(REPO, {"a-Q4_0.gguf": gguf(seed=1), "a-Q8_0.gguf": gguf(seed=2)})
    assert model_main(["pull", f"{REPO}:Q4_0", f"{REPO}/a-Q8_0.gguf"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [str(models(tmp_path) / FOLDER / "a-Q4_0.gguf"), str(models(tmp_path) / FOLDER / "a-Q8_0.gguf")]

    assert model_main(["pull", REPO]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "several GGUF files" in errors[0] and captured.out == ""
    assert "Traceback" not in captured.err

    monkeypatch.setenv("MODEL_URL", "http://example.com/x.gguf")
    assert model_main(["pull", REPO]) == 2
    assert capsys.readouterr().err.startswith("error: MODEL_URL=")


def test_pull_cli_process_exit_codes(tmp_path: Path) -> None:
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "HF_ENDPOINT": dead_endpoint()}
    proc = subprocess.run([sys.executable, "-m", "lifecycle.model", "pull", f"{REPO}:Q4_0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lifecycle.model", "pull"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2  # argparse: a REF is required


# --- settings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODEL_REPO": "justaname"}, "MODEL_REPO='justaname' is not allowed: use org/repo"),
        ({"MODEL_REPO": "org/repo/file.gguf"}, "MODEL_REPO='org/repo/file.gguf' is not allowed"),
        ({"MODEL_URL": "http://example.com/x.gguf"}, "use https://"),
        ({"MODEL_URL": "ftp://example.com/x.gguf"}, "MODEL_URL='ftp://example.com/x.gguf' is not allowed"),
        ({"MODEL_URL": "https://example.com/"}, "must end with a file name"),
        ({"MODEL_FILE": "x.gguf"}, "MODEL_FILE='x.gguf' needs MODEL_REPO"),
        ({"MODEL_REPO": "org/repo:Q4_0", "MODEL_FILE": "x.gguf"}, "give one of them"),
        ({"MODEL_REPO": "org/repo", "MODEL_FILE": "../x.gguf"}, "MODEL_FILE='../x.gguf' is not allowed"),
    ],
)
def test_bad_source_settings(env: dict[str, str], message: str) -> None:
    from lifecycle.settings import SettingsError

    with pytest.raises(SettingsError) as err:
        Settings.from_env({"DATA_DIR": "/srv/data", **env}, probe_roots=[])
    assert message in str(err.value)


def test_good_source_settings() -> None:
    s = Settings.from_env({"DATA_DIR": "/srv/data", "MODEL_REPO": "bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M",
                           "MODEL_URL": "http://localhost:8000/x.gguf", "HF_HUB_CACHE": "/cache/hub"},
                          probe_roots=[])
    assert s.model_repo == "bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"
    assert s.model_url == "http://localhost:8000/x.gguf" and s.hf_hub_cache == Path("/cache/hub")


def test_precedence(tmp_path: Path) -> None:
    """MODEL_PATH > MODEL_NAME > MODEL_REPO > MODEL_URL > the default: the local ones need no network."""
    from lifecycle.model import single_model_reference

    model = models(tmp_path) / "local.gguf"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"GGUF")
    both = {"MODEL_REPO": REPO, "MODEL_URL": "https://example.com/x.gguf"}
    assert resolve_model(settings(tmp_path, MODEL_NAME="local.gguf", **both)) == model
    assert resolve_model(settings(tmp_path, MODEL_PATH=str(model), MODEL_NAME="other.gguf", **both)) == model
    assert single_model_reference(settings(tmp_path, **both)) == REPO
    assert single_model_reference(settings(tmp_path, MODEL_REPO=REPO, MODEL_FILE="f.gguf")) == f"{REPO}/f.gguf"
    assert single_model_reference(settings(tmp_path, MODEL_URL="https://example.com/x.gguf")) == \
        "https://example.com/x.gguf"
    assert single_model_reference(settings(tmp_path)) is None


def test_download_error_is_a_provision_error() -> None:
    from lifecycle.downloads import ProvisionError

    assert issubclass(ModelSourceError, DownloadError) and issubclass(DownloadError, ProvisionError)
    assert issubclass(ModelNotFound, ProvisionError)


# --- pieces: progress lines, reference syntax -----------------------------------------------------------------------


def test_progress_lines_are_rate_limited() -> None:
    from lifecycle.downloads import Progress

    now = [0.0]
    progress = Progress("m.gguf", 100_000_000, bar=False, clock=lambda: now[0])
    for _ in range(100):  # 1 MB every 0.1 s: 10 MB/s for 10 s
        now[0] += 0.1
        progress.update(1_000_000)
    progress.close()
    lines = progress.lines
    assert lines[0] == "downloading m.gguf (100.0 MB)"
    assert lines[-1].startswith("m.gguf: done, 100.0 MB in 10s")
    middle = lines[1:-1]
    assert 4 <= len(middle) <= 5  # one each 20% (2 s apart at most), not one per update
    assert middle[0].startswith("m.gguf: 20% (20.0 MB of 100.0 MB) at 10.0 MB/s, ETA 8s")


def test_progress_without_a_size_and_quiet_stretches() -> None:
    from lifecycle.downloads import Progress

    now = [0.0]
    progress = Progress("m.gguf", None, bar=False, clock=lambda: now[0])
    now[0] = 31.0
    progress.update(5_000_000)
    assert progress.lines[-1] == "m.gguf: 5.0 MB at 0.2 MB/s"


@pytest.mark.parametrize(
    ("file", "quant", "expected"),
    [
        ("model-Q4_K_M.gguf", "q4_k_m", True),
        ("model.Q4_K_M.gguf", "Q4_K_M", True),
        ("model-Q4_K_M.gguf", "Q4_K", False),
        ("model-IQ4_XS.gguf", "Q4_XS", False),
        ("Q4_K_M/model-Q4_K_M-00001-of-00002.gguf", "Q4_K_M", True),
        ("model-Q8_0.gguf", "Q4_0", False),
    ],
)
def test_quant_tags_are_whole_tokens(file: str, quant: str, expected: bool) -> None:
    from lifecycle.refs import has_quant

    assert has_quant(file, quant) is expected


def test_reference_syntax() -> None:
    from lifecycle.refs import parse_reference, shard_names

    assert parse_reference("x.gguf").kind == "name"
    assert parse_reference("/m/x.gguf").kind == "path"
    repo = parse_reference("org/repo:Q4_K_M")
    assert (repo.kind, repo.repo, repo.quant, repo.file) == ("repo", "org/repo", "Q4_K_M", None)
    exact = parse_reference("org/repo/sub/x.gguf")
    assert (exact.repo, exact.quant, exact.file) == ("org/repo", None, "sub/x.gguf")
    assert parse_reference("https://host/x.gguf").kind == "url"
    for bad in ("", "org/repo:Q4/x.gguf", "http://example.com/x.gguf", "org//x", "org/../x", "ftp://h/x.gguf"):
        with pytest.raises(ValueError):
            parse_reference(bad)
    assert shard_names("d/m-00001-of-00003.gguf") == [f"d/m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert shard_names("m.gguf") == ["m.gguf"]


def test_a_whole_partial_file_is_checked_and_renamed(hub: FakeHub, tmp_path: Path) -> None:
    """Killed after the last byte, before the rename: the next start asks for the rest (416) and keeps it."""
    data = gguf()
    hub.add_repo(REPO, {"model-Q4_0.gguf": data})
    target = models(tmp_path) / FOLDER / "model-Q4_0.gguf"
    target.parent.mkdir(parents=True)
    downloads.partial_path(target).write_bytes(data)
    assert resolve_reference(REPO, settings(tmp_path)) == target and file_sha(target) == sha(data)
    assert [g.headers.get("Range") for g in hub.gets("model-Q4_0.gguf")] == [f"bytes={len(data)}-"]


def test_a_file_from_disk_without_redirects(hub: FakeHub, tmp_path: Path) -> None:
    """The fake serves a real file from disk (the e2e tests serve the default GGUF so), straight from /resolve/."""
    source = tmp_path / "real.gguf"
    source.write_bytes(gguf(200_000, seed=7))
    hub.redirect = False
    hub.add_repo(REPO, {"real.gguf": source})
    path = resolve_reference(REPO, settings(tmp_path))
    assert file_sha(path) == file_sha(source)
    assert [g.path for g in hub.gets("real.gguf")] == [f"/{REPO}/resolve/{hub.repos[REPO].sha}/real.gguf"]
