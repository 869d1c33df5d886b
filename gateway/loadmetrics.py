"""Load signals for inference-aware load balancers and autoscalers, per model: queued and running requests, slots,
and the KV cache's utilisation derived from llama-server's GET /slots (docs/METRICS.md, "For load balancers and
autoscalers").

Pure functions over the parsed /slots JSON and llama-server's /metrics text, plus one async reader; gateway.scrape
calls them at scrape time only, never on the request path. What llama-server's /slots gives per slot (the pinned
build; tests/unit/data/slots_*.json are real answers):

    {"id": 3, "n_ctx": 4096, "is_processing": true, "id_task": 1, "n_prompt_tokens": 79,
     "n_prompt_tokens_processed": 38, "n_prompt_tokens_cache": 0, "params": {...},
     "next_token": [{"has_next_token": true, "n_remain": 159, "n_decoded": 41, ...}]}

`n_ctx` is the slot's context: the whole KV buffer when the slots share one (--kv-unified, the gateway's default),
CTX / PARALLEL otherwise. `n_prompt_tokens` is the size of the slot's token list, i.e. the tokens its KV cells hold:
the prompt plus every token generated so far (38 + 41 above); a slot that never ran has no such field. After a
request the slot is idle and keeps its tokens for prompt reuse (llama-server purges an idle slot's cells as soon as a
new request needs the room), so only the slots with `is_processing` count as held.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from lifecycle import offload
from lifecycle.upstream import Upstream, UpstreamError

log = logging.getLogger("gateway.loadmetrics")

# The series' names: what KEDA, an HPA and the Inference Extension's endpoint picker are configured with
# (deploy/kubernetes, docs/SCALING.md).
QUEUED, KV_CACHE = "gateway_queued_requests", "gateway_kv_cache_utilization"
RUNNING, SLOTS = "gateway_running_requests", "gateway_slots_total"
SERIES = frozenset({QUEUED, KV_CACHE, RUNNING, SLOTS})
PARSE_IN_THREAD = 256 << 10  # a /slots answer larger than this is parsed off the event loop (many slots)
_TRUE = frozenset({"true", "1", "on", "enabled", "yes"})  # a preset's boolean, as llama-server reads it
_UNIFIED_KEYS = frozenset({"kv-unified", "kvu"})
_SPLIT_KEYS = frozenset({"no-kv-unified", "no-kvu"})
_DEFERRED = re.compile(r"^llamacpp:requests_deferred(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class SlotLoad:
    """One llama-server's slots as /slots showed them at one scrape."""

    slots_total: int
    running: int  # slots with is_processing
    tokens_held: int  # KV tokens of the running slots
    tokens_cached_idle: int  # KV tokens idle slots keep for prompt reuse (not counted as held)
    n_ctx: int  # the context available: one slot's n_ctx with a unified KV buffer, the sum of them otherwise

    @property
    def kv_utilization(self) -> float | None:
        """tokens_held / n_ctx in [0, 1]; None without any context (no slots)."""
        return utilization(self.tokens_held, self.n_ctx)


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One model's load at one scrape: `slots` is None when /slots failed (its series are then absent)."""

    queued: int
    slots: SlotLoad | None

    def to_json(self) -> dict[str, Any]:
        """The `load` entry of /metrics' JSON: null where the Prometheus series is absent."""
        s = self.slots
        return {
            "queued_requests": self.queued,
            "running_requests": None if s is None else s.running,
            "slots_total": None if s is None else s.slots_total,
            "kv_cache_utilization": None if s is None else s.kv_utilization,
            "kv_tokens_held": None if s is None else s.tokens_held,
            "kv_tokens_cached_idle": None if s is None else s.tokens_cached_idle,
            "n_ctx": None if s is None else s.n_ctx,
        }


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def utilization(held: int, n_ctx: int) -> float | None:
    if n_ctx <= 0:
        return None
    return min(1.0, max(0.0, held / n_ctx))


def parse_slots(body: bytes) -> list[Mapping[str, Any]] | None:
    """The slot objects of a /slots answer; None for anything that is not a JSON array (an error object...)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, list):
        return None
    return [slot for slot in data if isinstance(slot, dict)]


def slot_tokens(slot: Mapping[str, Any]) -> int:
    """The tokens a slot's KV cells hold: its token list (prompt + generated so far); 0 for a slot never used."""
    return _count(slot.get("n_prompt_tokens"))


def slot_load(slots: Sequence[Mapping[str, Any]], unified: bool) -> SlotLoad:
    """The arithmetic: running slots' tokens over the context available, which is one buffer of n_ctx tokens with a
    unified KV cache (every slot reports the same n_ctx: the largest is taken) and Σ n_ctx without one."""
    running = held = idle = 0
    contexts = [_count(slot.get("n_ctx")) for slot in slots]
    for slot in slots:
        tokens = slot_tokens(slot)
        if slot.get("is_processing") is True:
            running += 1
            held += tokens
        else:
            idle += tokens
    n_ctx = (max(contexts) if contexts else 0) if unified else sum(contexts)
    return SlotLoad(len(slots), running, held, idle, n_ctx)


def requests_deferred(metrics_text: str) -> int | None:
    """llamacpp:requests_deferred from one llama-server's /metrics text (unlabelled); None when it is not there."""
    match = _DEFERRED.search(metrics_text)
    if match is None:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    return int(value) if value > 0 else 0


def kv_unified(extra_args: Sequence[str], options: Iterable[tuple[str, str]] = ()) -> bool:
    """Whether a model's slots share one KV buffer. The command line (EXTRA_ARGS) wins, as in llama-server; else
    the router's preset options (the [*] section, then the model's: MODELS_PRESET) may turn it off; else the
    gateway's default, --kv-unified (lifecycle.supervisor)."""
    if offload.has_flag(extra_args, offload.KV_UNIFIED_FLAGS):
        return offload.kv_unified(extra_args)
    choice = True
    for key, value in options:
        key = key.strip().lstrip("-")
        if key in _UNIFIED_KEYS:
            choice = value.strip().lower() in _TRUE
        elif key in _SPLIT_KEYS:
            choice = value.strip().lower() not in _TRUE
    return choice


def model_path(path: str, model: str | None) -> str:
    """`path` of the backend, or of one model's own llama-server through the router (autoload=false: a scrape
    never loads a model)."""
    return path if model is None else f"{path}?model={quote(model, safe='')}&autoload=false"


async def backend_get(upstream: Upstream, path: str, model: str | None, timeout: float) -> bytes | None:
    """The body of one GET to llama-server (or to one model's, through the router) within `timeout`; None when it
    failed (a warning) or answered anything but 200 (llama-server's own answer: --no-slots gives 501, every
    scrape, so no warning)."""
    path = model_path(path, model)
    try:
        reply = await upstream.request("GET", path, timeout=timeout)
    except UpstreamError as exc:
        log.warning("llama-server %s failed: %s", path, exc)
        return None
    return reply.body if reply.status == 200 else None


async def read_slots(upstream: Upstream, model: str | None, timeout: float) -> list[Mapping[str, Any]] | None:
    """GET /slots of the backend (or of one model's through the router); None when it fails, times out or answers
    anything but a JSON array (--no-slots answers 501)."""
    body = await backend_get(upstream, "/slots", model, timeout)
    if body is None:
        return None
    return await asyncio.to_thread(parse_slots, body) if len(body) > PARSE_IN_THREAD else parse_slots(body)


def families(loads: Mapping[str, ModelLoad]) -> list[Metric]:
    """The four gauges, one sample per model; a model whose /slots failed has only gateway_queued_requests."""
    queued = GaugeMetricFamily(QUEUED, "Requests waiting, per model: the gateway's admission "
                               "queue plus llama-server's deferred requests", labels=("model",))
    kv = GaugeMetricFamily(KV_CACHE, "Share of the KV cache (0-1) held by the requests "
                           "being processed, from llama-server's /slots", labels=("model",))
    running = GaugeMetricFamily(RUNNING, "llama-server slots processing a request, from /slots",
                                labels=("model",))
    total = GaugeMetricFamily(SLOTS, "llama-server's parallel slots, from /slots", labels=("model",))
    for model, load in loads.items():
        queued.add_metric((model,), load.queued)
        s = load.slots
        if s is None:
            continue
        value = s.kv_utilization
        if value is not None:
            kv.add_metric((model,), value)
        running.add_metric((model,), s.running)
        total.add_metric((model,), s.slots_total)
    return [queued, kv, running, total]
