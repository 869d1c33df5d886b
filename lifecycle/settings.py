"""The one settings object, built once from the environment and passed explicitly.

The variable names and defaults of the project we replace are the public contract. One table, VARIABLES, holds
every variable: how it is read and checked, its default (the `Settings` dataclass takes its field defaults from
it) and its row in docs/CONFIGURATION.md, whose tables are generated from it (`python -m lifecycle.settings
--docs`; a unit test fails when they differ). Every bad value raises SettingsError naming the variable, the value
and what is allowed; the entry points turn it into one line on stderr and exit code 2.
"""

# RUF009: the Settings field defaults are calls to setting(), which returns a dataclasses.field.
# ruff: noqa: RUF009

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lifecycle.platform import detect_data_dir
from lifecycle.refs import check_repo, check_repo_file, check_url, parse_reference
from lifecycle.routes import JSON_ROUTES

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
MODES = ("gateway", "handler")
PORT_RANGE = (1, 65535)
MODELS_SUBDIR = "models"  # MODELS_DIR's default under DATA_DIR
KEYS_FILE_NAME = "api_keys.txt"  # AUTH_KEYS_FILE's default under DATA_DIR
USAGE_DB_NAME = "usage.sqlite3"  # USAGE_DB's default under DATA_DIR
CACHE_SUBDIR = Path(".cache") / "llama-gguf-inference"  # LLAMA_GGUF_CACHE_DIR's default under home (or DATA_DIR)


class SettingsError(ValueError):
    """A bad environment value; str() is the one line shown to the user."""


# --- What may reach llama-server: EXTRA_ARGS flags and PASSTHROUGH_ROUTES ------------------------------------------
# llama-server is ours: bound to 127.0.0.1:PORT_BACKEND, locked with the per-boot key, with nothing armed that lets a
# caller act on the host. These are the only two ways an operator setting could change that, so each has one rule.

_REBIND = "the gateway binds llama-server to 127.0.0.1:PORT_BACKEND itself (use HOST, PORT, PORT_BACKEND)"
_AUTH = "the gateway locks llama-server with its own per-boot key (client keys go in AUTH_KEYS_FILE)"
_HOST = "it lets API callers act on this host through llama-server"
_ROUTER = "llama-server's router mode (several models) is not supported behind the gateway"

# Flag (as llama.cpp's common/arg.cpp names it, short aliases included) -> why it is refused.
REFUSED_BACKEND_FLAGS: dict[str, str] = {
    "--host": _REBIND,
    "--port": _REBIND,
    "--reuse-port": _REBIND + "; a second server could take its connections",
    "--api-prefix": "the gateway calls llama-server's routes at their usual paths",
    "--ssl-key-file": "the gateway speaks plain HTTP to llama-server on 127.0.0.1",
    "--ssl-cert-file": "the gateway speaks plain HTTP to llama-server on 127.0.0.1",
    "--api-key": _AUTH,
    "--api-key-file": _AUTH,
    "--tools": _HOST + " (built-in tools: shell commands, file reads and writes)",
    "--tools-runtime": _HOST + " (built-in tools)",
    "-ag": _HOST + " (built-in tools and the CORS proxy)",
    "--agent": _HOST + " (built-in tools and the CORS proxy)",
    "--mcp-servers-config": _HOST + " (MCP servers)",
    "--mcp-servers-json": _HOST + " (MCP servers)",
    "--ui-mcp-proxy": _HOST + " (the /cors-proxy fetches any URL)",
    "--webui-mcp-proxy": _HOST + " (the /cors-proxy fetches any URL)",
    "--path": _HOST + " (serves a folder's files)",
    "--media-path": _HOST + " (file:// URLs read a folder's files)",
    "--slot-save-path": _HOST + " (POST /slots writes and reads KV-cache files)",
    "--props": _HOST + " (POST /props changes llama-server's settings)",
    "--rpc": "it sends the model and the work to other hosts (RPC servers)",
    "--log-prompts-dir": "it writes every prompt to disk (llama.cpp's debugging aid)",
    "--models-dir": _ROUTER,
    "--models-preset": _ROUTER,
    "--models-max": _ROUTER,
    "--models-autoload": _ROUTER,
    "--no-models-autoload": _ROUTER,
    "-n": "use MAX_TOKENS",
    "--predict": "use MAX_TOKENS",
    "--n-predict": "use MAX_TOKENS",
    # The gateway must know which of these is on (lifecycle.routes.feature_missing), so they are settings.
    "--embedding": "use EMBEDDINGS=true",
    "--embeddings": "use EMBEDDINGS=true",
    "--rerank": "use RERANK=true",
    "--reranking": "use RERANK=true",
}


def backend_flag_name(arg: str) -> str | None:
    """The flag an EXTRA_ARGS word names as llama-server reads it (`--api_key=x` -> `--api-key`), or None for a
    value. llama-server treats `_` as `-` in long flags; `--flag=value` is not its syntax, but is checked too."""
    if not arg.startswith("-") or arg == "-" or re.fullmatch(r"-[0-9.]+", arg):
        return None  # a value: "-", or a negative number
    name = arg.split("=", 1)[0]
    return name.replace("_", "-") if name.startswith("--") else name


def check_backend_flags(args: Iterable[str], where: str) -> None:
    """Refuse the llama-server flags that rebind, unlock or arm the backend (REFUSED_BACKEND_FLAGS): the one rule
    for EXTRA_ARGS and for the keys of MODELS_PRESET (lifecycle.router), `where` names the source."""
    for arg in args:
        name = backend_flag_name(arg)
        if name is not None and name in REFUSED_BACKEND_FLAGS:
            raise SettingsError(f"{where} may not contain {name}: {REFUSED_BACKEND_FLAGS[name]}")


def check_extra_args(extra_args: Iterable[str]) -> None:
    check_backend_flags(extra_args, "EXTRA_ARGS")


# PASSTHROUGH_ROUTES may open only these: read-only llama-server routes the gateway does not serve itself, each for
# GET alone (tools/server/server-context.cpp). Route -> what it shows.
SAFE_PASSTHROUGH_ROUTES: dict[str, str] = {
    "/props": "the model's settings, path, chat template and context size",
    "/slots": "each slot's state: token counts and the last request's sampling parameters (not its text, as "
              "long as LLAMA_SERVER_SLOTS_DEBUG is scrubbed from llama-server's environment, which the supervisor "
              "does)",
    "/lora-adapters": "the loaded LoRA adapters and their scales",
}
# llama-server routes that no setting opens, and why. "/x" covers /x and everything under it, "/x/<id>" everything
# under /x, "METHOD /x" that method of a route the safe list opens for GET only.
NEVER_PUBLIC: dict[str, str] = {
    "/slots/<id>": "saves, restores or erases a slot's KV cache: files on the host, another user's context",
    "POST /props": "changes llama-server's global settings",
    "POST /lora-adapters": "sets the global LoRA scales, which changes every user's output",
    "/tools": "llama-server's agent tools run shell commands and read and write files on the host",
    "/cors-proxy": "fetches any URL from the host (SSRF)",
    "/models": "router mode: POST /models downloads any Hugging Face repo with the server's token, /models/load and "
               "/models/unload start and stop models, DELETE /models removes one (the gateway lists the models at "
               "/v1/models)",
    "/v1/stream": "replays, tails or cancels another client's stream, knowing only its client-chosen conversation id",
    "/v1/streams/lookup": "tells whether a guessed conversation id has a stream: an oracle for /v1/stream",
    "/v1/chat/completions/control": "cuts another live request's reasoning short, knowing only its completion id",
    "/v1/audio/transcriptions": "its body is multipart, so the gateway's caps on JSON fields (max_tokens, ...) "
                                "cannot see it",
    "/audio/transcriptions": "the same route as /v1/audio/transcriptions",
}
# Routes the gateway answers itself (gateway.health, gateway.app, gateway.models).
_GATEWAY_ROUTES = frozenset({"/ping", "/health", "/metrics", "/reload", "/v1/models"})
_ROUTE = re.compile(r"(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+")


def never_public(route: str) -> str | None:
    """Why `route` may never be opened (its NEVER_PUBLIC entry), or None."""
    for key, why in NEVER_PUBLIC.items():
        if " " in key:
            continue  # a method of a safe route: the safe list opens GET alone
        if key.endswith("/<id>"):
            if route.startswith(key[: -len("<id>")]):
                return why
        elif route == key or route.startswith(key + "/"):
            return why
    return None


def passthrough_methods(route: str) -> tuple[str, ...]:
    """The methods PASSTHROUGH_ROUTES opens on `route`: ("GET",) for a route of SAFE_PASSTHROUGH_ROUTES (all are
    read-only). Raises ValueError (saying why) for any other: not a plain path, a route the gateway serves itself
    (lifecycle.routes.JSON_ROUTES, /health, /v1/models, ...), a NEVER_PUBLIC one, or one not on the safe list."""
    if not _ROUTE.fullmatch(route) or any(part in (".", "..") for part in route.split("/")):
        raise ValueError(f"{route} is not a plain path such as /props")
    if route in JSON_ROUTES:
        raise ValueError(f"{route} is served by default, no need to open it")
    if route in _GATEWAY_ROUTES:
        raise ValueError(f"{route} may not be opened: the gateway answers it itself")
    why = never_public(route)
    if why is not None:
        raise ValueError(f"{route} may never be opened: {why}")
    if route not in SAFE_PASSTHROUGH_ROUTES:
        raise ValueError(f"{route} is not on the safe list: {', '.join(SAFE_PASSTHROUGH_ROUTES)}")
    return ("GET",)


def _check_ref(name: str, value: str, check: Callable[[str], object]) -> None:
    """A model reference setting checked with its lifecycle.refs rule."""
    try:
        check(value)
    except ValueError as exc:
        raise SettingsError(f"{name}={value!r} is not allowed: {exc}") from None


def check_models(refs: tuple[str, ...]) -> None:
    """MODELS: `all` alone, or model references (lifecycle.refs), each checked like MODEL_REPO and MODEL_URL."""
    if "all" in refs and len(refs) > 1:
        raise SettingsError("MODELS=all stands alone (every GGUF in MODELS_DIR): do not list other models with it")
    for ref in refs:
        if ref != "all":
            _check_ref("MODELS", ref, parse_reference)


def check_redis_url(url: str) -> None:
    """REDIS_URL: a URL redis-py can connect to (the password, if any, stays in the URL: never logged)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss", "unix") or not rest.strip("/"):
        shown = _URL_SECRETS.sub(lambda m: m[1] + m[2] + ("?..." if m[3] else ""), url)
        raise SettingsError(f"REDIS_URL={shown!r} is not a Redis URL: use redis://host:6379/0, "
                            "rediss://host:6380/0 (TLS) or unix:///path/to/redis.sock")


def check_passthrough_routes(routes: Iterable[str]) -> None:
    for route in routes:
        try:
            passthrough_methods(route)
        except ValueError as exc:
            raise SettingsError(f"PASSTHROUGH_ROUTES: {exc}") from None


# --- The table ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Var:
    """One environment variable: how it is read and checked, its default, and its row in docs/CONFIGURATION.md.

    kind: str, name (a plain file or folder name, `hint` says what to use instead), path, bool, int, port, float,
    auto_int (an integer, or None for unset/`auto`), choice (one of `choices`, lower-cased), list and origins
    (comma-separated; origins lose a trailing `/`), args (split like a shell line). `check` runs on a set value.
    `default` is the value when unset (None: unset); `default_from` takes another variable's value instead;
    `shown` is the docs' default where it is worked out at start-up. `alias_of`: another name of that variable,
    read when it is unset (`deprecated`: with a warning). `read_by`: not a Settings field, read by that module.
    `doc` is the description; `{NAME}` in it is NAME's default. `new` marks it **New.**; `was`: the old default.
    """

    name: str
    section: str
    kind: str = "str"
    default: Any = None
    doc: str = ""
    minimum: float = 0
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    hint: str = ""
    check: Callable[[Any], None] | None = None
    default_from: str | None = None
    shown: str | None = None
    alias_of: str | None = None
    deprecated: bool = False
    new: bool = False
    was: str | None = None
    read_by: str | None = None

    def parse(self, raw: str, name: str | None = None) -> Any:
        """A set value (stripped, not empty) as this variable's value; errors name `name` (an alias) or ours."""
        value = _PARSERS[self.kind](self, name or self.name, raw)
        if self.check is not None:
            self.check(value)
        return value


def _raw(env: Mapping[str, str], name: str) -> str | None:
    """The value as given, stripped; None when unset or empty (an empty value counts as unset)."""
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _bool(var: Var, name: str, raw: str) -> bool:
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean: use true/false, 1/0, yes/no or on/off")


def _int(var: Var, name: str, raw: str) -> int:
    minimum, maximum = PORT_RANGE if var.kind == "port" else (int(var.minimum), var.maximum)
    try:
        number = int(raw)
    except ValueError:
        number = None
    if number is None or number < minimum or (maximum is not None and number > maximum):
        allowed = f"an integer >= {minimum}" if maximum is None else f"an integer {minimum}-{maximum}"
        raise SettingsError(f"{name}={raw!r} is not allowed: use {allowed}")
    return number


def _auto_int(var: Var, name: str, raw: str) -> int | None:
    if raw.lower() == "auto":
        return None
    try:
        number = int(raw)
    except ValueError:
        number = None
    if number is None or number < var.minimum:
        raise SettingsError(f"{name}={raw!r} is not allowed: use auto (or leave it unset), or an integer "
                            f">= {int(var.minimum)}")
    return number


def _float(var: Var, name: str, raw: str) -> float:
    try:
        number = float(raw)
    except ValueError:
        number = None
    if number is None or number != number or number < var.minimum:
        raise SettingsError(f"{name}={raw!r} is not allowed: use a number >= {var.minimum:g}")
    return number


def _choice(var: Var, name: str, raw: str) -> str:
    if raw.lower() not in var.choices:
        raise SettingsError(f"{name}={raw!r} is not allowed: use {' or '.join(var.choices)}")
    return raw.lower()


def _name(var: Var, name: str, raw: str) -> str:
    if "/" in raw or raw in (".", ".."):
        raise SettingsError(f"{name}={raw!r} is not allowed: {var.hint}")
    return raw


def _args(var: Var, name: str, raw: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} cannot be split like a shell line: {exc}") from None


_PARSERS: dict[str, Callable[[Var, str, str], Any]] = {
    "str": lambda var, name, raw: raw,
    "name": _name,
    "path": lambda var, name, raw: Path(raw).expanduser(),
    "bool": _bool,
    "int": _int,
    "port": _int,
    "float": _float,
    "auto_int": _auto_int,
    "choice": _choice,
    "list": lambda var, name, raw: tuple(item.strip() for item in raw.split(",") if item.strip()),
    "origins": lambda var, name, raw: tuple(item.strip().rstrip("/") for item in raw.split(",") if item.strip()),
    "args": _args,
}

# Every variable, in the order of its docs section. Sections: the `<!-- settings:SECTION -->` tables of
# docs/CONFIGURATION.md.
VARIABLES: tuple[Var, ...] = (
    # Model
    Var("MODEL_NAME", "model", "name", hint="use a file name; use MODEL_PATH for paths",
        doc="GGUF file name, looked up in `MODELS_DIR`. A plain file name (no `/`); wins over `MODEL_REPO` and "
            "`MODEL_URL`."),
    Var("MODEL_PATH", "model", "path", doc="Full path to a GGUF file; wins over every other model setting."),
    Var("MODELS_DIR", "model", "path", shown=f"`$DATA_DIR/{MODELS_SUBDIR}`",
        doc="Where `MODEL_NAME` is looked up, and where `MODEL_REPO` and `MODEL_URL` downloads are kept "
            "(`<org>--<repo>/<file>` and `<file>`); see [MODELS.md](MODELS.md#sources)."),
    Var("MODEL_REPO", "model", check=lambda value: _check_ref("MODEL_REPO", value, check_repo), new=True,
        doc="A Hugging Face repo to serve a GGUF from: `org/repo` (its one GGUF model) or `org/repo:QUANT` (the "
            "GGUF whose name carries that tag, e.g. `:Q4_K_M`). Taken from the Hugging Face cache or `MODELS_DIR` "
            "when it is there (no network), else downloaded into `MODELS_DIR` once; see "
            "[MODELS.md](MODELS.md#sources). Wins over `MODEL_URL`."),
    Var("MODEL_FILE", "model", check=lambda value: _check_ref("MODEL_FILE", value, check_repo_file), new=True,
        doc="The exact file of `MODEL_REPO` to serve (a path in the repo, e.g. `model-Q4_K_M.gguf`); only with "
            "`MODEL_REPO`, and not with a `:QUANT` tag."),
    Var("MODEL_URL", "model", check=lambda value: _check_ref("MODEL_URL", value, check_url), new=True,
        doc="An `https://` URL of a GGUF file, downloaded once into `MODELS_DIR` (resumed when interrupted; "
            "checked against a sha256 given as `#sha256=<hex>` or published by the server). `http://` only for "
            "127.0.0.1 or localhost."),
    Var("HF_TOKEN", "model", read_by="lifecycle/sources.py", new=True,
        doc="Hugging Face token for gated or private repos (read by `huggingface_hub`, which also finds the token "
            "of `hf auth login`). A secret: never logged or printed."),
    Var("HF_ENDPOINT", "model", read_by="lifecycle/sources.py", shown="`https://huggingface.co`", new=True,
        doc="The Hugging Face Hub to download from (read by `huggingface_hub`), e.g. a mirror."),
    Var("HF_HUB_CACHE", "model", "path", shown="`/runpod-volume/huggingface-cache/hub` when it exists", new=True,
        doc="A Hugging Face cache (`models--org--repo/snapshots/...`) to look in first for `MODEL_REPO`: a model "
            "found there is used with no network access. Unset: RunPod's model cache, when it exists."),
    # Several models (llama-server's router mode)
    Var("MODELS", "models", "list", (), new=True, check=check_models,
        doc="Serve several models at once through llama-server's router mode: `all` (every GGUF in `MODELS_DIR`) "
            "or a comma-separated list of file names in `MODELS_DIR`, `org/repo[:QUANT]` references and URLs. "
            "The request's `model` picks one. Unset: one model, exactly as before. See "
            "[MODELS.md](MODELS.md#several-models-at-once)."),
    Var("DEFAULT_MODEL", "models", "str", new=True,
        doc="With `MODELS`: the model for requests whose `model` is `any`, empty or missing (an id, file name or "
            "alias). Default: the first listed."),
    Var("MODELS_MAX", "models", "int", 4, minimum=0, new=True,
        doc="With `MODELS`: how many models are loaded at once (`--models-max`; 0 = no limit); the least recently "
            "used is unloaded first."),
    Var("MODEL_IDLE_TIMEOUT", "models", "int", -1, minimum=-1, new=True,
        doc="With `MODELS`: seconds of idleness after which a model sleeps (its memory freed; the next request "
            "wakes it) (`--sleep-idle-seconds`; -1 = never)."),
    Var("MODELS_PRESET", "models", "path", new=True,
        doc="With `MODELS`: per-model llama-server arguments, in llama-server's preset INI format (a section per "
            "model id, file name or alias; `[*]` for all). Keys are llama-server flags without dashes; the flags "
            "`EXTRA_ARGS` may not hold are refused here too."),
    # Paths
    Var("DATA_DIR", "paths", "path", shown="detected",
        doc="Base directory for models, logs and the keys file. Must be writable (logs go there): if it is not, "
            "start-up stops with exit code 1 and one line naming it, in both modes (before: a traceback). "
            "`make serve` uses `./data`."),
    Var("LLAMA_GGUF_CACHE_DIR", "paths", "path", shown=f"`~/{CACHE_SUBDIR.as_posix()}`",
        doc="Build and download cache (llama-server builds, the default model). `XDG_CACHE_HOME` is honoured."),
    # Backend (llama-server)
    Var("LLAMA_SERVER_BIN", "backend", "path", doc="Path to a `llama-server` binary to use."),
    Var("CMAKE_ARGS", "backend", read_by="lifecycle/llama_server.py",
        doc="Extra CMake arguments when llama-server is built from source, e.g. `-DGGML_CUDA=ON`. Each distinct "
            "value gets its own cache entry."),
    Var("NGL", "backend", "auto_int", was="`99`",
        doc="Layers offloaded to the GPU. Unset or `auto`: llama-server fits them to free device memory "
            "(`-ngl auto --fit on`), see [GPU offload and context](#gpu-offload-and-context). A number is passed "
            "exactly (`-ngl N`): 0 = CPU only, 99 (or more) = all."),
    Var("CTX", "backend", "auto_int", was="`16384`",
        doc="Context length, shared by the parallel slots. Unset or `auto`: no `-c`, so llama-server takes the "
            "model's trained context and `--fit` shrinks it when it does not fit in memory. A number is passed "
            "exactly (`-c N`); 0 = the model's own, in full (`--fit` keeps it)."),
    Var("PARALLEL", "backend", "int", 8, minimum=1, new=True,
        doc="Parallel decoding slots in llama-server (`--parallel`). Throughput comes from here. They share one KV "
            "buffer of `CTX` tokens (`--kv-unified`, as llama-server does with its own automatic slot count), so "
            "one request may still use the whole context; pass `--no-kv-unified` in `EXTRA_ARGS` to split it "
            "`CTX / PARALLEL` per slot."),
    Var("THREADS", "backend", "int", 0, doc="CPU threads (`-t`); 0 = llama-server decides."),
    Var("EMBEDDINGS", "backend", "bool", False, new=True,
        doc="Start llama-server with `--embeddings`, for an embedding model: `/v1/embeddings` works only then "
            "(otherwise it answers a 501 naming this variable). llama.cpp says of the flag \"restrict to only "
            "support embedding use case; use only with dedicated embedding models\": a generative model started "
            "with it still answers chat (with the llama.cpp built here), but llama-server then computes an output "
            "for every prompt token, not just the last, and shrinks its batch to the micro-batch (`-ub`, 512), so "
            "prompts are processed more slowly; an embedding input must fit in one micro-batch. A model with no "
            "pooling of its own (most generative ones) also needs `--pooling mean` (or `cls`, `last`) in "
            "`EXTRA_ARGS`, else `/v1/embeddings` answers 400 \"Pooling type 'none' is not OAI compatible\"."),
    Var("RERANK", "backend", "bool", False, new=True,
        doc="Start llama-server with `--rerank` (embeddings with rank pooling), for a reranker model (e.g. "
            "bge-reranker-v2-m3): `/v1/rerank` (and `/rerank`, `/v1/reranking`, `/reranking`) work only then "
            "(otherwise a 501 naming this variable). A model without a classifier head loads with it and answers, "
            "but its scores mean nothing."),
    Var("EXTRA_ARGS", "backend", "args", (), check=check_extra_args,
        doc="More llama-server arguments, split like a shell line (`EXTRA_ARGS=\"--pooling mean -ub 1024\"`). "
            "Flags that would rebind, unlock or arm the backend are refused at start-up (exit 2), see below; "
            "`--embeddings` and `--rerank` are the settings `EMBEDDINGS` and `RERANK`."),
    Var("PORT_BACKEND", "backend", "port", 8080, doc="llama-server's port, bound to 127.0.0.1 only."),
    Var("BACKEND_PORT", "backend", alias_of="PORT_BACKEND", deprecated=True),
    Var("BACKEND_STOP_TIMEOUT", "backend", "float", 10.0, new=True,
        doc="Seconds between SIGTERM and SIGKILL when stopping llama-server."),
    Var("BACKEND_RESTART_DELAY", "backend", "float", 1.0, new=True,
        doc="First restart backoff in seconds, doubled per crash."),
    Var("BACKEND_RESTART_MAX_DELAY", "backend", "float", 60.0, new=True, doc="Backoff cap."),
    Var("BACKEND_RESTART_LIMIT", "backend", "int", 5, minimum=1, new=True,
        doc="Crashes within `BACKEND_RESTART_WINDOW` that make a crash loop."),
    Var("BACKEND_RESTART_WINDOW", "backend", "float", 300.0, minimum=1.0, new=True, doc="Seconds."),
    Var("BACKEND_CRASH_LOOP", "backend", "choice", "exit", choices=("exit", "retry"), new=True,
        doc="On a crash loop: `exit` (code 1, the platform replaces the container) or `retry`. See "
            "[RESILIENCE.md](RESILIENCE.md)."),
    Var("BACKEND_WAIT_TIMEOUT", "backend", "float", 120.0, new=True,
        doc="Serverless mode: how long a job waits for a backend that is (re)starting before it fails."),
    # Gateway (HTTP mode)
    Var("HOST", "gateway", "str", "0.0.0.0", new=True, doc="Address the gateway and health port bind to."),
    Var("PORT", "gateway", "port", 8000, doc="Public gateway port."),
    Var("PORT_HEALTH", "gateway", "port", 8001,
        doc="Health-only port for platform probes (200 to GET/HEAD on any path, never touches the backend). Every "
            "answer carries an `X-Request-ID` (before, none did)."),
    Var("AUTH_ENABLED", "gateway", "bool", True, doc="API key authentication."),
    Var("AUTH_KEYS_FILE", "gateway", "path", shown=f"`$DATA_DIR/{KEYS_FILE_NAME}`",
        doc="Keys file; see [AUTHENTICATION.md](AUTHENTICATION.md). Reloaded by itself when it changes."),
    Var("MAX_REQUESTS_PER_MINUTE", "gateway", "int", 100, minimum=1,
        doc="Rate limit per key (sliding 60 s window); a key's own limit in the file wins."),
    Var("CORS_ORIGINS", "gateway", "origins", (), doc="Comma-separated allowed origins, `*`, or empty for off."),
    Var("METRICS_AUTH_ENABLED", "gateway", "bool", False, new=True, doc="Require a key for `/metrics`."),
    Var("AUTH_FAILURE_LIMIT", "gateway", "int", 10, minimum=1, new=True,
        doc="Failed keys from one address within `AUTH_FAILURE_WINDOW` before it gets 429."),
    Var("AUTH_FAILURE_WINDOW", "gateway", "float", 60.0, minimum=1.0, new=True,
        doc="Seconds that failed keys are remembered per address."),
    Var("REDIS_URL", "gateway", "str", check=check_redis_url, new=True,
        doc="Share rate limits, token budgets, failed-key throttling and key revocations between replicas through "
            "this Redis (`redis://[:password@]host:6379/0`, `rediss://` for TLS, `unix://`); unset: each replica "
            "keeps its own. If Redis cannot be reached, each replica falls back to its own limits, with a warning, "
            "a metric and `/health` saying so, and picks Redis up again by itself; see [SCALING.md](SCALING.md)."),
    Var("REDIS_TIMEOUT", "gateway", "float", 0.1, minimum=0.001, new=True,
        doc="Seconds a request waits for Redis (one round trip) before it is judged by the replica's own limits "
            "and Redis counts as down."),
    Var("PASSTHROUGH_ROUTES", "gateway", "list", (), check=check_passthrough_routes, new=True,
        doc="Read-only llama-server routes to open through the gateway, for GET only (e.g. `/props,/slots`); "
            "closed by default. Only the safe list may be opened: `/props`, `/slots`, `/lora-adapters`. Anything "
            "else is refused at start-up (exit 2) with the reason: a route the gateway serves by default "
            "(`/tokenize`, `/v1/rerank`, ...: no need to open it), one that is never public (see "
            "[Routes that are never opened](#routes-that-are-never-opened)), or one not on the list. One rule: "
            "`passthrough_methods` in `lifecycle/settings.py`."),
    Var("CLIENT_TIMEOUT", "gateway", "float", 30.0, minimum=0.1, new=True,
        doc="Seconds a client may take to send its body (else 408), sit idle or stuck in its headers, or leave an "
            "answer unread: a client that reads nothing for this long while its stream (or a large answer) waits "
            "is dropped, and its backend slot is freed. (Before, a client that never read its stream held a slot "
            "forever.)"),
    Var("MAX_CONNECTIONS", "gateway", "int", 1024, minimum=1, new=True,
        doc="Open client connections on `PORT` (and, separately, on `PORT_HEALTH`). One more gets a 503 "
            "`too_many_connections` and is closed before anything of it is read."),
    Var("FAST_LANE", "gateway", "bool", True, new=True,
        doc="Answer plain API calls (whole JSON POSTs to the API routes, streamed or not, and "
            "`GET /v1/models`) on the gateway's lean request path; everything else always takes the full aiohttp "
            "path. `false` sends every request through aiohttp. Same answers, headers and checks either way; see "
            "[README.md, Speed](../README.md#speed)."),
    Var("MAX_CONCURRENT_REQUESTS", "gateway", "int", default_from="PARALLEL", minimum=1,
        doc="Requests sent to the backend at once. The old default was 1, which serialised everything."),
    Var("MAX_QUEUE_SIZE", "gateway", "int", 0, doc="Requests allowed to wait (0 = unbounded)."),
    Var("QUEUE_TIMEOUT", "gateway", "float", 60.0, minimum=0.001, new=True,
        doc="Seconds a request may wait for a slot before a 503 `queue_timeout`."),
    Var("REQUEST_TIMEOUT", "gateway", "float", 600.0, minimum=0.001, new=True,
        doc="Seconds for a whole non-streaming request before a 504."),
    Var("STREAM_IDLE_TIMEOUT", "gateway", "float", 120.0, minimum=0.001, new=True,
        doc="Longest silence between two pieces of a stream before an SSE error event."),
    Var("UPSTREAM_CONNECT_TIMEOUT", "gateway", "float", 5.0, minimum=0.001, new=True,
        doc="Seconds to connect to llama-server."),
    Var("DRAIN_TIMEOUT", "gateway", "float", 30.0, new=True,
        doc="On SIGTERM, seconds in-flight requests may take to finish."),
    Var("MAX_REQUEST_BODY_SIZE", "gateway", "int", 10 * 1024 * 1024, minimum=1,
        doc="Largest request body in bytes; larger gets 413."),
    Var("MAX_HEADERS", "gateway", "int", 64, minimum=1, doc="Most request headers; more get a 431."),
    Var("MAX_HEADER_LINE_SIZE", "gateway", "int", 8192, minimum=256,
        doc="Longest header line in bytes; longer gets a 431. Together with `MAX_HEADERS` this bounds what a "
            "connection still sending its headers can hold ({MAX_HEADERS} x {MAX_HEADER_LINE_SIZE} bytes); "
            "before, the parser took 16 times that before refusing."),
    Var("MAX_TOKENS", "gateway", "int", 4096, minimum=1, new=True,
        doc="The most tokens one request may generate. A request that gives no `max_tokens` (or `-1`) gets up to "
            "this many (llama-server's `-n`; before, it generated until the context was full); one that asks for "
            "more gets a 400 naming the field (`max_tokens`, `max_completion_tokens`, `n_predict`). Serverless "
            "jobs obey it too; a native job that gives no `max_tokens` gets `JOB_MAX_TOKENS`."),
    Var("MAX_RESPONSE_SIZE", "gateway", "int", 64 * 1024 * 1024, minimum=1024, new=True,
        doc="Largest whole (non-streamed) backend answer in bytes; a larger one is dropped, not buffered, and the "
            "client gets a 502 `backend_answer_too_large`. Streams are passed on as they arrive and are not "
            "limited."),
    Var("SHARED_PROMPT_CACHE", "gateway", "bool", True, new=True,
        doc="llama-server reuses the cached prefix of an earlier prompt, whoever sent it, and says so in "
            "`usage.prompt_tokens_details.cached_tokens`, `timings` and in how fast the answer comes: one key can "
            "learn that another sent the same prompt. `false` sends `\"cache_prompt\": false` with every request, "
            "so no prompt is reused: nothing to learn, at the cost of processing every prompt in full."),
    # Serverless mode (RunPod)
    Var("JOB_MAX_TOKENS", "serverless", "int", 512, minimum=1, new=True,
        doc="The tokens a native job (`prompt` or `messages`) may generate when its `sampling_params` give no "
            "`max_tokens`; at most `MAX_TOKENS`. Without it such a job ran on until `MAX_TOKENS` ({MAX_TOKENS}) "
            "or the end of the context: minutes of generation, which RunPod bills by the second of worker time, "
            "with a slot held all along, for an answer nobody asked to be that long. A job "
            "that wants more asks for it (`max_tokens` up to `MAX_TOKENS`, or `-1` for `MAX_TOKENS`). "
            "`openai_route` jobs are not affected: as in HTTP mode and the OpenAI API, a body without "
            "`max_tokens` (`max_completion_tokens`, `n_predict`, `max_output_tokens`) gets up to `MAX_TOKENS`. "
            "See [SERVERLESS.md](SERVERLESS.md#native)."),
    # Logs and modes
    Var("LOG_NAME", "logs", "name", "llama", hint="use a plain folder name",
        doc="Log folder name under `$DATA_DIR/logs/`."),
    Var("WORKER_TYPE", "logs", "name", "", hint="use a plain folder name",
        doc="When set, the log folder is `{LOG_NAME}-<WORKER_TYPE>` (and `LOG_NAME` is not used)."),
    Var("MODE", "logs", "choice", choices=MODES, shown="detected",
        doc="`gateway` (HTTP mode) or `handler` (RunPod serverless). Detected: `handler` when "
            "`RUNPOD_WEBHOOK_GET_JOB` is set, else `gateway`."),
    Var("DEBUG_SHELL", "logs", "bool", False,
        doc="`entrypoint.sh` prints the resolved settings and holds instead of starting. Any boolean spelling "
            "(`on`, `yes`, ...); a bad value exits 2."),
    Var("ACCESS_LOG", "logs", "bool", True, new=True,
        doc="One line per request in `$DATA_DIR/logs/<LOG_NAME>/access.log`; see [METRICS.md](METRICS.md)."),
    Var("LOG_FORMAT", "logs", "choice", "text", choices=("text", "json"), new=True,
        doc="Access log lines as `text` or `json` (JSON lines)."),
    Var("ACCESS_LOG_FORMAT", "logs", alias_of="LOG_FORMAT"),
    Var("ACCESS_LOG_MAX_BYTES", "logs", "int", 10_000_000, minimum=1024, new=True,
        doc="Size at which the access log is rotated."),
    Var("ACCESS_LOG_BACKUPS", "logs", "int", 5, new=True, doc="Rotated access logs kept."),
    Var("USAGE_LEDGER", "logs", "bool", True, new=True,
        doc="The usage ledger: requests, prompt, completion and cached tokens, errors and time to first token per "
            "API key id, model and hour, in SQLite (`USAGE_DB`), written off the request path at most every 0.5 s; "
            "`python -m gateway.keys usage` prints it. See [USAGE.md](USAGE.md)."),
    Var("USAGE_DB", "logs", "path", shown=f"`$DATA_DIR/{USAGE_DB_NAME}`", new=True,
        doc="The usage ledger's SQLite file; several gateway processes may share one (on a local disk, not NFS)."),
)
VARS: dict[str, Var] = {var.name: var for var in VARIABLES}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(var.section for var in VARIABLES))


def aliases(name: str) -> tuple[Var, ...]:
    """The other names of variable `name`, read in this order when it is unset."""
    return tuple(var for var in VARIABLES if var.alias_of == name)


_UNSET: Any = object()


def _lookup(var: Var, env: Mapping[str, str], deprecations: list[str] | None = None) -> Any:
    """Variable `var` read from `env` (by its name, else by its aliases'), or _UNSET when none is set. A deprecated
    alias that is read adds its warning to `deprecations`."""
    for name in (var.name, *(alias.name for alias in aliases(var.name))):
        raw = _raw(env, name)
        if raw is not None:
            if name != var.name and VARS[name].deprecated and deprecations is not None:
                deprecations.append(f"{name} is deprecated: use {var.name}")
            return var.parse(raw, name)
    return _UNSET


def read(name: str, env: Mapping[str, str] | None = None) -> Any:
    """One variable as Settings reads it (its aliases included), or its default when unset; SettingsError when bad.
    For the few places that need one setting without the whole Settings object."""
    var = VARS[name]
    var = VARS[var.alias_of] if var.alias_of else var
    value = _lookup(var, os.environ if env is None else env)
    if value is not _UNSET:
        return value
    return read(var.default_from, env) if var.default_from else var.default


def read_bool(name: str, env: Mapping[str, str] | None = None, default: bool | None = None) -> bool:
    """One boolean setting, as every setting reads it (`python -m lifecycle.settings --bool NAME`). Unset: `default`,
    else the table's default (false for a name not in the table)."""
    var = VARS.get(name)
    if var is None or var.kind != "bool":
        var = Var(name, "", "bool", False)
    value = _lookup(var, os.environ if env is None else env)
    if value is _UNSET:
        return var.default if default is None else default
    return bool(value)


def default_cache_dir(env: Mapping[str, str], data_dir: Path | None = None) -> Path:
    """LLAMA_GGUF_CACHE_DIR; in our images (LLAMA_GGUF_IMAGE set) $DATA_DIR/.cache/llama-gguf-inference, so the
    default model is fetched once into the data volume; else the user's cache folder."""
    explicit = read("LLAMA_GGUF_CACHE_DIR", env)
    if explicit is not None:
        return explicit
    if env.get("LLAMA_GGUF_IMAGE") and data_dir is not None:
        return data_dir / CACHE_SUBDIR
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / CACHE_SUBDIR.parent
    return base.expanduser() / CACHE_SUBDIR.name


def setting(name: str, *, required: bool = False, factory: Callable[[], Any] | None = None) -> Any:
    """A Settings field read from variable `name`, with the table's default (none when `required`)."""
    var = VARS[name]
    metadata = {"env": name}
    if required:
        return field(metadata=metadata)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    default = VARS[var.default_from].default if var.default_from else var.default
    return field(default=default, metadata=metadata)


# scheme://user:password@ and ?query in a URL, for describe()
_URL_SECRETS = re.compile(r"(\w+://)(?:[^/@\s]*@)?([^?\s]*)(\?[^\s,#]*)?")


@dataclass(frozen=True)
class Settings:
    """Every field is read from the variable `setting()` names, with the table's default."""

    data_dir: Path = setting("DATA_DIR", required=True)
    models_dir: Path = setting("MODELS_DIR", required=True)
    model_name: str | None = setting("MODEL_NAME")
    model_path: Path | None = setting("MODEL_PATH")
    model_repo: str | None = setting("MODEL_REPO")
    model_file: str | None = setting("MODEL_FILE")
    model_url: str | None = setting("MODEL_URL")
    hf_hub_cache: Path | None = setting("HF_HUB_CACHE")
    models: tuple[str, ...] = setting("MODELS")
    default_model: str | None = setting("DEFAULT_MODEL")
    models_max: int = setting("MODELS_MAX")
    model_idle_timeout: int = setting("MODEL_IDLE_TIMEOUT")
    models_preset: Path | None = setting("MODELS_PRESET")
    cache_dir: Path = setting("LLAMA_GGUF_CACHE_DIR", factory=lambda: default_cache_dir(os.environ))
    llama_server_bin: Path | None = setting("LLAMA_SERVER_BIN")

    auth_enabled: bool = setting("AUTH_ENABLED")
    auth_keys_file: Path | None = setting("AUTH_KEYS_FILE")
    max_requests_per_minute: int = setting("MAX_REQUESTS_PER_MINUTE")
    cors_origins: tuple[str, ...] = setting("CORS_ORIGINS")
    metrics_auth_enabled: bool = setting("METRICS_AUTH_ENABLED")
    auth_failure_limit: int = setting("AUTH_FAILURE_LIMIT")
    auth_failure_window: float = setting("AUTH_FAILURE_WINDOW")
    redis_url: str | None = setting("REDIS_URL")
    redis_timeout: float = setting("REDIS_TIMEOUT")
    passthrough_routes: tuple[str, ...] = setting("PASSTHROUGH_ROUTES")
    client_timeout: float = setting("CLIENT_TIMEOUT")
    fast_lane: bool = setting("FAST_LANE")

    parallel: int = setting("PARALLEL")
    max_concurrent_requests: int = setting("MAX_CONCURRENT_REQUESTS")
    max_queue_size: int = setting("MAX_QUEUE_SIZE")
    max_request_body_size: int = setting("MAX_REQUEST_BODY_SIZE")
    max_headers: int = setting("MAX_HEADERS")
    max_header_line_size: int = setting("MAX_HEADER_LINE_SIZE")
    max_connections: int = setting("MAX_CONNECTIONS")
    max_tokens: int = setting("MAX_TOKENS")
    max_response_size: int = setting("MAX_RESPONSE_SIZE")
    shared_prompt_cache: bool = setting("SHARED_PROMPT_CACHE")

    # None: unset, llama-server fits the layers to free device memory (-ngl auto, --fit on)
    ngl: int | None = setting("NGL")
    # None: unset, no -c (the model's own context, shrunk by --fit to fit); 0: the model's own
    ctx: int | None = setting("CTX")
    threads: int = setting("THREADS")
    extra_args: tuple[str, ...] = setting("EXTRA_ARGS")
    embeddings: bool = setting("EMBEDDINGS")  # llama-server's --embeddings (lifecycle.routes: feature "embeddings")
    rerank: bool = setting("RERANK")  # llama-server's --rerank (lifecycle.routes: feature "rerank")

    host: str = setting("HOST")
    port: int = setting("PORT")
    port_health: int = setting("PORT_HEALTH")
    port_backend: int = setting("PORT_BACKEND")

    log_name: str = setting("LOG_NAME")
    worker_type: str = setting("WORKER_TYPE")
    debug_shell: bool = setting("DEBUG_SHELL")
    mode: str | None = setting("MODE")

    stop_timeout: float = setting("BACKEND_STOP_TIMEOUT")
    backend_wait: float = setting("BACKEND_WAIT_TIMEOUT")
    job_max_tokens: int = setting("JOB_MAX_TOKENS")
    restart_limit: int = setting("BACKEND_RESTART_LIMIT")
    restart_window: float = setting("BACKEND_RESTART_WINDOW")
    restart_base_delay: float = setting("BACKEND_RESTART_DELAY")
    restart_max_delay: float = setting("BACKEND_RESTART_MAX_DELAY")
    crash_loop: str = setting("BACKEND_CRASH_LOOP")
    queue_timeout: float = setting("QUEUE_TIMEOUT")
    request_timeout: float = setting("REQUEST_TIMEOUT")
    stream_idle_timeout: float = setting("STREAM_IDLE_TIMEOUT")
    connect_timeout: float = setting("UPSTREAM_CONNECT_TIMEOUT")
    drain_timeout: float = setting("DRAIN_TIMEOUT")
    access_log: bool = setting("ACCESS_LOG")
    log_format: str = setting("LOG_FORMAT")
    access_log_max_bytes: int = setting("ACCESS_LOG_MAX_BYTES")
    access_log_backups: int = setting("ACCESS_LOG_BACKUPS")
    usage_ledger: bool = setting("USAGE_LEDGER")
    usage_db_path: Path | None = setting("USAGE_DB")
    deprecations: tuple[str, ...] = ()  # the warnings for deprecated variables that were read

    @property
    def keys_file(self) -> Path:
        return self.auth_keys_file or self.data_dir / KEYS_FILE_NAME

    @property
    def usage_db(self) -> Path:
        return self.usage_db_path or self.data_dir / USAGE_DB_NAME

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs" / self.log_name

    @property
    def boot_log_dir(self) -> Path:
        return self.data_dir / "logs" / "_boot"

    @property
    def audit_dir(self) -> Path:
        """The audit log's folder (gateway.audit): key changes, reloads, admin actions."""
        return self.data_dir / "logs" / "audit"

    def describe(self) -> dict[str, str]:
        """The resolved settings as strings, safe to print: no secrets live in Settings, and a URL's credentials
        and query string (MODEL_URL, MODELS, a signed link's token) are left out."""
        out = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, tuple):
                value = " ".join(value)
            if isinstance(value, str) and "://" in value:
                value = _URL_SECRETS.sub(lambda m: m[1] + m[2] + ("?..." if m[3] else ""), value)
            if value is None:
                var = VARS.get(item.metadata.get("env", ""))
                value = "auto" if var is not None and var.kind == "auto_int" else ""
            out[item.name] = str(value)
        out["keys_file"] = str(self.keys_file)
        out["usage_db"] = str(self.usage_db)
        out["log_dir"] = str(self.log_dir)
        return out

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, probe_roots: Iterable[Path] | None = None
    ) -> Settings:
        env = os.environ if env is None else env
        deprecations: list[str] = []
        values: dict[str, Any] = {}
        unset: list[tuple[str, str]] = []  # (field, variable) read from another variable
        for item in fields(cls):
            if "env" not in item.metadata:
                continue
            var = VARS[item.metadata["env"]]
            value = _lookup(var, env, deprecations)
            if value is not _UNSET:
                values[item.name] = value
            elif var.default_from is not None:
                unset.append((item.name, var.default_from))
            else:
                values[item.name] = var.default
        for name, source in unset:
            values[name] = values[_FIELDS[source]]

        # The defaults that are worked out here: each is the `shown` of its variable in the table.
        data_dir = values["data_dir"] = detect_data_dir(values["data_dir"], probe_roots)
        values["models_dir"] = values["models_dir"] or data_dir / MODELS_SUBDIR
        values["cache_dir"] = default_cache_dir(env, data_dir)
        if values["worker_type"]:
            values["log_name"] = f"{VARS['LOG_NAME'].default}-{values['worker_type']}"

        settings = cls(**values, deprecations=tuple(deprecations))
        if settings.model_file is not None:
            if settings.model_repo is None:
                raise SettingsError(f"MODEL_FILE={settings.model_file!r} needs MODEL_REPO (the repo it is in)")
            if ":" in settings.model_repo:
                raise SettingsError(f"MODEL_FILE={settings.model_file!r} and a :QUANT tag in "
                                    f"MODEL_REPO={settings.model_repo!r}: give one of them")
        ports = {"PORT": settings.port, "PORT_HEALTH": settings.port_health, "PORT_BACKEND": settings.port_backend}
        if len(set(ports.values())) != len(ports):
            shown = ", ".join(f"{k}={v}" for k, v in ports.items())
            raise SettingsError(f"ports must differ: {shown}")
        return settings


# Variable -> the Settings field it sets.
_FIELDS: dict[str, str] = {item.metadata["env"]: item.name for item in fields(Settings) if "env" in item.metadata}


# --- docs/CONFIGURATION.md ------------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "CONFIGURATION.md"
DOCS_COMMAND = "python -m lifecycle.settings --docs"
_BLOCK = re.compile(r"(<!-- settings:(?P<section>[a-z]+) -->\n)(?P<body>.*?)(<!-- /settings -->)", re.DOTALL)


def _plain(value: Any) -> str:
    """A default as it is written in the environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def shown_default(var: Var) -> str:
    """The Default cell of `var`'s docs row."""
    target = VARS[var.alias_of] if var.alias_of else var
    if target.shown is not None:
        return target.shown
    if target.default_from is not None:
        return f"`{target.default_from}`"
    if target.default is None:
        return "unset (`auto`)" if target.kind == "auto_int" else "—"
    text = _plain(target.default)
    return f"`{text}`" if text else '`""`'


def description(var: Var) -> str:
    """The Description cell of `var`'s docs row."""
    parts = []
    if var.new:
        parts.append("**New.**")
    if var.was is not None:
        parts.append(f"**Changed** (was {var.was}).")
    if var.alias_of is not None:
        parts.append(f"Deprecated alias of `{var.alias_of}` (a warning is logged)." if var.deprecated else
                     f"Alias of `{var.alias_of}`, read when `{var.alias_of}` is unset.")
    if var.doc:
        parts.append(var.doc.format_map({name: _plain(other.default) for name, other in VARS.items()}))
    return " ".join(parts)


def docs_table(section: str) -> str:
    """The Markdown table of one docs section."""
    lines = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for var in VARIABLES:
        if var.section == section:
            lines.append(f"| `{var.name}` | {shown_default(var)} | {description(var)} |")
    return "\n".join(lines) + "\n"


def render_docs(text: str) -> str:
    """`text` with every `<!-- settings:SECTION -->` ... `<!-- /settings -->` block filled from VARIABLES."""

    def fill(match: re.Match[str]) -> str:
        section = match["section"]
        if section not in SECTIONS:
            raise SettingsError(f"docs: no settings section {section!r}: use one of {', '.join(SECTIONS)}")
        return f"{match[1]}{docs_table(section)}{match[4]}"

    return _BLOCK.sub(fill, text)


def docs_sections(text: str) -> list[str]:
    """The sections whose tables `text` holds, in order."""
    return [match["section"] for match in _BLOCK.finditer(text)]


BAD_SETTINGS_EXIT = 2


def load_settings() -> Settings | None:
    """The settings from the environment, or None once the one-line error is printed; the entry point then
    exits with BAD_SETTINGS_EXIT."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    """`python -m lifecycle.settings`: print the resolved settings (DEBUG_SHELL uses it).

    `python -m lifecycle.settings --bool NAME`: print `true` or `false` for one boolean setting (unset: its
    default), or the one-line error and exit 2; entrypoint.sh reads DEBUG_SHELL so, with the same rule as Python.

    `python -m lifecycle.settings --docs [--check]`: write the variable tables of docs/CONFIGURATION.md from
    VARIABLES (`--check`: write nothing, exit 1 when they differ)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bool"] and len(argv) == 2:
        try:
            print("true" if read_bool(argv[1]) else "false")
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return BAD_SETTINGS_EXIT
        return 0
    if argv in (["--docs"], ["--docs", "--check"]):
        text = DOCS.read_text(encoding="utf-8")
        rendered = render_docs(text)
        if rendered == text:
            return 0
        if "--check" in argv:
            print(f"error: {DOCS} differs from the settings table: run {DOCS_COMMAND}", file=sys.stderr)
            return 1
        DOCS.write_text(rendered, encoding="utf-8")
        print(f"wrote {DOCS}")
        return 0
    if argv:
        print("usage: python -m lifecycle.settings [--bool NAME | --docs [--check]]", file=sys.stderr)
        return BAD_SETTINGS_EXIT
    settings = load_settings()
    if settings is None:
        return BAD_SETTINGS_EXIT
    for key, value in settings.describe().items():
        print(f"  {key}={value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
