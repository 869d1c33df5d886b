"""What llama-server chose for GPU offload and context: read off its command line, its start-up log and GET /props.

With NGL and CTX unset the gateway passes `-ngl auto --fit on` and no `-c`: llama-server then fits the layers (and
the context) to free device memory, so what it runs with is only known once it is up. This module turns what it
printed while loading (at `-lv 4`, see supervisor.backend_command) into one plain dict for the log and /health.

The parse is tolerant by design: llama.cpp's log lines are not an interface, so every fact that is not found is
None (null in /health), never an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# llama-server's flags (common/arg.cpp), short and long forms.
NGL_FLAGS = ("-ngl", "--gpu-layers", "--n-gpu-layers")
CTX_FLAGS = ("-c", "--ctx-size")
FIT_FLAGS = ("-fit", "--fit")
VERBOSITY_FLAGS = ("-lv", "--verbosity", "--log-verbosity", "-v", "--verbose", "--log-verbose")
KV_UNIFIED_FLAGS = ("-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified")
# llama.cpp prints its offload, buffer and --fit lines at "trace" (4); its default, 3, hides all of them.
OFFLOAD_LOG_VERBOSITY = "4"

MAX_LOG_BYTES = 8 << 20  # of one start-up's log read; loading logs are some hundred lines
MAX_FIT_LINES = 24  # of what --fit printed: the first and the last half of them

_LINE_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")  # llama.cpp's "0.00.317.356 I " (absent with --no-log-prefix)
_NO_GPU = re.compile(r"no usable GPU found")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(r"(\S+)\s+(model|KV|RS|compute|output) buffer size =\s*([0-9.]+) MiB")
_DEVICE = re.compile(r"- (\S+?)\s*: (.+?) \((\d+) MiB, (\d+) MiB free\)\s*$")
_N_LAYER_ALL = re.compile(r"print_info: n_layer_all\s*=\s*(\d+)")
_N_LAYER = re.compile(r"print_info: n_layer\s*=\s*(\d+)")
_N_CTX_TRAIN = re.compile(r"print_info: n_ctx_train\s*=\s*(\d+)")
_N_CTX = re.compile(r"llama_context: n_ctx\s*=\s*(\d+)")
_FIT = re.compile(r"(?:common_params_fit_impl|common_fit_params|llama_params_fit\w*): (.*)$")
_FIT_FAILED = re.compile(r"failed to fit params to free device memory")
_FIT_ERROR = re.compile(r"encountered an error while trying to fit params")
# --fit's search steps, one per try: left out of fit_log
_FIT_NOISE = re.compile(r"^(set ngl_per_device|trying to fit one extra layer|memory for test allocation|id=\d+,|"
                        r"start filling device|getting device memory data)")
_FIT_OK = re.compile(r"successfully fit params to free device memory")
_LOADED = re.compile(r"llama_server: model loaded|server is listening|listening on http")


def last_value(cmd: Sequence[str], flags: Iterable[str]) -> str | None:
    """The value of the last of `flags` on a command line (llama-server keeps the last one), or None."""
    names = set(flags)
    found = None
    for i, arg in enumerate(cmd[:-1]):
        if arg in names:
            found = cmd[i + 1]
    return found


def has_flag(args: Iterable[str], flags: Iterable[str]) -> bool:
    return bool(set(flags) & set(args))


def kv_unified(extra_args: Sequence[str]) -> bool:
    """Whether the slots share one KV buffer: the gateway's default (--kv-unified) unless EXTRA_ARGS decides;
    the last of its -kvu / -no-kvu flags wins, as in llama-server."""
    choice = True
    for arg in extra_args:
        if arg in KV_UNIFIED_FLAGS:
            choice = "no" not in arg
    return choice


def _number(text: str | None) -> int | str | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text  # "auto", "all"


def requested(cmd: Sequence[str]) -> dict[str, Any]:
    """What the command line asks: ngl ("auto", "all" or N), ctx ("auto" when no -c, else N; 0 = the model's own)
    and fit (llama-server's default is on)."""
    ngl = _number(last_value(cmd, NGL_FLAGS))
    ctx = _number(last_value(cmd, CTX_FLAGS))
    fit = last_value(cmd, FIT_FLAGS)
    return {
        "ngl": "auto" if ngl is None else ngl,
        "ctx": "auto" if ctx is None else ctx,
        "fit": fit is None or fit in ("on", "enabled", "true", "1"),  # common_arg_utils::is_truthy
    }


@dataclass
class LogFacts:
    """What one start-up's log says; None (or empty) for every line that was not there."""

    no_gpu: bool = False  # "warning: no usable GPU found": a build without GPU support, or no device
    gpu_layers: int | None = None
    layers: int | None = None  # what -ngl counts: the model's layers plus its output layer
    n_layer_all: int | None = None
    n_ctx_train: int | None = None
    n_ctx: int | None = None  # llama_context: n_ctx, all slots together
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    buffers: dict[str, dict[str, float]] = field(default_factory=dict)  # buffer type -> kind -> MiB
    fit_status: str | None = None  # ok | failed | error
    fit_log: list[str] = field(default_factory=list)


def _int(match: re.Match[str] | None, group: int = 1) -> int | None:
    return int(match.group(group)) if match else None


def parse_server_log(lines: Iterable[str]) -> LogFacts:
    """Read llama-server's start-up lines (up to "model loaded") into LogFacts."""
    facts = LogFacts()
    n_layer: int | None = None
    fit_lines: list[str] = []
    for raw in lines:
        line = _LINE_PREFIX.sub("", raw.rstrip("\r\n"))
        if _NO_GPU.search(line):
            facts.no_gpu = True
        elif m := _OFFLOADED.search(line):
            facts.gpu_layers, facts.layers = int(m.group(1)), int(m.group(2))
        elif m := _BUFFER.search(line):
            kind = m.group(2).lower()
            per = facts.buffers.setdefault(m.group(1), {})
            per[kind] = round(per.get(kind, 0.0) + float(m.group(3)), 2)
        elif m := _FIT.search(line):
            text = m.group(1).strip()
            if _FIT_OK.search(text):
                facts.fit_status = "ok"
            elif _FIT_FAILED.search(text):
                facts.fit_status = "failed"
            elif _FIT_ERROR.search(text):
                facts.fit_status = "error"
            if text and not _FIT_NOISE.search(text):
                fit_lines.append(text)
        elif m := _DEVICE.search(line):
            facts.devices[m.group(1)] = {"description": m.group(2).strip(), "total_mib": int(m.group(3)),
                                         "free_mib": int(m.group(4))}
        elif m := _N_LAYER_ALL.search(line):
            facts.n_layer_all = int(m.group(1))
        elif m := _N_LAYER.search(line):
            n_layer = int(m.group(1))
        elif m := _N_CTX_TRAIN.search(line):
            facts.n_ctx_train = int(m.group(1))
        elif m := _N_CTX.search(line):
            facts.n_ctx = int(m.group(1))
        elif _LOADED.search(line):
            break
    if facts.n_layer_all is None:
        facts.n_layer_all = n_layer
    half = MAX_FIT_LINES // 2
    if len(fit_lines) > MAX_FIT_LINES:
        fit_lines[half:-half] = [f"... {len(fit_lines) - 2 * half} more lines in the server log"]
    facts.fit_log = fit_lines
    if facts.no_gpu and facts.gpu_layers is None:
        # Without GPU offload llama.cpp prints no "offloaded" line: nothing is on a GPU. It would count the
        # layers as n_layer_all + 1 (llama-model.cpp: max_offloadable_layers).
        facts.gpu_layers = 0
        if facts.n_layer_all is not None:
            facts.layers = facts.n_layer_all + 1
    return facts


def read_server_log(path: Path, offset: int = 0, limit: int = MAX_LOG_BYTES) -> LogFacts:
    """parse_server_log on `path` from byte `offset` (where this start-up began writing). Blocking: call it off
    the event loop. A missing or unreadable log gives empty facts."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(limit)
    except OSError:
        return LogFacts()
    return parse_server_log(data.decode("utf-8", "replace").splitlines())


def props_n_ctx(body: bytes) -> tuple[int | None, int | None]:
    """(per-slot n_ctx, total_slots) from GET /props; None for what is missing or malformed."""
    try:
        props = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(props, dict):
        return None, None
    settings = props.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    slots = props.get("total_slots")
    return _count(n_ctx), _count(slots)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def summary(cmd: Sequence[str], extra_args: Sequence[str], facts: LogFacts | None,
            n_ctx_slot: int | None, total_slots: int | None) -> dict[str, Any]:
    """The `offload` object of /health (docs/CONFIGURATION.md, "GPU offload").

    n_ctx is the whole context (comparable to CTX): /props reports it per slot, which is all of it when the slots
    share one KV buffer (--kv-unified) and a slot's share otherwise; the log's llama_context line fills in when
    /props said nothing."""
    facts = facts or LogFacts()
    n_ctx: int | None = None
    if n_ctx_slot is not None:
        if kv_unified(extra_args):
            n_ctx = n_ctx_slot
        elif total_slots is not None:
            n_ctx = n_ctx_slot * total_slots
    if n_ctx is None:
        n_ctx = facts.n_ctx
    return {
        **requested(cmd),
        "gpu_layers": facts.gpu_layers,
        "layers": facts.layers,
        "n_ctx": n_ctx,
        "n_ctx_slot": n_ctx_slot,
        "n_ctx_train": facts.n_ctx_train,
        "fit_status": facts.fit_status,
        "fit_log": facts.fit_log,
        "devices": facts.devices,
        "device_memory_mib": facts.buffers,
    }


def pending(cmd: Sequence[str]) -> dict[str, Any]:
    """The `offload` object while llama-server loads: what was asked, nothing measured yet."""
    return summary(cmd, (), None, None, None)


def describe(offload: dict[str, Any]) -> str:
    """One log line's worth: `offload: 31/31 layers on the GPU (ngl auto, fit on: ok), n_ctx 8192 (ctx auto), ...`."""
    def shown(value: object) -> str:
        return "?" if value is None else str(value)

    fit = "on" if offload["fit"] else "off"
    if offload["fit"]:
        fit += f": {offload['fit_status'] or 'no report'}"
    memory = "; ".join(
        f"{name} " + " ".join(f"{kind} {mib:.0f}" for kind, mib in kinds.items())
        for name, kinds in offload["device_memory_mib"].items()
    ) or "?"
    devices = "; ".join(f"{name} {d['free_mib']}/{d['total_mib']} MiB free"
                        for name, d in offload["devices"].items()) or "?"
    return (f"offload: {shown(offload['gpu_layers'])}/{shown(offload['layers'])} layers on the GPU "
            f"(ngl {offload['ngl']}, fit {fit}), n_ctx {shown(offload['n_ctx'])} (ctx {offload['ctx']}, "
            f"{shown(offload['n_ctx_slot'])} per slot, trained {shown(offload['n_ctx_train'])}), "
            f"buffers MiB: {memory}; devices before loading: {devices}")
