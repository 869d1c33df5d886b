"""The syntax of a model reference: what MODEL_NAME, MODEL_REPO (+ MODEL_FILE), MODEL_URL and each entry of a list
of models may say. Pure (no I/O); settings.py checks values with it, sources.py resolves them.

    x.gguf                      a file in MODELS_DIR (a plain name, no `/`)
    /abs/path/x.gguf            a local file
    org/repo                    a Hugging Face repo with one GGUF model
    org/repo:Q4_K_M             the GGUF in that repo whose name carries the tag Q4_K_M
    org/repo/path/in/repo.gguf  that exact file of the repo
    https://host/x.gguf         a URL (http only for 127.0.0.1 / localhost)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

REF_FORMS = "a file name in MODELS_DIR, org/repo, org/repo:QUANT, org/repo/file.gguf or an https:// URL"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"  # a Hub user, org or repo name
_REPO = re.compile(rf"(?P<repo>{_PART}/{_PART})(?::(?P<quant>[A-Za-z0-9][A-Za-z0-9_.-]*))?")
_SHARD = re.compile(r"(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf")


@dataclass(frozen=True)
class Reference:
    """One parsed model reference. kind: `name` (in MODELS_DIR), `path` (absolute), `repo`, or `url`."""

    kind: Literal["name", "path", "repo", "url"]
    text: str
    repo: str | None = None  # org/repo
    quant: str | None = None  # the :QUANT tag
    file: str | None = None  # a file path inside the repo
    url: str | None = None


def check_repo(value: str) -> tuple[str, str | None]:
    """`org/repo` or `org/repo:QUANT` as (repo, quant); ValueError saying what is allowed."""
    match = _REPO.fullmatch(value)
    if match is None or ".." in match["repo"] or "--" in match["repo"]:
        raise ValueError("use org/repo or org/repo:QUANT (a Hugging Face repo, e.g. "
                         "bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M)")
    return match["repo"], match["quant"]


def check_repo_file(value: str) -> str:
    """A file path inside a repo (`x.gguf`, `Q4_K_M/x-00001-of-00002.gguf`); ValueError when it is not one."""
    parts = value.split("/")
    if value.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in value:
        raise ValueError("use a file path inside the repo, such as model-Q4_K_M.gguf (no leading /, no ..)")
    return value


def check_url(value: str) -> str:
    """An https URL (http only for a loopback host) naming a file; ValueError when it is not one."""
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        parts, host = None, None
    if parts is None or not host or parts.scheme not in ("http", "https"):
        raise ValueError("use an https:// URL of a .gguf file")
    if parts.scheme == "http" and host not in LOOPBACK_HOSTS:
        raise ValueError("use https:// (http:// only for 127.0.0.1 or localhost)")
    name = url_file_name(value)
    if not name or name in (".", ".."):
        raise ValueError("the URL must end with a file name, such as https://host/model.gguf")
    return value


def url_file_name(url: str) -> str:
    """The file name a URL names (its last path segment, unquoted)."""
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def parse_reference(ref: str) -> Reference:
    """One model reference (see the module docstring); ValueError saying what is wrong."""
    text = ref.strip()
    if not text:
        raise ValueError(f"an empty model reference: use {REF_FORMS}")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        return Reference("url", text, url=check_url(text))
    if text.startswith(("/", "~")):
        return Reference("path", text)
    if "/" not in text:
        if text in (".", ".."):
            raise ValueError(f"{text!r} is not a model file name: use {REF_FORMS}")
        return Reference("name", text)
    org, _, rest = text.partition("/")
    name, slash, file = rest.partition("/")
    try:
        if slash:
            repo, quant = check_repo(f"{org}/{name}")
            if quant is not None:
                raise ValueError("give either a :QUANT tag or a file, not both")
            return Reference("repo", text, repo=repo, file=check_repo_file(file))
        repo, quant = check_repo(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a model reference ({exc}); use {REF_FORMS}") from None
    return Reference("repo", text, repo=repo, quant=quant)


def shard_names(file: str) -> list[str]:
    """All the shards of a split GGUF (`x-00001-of-00003.gguf` -> the three names, in order; the same folder), or
    [file] for a file that is not a shard."""
    folder, _, name = file.rpartition("/")
    match = _SHARD.fullmatch(name)
    if match is None:
        return [file]
    count, width = int(match["count"]), len(match["count"])
    prefix = f"{folder}/" if folder else ""
    return [f"{prefix}{match['base']}-{i:0{width}d}-of-{match['count']}.gguf" for i in range(1, count + 1)]


def is_later_shard(file: str) -> bool:
    """Whether `file` is a shard other than the first (llama.cpp is pointed at the first one)."""
    match = _SHARD.fullmatch(file.rpartition("/")[2])
    return match is not None and int(match["index"]) != 1


def has_quant(file: str, quant: str) -> bool:
    """Whether the path `file` carries the tag `quant` (case-insensitive, as a whole token: Q4_K is not in
    Q4_K_M, but is in model-Q4_K.gguf and Q4_K/model.gguf)."""
    pattern = rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])"
    return re.search(pattern, file, re.IGNORECASE) is not None
