"""Typed keys for what the gateway app holds; one owner per piece of mutable state."""

from __future__ import annotations

from aiohttp import web

from gateway.accesslog import AccessLog
from gateway.admission import Admissions
from gateway.audit import AuditLog
from gateway.auth import KeyStore
from gateway.connections import Connections
from gateway.cors import Cors
from gateway.drain import Drain
from gateway.guard import Guard
from gateway.ledger import Ledger
from gateway.metrics import Metrics
from gateway.observe import Observer
from gateway.pipeline import Exchange, Pipeline
from gateway.requestid import RequestIds
from gateway.shared import Shared
from gateway.stats import Stats
from lifecycle.backend import Backend
from lifecycle.request_rules import Limits
from lifecycle.settings import Settings
from lifecycle.upstream import Upstream

SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", Backend)
UPSTREAM = web.AppKey("upstream", Upstream)
STATS = web.AppKey("stats", Stats)
KEYS = web.AppKey("keys", KeyStore)
CORS = web.AppKey("cors", Cors)
SHARED = web.AppKey("shared", Shared)  # with REDIS_URL: the windows every replica shares (gateway.shared)
GUARD = web.AppKey("guard", Guard)  # rate limits, token budgets, concurrency, failed keys (gateway.guard)
ADMISSION = web.AppKey("admission", Admissions)
DRAIN = web.AppKey("drain", Drain)
METRICS = web.AppKey("metrics", Metrics)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
OBSERVER = web.AppKey("observer", Observer)
LEDGER = web.AppKey("ledger", Ledger)  # the usage ledger (USAGE_LEDGER), fed by the observer
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
CONNECTIONS = web.AppKey("connections", Connections)  # open client connections on PORT
AUDIT = web.AppKey("audit", AuditLog)  # key reloads and admin actions (gateway.audit)
LIMITS = web.AppKey("limits", Limits)  # what lifecycle.request_rules checks request bodies against

PIPELINE = web.AppKey("pipeline", Pipeline)  # made once the upstream client exists (gateway.app)

# Per-request state: the request's Exchange, made by the gate middleware (typed: aiohttp warns about plain strings).
EXCHANGE = web.RequestKey("exchange", Exchange)
