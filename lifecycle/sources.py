"""Where a model comes from: one model reference (lifecycle.refs) turned into a local GGUF path.

resolve_reference() is the one entry: a file in MODELS_DIR, a local path, a Hugging Face repo (`org/repo`,
`org/repo:QUANT`, `org/repo/file.gguf`) or an http(s) URL. A repo is looked up, in order, in

1. the Hugging Face cache: HF_HUB_CACHE, else RunPod's model cache (RUNPOD_HF_CACHE) when it exists
   (`models--org--repo/snapshots/<rev>/<file>`, `refs/main` names the revision); no network at all;
2. MODELS_DIR/<org>--<repo>/<file>, where an earlier download left it; no network;
3. the Hub (HF_ENDPOINT, HF_TOKEN): the repo's files are listed with huggingface_hub, the file's metadata (size,
   sha256) read with it, and the bytes fetched with downloads.download_file into MODELS_DIR/<org>--<repo>/.

huggingface_hub 2.x downloads into a temporary file of its own process and deletes it on failure, so an
interrupted download of a large GGUF would start from zero after a restart; download_file resumes it, checks the
sha256 the Hub publishes (the LFS ETag) and says how far it is in the log. A split model
(`name-00001-of-00003.gguf`) is fetched whole; its first shard's path is returned (llama.cpp loads the rest).

Every failure is a ProvisionError (ModelNotFound for a local file, ModelSourceError, DiskSpaceError and
ChecksumError for a download) whose message names the model, the file and the cause; HF_TOKEN never appears in one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from lifecycle.downloads import SHA256, DownloadError, ProvisionError, download_file
from lifecycle.refs import (
    REF_FORMS,
    has_quant,
    is_later_shard,
    parse_reference,
    shard_names,
    url_file_name,
)
from lifecycle.settings import Settings

log = logging.getLogger(__name__)

RUNPOD_HF_CACHE = Path("/runpod-volume/huggingface-cache/hub")  # RunPod's cached models (a Hugging Face cache)
DEFAULT_ENDPOINT = "https://huggingface.co"
REVISION = "main"
USER_AGENT = "llama-gguf-inference"
HUB_TIMEOUT = 30.0  # seconds for the Hub's listing and each read of a download (a stalled server fails, not hangs)


class ModelNotFound(ProvisionError):
    """A local model file (MODEL_PATH, MODEL_NAME, a path or a name in MODELS_DIR) is not there."""


class ModelSourceError(DownloadError):
    """A model could not be found or fetched from its source (a repo, a URL)."""


class _NoChoice(ModelSourceError):
    """No single model among a repo's files (none matches, or several do)."""


# --- local files ----------------------------------------------------------------------------------------------------


def gguf_files(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.suffix == ".gguf")
    except OSError:
        return []


def missing(path: Path, how: str) -> ModelNotFound:
    """The error for a local model file that is not there: names it and what the folder holds."""
    folder = path.parent
    if not folder.is_dir():
        there = f"the folder {folder} does not exist"
    else:
        files = gguf_files(folder)
        there = f".gguf files in {folder}: {', '.join(files)}" if files else f"no .gguf files in {folder}"
    return ModelNotFound(f"model not found: {path} ({how}); {there}")


# --- choosing the model among a repo's files ------------------------------------------------------------------------


def _ggufs(files: Iterable[str]) -> list[str]:
    """The model GGUFs among a repo's files: `.gguf`, not a multimodal projector (mmproj)."""
    return sorted(f for f in files if f.lower().endswith(".gguf") and not f.rsplit("/", 1)[-1].lower()
                  .startswith("mmproj"))


def choose_files(repo: str, files: Iterable[str], quant: str | None = None, file: str | None = None) -> list[str]:
    """The files of the one model a reference names among `files` (a repo's or a snapshot's): [file] or all its
    shards, the first first. `file`: exactly that one; `quant`: the GGUF whose name carries that tag; neither: the
    only GGUF. Raises ModelSourceError naming the candidates."""
    files = list(files)
    ggufs = _ggufs(files)
    listed = ", ".join(ggufs) if ggufs else "none"
    if file is not None:
        wanted = shard_names(file)
        absent = [name for name in wanted if name not in files]
        if absent:
            raise _NoChoice(f"{repo}: no file {absent[0]} in the repo; its GGUF files: {listed}")
        return wanted
    models = [name for name in ggufs if not is_later_shard(name)]
    if quant is not None:
        models = [name for name in models if has_quant(name, quant)]
        if not models:
            raise _NoChoice(f"{repo}: no GGUF file with {quant} in its name; its GGUF files: {listed}")
    if not models:
        raise _NoChoice(f"{repo}: the repo has no GGUF files")
    if len(models) > 1:
        how = f"several GGUF files match {quant}" if quant else "the repo has several GGUF files"
        raise _NoChoice(f"{repo}: {how}: {', '.join(models)}; name one with {repo}:QUANT or MODEL_FILE")
    wanted = shard_names(models[0])
    absent = [name for name in wanted if name not in files]
    if absent:
        raise _NoChoice(f"{repo}: shard {absent[0]} of {models[0]} is not in the repo")
    return wanted


def _files_under(folder: Path) -> list[str]:
    try:
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf") if p.is_file()]
    except OSError:
        return []


def _local_choice(folder: Path, repo: str, quant: str | None, file: str | None) -> Path | None:
    """The model's first file in `folder` when every file of it is there, else None."""
    if not folder.is_dir():
        return None
    try:
        chosen = choose_files(repo, _files_under(folder), quant, file)
    except _NoChoice:
        return None
    return folder / chosen[0]


# --- the Hugging Face cache and MODELS_DIR --------------------------------------------------------------------------


def hf_cache(settings: Settings) -> Path | None:
    """The Hugging Face cache to look in: HF_HUB_CACHE, else RunPod's model cache when it exists."""
    if settings.hf_hub_cache is not None:
        return settings.hf_hub_cache
    return RUNPOD_HF_CACHE if RUNPOD_HF_CACHE.is_dir() else None


def find_in_hf_cache(cache: Path, repo: str, quant: str | None = None, file: str | None = None) -> Path | None:
    """The model in a Hugging Face cache (`models--org--repo/snapshots/<rev>/`, the revision refs/main names
    first, then the newest snapshot), without network access; None when it is not there whole."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshots = folder / "snapshots"
    try:
        order = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime,
                       reverse=True)
    except OSError:
        return None
    try:
        main = (folder / "refs" / REVISION).read_text().strip()
    except OSError:
        main = ""
    order.sort(key=lambda p: p.name != main)  # stable: refs/main's snapshot first
    for snapshot in order:
        found = _local_choice(snapshot, repo, quant, file)
        if found is not None:
            return found
    return None


def repo_dir(settings: Settings, repo: str) -> Path:
    """Where a repo's downloads are kept: MODELS_DIR/<org>--<repo>/ (the repo's own folders below it)."""
    return settings.models_dir / repo.replace("/", "--")


# --- the Hub --------------------------------------------------------------------------------------------------------


def hub_endpoint() -> str:
    """The Hub: HF_ENDPOINT (as huggingface_hub reads it), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _hf() -> Any:
    """huggingface_hub, with its telemetry off unless HF_HUB_DISABLE_TELEMETRY says otherwise: it would fetch a
    registry from huggingface.co (whatever HF_ENDPOINT says) before the first request, stalling 3 s offline."""
    import huggingface_hub
    import huggingface_hub.constants

    if "HF_HUB_DISABLE_TELEMETRY" not in os.environ:
        huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True
    for name in ("httpx2", "httpx"):  # one INFO line per request otherwise; our own lines say what happens
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    return huggingface_hub


def hub_token() -> str | None:
    """HF_TOKEN, else the token `hf auth login` saved (huggingface_hub finds both). Never log it."""
    return _hf().get_token()


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [requests.RequestException, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(__import__(module).TransportError)
    return tuple(errors)


def _hub_error(exc: BaseException, repo: str, file: str | None, endpoint: str, token: bool,
               files: list[str] | None = None) -> ModelSourceError:
    """huggingface_hub's (or requests') exception as one message naming the repo, the file and the cause."""
    hf = _hf().errors

    what = f"{repo}/{file}" if file else repo
    listed = f"; its GGUF files: {', '.join(_ggufs(files)) or 'none'}" if files is not None else ""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, DownloadError) and exc.status is not None:
        status = exc.status
    if isinstance(exc, hf.GatedRepoError) or (status in (401, 403) and file is not None):
        given = "HF_TOKEN is set but the Hub refused it" if token else "no HF_TOKEN is set"
        return ModelSourceError(f"{what}: access denied (HTTP {status or 401}; a gated or private repo, {given}): "
                                f"accept the repo's terms on {endpoint}/{repo} and set HF_TOKEN to a token of that "
                                "account", status)
    if isinstance(exc, hf.RepositoryNotFoundError) or (status in (401, 403) and file is None):
        private = "; if it is private or gated, set HF_TOKEN" if not token else " (or HF_TOKEN may not read it)"
        return ModelSourceError(f"{what}: no such repo on {endpoint} (HTTP {status or 404}){private}", status)
    if isinstance(exc, hf.RevisionNotFoundError):
        return ModelSourceError(f"{what}: the repo has no revision {REVISION}", status)
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return ModelSourceError(f"{what}: not in the Hugging Face cache or MODELS_DIR, and HF_HUB_OFFLINE is set")
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return ModelSourceError(f"{what}: not in the Hugging Face cache or MODELS_DIR, and the Hub cannot be "
                                f"reached at {endpoint}")
    if isinstance(exc, hf.EntryNotFoundError) or status == 404:
        return ModelSourceError(f"{what}: no such file in the repo (HTTP 404){listed}", 404)
    if isinstance(exc, hf.HfHubHTTPError) or status is not None:
        return ModelSourceError(f"{what}: the Hub at {endpoint} answered HTTP {status}", status)
    if isinstance(exc, _network_errors()):
        return ModelSourceError(f"{what}: cannot reach the Hub at {_host(endpoint)} (HF_ENDPOINT={endpoint}): "
                                f"{_cause(exc)}")
    return ModelSourceError(f"{what}: {_cause(exc)}")


def _cause(exc: BaseException) -> str:
    """A short cause: the innermost reason of a connection error (connection refused, name not known, ...)."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "timed out", "Network is unreachable", "No route to host"):
        if marker.lower() in text.lower():
            return marker[0].lower() + marker[1:]
    return f"{type(exc).__name__}: {text}"[:300]


def download_from_hub(repo: str, settings: Settings, quant: str | None = None, file: str | None = None) -> Path:
    """List `repo` on the Hub, choose the model's files and download each into MODELS_DIR/<org>--<repo>/ (the
    ones already there are kept). Returns the first file's path."""
    hf = _hf()
    from huggingface_hub.utils import build_hf_headers

    endpoint = hub_endpoint()
    token = hub_token()
    try:
        api = hf.HfApi(endpoint=endpoint, token=token or False, library_name=USER_AGENT)
        info = api.model_info(repo, revision=REVISION, timeout=HUB_TIMEOUT)
    except Exception as exc:
        raise _hub_error(exc, repo, file, endpoint, bool(token)) from None
    files = [sibling.rfilename for sibling in info.siblings or []]
    chosen = choose_files(repo, files, quant, file)
    commit = info.sha or REVISION
    folder = repo_dir(settings, repo)
    for name in chosen:
        target = folder / name
        if target.is_file():
            continue
        try:
            meta = hf.get_hf_file_metadata(hf.hf_hub_url(repo, name, revision=commit, endpoint=endpoint),
                                           token=token or False, endpoint=endpoint, library_name=USER_AGENT,
                                           timeout=HUB_TIMEOUT)
            sha256 = meta.etag if meta.etag and SHA256.fullmatch(meta.etag) else None
            location = meta.location
            same_host = _host(location) == _host(endpoint)
            headers = build_hf_headers(token=(token or False) if same_host else False, library_name=USER_AGENT)
            download_file(location, target, label=f"{repo}/{name}", headers=headers, sha256=sha256, size=meta.size,
                          timeout=HUB_TIMEOUT)
        except Exception as exc:
            if isinstance(exc, DownloadError) and exc.status is None:
                raise  # disk space, checksum: the message already names the file
            raise _hub_error(exc, repo, name, endpoint, bool(token), files) from None
    return folder / chosen[0]


def resolve_repo(repo: str, settings: Settings, quant: str | None = None, file: str | None = None) -> Path:
    """A repo's model as a local path: the Hugging Face cache, MODELS_DIR, or a download (module docstring)."""
    cache = hf_cache(settings)
    if cache is not None:
        found = find_in_hf_cache(cache, repo, quant, file)
        if found is not None:
            log.info("model %s: found in the Hugging Face cache %s", repo, cache)
            return found
    found = _local_choice(repo_dir(settings, repo), repo, quant, file)
    if found is not None:
        return found
    return download_from_hub(repo, settings, quant, file)


# --- URLs -----------------------------------------------------------------------------------------------------------


def _fragment_sha256(url: str) -> tuple[str, str | None]:
    """The URL without its fragment, and the sha256 a `#sha256=<hex>` fragment gives."""
    base, _, fragment = url.partition("#")
    for part in fragment.split("&"):
        key, _, value = part.partition("=")
        if key == "sha256" and SHA256.fullmatch(value.lower()):
            return base, value.lower()
    return base, None


def resolve_url(url: str, settings: Settings) -> Path:
    """An http(s) GGUF as MODELS_DIR/<its file name> (kept there: the next start uses it with no network). A
    shard URL (`...-00001-of-00003.gguf`) brings its siblings from the same folder of the server."""
    base, sha256 = _fragment_sha256(url)
    name = url_file_name(base)
    names = shard_names(name)
    targets = [settings.models_dir / n for n in names]
    if all(t.is_file() for t in targets):
        return targets[0]
    endpoint = hub_endpoint()
    token = hub_token() if _host(base) == _host(endpoint) else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    path, _, query = base.partition("?")
    folder = path.rsplit("/", 1)[0]
    for index, (shard, target) in enumerate(zip(names, targets, strict=True)):
        shard_url = f"{folder}/{quote(shard)}" + (f"?{query}" if query else "")
        try:
            download_file(shard_url, target, label=shard, headers=headers,
                          sha256=sha256 if index == 0 and len(names) == 1 else None)
        except DownloadError as exc:
            if exc.status is None:
                raise
            hint = "; set HF_TOKEN" if exc.status in (401, 403) and _host(base) == _host(endpoint) else ""
            raise ModelSourceError(f"{shard_url.split('?')[0]}: HTTP {exc.status}{hint}", exc.status) from None
        except requests.RequestException as exc:
            raise ModelSourceError(f"{shard_url.split('?')[0]}: cannot reach {_host(base)}: {_cause(exc)}") from None
    return targets[0]


# --- the one entry --------------------------------------------------------------------------------------------------


def resolve_reference(ref: str, settings: Settings) -> Path:
    """One model reference as the path of a local GGUF file (the first shard of a split model), fetching it when
    needed.

    `ref` is one of: a file name in MODELS_DIR (`x.gguf`), an absolute path, `org/repo`, `org/repo:QUANT`,
    `org/repo/path/in/repo.gguf`, or an http(s) URL (see lifecycle.refs). Blocking: a download takes as long as
    it takes (progress in the log). Raises a ProvisionError (ModelNotFound, ModelSourceError, DiskSpaceError,
    ChecksumError) with one line for the user; nothing half-written is ever left under a final name.
    """
    try:
        parsed = parse_reference(ref)
    except ValueError as exc:
        raise ModelSourceError(f"bad model reference: {exc}") from None
    if parsed.kind == "name":
        path = settings.models_dir / parsed.text
        if not path.is_file():
            raise missing(path, "in MODELS_DIR")
        return path
    if parsed.kind == "path":
        path = Path(parsed.text).expanduser()
        if not path.is_file():
            raise missing(path, "a local path")
        return path
    if parsed.kind == "url":
        assert parsed.url is not None
        return resolve_url(parsed.url, settings)
    assert parsed.repo is not None
    return resolve_repo(parsed.repo, settings, parsed.quant, parsed.file)


__all__ = [
    "REF_FORMS",
    "RUNPOD_HF_CACHE",
    "ModelNotFound",
    "ModelSourceError",
    "choose_files",
    "find_in_hf_cache",
    "gguf_files",
    "hf_cache",
    "missing",
    "repo_dir",
    "resolve_reference",
    "resolve_repo",
    "resolve_url",
]
