"""Several models at once: llama-server's router mode (MODELS, MODELS_MAX, MODEL_IDLE_TIMEOUT, MODELS_PRESET).

1. `plan(settings, resolve)` turns MODELS into a ModelSet: every model's id (its file name without `.gguf`, and
   without the `-00001-of-0000N` of a multi-shard model), its path, its names (id, file name, aliases) and the
   user's per-model preset options. Done once at start (in the provisioning thread) and again on an admin refresh.
2. `preset_text(models, defaults)` is the INI file the router reads (`--models-preset`): one section per model with
   its absolute path. It is ours, written under the cache, so the router lists exactly these models (its own cache
   scan is pointed at an empty folder, see `router_env`).
3. `ModelSet.choose(requested)` is the one rule for a request's `model`, in both HTTP lanes and in serverless mode
   (called by lifecycle.request_rules.admit_body): `any`, empty or missing means the default; an id, file name or
   alias picks that model; anything else is a 404 `model_not_found` listing the ids.
4. `Router` talks to the router's own routes (GET /models, POST /models/load and /models/unload) with the
   backend's key, keeps the models' statuses, and `wait_ready(id, deadline)` lets a request for a model that is
   not loaded wait for it (loading it when nobody has), bounded by the caller's deadline.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle.downloads import ProvisionError
from lifecycle.request_rules import RequestRejected
from lifecycle.settings import Settings, SettingsError, check_backend_flags
from lifecycle.upstream import Upstream, UpstreamError

log = logging.getLogger("lifecycle.router")

ANY = "any"
SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# Preset keys that only presets know (not llama-server flags), as the router reads them (server-models.cpp).
PRESET_ONLY = frozenset({"load-on-startup", "stop-timeout", "dedup-cache-models"})
# Keys the gateway sets for every model itself (the model file), refused in a section for a model it serves.
OWN_KEYS = frozenset({"model", "m", "hf-repo", "hf", "hfr", "model-url", "mu"})
# Seconds between looks at a loading model's status, while a request waits for it: a GET /models on loopback costs
# the router well under a millisecond, and each look may be the one that sees the load finish (bench/models.py).
STATUS_POLL = 0.025
STATUS_TTL = 1.0  # a status older than this is fetched again before it is trusted
ROUTER_TIMEOUT = 10.0  # the router's own routes answer at once; a load is waited for by polling


class UnknownModel(RequestRejected):
    """A request's `model` that names none of the served models: a 404 `model_not_found`."""

    def __init__(self, requested: str, ids: tuple[str, ...]) -> None:
        super().__init__(f"model {requested!r} does not exist; available models: {', '.join(ids)}", "model",
                         "model_not_found", status=404)


def model_id(path: Path) -> str:
    """A model's id: its file name without `.gguf` (and without the shard suffix of a multi-shard model)."""
    name = path.name
    match = SHARD.search(name)
    if match:
        return name[: match.start()]
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


@dataclass(frozen=True)
class ServedModel:
    id: str
    path: Path
    aliases: tuple[str, ...] = ()  # other names a request may use: the file name, the preset's `alias`
    options: tuple[tuple[str, str], ...] = ()  # the user's preset options for it (MODELS_PRESET)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, self.path.name, *self.aliases)


@dataclass(frozen=True)
class ModelSet:
    models: tuple[ServedModel, ...]
    default: str
    global_options: tuple[tuple[str, str], ...] = ()  # the preset's [*] section
    _by_name: dict[str, ServedModel] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, ServedModel] = {}
        for model in self.models:
            for name in model.names:
                other = by_name.setdefault(name, model)
                if other is not model:
                    raise SettingsError(f"MODELS: the name {name!r} means both {other.path} and {model.path}")
        object.__setattr__(self, "_by_name", by_name)
        if self.default not in by_name:
            raise SettingsError(f"DEFAULT_MODEL={self.default!r} is none of the served models: {', '.join(self.ids)}")

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(model.id for model in self.models)

    def get(self, name: str) -> ServedModel | None:
        return self._by_name.get(name)

    def choose(self, requested: object) -> ServedModel:
        """The model a request's `model` field means (see the module's docs); UnknownModel (404) otherwise."""
        if requested is None or requested == "" or requested == ANY:
            return self._by_name[self.default]
        if not isinstance(requested, str):
            raise RequestRejected("model must be a string", "model")
        model = self._by_name.get(requested)
        if model is None:
            raise UnknownModel(requested, self.ids)
        return model


# --- planning -------------------------------------------------------------------------------------------------------


def is_model_file(path: Path) -> bool:
    """A GGUF a router may serve from MODELS_DIR: not a projector (mmproj*), not a later shard."""
    name = path.name
    if not name.lower().endswith(".gguf") or name.lower().startswith("mmproj") or not path.is_file():
        return False
    match = SHARD.search(name)
    return match is None or int(match.group(1)) == 1


def all_in(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if is_model_file(p))
    except OSError as exc:
        raise ProvisionError(f"MODELS=all: cannot list MODELS_DIR {folder}: {exc.strerror or exc}") from None


def read_preset(path: Path | None) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """MODELS_PRESET as ([*] options, {section: options}); every key checked like EXTRA_ARGS."""
    if path is None:
        return {}, {}
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",), comment_prefixes=(";", "#"),
                                       inline_comment_prefixes=None, default_section="\0none", strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        text = path.read_text(encoding="utf-8")
        # llama-server's format allows keys before the first section (version = 1)
        parser.read_string("[\0top]\n" + text, source=str(path))
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise SettingsError(f"MODELS_PRESET={path}: cannot be read: {exc}") from None
    sections: dict[str, dict[str, str]] = {}
    glob: dict[str, str] = {}
    for name in parser.sections():
        options = {key.strip(): value.strip() for key, value in parser.items(name)}
        if name == "\0top":
            continue  # version = 1 and the like
        for key in options:
            check_preset_key(key, path, name)
        if name == "*":
            glob = options
        else:
            sections[name] = options
    return glob, sections


def check_preset_key(key: str, path: Path, section: str) -> None:
    where = f"MODELS_PRESET={path} [{section}]"
    if key.startswith("LLAMA_ARG_") or (key.upper() == key and "_" in key):
        raise SettingsError(f"{where}: {key}: write the llama-server flag name (e.g. n-gpu-layers), not its "
                            "environment variable")
    if key in PRESET_ONLY:
        return
    dashes = "-" if len(key) <= 3 else "--"
    check_backend_flags([dashes + key, "--" + key], where)


def _pairs(options: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(options.items())


def plan(settings: Settings, resolve: Callable[[str], Path]) -> ModelSet:
    """MODELS as a ModelSet (blocking: `resolve` may download). SettingsError or ProvisionError say what is wrong."""
    refs = settings.models
    if refs == ("all",):
        paths = all_in(settings.models_dir)
        if not paths:
            raise ProvisionError(f"MODELS=all: no .gguf files in MODELS_DIR {settings.models_dir}")
    else:  # `all` stands alone (lifecycle.settings.check_models)
        paths = [resolve(ref) for ref in refs]
    glob, sections = read_preset(settings.models_preset)
    models: list[ServedModel] = []
    seen: set[str] = set()
    for path in paths:
        mid = model_id(path)
        if mid in seen:
            raise SettingsError(f"MODELS: two models would both be called {mid!r} ({path})")
        seen.add(mid)
        models.append(ServedModel(mid, path.resolve()))
    # Each preset section applies to the model it names (id, file name or alias); one that names none adds a model
    # when it gives its own `model` path.
    by_name = {name: index for index, model in enumerate(models) for name in model.names}
    for section, options in sections.items():
        index = by_name.get(section)
        aliases = tuple(a.strip() for a in options.pop("alias", "").split(",") if a.strip())
        if index is None:
            given = options.pop("model", None) or options.pop("m", None)
            if given is None:
                raise SettingsError(f"MODELS_PRESET [{section}] names none of the served models "
                                    f"({', '.join(m.id for m in models)}) and gives no `model` path")
            path = Path(given).expanduser()
            if not path.is_file():
                raise ProvisionError(f"MODELS_PRESET [{section}]: model = {path}: no such file")
            models.append(ServedModel(section, path.resolve(), aliases, _pairs(options)))
            continue
        own = OWN_KEYS.intersection(options)
        if own:
            raise SettingsError(f"MODELS_PRESET [{section}]: {', '.join(sorted(own))} is set by MODELS for a served "
                                "model; remove it")
        model = models[index]
        models[index] = ServedModel(model.id, model.path, model.aliases + aliases, _pairs(options))
    if not models:
        raise SettingsError("MODELS lists no model")
    default = settings.default_model or models[0].id
    modelset = ModelSet(tuple(models), default, _pairs(glob))
    chosen = modelset.get(default)
    assert chosen is not None  # ModelSet checked it
    if chosen.id != default:
        modelset = ModelSet(modelset.models, chosen.id, modelset.global_options)
    return modelset


def preset_text(models: ModelSet, defaults: Mapping[str, str]) -> str:
    """The router's preset INI: our defaults under the user's [*], then a section per model with its path.

    The router gives command-line arguments precedence over a model's section, and a model's section over [*]: the
    gateway's defaults go in [*] so that MODELS_PRESET can change them per model."""
    lines = ["version = 1", "", "[*]"]
    for key, value in {**defaults, **dict(models.global_options)}.items():
        lines.append(f"{key} = {value}")
    for model in models.models:
        lines += ["", f"[{model.id}]", f"model = {model.path}"]
        lines += [f"{key} = {value}" for key, value in model.options]
    return "\n".join(lines) + "\n"


# --- the running router ---------------------------------------------------------------------------------------------


class ModelLoadFailed(Exception):
    """The router tried to load the model and its instance exited."""


@dataclass
class Status:
    value: str = "unloaded"  # unloaded, loading, loaded, sleeping (and the router's downloading)
    failed: bool = False
    exit_code: int | None = None


class Router:
    """The router's model statuses and its load/unload routes. One per Backend; safe on one event loop."""

    def __init__(self, client: Callable[[], Upstream], clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self.clock = clock
        self.statuses: dict[str, Status] = {}
        self.fetched_at = float("-inf")
        self.info: dict[str, dict[str, object]] = {}  # the router's own entry per id (GET /models)
        self._upstream: Upstream | None = None
        self._refreshing: asyncio.Task[None] | None = None

    def _up(self) -> Upstream:
        if self._upstream is None:
            self._upstream = self._client()
        return self._upstream

    async def close(self) -> None:
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None

    async def refresh(self, *, reload: bool = False) -> None:
        """Read every model's status from GET /models (one look shared by concurrent callers)."""
        if reload:
            await self._fetch(True)
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._fetch(False))
        await asyncio.shield(self._refreshing)

    async def _fetch(self, reload: bool) -> None:
        reply = await self._up().request("GET", "/models?reload=1" if reload else "/models", timeout=ROUTER_TIMEOUT)
        if reply.status != 200:
            raise UpstreamError(f"GET /models answered {reply.status}")
        data = json.loads(reply.body).get("data") or []
        statuses: dict[str, Status] = {}
        info: dict[str, dict[str, object]] = {}
        for entry in data:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            raw = entry.get("status") or {}
            statuses[entry["id"]] = Status(str(raw.get("value", "unloaded")), bool(raw.get("failed", False)),
                                           raw.get("exit_code"))
            info[entry["id"]] = entry
        self.statuses, self.info, self.fetched_at = statuses, info, self.clock()

    async def status(self, mid: str, *, fresh: bool = False) -> Status:
        if fresh or self.clock() - self.fetched_at > STATUS_TTL:
            await self.refresh()
        return self.statuses.get(mid, Status())

    async def load(self, mid: str) -> tuple[int, bytes]:
        return await self._act("/models/load", mid)

    async def unload(self, mid: str) -> tuple[int, bytes]:
        return await self._act("/models/unload", mid)

    async def _act(self, path: str, mid: str) -> tuple[int, bytes]:
        """POST a load or unload; the statuses are looked at again before they are next trusted."""
        body = json.dumps({"model": mid}).encode()
        reply = await self._up().request("POST", path, body=body, headers={"Content-Type": "application/json"},
                                         timeout=ROUTER_TIMEOUT)
        self.fetched_at = float("-inf")
        return reply.status, reply.body

    async def wait_ready(self, mid: str, deadline: float) -> bool:
        """Wait until `mid` is loaded (or sleeping: the next request wakes it), loading it if it is unloaded.
        True once it is; False at `deadline` (monotonic, on `clock`). ModelLoadFailed when its load failed."""
        status = await self.status(mid)
        if status.value in ("loaded", "sleeping"):
            return True
        asked = told = False
        saw_loading = False
        while True:
            if status.value in ("loaded", "sleeping"):
                return True
            if status.value == "loading":
                saw_loading = True
            elif status.value == "unloaded":
                if status.failed and (asked or saw_loading):
                    raise ModelLoadFailed(f"the model {mid} failed to load (exit code {status.exit_code}); "
                                          "see the llama-server log")
                if not asked:
                    asked = True
                    code, body = await self.load(mid)
                    if code != 200 and b"already running" not in body:
                        # "model limit reached": every loaded model is busy; asked again until one is idle and the
                        # router unloads the least recently used one
                        if not told:
                            told = True
                            log.info("router: %s waits for a loaded model to go idle (loading it answered %d: %s)",
                                     mid, code, body[:200].decode("utf-8", "replace"))
                        asked = False
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(STATUS_POLL)
            status = await self.status(mid, fresh=True)
