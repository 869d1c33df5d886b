"""Typed keys for what the gateway app holds; one owner per piece of mutable state."""

from __future__ import annotations

from aiohttp import web

from gateway.accesslog import AccessLog
from gateway.admission import Admission
from gateway.auth import KeyStore
from gateway.cors import Cors
from gateway.metrics import Metrics
from gateway.ratelimit import SlidingWindow
from gateway.requestid import RequestIds
from gateway.stats import Drain, Stats
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
REQUEST_IDS = web.AppKey("request_ids", RequestIds)

# Per-request values, set by the gate middleware and the proxy.
KEY_ID = "key_id"
RATE = "rate_decision"
REQUEST_ID = "request_id"
STARTED = "started"
REJECTED = "rejected"
TTFT = "ttft"
USAGE = "usage"
SENT_STATUS = "sent_status"  # the status whose headers went out (set by gateway.decorate)
