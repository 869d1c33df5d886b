"""The one settings object, built once from the environment and passed explicitly.

The variable names and defaults of the project we replace are the public contract (see
docs/CONFIGURATION.md). Every bad value raises SettingsError naming the variable, the value and
what is allowed; the entry points turn it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lifecycle.platform import detect_data_dir

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
MODES = ("gateway", "handler")


class SettingsError(ValueError):
    """A bad environment value; str() is the one line shown to the user."""


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def str(self, name: str, default: str = "") -> str:
        value = self.raw(name)
        return default if value is None else value

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise SettingsError(f"{name}={value!r} is not a boolean: use true/false, 1/0, yes/no or on/off")

    def int(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum or (maximum is not None and number > maximum):
            allowed = f"an integer >= {minimum}" if maximum is None else f"an integer {minimum}-{maximum}"
            raise SettingsError(f"{name}={value!r} is not allowed: use {allowed}")
        return number

    def auto_int(self, name: str, minimum: int = 0) -> int | None:
        """An integer, or None when unset or `auto` (llama-server then chooses)."""
        value = self.raw(name)
        if value is None or value.lower() == "auto":
            return None
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise SettingsError(f"{name}={value!r} is not allowed: use auto (or leave it unset), or an integer "
                                f">= {minimum}")
        return number

    def float(self, name: str, default: float, minimum: float = 0.0) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is None or number != number or number < minimum:
            raise SettingsError(f"{name}={value!r} is not allowed: use a number >= {minimum:g}")
        return number

    def port(self, name: str, default: int) -> int:
        return self.int(name, default, minimum=1, maximum=65535)

    def path(self, name: str) -> Path | None:
        value = self.raw(name)
        return None if value is None else Path(value).expanduser()


def default_cache_dir(env: Mapping[str, str], data_dir: Path | None = None) -> Path:
    """LLAMA_GGUF_CACHE_DIR; in our images (LLAMA_GGUF_IMAGE set) $DATA_DIR/.cache/llama-gguf-inference, so the
    default model is fetched once into the data volume; else the user's cache folder."""
    if env.get("LLAMA_GGUF_CACHE_DIR"):
        return Path(env["LLAMA_GGUF_CACHE_DIR"]).expanduser()
    if env.get("LLAMA_GGUF_IMAGE") and data_dir is not None:
        return data_dir / ".cache" / "llama-gguf-inference"
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "llama-gguf-inference"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    models_dir: Path
    model_name: str | None = None
    model_path: Path | None = None
    cache_dir: Path = field(default_factory=lambda: default_cache_dir(os.environ))
    llama_server_bin: Path | None = None

    auth_enabled: bool = True
    auth_keys_file: Path | None = None
    max_requests_per_minute: int = 100
    cors_origins: tuple[str, ...] = ()
    metrics_auth_enabled: bool = False
    auth_failure_limit: int = 10
    auth_failure_window: float = 60.0
    passthrough_routes: tuple[str, ...] = ()
    client_timeout: float = 30.0
    fast_lane: bool = True

    parallel: int = 8
    max_concurrent_requests: int = 8
    max_queue_size: int = 0
    max_request_body_size: int = 10 * 1024 * 1024
    max_headers: int = 64
    max_header_line_size: int = 8192
    max_connections: int = 1024
    max_tokens: int = 4096
    max_response_size: int = 64 * 1024 * 1024
    shared_prompt_cache: bool = True

    ngl: int | None = None  # None: unset, llama-server fits the layers to free device memory (-ngl auto, --fit on)
    ctx: int | None = None  # None: unset, no -c (the model's own context, shrunk by --fit to fit); 0: the model's own
    threads: int = 0
    extra_args: tuple[str, ...] = ()

    host: str = "0.0.0.0"
    port: int = 8000
    port_health: int = 8001
    port_backend: int = 8080

    log_name: str = "llama"
    worker_type: str = ""
    debug_shell: bool = False
    mode: str | None = None

    stop_timeout: float = 10.0
    backend_wait: float = 120.0
    restart_limit: int = 5
    restart_window: float = 300.0
    restart_base_delay: float = 1.0
    restart_max_delay: float = 60.0
    crash_loop: str = "exit"
    queue_timeout: float = 60.0
    request_timeout: float = 600.0
    stream_idle_timeout: float = 120.0
    connect_timeout: float = 5.0
    drain_timeout: float = 30.0
    access_log: bool = True
    log_format: str = "text"
    access_log_max_bytes: int = 10_000_000
    access_log_backups: int = 5
    deprecations: tuple[str, ...] = ()

    @property
    def keys_file(self) -> Path:
        return self.auth_keys_file or self.data_dir / "api_keys.txt"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs" / self.log_name

    @property
    def boot_log_dir(self) -> Path:
        return self.data_dir / "logs" / "_boot"

    def describe(self) -> dict[str, str]:
        """The resolved settings as strings, safe to print (no secrets live in Settings)."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, tuple):
                value = " ".join(value)
            out[key] = ("auto" if key in ("ngl", "ctx") else "") if value is None else str(value)
        out["keys_file"] = str(self.keys_file)
        out["log_dir"] = str(self.log_dir)
        return out

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, probe_roots: Iterable[Path] | None = None
    ) -> Settings:
        env = os.environ if env is None else env
        r = _Reader(env)
        deprecations: list[str] = []

        data_dir = detect_data_dir(r.path("DATA_DIR"), probe_roots)
        models_dir = r.path("MODELS_DIR") or data_dir / "models"

        worker_type = r.str("WORKER_TYPE")
        log_name = f"llama-{worker_type}" if worker_type else r.str("LOG_NAME", "llama")
        if "/" in log_name or log_name in (".", ".."):
            raise SettingsError(f"LOG_NAME={log_name!r} is not allowed: use a plain folder name")

        if r.raw("PORT_BACKEND") is not None:
            port_backend = r.port("PORT_BACKEND", 8080)
        else:
            port_backend = r.port("BACKEND_PORT", 8080)
            if r.raw("BACKEND_PORT") is not None:
                deprecations.append("BACKEND_PORT is deprecated: use PORT_BACKEND")

        extra = r.str("EXTRA_ARGS")
        try:
            extra_args = tuple(shlex.split(extra))
        except ValueError as exc:
            raise SettingsError(f"EXTRA_ARGS={extra!r} cannot be split like a shell line: {exc}") from None

        cors = tuple(o.strip().rstrip("/") for o in r.str("CORS_ORIGINS").split(",") if o.strip())
        routes = tuple(p.strip() for p in r.str("PASSTHROUGH_ROUTES").split(",") if p.strip())
        for route in routes:
            if not route.startswith("/") or route.startswith("/v1/") or "{" in route:
                raise SettingsError(
                    f"PASSTHROUGH_ROUTES={r.str('PASSTHROUGH_ROUTES')!r} is not allowed: use llama-server paths "
                    "such as /props,/slots,/tokenize"
                )

        mode = r.raw("MODE")
        if mode is not None and mode.lower() not in MODES:
            raise SettingsError(f"MODE={mode!r} is not allowed: use {' or '.join(MODES)}")

        crash_loop = r.str("BACKEND_CRASH_LOOP", "exit").lower()
        if crash_loop not in ("exit", "retry"):
            raise SettingsError(f"BACKEND_CRASH_LOOP={crash_loop!r} is not allowed: use exit or retry")
        log_format = (r.raw("LOG_FORMAT") or r.str("ACCESS_LOG_FORMAT", "text")).lower()
        if log_format not in ("text", "json"):
            raise SettingsError(f"LOG_FORMAT={log_format!r} is not allowed: use text or json")
        parallel = r.int("PARALLEL", 8, minimum=1)
        model_name = r.raw("MODEL_NAME")
        if model_name is not None and ("/" in model_name or model_name in (".", "..")):
            raise SettingsError(f"MODEL_NAME={model_name!r} is not allowed: use a file name; use MODEL_PATH for paths")

        check_extra_args(extra_args)
        check_passthrough_routes(routes)

        settings = cls(
            data_dir=data_dir,
            models_dir=models_dir,
            model_name=model_name,
            model_path=r.path("MODEL_PATH"),
            cache_dir=default_cache_dir(env, data_dir),
            llama_server_bin=r.path("LLAMA_SERVER_BIN"),
            auth_enabled=r.bool("AUTH_ENABLED", True),
            auth_keys_file=r.path("AUTH_KEYS_FILE"),
            max_requests_per_minute=r.int("MAX_REQUESTS_PER_MINUTE", 100, minimum=1),
            cors_origins=cors,
            metrics_auth_enabled=r.bool("METRICS_AUTH_ENABLED", False),
            auth_failure_limit=r.int("AUTH_FAILURE_LIMIT", 10, minimum=1),
            auth_failure_window=r.float("AUTH_FAILURE_WINDOW", 60.0, minimum=1.0),
            passthrough_routes=routes,
            client_timeout=r.float("CLIENT_TIMEOUT", 30.0, minimum=0.1),
            fast_lane=r.bool("FAST_LANE", True),
            parallel=parallel,
            max_concurrent_requests=r.int("MAX_CONCURRENT_REQUESTS", parallel, minimum=1),
            max_queue_size=r.int("MAX_QUEUE_SIZE", 0),
            max_request_body_size=r.int("MAX_REQUEST_BODY_SIZE", 10 * 1024 * 1024, minimum=1),
            max_headers=r.int("MAX_HEADERS", 64, minimum=1),
            max_header_line_size=r.int("MAX_HEADER_LINE_SIZE", 8192, minimum=256),
            max_connections=r.int("MAX_CONNECTIONS", 1024, minimum=1),
            max_tokens=r.int("MAX_TOKENS", 4096, minimum=1),
            max_response_size=r.int("MAX_RESPONSE_SIZE", 64 * 1024 * 1024, minimum=1024),
            shared_prompt_cache=r.bool("SHARED_PROMPT_CACHE", True),
            ngl=r.auto_int("NGL"),
            ctx=r.auto_int("CTX"),
            threads=r.int("THREADS", 0),
            extra_args=extra_args,
            host=r.str("HOST", "0.0.0.0"),
            port=r.port("PORT", 8000),
            port_health=r.port("PORT_HEALTH", 8001),
            port_backend=port_backend,
            log_name=log_name,
            worker_type=worker_type,
            debug_shell=r.bool("DEBUG_SHELL", False),
            mode=mode.lower() if mode else None,
            stop_timeout=r.float("BACKEND_STOP_TIMEOUT", 10.0),
            backend_wait=r.float("BACKEND_WAIT_TIMEOUT", 120.0),
            restart_limit=r.int("BACKEND_RESTART_LIMIT", 5, minimum=1),
            restart_window=r.float("BACKEND_RESTART_WINDOW", 300.0, minimum=1.0),
            restart_base_delay=r.float("BACKEND_RESTART_DELAY", 1.0),
            restart_max_delay=r.float("BACKEND_RESTART_MAX_DELAY", 60.0),
            crash_loop=crash_loop,
            queue_timeout=r.float("QUEUE_TIMEOUT", 60.0, minimum=0.001),
            request_timeout=r.float("REQUEST_TIMEOUT", 600.0, minimum=0.001),
            stream_idle_timeout=r.float("STREAM_IDLE_TIMEOUT", 120.0, minimum=0.001),
            connect_timeout=r.float("UPSTREAM_CONNECT_TIMEOUT", 5.0, minimum=0.001),
            drain_timeout=r.float("DRAIN_TIMEOUT", 30.0),
            access_log=r.bool("ACCESS_LOG", True),
            log_format=log_format,
            access_log_max_bytes=r.int("ACCESS_LOG_MAX_BYTES", 10_000_000, minimum=1024),
            access_log_backups=r.int("ACCESS_LOG_BACKUPS", 5),
            deprecations=tuple(deprecations),
        )
        ports = {"PORT": settings.port, "PORT_HEALTH": settings.port_health, "PORT_BACKEND": settings.port_backend}
        if len(set(ports.values())) != len(ports):
            shown = ", ".join(f"{k}={v}" for k, v in ports.items())
            raise SettingsError(f"ports must differ: {shown}")
        return settings


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
    "--models-dir": _ROUTER,
    "--models-preset": _ROUTER,
    "--models-max": _ROUTER,
    "--models-autoload": _ROUTER,
    "--no-models-autoload": _ROUTER,
    "-n": "use MAX_TOKENS",
    "--predict": "use MAX_TOKENS",
    "--n-predict": "use MAX_TOKENS",
}


def backend_flag_name(arg: str) -> str | None:
    """The flag an EXTRA_ARGS word names as llama-server reads it (`--api_key=x` -> `--api-key`), or None for a
    value. llama-server treats `_` as `-` in long flags; `--flag=value` is not its syntax, but is checked too."""
    if not arg.startswith("-") or arg == "-" or re.fullmatch(r"-[0-9.]+", arg):
        return None  # a value: "-", or a negative number
    name = arg.split("=", 1)[0]
    return name.replace("_", "-") if name.startswith("--") else name


def check_extra_args(extra_args: Iterable[str]) -> None:
    """Refuse the EXTRA_ARGS flags that rebind, unlock or arm the backend (REFUSED_BACKEND_FLAGS)."""
    for arg in extra_args:
        name = backend_flag_name(arg)
        if name is not None and name in REFUSED_BACKEND_FLAGS:
            raise SettingsError(f"EXTRA_ARGS may not contain {name}: {REFUSED_BACKEND_FLAGS[name]}")


# llama-server routes that act on the host or change its state (tools, the CORS proxy, saving or erasing slots,
# loading router models): never opened, nor anything under them.
_CLOSED_ROUTES = ("/tools", "/cors-proxy")
_CLOSED_PREFIXES = ("/tools/", "/cors-proxy/", "/slots/", "/models/")
# Routes whose POST changes state (settings, LoRA adapters, router models): opened for GET only.
_GET_ONLY_ROUTES = frozenset({"/props", "/slots", "/lora-adapters", "/models"})
# Routes the gateway answers itself (gateway.health, gateway.app), and the OpenAI routes under /v1/.
_GATEWAY_ROUTES = frozenset({"/ping", "/health", "/metrics", "/reload"})
_ROUTE = re.compile(r"(/[A-Za-z0-9_-][A-Za-z0-9._-]*)+")


def passthrough_methods(route: str) -> tuple[str, ...]:
    """The methods PASSTHROUGH_ROUTES opens on `route`: ("GET",) or ("GET", "POST"). Raises ValueError (saying why)
    for a route that may never be opened: not a plain path, one the gateway answers itself (/health, /v1/...), or
    one that acts on the host or on llama-server's state (/tools, /cors-proxy, /slots/<id>, /models/load, ...)."""
    if not _ROUTE.fullmatch(route) or any(part in (".", "..") for part in route.split("/")):
        raise ValueError(f"{route} is not a plain path such as /props or /tokenize")
    if route in _GATEWAY_ROUTES or route.startswith("/v1/"):
        raise ValueError(f"{route} may not be opened: the gateway answers it itself")
    if route in _CLOSED_ROUTES or route.startswith(_CLOSED_PREFIXES):
        raise ValueError(f"{route} may not be opened: it acts on the host or changes llama-server's state")
    return ("GET",) if route in _GET_ONLY_ROUTES else ("GET", "POST")


def check_passthrough_routes(routes: Iterable[str]) -> None:
    for route in routes:
        try:
            passthrough_methods(route)
        except ValueError as exc:
            raise SettingsError(f"PASSTHROUGH_ROUTES: {exc}") from None


def read_bool(name: str, env: Mapping[str, str] | None = None, default: bool = False) -> bool:
    """One boolean setting, as every setting reads it (`python -m lifecycle.settings --bool NAME`)."""
    return _Reader(os.environ if env is None else env).bool(name, default)


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

    `python -m lifecycle.settings --bool NAME`: print `true` or `false` for one boolean setting (unset: false), or
    the one-line error and exit 2; entrypoint.sh reads DEBUG_SHELL so, with the same rule as Python."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bool"] and len(argv) == 2:
        try:
            print("true" if read_bool(argv[1]) else "false")
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return BAD_SETTINGS_EXIT
        return 0
    settings = load_settings()
    if settings is None:
        return BAD_SETTINGS_EXIT
    for key, value in settings.describe().items():
        print(f"  {key}={value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
