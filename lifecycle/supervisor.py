"""The llama-server child process as one unit: start, wait until ready, watch, stop.

Invariants:
1. The supervisor is the only owner of the child and of `state`; everything else reads them. The state changes only
   along TRANSITIONS (one `_enter`, which refuses anything else), and every time it reads comes from its `clock`.
2. The backend only answers requests that carry the per-boot key. The key reaches llama-server only in its
   environment (LLAMA_API_KEY, which llama-server reads like --api-key), never on disk or on its command line:
   /proc/<pid>/environ is readable by our own user alone, and nothing is left behind, even after SIGKILL of us.
   In this process it is private to the supervisor: `client()` hands out upstream clients that carry it.
3. The child's environment holds no inherited llama-server setting: every LLAMA_ARG_* (and the few other names
   llama-server reads that rebind or re-key it) is dropped, so only our command line configures it.
4. The child can never outlive us: it gets PR_SET_PDEATHSIG=SIGKILL (so even SIGKILL of our process takes it
   down) and stop() sends SIGTERM to its process group, waits, then SIGKILLs and reaps it.
5. Readiness is polled with no attempt cap while the child lives (big models load for minutes). Ready means: our
   child is still running, /health answers 200, and a protected route answers 200 to our key and 401 to an empty
   and a wrong one; anything else on PORT_BACKEND (a foreign server) is never taken for it. If the child exits
   while loading, start() raises with its last log lines.
6. GPU offload and context are llama-server's to fit unless NGL / CTX are set (-ngl auto, --fit on, no -c); what it
   chose is read once it is ready, after every start and restart, from GET /props and its start-up log, into
   `offload` (logged as one "offload: ..." line, shown in /health). It never fails a start: what cannot be read
   (a /props that does not answer within PROBE_TIMEOUT, a log without those lines) is left null.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import logging
import os
import secrets
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

from lifecycle import offload
from lifecycle.crashloop import CrashLoop
from lifecycle.router import ModelSet, Router, preset_text
from lifecycle.settings import Settings
from lifecycle.upstream import Upstream, UpstreamError

log = logging.getLogger("lifecycle.supervisor")

PR_SET_PDEATHSIG = 1
LOG_TAIL_LINES = 30
PROBE_TIMEOUT = 5.0
PROBE_ROUTE = "/v1/models"  # needs the key, cheap, answered once the model is loaded
PROPS_MAX_SIZE = 4 << 20  # GET /props carries the chat template
# At -lv 4 llama-server logs the last four characters of its API key ("api_keys: ****abcd"): the per-boot key ends
# in these four public ones, so nothing of its random part reaches the log.
KEY_TAIL = "-gw0"

# What llama-server reads from its environment (common/arg.cpp `set_env`, tools/server): every LLAMA_ARG_* setting,
# the API key, the router's child-mode variables, Vertex AI's AIP_* (AIP_MODE=PREDICTION plus AIP_HTTP_PORT
# moves it to another port), and its debugging switches (tools/server, src): LLAMA_SERVER_SLOTS_DEBUG (GET /slots
# then shows every slot's prompt and generated text, other users' included, and the log prints prompt tokens),
# LLAMA_SERVER_SLOTS_N_DIFF (how many of those tokens), LLAMA_TRACE (more tracing in the log) and LLAMA_MEDIA_MARKER
# (pins the media placeholder, random per start otherwise, so a prompt could forge it). HF_TOKEN and
# MTMD_BACKEND_DEVICE are kept: they open nothing.
SCRUBBED_ENV_PREFIXES = ("LLAMA_ARG_", "AIP_")
SCRUBBED_ENV_NAMES = frozenset({"LLAMA_API_KEY", "LLAMA_SERVER_ROUTER_PORT", "LLAMA_SERVER_CHILD_MODE",
                                "LLAMA_APP_CMD", "LLAMA_SERVER_SLOTS_DEBUG", "LLAMA_SERVER_SLOTS_N_DIFF",
                                "LLAMA_TRACE", "LLAMA_MEDIA_MARKER"})
# llama-server also reads these config files before its environment and command line (common/arg.cpp).
CONFIG_FILES = (Path("/etc/llama.cpp/config.ini"),)


class BackendState(enum.StrEnum):
    """What the supervisor is doing with llama-server; /health shows the value."""

    STOPPED = "stopped"  # nothing runs: before start(), and after stop()
    LOADING = "loading"  # the first start: spawned, waiting until it is ready
    READY = "ready"  # up and answering our key: the only state requests are sent in
    RESTARTING = "restarting"  # it died on its own: waiting out the backoff, or loading again
    DOWN = "down"  # a crash loop: given up (BACKEND_CRASH_LOOP=exit), or retrying slowly (retry)
    STOPPING = "stopping"  # stop(): SIGTERM, then SIGKILL, then reaped


S = BackendState
# Every state change the supervisor may make; Supervisor._enter refuses any other (StateError).
TRANSITIONS: dict[BackendState, frozenset[BackendState]] = {
    S.STOPPED: frozenset({S.LOADING}),  # start(), once per Supervisor
    S.LOADING: frozenset({S.READY, S.STOPPING}),  # ready; exited while loading (start() raises), or stop()
    S.READY: frozenset({S.RESTARTING, S.DOWN, S.STOPPING}),  # it died; it died and that made a crash loop; stop()
    # restarted; the new one died too (another crash, not yet a loop); that made a loop; stop()
    S.RESTARTING: frozenset({S.READY, S.RESTARTING, S.DOWN, S.STOPPING}),
    # (retry) a later try succeeded; it died again within the window; the window moved on; stop()
    S.DOWN: frozenset({S.READY, S.DOWN, S.RESTARTING, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),  # the child is reaped
}
del S


class StateError(RuntimeError):
    """A state change TRANSITIONS does not allow: a bug in the supervisor, never something llama-server did."""


class BackendStartError(RuntimeError):
    """llama-server could not be started (DATA_DIR not writable), or exited before it became ready; str() says
    which, with its last log lines."""


def instance_id() -> str:
    return os.environ.get("RUNPOD_POD_ID") or socket.gethostname() or "local"


def server_log_path(log_dir: Path, now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(now))
    return log_dir / f"{stamp}_server_{instance_id()}.log"


def tail_lines(path: Path, count: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return list(deque(lines, maxlen=count))


def unwritable(data_dir: Path, path: Path, exc: OSError) -> str:
    return f"DATA_DIR {data_dir} is not writable: cannot write {path} ({exc.strerror or exc.__class__.__name__})"


def ensure_writable_dir(folder: Path, data_dir: Path) -> None:
    """Create `folder` (under DATA_DIR) and check a file can be written there; BackendStartError naming DATA_DIR
    otherwise. Blocking: call it off the event loop."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise BackendStartError(unwritable(data_dir, Path(exc.filename) if exc.filename else folder, exc)) from None


def _child_setup() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGKILL the child when we die; resolved before fork."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: stop() still covers every orderly exit
    parent = os.getpid()

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # we died between fork and prctl
            os._exit(1)

    return setup


def backend_env(environ: Mapping[str, str], api_key: str) -> tuple[dict[str, str], list[str]]:
    """The child's environment: ours without anything llama-server would read as a setting, plus the per-boot key
    as LLAMA_API_KEY; and the names that were dropped (to log; never their values)."""
    dropped = sorted(name for name in environ
                     if name.startswith(SCRUBBED_ENV_PREFIXES) or name in SCRUBBED_ENV_NAMES)
    env = {name: value for name, value in environ.items() if name not in dropped}
    env["LLAMA_API_KEY"] = api_key
    return env, [name for name in dropped if name != "LLAMA_API_KEY"]


def config_files(environ: Mapping[str, str]) -> list[Path]:
    """llama.cpp config files that exist: llama-server applies them under its command line."""
    home = Path(environ.get("HOME") or Path.home())
    base = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else home / ".config"
    found = []
    for path in (*CONFIG_FILES, base / "llama.cpp" / "config.ini"):
        try:
            if path.is_file():
                found.append(path)
        except OSError:  # a folder we may not look into: neither may llama-server, running as us
            pass
    return found


def backend_key() -> str:
    """The per-boot key: 32 random bytes, then KEY_TAIL."""
    return secrets.token_urlsafe(32) + KEY_TAIL


def backend_command(settings: Settings, binary: Path, model: Path) -> list[str]:
    """llama-server's command line; its key comes in the environment (backend_env).

    NGL unset: `-ngl auto`; CTX unset: no `-c` (llama-server's 0, the model's trained context); with `--fit on`
    llama-server fits whatever of the two is unset to free device memory (common/fit.cpp) instead of failing on a
    model larger than the GPU. A set NGL or CTX is passed exactly (CTX=0: the model's own, which --fit keeps)."""
    extra = settings.extra_args
    cmd = [
        str(binary),
        "--host", "127.0.0.1",
        "--port", str(settings.port_backend),
        "-m", str(model),
        "-ngl", "auto" if settings.ngl is None else str(settings.ngl),
    ]
    if settings.ctx is not None:
        cmd += ["-c", str(settings.ctx)]
    if not offload.has_flag(extra, offload.FIT_FLAGS):
        cmd += ["--fit", "on"]
    if not offload.has_flag(extra, offload.VERBOSITY_FLAGS):
        # the offload, buffer and --fit lines the supervisor reads (offload.py) are printed at "trace" only
        cmd += ["-lv", offload.OFFLOAD_LOG_VERBOSITY]
    cmd += [
        "--parallel", str(settings.parallel),
        # MAX_TOKENS for requests that give no max_tokens (or -1); the gateway refuses any larger one
        "-n", str(settings.max_tokens),
    ]
    if settings.threads:
        cmd += ["-t", str(settings.threads)]
    if "--alias" not in settings.extra_args and "-a" not in settings.extra_args:
        cmd += ["--alias", model.name]
    if not offload.has_flag(extra, offload.KV_UNIFIED_FLAGS):
        # One KV buffer of CTX tokens shared by the slots, as llama-server does with its own automatic slot count:
        # any one request may use the whole context instead of CTX / PARALLEL.
        cmd.append("--kv-unified")
    if "--metrics" not in settings.extra_args:
        cmd.append("--metrics")  # re-exported on the gateway's /metrics
    if settings.embeddings:
        cmd.append("--embeddings")
    if settings.rerank:
        cmd.append("--rerank")
    return cmd + list(settings.extra_args)


def router_defaults(settings: Settings) -> dict[str, str]:
    """What backend_command gives one model, as preset options for every model of the router (its [*] section,
    which MODELS_PRESET may change per model)."""
    extra = settings.extra_args
    options = {"n-gpu-layers": "auto" if settings.ngl is None else str(settings.ngl)}
    if settings.ctx is not None:
        options["ctx-size"] = str(settings.ctx)
    if not offload.has_flag(extra, offload.FIT_FLAGS):
        options["fit"] = "on"
    options["parallel"] = str(settings.parallel)
    if settings.threads:
        options["threads"] = str(settings.threads)
    if not offload.has_flag(extra, offload.KV_UNIFIED_FLAGS):
        options["kv-unified"] = "true"
    if settings.embeddings:
        options["embeddings"] = "true"
    if settings.rerank:
        options["rerank"] = "true"
    return options


def router_command(settings: Settings, binary: Path, preset: Path) -> list[str]:
    """llama-server in router mode (MODELS): the models come from our preset file, each loaded in its own child on
    127.0.0.1 that inherits these arguments (which win over any preset's) and the per-boot key."""
    cmd = [
        str(binary),
        "--host", "127.0.0.1",
        "--port", str(settings.port_backend),
        "--models-preset", str(preset),
        "--models-max", str(settings.models_max),
        "-n", str(settings.max_tokens),
    ]
    if settings.model_idle_timeout >= 0:
        cmd += ["--sleep-idle-seconds", str(settings.model_idle_timeout)]
    if "--metrics" not in settings.extra_args:
        cmd.append("--metrics")
    return cmd + list(settings.extra_args)


def router_files(settings: Settings) -> tuple[Path, Path]:
    """Where the router's preset file goes, and the empty folder its own model-cache scan is pointed at."""
    folder = settings.cache_dir / "router" / str(settings.port_backend)
    return folder / "models.ini", folder / "empty-cache"


def write_preset(settings: Settings, models: ModelSet) -> Path:
    """Write the router's preset file (atomically: a reload never reads half of it); blocking."""
    preset, empty = router_files(settings)
    empty.mkdir(parents=True, exist_ok=True)
    partial = preset.with_suffix(".ini.partial")
    partial.write_text(preset_text(models, router_defaults(settings)), encoding="utf-8")
    partial.replace(preset)
    return preset


def _watch_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the llama-server watch failed; restarts stop", exc_info=task.exception())


class Supervisor:
    """Owns llama-server: start, readiness, restarts with backoff, crash-loop detection, stop.

    Its state moves only along TRANSITIONS, through `_enter`. Every duration it measures (start-up time, the
    crash-loop window, gone()'s wait) is read from `clock`, monotonic seconds that must advance; only the log file's
    name carries a wall-clock date. The per-boot key stays inside: `client()` is the one way to talk to the backend
    with it. Used through lifecycle.backend.Backend, which provisions what start() needs.
    """

    def __init__(
        self, settings: Settings, *, poll_interval: float = 0.25, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.binary: Path | None = None
        self.model: Path | None = None
        self.models: ModelSet | None = None  # several models: llama-server runs as a router (MODELS)
        self.router: Router | None = None
        self.poll_interval = poll_interval
        self.clock = clock
        self._state = BackendState.STOPPED
        self.ready = False  # whether the state is READY; set only by _enter()
        self._api_key = backend_key()
        self.base_url = f"http://127.0.0.1:{settings.port_backend}"
        self.log_path: Path | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.last_error: str | None = None
        self.last_log_lines: list[str] = []
        self.restarts = 0
        # What llama-server was asked and chose for GPU layers and context (offload.summary); /health shows it.
        self.offload: dict[str, object] | None = None
        self.crash_loop = CrashLoop(settings, clock)
        self.gave_up = asyncio.Event()  # set on a crash loop with BACKEND_CRASH_LOOP=exit
        self._proc: asyncio.subprocess.Process | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._teardown: asyncio.Task[None] | None = None

    # --- state -----------------------------------------------------------------------------------------------

    @property
    def state(self) -> BackendState:
        return self._state

    def _enter(self, new: BackendState) -> None:
        """The one place the state changes; StateError for a change TRANSITIONS does not allow."""
        old = self._state
        if new not in TRANSITIONS[old]:
            raise StateError(f"the backend cannot go from {old} to {new}")
        self._state = new
        self.ready = new is BackendState.READY  # read on every request: an attribute, kept here with the state
        if new is not old:
            log.debug("backend state %s -> %s", old, new)

    @property
    def up(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def model_id(self) -> str | None:
        if self.models is not None:
            return self.models.default
        return self.model.name if self.model else None

    async def gone(self, pid: int | None, within: float = 2.0) -> bool:
        """Whether the llama-server that had `pid` has exited, waiting up to `within` seconds for the supervisor
        to notice (it does when it reaps the child). Safe to await from any event loop: it only reads state."""
        deadline = self.clock() + within
        while pid is not None and self.pid == pid:
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def client(
        self, *, connect_timeout: float | None = None, stream_idle_timeout: float | None = None,
        max_response_size: int | None = None,
    ) -> Upstream:
        """A client to our llama-server that carries the per-boot key: the one place the key is handed to anything.
        connect_timeout defaults to UPSTREAM_CONNECT_TIMEOUT."""
        connect = self.settings.connect_timeout if connect_timeout is None else connect_timeout
        return Upstream(self.base_url, self._api_key, connect_timeout=connect,
                        stream_idle_timeout=stream_idle_timeout, max_response_size=max_response_size)

    # --- start ---------------------------------------------------------------------------------------------------

    async def start(self, binary: Path, model: Path | ModelSet) -> None:
        """Spawn llama-server and return once it is ready (invariant 5); then watch it. Once per Supervisor.
        `model` is the one GGUF to serve, or a ModelSet for router mode (MODELS).
        On failure (BackendStartError, or cancelled) the child is stopped and the state is STOPPED."""
        if self._proc is not None or self._teardown is not None:
            raise StateError("a Supervisor starts once")
        if isinstance(model, ModelSet):
            self.binary, self.models = binary, model
            self.model = model.get(model.default).path  # type: ignore[union-attr]
            self.router = Router(self.client)
        else:
            self.binary, self.model = binary, model
        self._enter(BackendState.LOADING)
        self.started_at = self.clock()
        try:
            await self._spawn_and_wait()
            if self._state is not BackendState.LOADING:
                raise BackendStartError("llama-server was stopped while it loaded")
        except BaseException:
            await self.stop()
            raise
        self._enter(BackendState.READY)
        self.ready_at = self.clock()
        log.info("llama-server ready in %.1fs (pid %s)", self.ready_at - self.started_at, self.pid)
        self._watch_task = asyncio.create_task(self._watch(), name="llama-server-watch")
        self._watch_task.add_done_callback(_watch_ended)

    async def _spawn_and_wait(self) -> None:
        assert self.binary is not None and self.model is not None
        self.log_path = server_log_path(self.settings.log_dir)
        env, dropped = backend_env(os.environ, self._api_key)
        if self.models is not None:
            preset = await asyncio.to_thread(write_preset, self.settings, self.models)
            cmd = router_command(self.settings, self.binary, preset)
            env["LLAMA_CACHE"] = str(router_files(self.settings)[1])  # the router lists our preset's models only
            self.offload = None  # chosen per model, by each model's own llama-server
        else:
            cmd = backend_command(self.settings, self.binary, self.model)
            self.offload = offload.pending(cmd)
        if dropped:
            log.warning("not passed to llama-server (use EXTRA_ARGS for its flags): %s", ", ".join(dropped))
        log.info("starting llama-server on 127.0.0.1:%d; log: %s", self.settings.port_backend, self.log_path)
        try:
            out = self.log_path.open("ab")
        except OSError as exc:
            raise BackendStartError(unwritable(self.settings.data_dir, self.log_path, exc)) from None
        with out:
            log_offset = os.fstat(out.fileno()).st_size  # a restart within the same second appends to the file
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_child_setup(),
                )
            except OSError as exc:
                self.last_error = f"cannot run {self.binary}: {exc.strerror or exc.__class__.__name__}"
                raise BackendStartError(self.last_error) from None
        if self._teardown is not None:  # stop() came while it was being spawned, and saw no child yet
            self._signal(self._proc.pid, signal.SIGKILL)
            await self._proc.wait()
            raise BackendStartError("llama-server was stopped while it started")
        await self._wait_ready()
        if self.models is None:
            await self._record_offload(cmd, log_offset)

    async def _record_offload(self, cmd: list[str], log_offset: int) -> None:
        """Fill `offload` from GET /props (n_ctx) and the start-up log (layers, buffers, --fit); log it."""
        assert self.log_path is not None
        upstream = self.client(max_response_size=PROPS_MAX_SIZE)
        n_ctx_slot = total_slots = None
        try:
            reply = await upstream.request("GET", "/props", timeout=PROBE_TIMEOUT)
            if reply.status == 200:
                n_ctx_slot, total_slots = offload.props_n_ctx(reply.body)
            else:
                log.warning("llama-server GET /props answered %d: n_ctx unknown", reply.status)
        except UpstreamError as exc:
            log.warning("llama-server GET /props failed (%s): n_ctx unknown", exc.__class__.__name__)
        finally:
            await upstream.close()
        facts = await asyncio.to_thread(offload.read_server_log, self.log_path, log_offset)
        self.offload = offload.summary(cmd, self.settings.extra_args, facts, n_ctx_slot, total_slots)
        log.info("%s", offload.describe(self.offload))

    async def replace_models(self, models: ModelSet) -> None:
        """Serve `models` from now on: rewrite the preset file and have the router reload its list (a loaded
        model whose file went away is unloaded by the router)."""
        if self.router is None:
            raise StateError("not in router mode")
        await asyncio.to_thread(write_preset, self.settings, models)
        self.models = models
        await self.router.refresh(reload=True)

    async def _probe(self, ours: Upstream, strangers: list[Upstream]) -> bool | None:
        """True: our llama-server is ready. None: nothing ready answers yet. False: whatever answers on PORT_BACKEND
        does not hold our key (it takes a wrong one, or refuses ours): not our child."""
        try:
            health = await ours.request("GET", "/health", timeout=PROBE_TIMEOUT)
            if health.status != 200:
                return None
            mine = await ours.request("GET", PROBE_ROUTE, timeout=PROBE_TIMEOUT)
            theirs = [await u.request("GET", PROBE_ROUTE, timeout=PROBE_TIMEOUT) for u in strangers]
        except UpstreamError:
            return None
        return mine.status == 200 and all(reply.status == 401 for reply in theirs)

    async def _wait_ready(self) -> None:
        """Poll /health through our own upstream client (no attempt cap) until ready, or raise once it exits."""
        assert self._proc is not None
        proc = self._proc
        exited = asyncio.create_task(proc.wait())
        ours = self.client()
        connect = self.settings.connect_timeout
        strangers = [Upstream(self.base_url, key, connect_timeout=connect) for key in ("", secrets.token_urlsafe(32))]
        warned = False
        try:
            while not exited.done():
                verdict = await self._probe(ours, strangers)
                if verdict and proc.returncode is None:
                    return
                if verdict is False and not warned:
                    warned = True
                    log.warning("something that is not our llama-server (pid %s) answers on 127.0.0.1:%d: waiting "
                                "for ours (is PORT_BACKEND taken?)", proc.pid, self.settings.port_backend)
                await asyncio.wait({exited}, timeout=self.poll_interval)
        finally:
            if not exited.done():
                exited.cancel()
            for upstream in (ours, *strangers):
                await upstream.close()
        await self._record_exit(f"llama-server exited with code {proc.returncode} while loading")
        raise BackendStartError(
            f"{self.last_error}; log {self.log_path}, last lines:\n"
            + "\n".join(f"  {line}" for line in self.last_log_lines)
        )

    async def _record_exit(self, message: str) -> None:
        self.last_error = message
        self.last_log_lines = await asyncio.to_thread(tail_lines, self.log_path) if self.log_path else []

    # --- watch and restart ---------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Restart llama-server whenever it dies on its own, as the crash-loop policy says."""
        unstarted: str | None = None  # why the last restart did not even run llama-server
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._state in (BackendState.STOPPING, BackendState.STOPPED):
                return
            verdict = self.crash_loop.crashed()
            # at once: /health must not say ready while the log is read
            self._enter(BackendState.DOWN if verdict.loop else BackendState.RESTARTING)
            await self._record_exit(unstarted or f"llama-server exited unexpectedly with code {code}")
            log.error("%s; last lines:\n%s", self.last_error, "\n".join(self.last_log_lines[-10:]))
            if verdict.loop:
                log.error("crash loop: %d crashes within %.0fs; the backend is down",
                          self.crash_loop.recent, self.settings.restart_window)
            if verdict.delay is None:
                self.gave_up.set()
                return
            log.info("restarting llama-server in %.1fs", verdict.delay)
            await asyncio.sleep(verdict.delay)
            before = self._proc
            try:
                await self._spawn_and_wait()
            except BackendStartError as exc:
                log.error("%s", exc)
                # Counted as a crash on the next turn: its exit, or (no new child) the reason there is none.
                unstarted = str(exc) if self._proc is before else None
                continue
            unstarted = None
            self.restarts += 1
            self._enter(BackendState.READY)
            self.ready_at = self.clock()
            log.info("llama-server restarted (restart %d, pid %s)", self.restarts, self.pid)

    # --- stop ----------------------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """SIGTERM the child's process group, SIGKILL after stop_timeout, reap. Idempotent: a second call waits
        for the first; a Supervisor that never started (or has stopped) has nothing to do."""
        if self._teardown is None:
            if self._state is BackendState.STOPPED:
                return
            self._teardown = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._teardown)

    async def _stop(self) -> None:
        self._enter(BackendState.STOPPING)
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            self._signal(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.settings.stop_timeout)
            except TimeoutError:
                log.warning("llama-server ignored SIGTERM for %.0fs; killing it", self.settings.stop_timeout)
                self._signal(proc.pid, signal.SIGKILL)
                await proc.wait()
        if self.router is not None:
            await self.router.close()
        self._enter(BackendState.STOPPED)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
