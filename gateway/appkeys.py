"""Typed keys for what the gateway app holds; one owner per piece of mutable state."""

from __future__ import annotations

from aiohttp import web

from gateway.accesslog import AccessLog
from gateway.admission import Admission
from gateway.auth import KeyStore
from gateway.connections import Connections
from gateway.cors import Cors
from gateway.metrics import Metrics
from gateway.observe import Answer, Observer
from gateway.ratelimit import Decision, SlidingWindow
from gateway.requestid import RequestIds
from gateway.stats import Drain, Stats
from lifecycle.request_rules import Limits
from lifecycle.settings import Settings
from lifecycle.supervisor import Supervisor
from lifecycle.upstream import Upstream

SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", Supervisor)
UPSTREAM = web.AppKey("upstream", Upstream)
STATS = web.AppKey("stats", Stats)
KEYS = web.AppKey("keys", KeyStore)
CORS = web.AppKey("cors", Cors)
LIMITER = web.AppKey("limiter", SlidingWindow)
FAILURES = web.AppKey("auth_failures", SlidingWindow)
ADMISSION = web.AppKey("admission", Admission)
DRAIN = web.AppKey("drain", Drain)
METRICS = web.AppKey("metrics", Metrics)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
OBSERVER = web.AppKey("observer", Observer)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
CONNECTIONS = web.AppKey("connections", Connections)  # open client connections on PORT
LIMITS = web.AppKey("limits", Limits)  # what lifecycle.request_rules checks request bodies against

# Per-request values, set by the gate middleware and the proxy (typed keys: aiohttp warns about plain strings).
KEY_ID = web.RequestKey("key_id", str)
RATE = web.RequestKey("rate_decision", Decision)
REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)
REJECTED = web.RequestKey("rejected", str)
TTFT = web.RequestKey("ttft", float)
ANSWER = web.RequestKey("answer", Answer)  # where the token usage is read from, in the batch
SENT_STATUS = web.RequestKey("sent_status", int)  # the status whose headers went out (set by gateway.decorate)
