"""Prometheus metrics for the gateway: bounded labels and exposition (token usage is read by gateway.usage).

Every series lives in a registry passed in (tests get fresh ones). Label values are bounded by construction:
routes come from a fixed table (anything else is "other"), rejection reasons from a fixed set, and key_id and
model values are capped (new values past the cap become "other"), so a scrape never grows without limit.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE_OPENMETRICS
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway import loadmetrics
from gateway.loadmetrics import ModelLoad
from gateway.routes import API_ROUTES

log = logging.getLogger("gateway.metrics")

OTHER = "other"
MODEL_STATES = ("loaded", "loading", "sleeping", "unloaded")  # the router's statuses of a served model
NO_KEY = "none"  # key_id of requests refused before a key was known
REJECTION_REASONS = ("auth", "rate", "scope", "budget", "queue_full", "queue_timeout", "size", "invalid", "connections",
                     OTHER)
MAX_KEY_IDS = 1000
MAX_MODELS = 16

# Prometheus' default text format; CONTENT_TYPE_LATEST in prometheus_client 0.26 announces text format 1.0.0, which
# older scrapers do not know, and what generate_latest() writes by default is 0.0.4.
CONTENT_TYPE_TEXT = CONTENT_TYPE_PLAIN_0_0_4
OPENMETRICS = "application/openmetrics-text"
EOF = b"# EOF\n"

# Seconds. TTFT spans a cached short prompt (a few ms) to a long prompt on CPU (a minute); whole requests run up to
# ten minutes (long generations); queue waits are bounded by the queue timeout.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                    600.0)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKENS_PER_SECOND_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0,
                             2000.0)

BackendSource = Callable[[], tuple[bool, bool, int]]


class LabelGuard:
    """Caps the distinct values of one label: the first `cap` values pass, later new ones become "other"."""

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.cap:
            return OTHER
        self.seen.add(value)
        return value


class _BackendCollector(Collector):
    """llama-server's state read from the supervisor at scrape time, so it is never stale."""

    def __init__(self) -> None:
        self.source: BackendSource | None = None

    def describe(self) -> list[Metric]:
        return self._families(None)

    def collect(self) -> list[Metric]:
        if self.source is None:
            return []
        try:
            state = self.source()
        except Exception:  # a scrape must never fail because of the backend's bookkeeping
            log.exception("the backend metrics source failed")
            return []
        return self._families(state)

    @staticmethod
    def _families(state: tuple[bool, bool, int] | None) -> list[Metric]:
        up = GaugeMetricFamily("gateway_backend_up", "1 while the llama-server process is running")
        ready = GaugeMetricFamily("gateway_backend_ready", "1 while llama-server answers requests (model loaded)")
        restarts = CounterMetricFamily("gateway_backend_restarts", "Times the supervisor restarted llama-server")
        if state is not None:
            up.add_metric([], float(state[0]))
            ready.add_metric([], float(state[1]))
            restarts.add_metric([], float(state[2]))
        return [up, ready, restarts]


class _LoadCollector(Collector):
    """The load balancers' gauges (gateway.loadmetrics), from the loads the last scrape read: a model that is gone,
    or whose /slots failed, has no stale sample left behind."""

    def __init__(self) -> None:
        self.loads: Mapping[str, ModelLoad] = {}

    def describe(self) -> list[Metric]:
        return loadmetrics.families({})

    def collect(self) -> list[Metric]:
        return loadmetrics.families(self.loads)


class _Histogram:
    """Bucket counts kept as a plain list: an observation is one bisect and two additions, no lock.

    prometheus_client's Histogram takes a lock and walks every bucket per observation; on the request path that was
    a measurable share of the gateway's CPU. Exposition still goes through prometheus_client (see _Series).
    """

    __slots__ = ("bounds", "counts", "edges", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.edges = [floatToGoString(b) for b in bounds] + ["+Inf"]  # the `le` labels
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # buckets are "less than or equal": bisect_left
        self.total += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """(cumulative buckets ending with +Inf, sum); consistent with itself even while the loop observes."""
        counts, total = list(self.counts), self.total
        return list(zip(self.edges, accumulate(counts), strict=True)), total


class _Series(Collector):
    """Exposes the gateway's own counters and histograms, read from plain dicts at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        return self.collect()

    def collect(self) -> list[Metric]:
        m = self.m
        requests = CounterMetricFamily("gateway_requests",
                                       "Requests answered, by route, HTTP status, API key id and model",
                                       labels=("route", "status", "key_id", "model"))
        for labels, value in list(m.requests.items()):
            requests.add_metric(labels, value)
        rejected = CounterMetricFamily("gateway_rejections", "Requests refused by the gateway itself, by reason",
                                       labels=("reason",))
        for reason, value in list(m.rejections.items()):
            rejected.add_metric((reason,), value)
        prompt = CounterMetricFamily("gateway_prompt_tokens", "Prompt tokens processed, by API key id and model",
                                     labels=("key_id", "model"))
        for labels, value in list(m.prompt.items()):
            prompt.add_metric(labels, value)
        completion = CounterMetricFamily("gateway_completion_tokens",
                                         "Completion tokens generated, by API key id and model",
                                         labels=("key_id", "model"))
        for labels, value in list(m.completion.items()):
            completion.add_metric(labels, value)
        cached = CounterMetricFamily("gateway_cached_prompt_tokens",
                                     "Prompt tokens llama-server reused from its cache (part of the prompt tokens), "
                                     "by API key id and model", labels=("key_id", "model"))
        for labels, value in list(m.cached.items()):
            cached.add_metric(labels, value)
        duration = _histogram_family("gateway_request_duration_seconds",
                                     "Time from the request's arrival to the last byte of the answer",
                                     "route", m.duration)
        ttft = _histogram_family("gateway_time_to_first_token_seconds",
                                 "Streams: time from the request's arrival to the first event from the model",
                                 ("route", "model"), m.ttft)
        queue_wait = _histogram_family("gateway_queue_wait_seconds", "Time admitted requests waited for a slot",
                                       None, {(): m.queue_wait})
        speed = _histogram_family("gateway_generation_tokens_per_second",
                                  "Generation speed of each completed request (completion tokens / generation time)",
                                  None, {(): m.speed})
        families = [requests, duration, ttft, queue_wait, rejected, prompt, completion, cached, speed]
        if m.shared_source is not None:  # REDIS_URL: whether the limits are shared right now
            up, fallbacks = m.shared_source()
            gauge = GaugeMetricFamily("gateway_shared_limits_up", "1 while the limits are shared through Redis "
                                      "(REDIS_URL), 0 while this replica counts alone because Redis is unreachable")
            gauge.add_metric((), 1 if up else 0)
            counter = CounterMetricFamily("gateway_shared_limits_fallbacks", "Requests judged by this replica's own "
                                          "limits because Redis was unreachable")
            counter.add_metric((), fallbacks)
            families += [gauge, counter]
        return families


def _histogram_family(
    name: str, documentation: str, label: str | tuple[str, ...] | None,
    children: Mapping[tuple[str, ...], _Histogram],
) -> HistogramMetricFamily:
    names = (label,) if isinstance(label, str) else (label or ())
    family = HistogramMetricFamily(name, documentation, labels=names)
    for labels, hist in list(children.items()):
        buckets, total = hist.snapshot()
        family.add_metric(list(labels), buckets, total)
    return family


class Metrics:
    """The gateway's series in `registry`. Update methods run on the event loop; render() may run in a thread.

    Request-path updates touch plain dicts and lists (no locks, a fraction of a microsecond each); a collector turns
    them into prometheus_client metric families when scraped.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        routes: Iterable[str] = API_ROUTES,
        max_key_ids: int = MAX_KEY_IDS,
        max_models: int = MAX_MODELS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.routes = {route: route for route in routes}
        self.key_ids = LabelGuard(max_key_ids)
        self.models = LabelGuard(max_models)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        # Children that exist from the first scrape, so rate() and the dashboard see zeros rather than nothing.
        self.rejections = dict.fromkeys(REJECTION_REASONS, 0)
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.prompt: dict[tuple[str, str], int] = {}
        self.completion: dict[tuple[str, str], int] = {}
        self.cached: dict[tuple[str, str], int] = {}
        self.duration = {(route,): _Histogram(DURATION_BUCKETS) for route in (*self.routes, OTHER)}
        self.ttft: dict[tuple[str, str], _Histogram] = {}  # by (route, model): a child per model that streamed
        self.queue_wait = _Histogram(QUEUE_WAIT_BUCKETS)
        self.speed = _Histogram(TOKENS_PER_SECOND_BUCKETS)
        self.shared_source: Callable[[], tuple[bool, int]] | None = None  # (up, fallbacks): gateway.shared
        started = clock()
        r = registry
        r.register(_Series(self))
        self.queue_depth = Gauge("gateway_queue_depth", "Requests waiting for a slot", registry=r)
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests holding a slot", registry=r)
        # Several models (MODELS): one child per served model (and state), so bounded by the models served.
        self.model_state = Gauge("gateway_model_state", "1 for the state each served model is in (router mode)",
                                 ("model", "state"), registry=r)
        self.model_queue_depth = Gauge("gateway_model_queue_depth", "Requests waiting for a slot, per model",
                                       ("model",), registry=r)
        self.model_in_flight = Gauge("gateway_model_requests_in_flight", "Requests holding a slot, per model",
                                     ("model",), registry=r)
        uptime = Gauge("gateway_uptime_seconds", "Seconds since the gateway started", registry=r)
        uptime.set_function(lambda: clock() - started)
        self._backend = _BackendCollector()
        r.register(self._backend)
        self._load = _LoadCollector()
        r.register(self._load)

    def route(self, path: str) -> str:
        """The route label of a request path: one of the known routes, or "other"."""
        return self.routes.get(path, OTHER)

    def key_id(self, key_id: str | None) -> str:
        return self.key_ids(key_id) if key_id else NO_KEY

    def observe_request(
        self, route: str, status: int | str, key_id: str | None, duration_s: float, model: str | None = None
    ) -> None:
        """Once per answered request; `route` may be the raw path (it is mapped onto the fixed set)."""
        route = self.routes.get(route, OTHER)
        labels = (route, str(status), self.key_id(key_id), self.model(model))
        self.requests[labels] = self.requests.get(labels, 0) + 1
        self.duration[(route,)].observe(duration_s)

    def model(self, model: str | None) -> str:
        """The model label: the served model's id (bounded like key ids), or "none" for a request for none."""
        return self.models(model) if model else NO_KEY

    def observe_ttft(self, route: str, seconds: float, model: str | None = None) -> None:
        labels = (self.routes.get(route, OTHER), self.model(model))
        hist = self.ttft.get(labels)
        if hist is None:
            hist = self.ttft[labels] = _Histogram(TTFT_BUCKETS)
        hist.observe(seconds)

    def observe_tokens(
        self, key_id: str | None, model: str | None, prompt: int, completion: int, seconds_generating: float = 0.0,
        cached: int = 0,
    ) -> None:
        labels = (self.key_id(key_id), self.models(model) if model else "unknown")
        if prompt > 0:
            self.prompt_tokens += prompt
            self.prompt[labels] = self.prompt.get(labels, 0) + prompt
        if cached > 0:
            self.cached[labels] = self.cached.get(labels, 0) + cached
        if completion > 0:
            self.completion_tokens += completion
            self.completion[labels] = self.completion.get(labels, 0) + completion
            if seconds_generating > 0:
                self.speed.observe(completion / seconds_generating)

    def reject(self, reason: str) -> None:
        """A refusal by the gateway itself; reasons outside REJECTION_REASONS count as "other"."""
        if reason not in self.rejections:
            reason = OTHER
        self.rejections[reason] += 1

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n)

    def set_model_states(self, states: Mapping[str, Mapping[str, object]]) -> None:
        """gateway.health.model_states' view: each model's status, slots held and queue."""
        for model, state in states.items():
            for name in MODEL_STATES:
                self.model_state.labels(model, name).set(1 if state["status"] == name else 0)
            self.model_queue_depth.labels(model).set(state["depth"])  # type: ignore[arg-type]
            self.model_in_flight.labels(model).set(state["active"])  # type: ignore[arg-type]

    def set_load(self, loads: Mapping[str, ModelLoad]) -> None:
        """Each model's load, read by gateway.scrape for this scrape (replaced whole, never updated in place)."""
        self._load.loads = dict(loads)

    def set_backend_source(self, source: BackendSource) -> None:
        """`source()` -> (up, ready, restarts), called at scrape time: lambda: (sup.up, sup.ready, sup.restarts)."""
        self._backend.source = source

    def render(
        self, accept_header: str | None, backend: str = "", openmetrics: bool | None = None
    ) -> tuple[bytes, str]:
        """(body, content type) for a scrape: OpenMetrics when the Accept header asks for it (or `openmetrics` is
        True), else Prometheus text.

        `backend` is relabel_backend_metrics(llama-server's /metrics text), appended after our own series. With
        many key ids a scrape takes tens of milliseconds: run it off the loop (asyncio.to_thread), which is safe.
        """
        if wants_openmetrics(accept_header) if openmetrics is None else openmetrics:
            body = generate_openmetrics(self.registry)
            if backend:
                # The backend's series go just before the closing "# EOF" the registry's output ends with.
                head = body[: -len(EOF)] if body.endswith(EOF) else body
                body = head + backend_to_openmetrics(backend).encode() + EOF
            return body, CONTENT_TYPE_OPENMETRICS
        body = generate_text(self.registry)
        if backend:
            body += backend.encode()
        return body, CONTENT_TYPE_TEXT

    def json_snapshot(self, base: Mapping[str, object]) -> dict[str, object]:
        """`base` (gateway/stats.py's fields, unchanged) plus token totals and rejections by reason."""
        out = dict(base)
        out.setdefault("tokens_prompt_total", self.prompt_tokens)
        out.setdefault("tokens_completion_total", self.completion_tokens)
        out.setdefault("rejections", dict(self.rejections))
        source = self._backend.source
        if source is not None and "backend_restarts" not in out:
            try:
                out["backend_restarts"] = source()[2]
            except Exception:
                log.exception("the backend metrics source failed")
        return out


def _media_types(accept_header: str) -> set[str]:
    return {part.split(";", 1)[0].strip().lower() for part in accept_header.split(",")}


def wants_openmetrics(accept_header: str | None) -> bool:
    if not accept_header or OPENMETRICS not in accept_header.lower():
        return False
    return OPENMETRICS in _media_types(accept_header)


FORMATS = ("json", "prometheus", "openmetrics")


def negotiate(accept_header: str | None, requested: str | None = None) -> str:
    """Which /metrics answer a caller gets: "openmetrics", "prometheus" or "json".

    An explicit choice (e.g. ?format=) wins when it is one of FORMATS. Otherwise scrapers name their formats in
    Accept (Prometheus sends application/openmetrics-text and text/plain), while curl, browsers and the seed's JSON
    clients send */* or application/json, or nothing, and keep getting the seed's JSON.
    """
    if requested in FORMATS:
        return requested
    if not accept_header:
        return "json"
    types = _media_types(accept_header)
    if OPENMETRICS in types:
        return "openmetrics"
    if "text/plain" in types:
        return "prometheus"
    return "json"


# --- llama-server's own series -------------------------------------------------------------------------------------

BACKEND_PREFIX = "llamacpp:"


def relabel_backend_metrics(text: str, model: str | None = None, headers: bool = True) -> str:
    """Only llama-server's `llamacpp:*` series (HELP, TYPE and sample lines) of its /metrics text, ready to append.
    With several models, `model` (a served model's id) is added as a label to each sample, and `headers=False`
    drops HELP and TYPE (given once, with the first model's)."""
    kept = []
    label = None if model is None else 'model="' + model.replace("\\", "\\\\").replace('"', '\\"') + '"'
    for line in text.splitlines():
        if line.startswith(BACKEND_PREFIX):
            if label is not None:
                name, sep, rest = line.partition("{")
                if sep:
                    line = f"{name}{{{label},{rest}"
                else:
                    name, _, value = line.partition(" ")
                    line = f"{name}{{{label}}} {value}"
            kept.append(line)
        elif headers and (line.startswith("# HELP ") or line.startswith("# TYPE ")) and \
                line[7:].startswith(BACKEND_PREFIX):
            kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


_OM_VALUES = {"nan": "NaN", "inf": "+Inf", "+inf": "+Inf", "-inf": "-Inf"}


def backend_to_openmetrics(text: str) -> str:
    """Prometheus text (relabel_backend_metrics' output) as OpenMetrics lines, without the closing `# EOF`.

    OpenMetrics names a counter family without its `_total` suffix and wants NaN/+Inf spelled so; llama-server's
    one counter without `_total` (n_tokens_max, a high-water mark) is declared a gauge, so every sample keeps the
    name it has in the Prometheus text format.
    """
    families: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                families[parts[2]] = parts[3]
    out = []
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            if len(parts) < 4:
                continue
            name, rest = parts[2], parts[3]
            typ = families.get(name, "unknown")
            if typ == "counter":
                if name.endswith("_total"):
                    name = name[:-6]
                else:
                    typ = "gauge"
            elif typ == "untyped":
                typ = "unknown"
            out.append(f"{parts[0]} {parts[1]} {name} {typ if parts[1] == 'TYPE' else rest}")
        elif line and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            out.append(f"{head} {_OM_VALUES.get(value.lower(), value)}")
    return "\n".join(out) + "\n" if out else ""
