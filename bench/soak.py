#!/usr/bin/env python3
"""A bounded soak: a fixed number of chat requests at a fixed concurrency through the gateway, against the same
load on the fast fake backend directly. Are there failures, how much latency does the gateway add, does it grow?

Two targets, both in front of bench/fake_llama_server.py (instant answers, so the gateway is what is measured):

  direct   a fake started by this script on its own port (the floor: the same load with no proxy)
  gateway  `python -m gateway` with auth on (a keys file whose one key has a rate limit far above the load),
           LLAMA_SERVER_BIN = the fake, PARALLEL 8 (so MAX_CONCURRENT_REQUESTS = 8 and, at concurrency 64, most
           requests wait in the admission queue), MAX_QUEUE_SIZE 0 (unbounded), QUEUE_TIMEOUT its default (60 s)

The client is aiohttp (on uvloop) with `--concurrency` workers sharing keep-alive connections, pulling from one
counter until `--requests` have been sent: a deterministic mix of whole JSON answers and SSE streams
(`--stream-pct`, default 30 %). Every answer is read to the end and checked (a JSON body with `choices`; a stream
with content, no error event and a final `[DONE]`). The direct pass runs first, then the gateway pass, same
request sequence and concurrency. Reported:

  outcomes     successes; documented refusals (503 with code queue_full / queue_timeout / backend_unavailable);
               failures by kind: any other status, a bad or truncated body, a connection error, a client timeout
  latency      p50/p99 per target (send -> last byte), overall and per kind, and the gateway's ADDED p50/p99
  memory       the gateway process's VmRSS (/proc/PID/status) at every 5 % of the requests: growth from the
               10 % mark (after warm-up) to the end, target < 10 %; also idle RSS before the load and 2 s after

Verdicts are printed, never turned into an exit code. The gateway's own output (stdout/stderr and its boot log)
is scanned for tracebacks, errors and warnings, which are printed verbatim; the log is kept under bench/out/.
The access log's chat lines are counted by status (every request should be there, none dropped by rotation),
the gateway's /metrics says how long admitted requests waited in its queue, and at the end the gateway gets one
SIGTERM (as `docker stop` sends it): its exit code, its shutdown time and its last log line are reported.

The per-key sliding-window rate limiter keeps one timestamp per accepted request for 60 s, so RSS grows by about
40 bytes per request until the first minute is full and is flat after that: a pass longer than 60 s at full
speed shows that growth, bounded, not a leak. `--no-auth` (no key check, no limiter) tells it apart;
`--no-access-log` measures what the access log costs.

    .venv/bin/python bench/soak.py [--requests 5000] [--concurrency 64] [--stream-pct 30] [--parallel 8]
                                   [--no-direct] [--no-auth] [--no-access-log] [--rate-limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from harness import (
    FAKE_SERVER,
    OUT,
    ROOT,
    Child,
    Processes,
    ensure_free,
    git_commit,
    http_status,
    machine,
    median,
    percentile,
    require_project_venv,
    tail,
    venv_env,
    wait_ready,
)

TARGET_RSS_GROWTH = 0.10
DOCUMENTED_503 = ("queue_full", "queue_timeout", "backend_unavailable")
CLIENT_KEY = "sk-bench-0123456789abcdef"
BACKEND_KEY = "sk-bench-backend-0123456789abcdef"
JSON_BODY = json.dumps({"model": "any", "messages": [{"role": "user", "content": "Say hello."}],
                        "max_tokens": 16}).encode()
STREAM_BODY = json.dumps({"model": "any", "messages": [{"role": "user", "content": "Say hello."}],
                          "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}}).encode()
CONTENT = re.compile(rb'"content":\s*"[^"]')  # a non-empty content delta
METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN)")
LOG_PATTERN = re.compile(r"Traceback|Error|Exception|WARNING|ERROR|CRITICAL|Unclosed|Task was destroyed|never "
                         r"retrieved")


@dataclass
class Target:
    name: str
    port: int
    key: str
    pid: int | None = None  # the process whose RSS is sampled

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


@dataclass
class Pass:
    target: str
    requests: int
    seconds: float
    outcomes: dict[str, int]
    latency_ms: dict[str, dict[str, float]]
    rss_kb: list[tuple[int, int]] = field(default_factory=list)  # (requests done, VmRSS kB) at each 5 % mark
    rss_idle_before_kb: int | None = None
    rss_idle_after_kb: int | None = None
    hwm_kb: int | None = None
    cpu_s: float | None = None


def is_stream(i: int, pct: int) -> bool:
    """Spread streams evenly: request i streams when the running share of streams would otherwise fall behind."""
    return (i + 1) * pct // 100 > i * pct // 100


def proc_status(pid: int | None, field_name: str) -> int | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def proc_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


async def one(session: aiohttp.ClientSession, target: Target, stream: bool) -> tuple[str, float]:
    """(outcome, seconds): 'ok', 'refused_<code>' or a failure kind."""
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"}
    start = time.perf_counter()
    try:
        async with session.post(target.url, data=STREAM_BODY if stream else JSON_BODY, headers=headers) as resp:
            if resp.status != 200:
                body = await resp.read()
                outcome = f"http_{resp.status}"
                if resp.status == 503:
                    with contextlib.suppress(ValueError, AttributeError, TypeError):
                        code = json.loads(body)["error"]["code"]
                        outcome = f"refused_{code}" if code in DOCUMENTED_503 else f"http_503_{code}"
                return outcome, time.perf_counter() - start
            if not stream:
                body = await resp.read()
                ok = b'"choices"' in body and b'"error"' not in body
                return ("ok" if ok else "bad_body"), time.perf_counter() - start
            done = content = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                if b'"error"' in data:
                    return "stream_error_event", time.perf_counter() - start
                if CONTENT.search(data):
                    content = True
            outcome = "ok" if done and content else ("stream_truncated" if content else "stream_empty")
            return outcome, time.perf_counter() - start
    except TimeoutError:
        return "client_timeout", time.perf_counter() - start
    except aiohttp.ClientError as exc:
        return f"conn_{type(exc).__name__}", time.perf_counter() - start


def summarize_latency(samples: list[tuple[bool, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for kind, pick in (("all", None), ("json", False), ("stream", True)):
        ms = [s * 1000 for stream, s in samples if pick is None or stream == pick]
        out[kind] = {"n": len(ms), "p50": median(ms), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
                     "max": max(ms) if ms else float("nan")}
    return out


async def run_pass(target: Target, args: argparse.Namespace) -> Pass:
    n, c = args.requests, args.concurrency
    marks = {max(1, n * k // 20): k * 5 for k in range(1, 21)}  # requests done -> percent
    outcomes: Counter[str] = Counter()
    samples: list[tuple[bool, float]] = []  # (stream, seconds) of successful requests
    rss: list[tuple[int, int]] = []
    next_i = 0
    done = 0
    deadline = time.monotonic() + args.max_seconds
    idle_before = proc_status(target.pid, "VmRSS")
    cpu_before = proc_cpu_s(target.pid)
    connector = aiohttp.TCPConnector(limit=c, limit_per_host=c)
    timeout = aiohttp.ClientTimeout(total=args.client_timeout)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def worker() -> None:
            nonlocal next_i, done
            while next_i < n and time.monotonic() < deadline:
                i = next_i
                next_i += 1
                stream = is_stream(i, args.stream_pct)
                outcome, seconds = await one(session, target, stream)
                outcomes[outcome] += 1
                if outcome == "ok":
                    samples.append((stream, seconds))
                done += 1
                if done in marks:
                    value = proc_status(target.pid, "VmRSS")
                    if value is not None:
                        rss.append((done, value))
                    if marks[done] % 25 == 0:
                        print(f"  {target.name}: {marks[done]:3d} % ({done} requests, "
                              f"{time.monotonic() - started:.1f} s)"
                              + (f", gateway RSS {value / 1024:.1f} MiB" if value is not None else ""),
                              file=sys.stderr)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(c)))
        seconds = time.monotonic() - started
    if next_i < n:
        print(f"  {target.name}: stopped after {next_i} of {n} requests: --max-seconds reached", file=sys.stderr)
    cpu_after = proc_cpu_s(target.pid)
    await asyncio.sleep(2.0 if target.pid is not None else 0)
    return Pass(
        target=target.name, requests=sum(outcomes.values()), seconds=seconds, outcomes=dict(outcomes),
        latency_ms=summarize_latency(samples), rss_kb=rss, rss_idle_before_kb=idle_before,
        rss_idle_after_kb=proc_status(target.pid, "VmRSS"), hwm_kb=proc_status(target.pid, "VmHWM"),
        cpu_s=None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
    )


def classify(outcomes: dict[str, int]) -> tuple[int, dict[str, int], dict[str, int]]:
    ok = outcomes.get("ok", 0)
    refused = {k.removeprefix("refused_"): v for k, v in outcomes.items() if k.startswith("refused_")}
    failures = {k: v for k, v in outcomes.items() if k != "ok" and not k.startswith("refused_")}
    return ok, refused, failures


def rss_growth(p: Pass, total: int) -> tuple[int | None, int | None, float | None]:
    """RSS at the first mark at or past 10 % of the requests, RSS at the end, and the growth between them."""
    warm = next((kb for done, kb in p.rss_kb if done >= total // 10), None)
    end = p.rss_kb[-1][1] if p.rss_kb else None
    if warm is None or end is None:
        return warm, end, None
    return warm, end, (end - warm) / warm


def scan_logs(paths: list[Path], limit: int = 40) -> list[str]:
    found: list[str] = []
    for path in paths:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if LOG_PATTERN.search(line):
                    found.append(f"{path.name}: {line}")
    return found[:limit] + ([f"... and {len(found) - limit} more"] if len(found) > limit else [])


def access_log_counts(data_dir: Path) -> dict[str, object]:
    """What the gateway's access log (all rotated files) says about the chat requests: lines per status."""
    files = sorted(data_dir.glob("logs/**/access.log*"))
    statuses: Counter[str] = Counter()
    lines = 0
    for path in files:
        with contextlib.suppress(OSError), path.open(errors="replace") as f:
            for line in f:
                lines += 1
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if rec.get("path") == "/v1/chat/completions":
                            statuses[str(rec.get("status"))] += 1
                    continue
                fields = line.split()
                if len(fields) > 5 and fields[4] == "/v1/chat/completions":
                    statuses[fields[5]] += 1
    return {"files": len(files), "lines": lines, "chat_by_status": dict(statuses)}


def markdown(passes: dict[str, Pass], total: int) -> tuple[str, dict[str, object]]:
    lines = ["| target | requests | ok | documented 503s | failures | wall (s) | req/s | p50 (ms) | p99 (ms) | "
             "JSON p99 | stream p99 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in passes.values():
        ok, refused, failures = classify(p.outcomes)
        lat = p.latency_ms
        lines.append(f"| {p.target} | {p.requests} | {ok} | {sum(refused.values())} | {sum(failures.values())} | "
                     f"{p.seconds:.1f} | {p.requests / p.seconds:,.0f} | {lat['all']['p50']:.2f} | "
                     f"{lat['all']['p99']:.2f} | {lat['json']['p99']:.2f} | {lat['stream']['p99']:.2f} |")
    g, d = passes["gateway"], passes.get("direct")
    ok, refused, failures = classify(g.outcomes)
    warm, end, growth = rss_growth(g, total)
    verdicts: dict[str, object] = {
        "gateway_failures": failures, "gateway_refusals": refused, "gateway_all_ok": ok == total,
        "rss_warm_kb": warm, "rss_end_kb": end, "rss_growth": growth,
        "rss_growth_met": growth is not None and growth < TARGET_RSS_GROWTH,
    }
    lines += ["", "| check | value | target | verdict |", "| --- | ---: | ---: | --- |"]
    verdict = "met" if ok == total else ("MISSED (documented refusals only)" if not failures else "MISSED")
    lines.append(f"| gateway requests answered 200 and complete | {ok} / {total} | all | {verdict} |")
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(failures.items())) or "none"
    lines.append(f"| gateway failures (by kind) | {sum(failures.values())} ({detail}) | 0 | "
                 f"{'met' if not failures else 'MISSED'} |")
    if refused:
        lines.append(f"| documented 503 refusals | {', '.join(f'{k}: {v}' for k, v in refused.items())} | | |")
    if d is not None:
        _, _, d_fail = classify(d.outcomes)
        added50 = g.latency_ms["all"]["p50"] - d.latency_ms["all"]["p50"]
        added99 = g.latency_ms["all"]["p99"] - d.latency_ms["all"]["p99"]
        verdicts.update({"added_p50_ms": added50, "added_p99_ms": added99, "direct_failures": d_fail})
        lines.append(f"| added p50 latency, gateway - direct | {added50:.2f} ms | (report) | |")
        lines.append(f"| added p99 latency, gateway - direct | {added99:.2f} ms | (report) | |")
        if d_fail:
            lines.append(f"| direct failures (the client or the fake, not the gateway) | {d_fail} | 0 | |")
    if growth is None:
        lines.append("| gateway RSS growth, 10 % mark -> end | not measured | < 10 % | |")
    else:
        lines.append(f"| gateway RSS growth, 10 % mark -> end | {warm / 1024:.1f} -> {end / 1024:.1f} MiB "
                     f"({growth:+.1%}) | < {TARGET_RSS_GROWTH:.0%} | "
                     f"{'met' if growth < TARGET_RSS_GROWTH else 'MISSED'} |")
    late = next((kb for done, kb in g.rss_kb if done >= total * 3 // 4), None)
    if late is not None and end is not None:
        verdicts["rss_growth_last_quarter"] = (end - late) / late
        lines.append(f"| gateway RSS growth, 75 % mark -> end | {late / 1024:.1f} -> {end / 1024:.1f} MiB "
                     f"({(end - late) / late:+.1%}) | (report) | |")
    if g.rss_idle_before_kb and g.rss_idle_after_kb:
        lines.append(f"| gateway RSS idle before load -> 2 s after | {g.rss_idle_before_kb / 1024:.1f} -> "
                     f"{g.rss_idle_after_kb / 1024:.1f} MiB (peak {(g.hwm_kb or 0) / 1024:.1f}) | (report) | |")
    if g.cpu_s is not None:
        lines.append(f"| gateway CPU during the pass | {g.cpu_s:.1f} s ({g.cpu_s / g.seconds:.0%} of a core, "
                     f"{g.cpu_s / max(1, g.requests) * 1e6:.0f} us/request) | (report) | |")
    return "\n".join(lines), verdicts


def queue_metrics(port: int) -> dict[str, object]:
    """The gateway's own view of its admission queue, from /metrics (Prometheus text; summed over label sets)."""
    try:
        status, body = http_status(f"http://127.0.0.1:{port}/metrics?format=prometheus", timeout=10)
    except OSError as exc:
        return {"error": str(exc)}
    if status != 200:
        return {"error": f"/metrics answered {status}"}
    sums: dict[str, float] = {}
    buckets: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        m = METRIC_LINE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "gateway_queue_wait_seconds_bucket":
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                buckets[le.group(1)] = buckets.get(le.group(1), 0.0) + value
        elif name.startswith(("gateway_queue_wait_seconds_", "gateway_rejections")) and not name.endswith("_created"):
            sums[name] = sums.get(name, 0.0) + value
    count = sums.get("gateway_queue_wait_seconds_count", 0.0)
    first = min((b for b in buckets if b != "+Inf"), key=float, default=None)
    wait_sum = sums.get("gateway_queue_wait_seconds_sum")
    out: dict[str, object] = {"admitted": count, "wait_sum_s": None if wait_sum is None else round(wait_sum, 3),
                              "rejections": {k: v for k, v in sums.items() if k.startswith("gateway_rejections")}}
    if count and out["wait_sum_s"] is not None:
        out["mean_wait_ms"] = round(1000 * float(out["wait_sum_s"]) / count, 2)  # type: ignore[arg-type]
    if count and first is not None:
        out[f"share_waited_over_{first}s"] = round(1 - buckets[first] / count, 4)
    return out


def graceful_stop(child: Child, timeout: float = 20.0) -> dict[str, object]:
    """One SIGTERM to the gateway itself, as `docker stop` sends it, and wait for it to exit.

    Processes.stop() would signal the whole process group, and timeout(1) forwards the signal again, so the gateway
    would see a second SIGTERM (its "exit now" signal) and skip its drain and its last log lines.
    """
    pid = child.pid
    started = time.monotonic()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return {"sent": False, "exit_code": child.proc.poll()}
    try:
        code = child.proc.wait(timeout)  # timeout(1) exits with the gateway's own status
    except subprocess.TimeoutExpired:
        return {"sent": True, "exited": False, "seconds": timeout}
    return {"sent": True, "exited": True, "exit_code": code, "seconds": round(time.monotonic() - started, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--stream-pct", type=int, default=30, help="percent of requests that stream (SSE)")
    p.add_argument("--stream-chunks", type=int, default=8, help="content events per fake stream")
    p.add_argument("--parallel", type=int, default=8, help="the gateway's PARALLEL (= MAX_CONCURRENT_REQUESTS)")
    p.add_argument("--max-queue-size", type=int, default=0, help="MAX_QUEUE_SIZE (0 = unbounded)")
    p.add_argument("--queue-timeout", type=float, default=None, help="QUEUE_TIMEOUT (default: the gateway's)")
    p.add_argument("--client-timeout", type=float, default=90.0, help="per request, in the client")
    p.add_argument("--max-seconds", type=float, default=150.0, help="per pass: send no new request after this")
    p.add_argument("--no-direct", action="store_true", help="skip the direct pass")
    p.add_argument("--rate-limit", type=int, default=1_000_000, help="the key's own limit, requests per minute")
    p.add_argument("--no-access-log", action="store_true", help="ACCESS_LOG=false, to measure what it costs")
    p.add_argument("--no-auth", action="store_true",
                   help="AUTH_ENABLED=false (no key check, no rate limiter): to tell the limiter's memory apart")
    p.add_argument("--port-base", type=int, default=19600, help="uses this port + 1..4 on 127.0.0.1")
    args = p.parse_args()
    require_project_venv()
    if not 0 <= args.stream_pct <= 100:
        raise SystemExit("--stream-pct must be 0-100")

    base = args.port_base
    direct_port, gw_port, gw_health, gw_backend = (base + i for i in range(1, 5))
    ensure_free(direct_port, gw_port, gw_health, gw_backend)
    budget = 2 * args.max_seconds + 120  # every server stops by itself after this, whatever happens

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    (tmp / "backend.key").write_text(BACKEND_KEY + "\n")
    (tmp / "api_keys.txt").write_text(f"bench:{CLIENT_KEY}:{args.rate_limit}\n")
    (tmp / "fake.gguf").write_bytes(b"GGUF")  # resolve_model only checks that the file exists
    fake_args = ["--exit-after", f"{budget:.0f}", "--stream-chunks", str(args.stream_chunks)]
    fake_cmd = [sys.executable, str(FAKE_SERVER), "--host", "127.0.0.1", "--port", str(direct_port),
                "--api-key-file", str(tmp / "backend.key"), "--alias", "fake.gguf", *fake_args]
    gw_vars = {
        "DATA_DIR": str(tmp / "data"), "AUTH_ENABLED": "false" if args.no_auth else "true",
        "AUTH_KEYS_FILE": str(tmp / "api_keys.txt"),
        "HOST": "127.0.0.1", "PORT": str(gw_port), "PORT_HEALTH": str(gw_health), "PORT_BACKEND": str(gw_backend),
        "LLAMA_SERVER_BIN": str(FAKE_SERVER), "MODEL_PATH": str(tmp / "fake.gguf"), "EXTRA_ARGS": " ".join(fake_args),
        "PARALLEL": str(args.parallel), "MAX_QUEUE_SIZE": str(args.max_queue_size),
    }
    if args.no_access_log:
        gw_vars["ACCESS_LOG"] = "false"
    if args.queue_timeout is not None:
        gw_vars["QUEUE_TIMEOUT"] = f"{args.queue_timeout:g}"

    info = {**machine(), "commit": git_commit()}
    started = time.monotonic()
    passes: dict[str, Pass] = {}
    shutdown: dict[str, object] = {}
    queue: dict[str, object] = {}
    log_lines: list[str] = []
    kept_log: Path | None = None
    with Processes(tmp) as procs:
        try:
            fake = procs.start("fake-direct", fake_cmd, env=venv_env({}), limit=budget)
            wait_ready(f"http://127.0.0.1:{direct_port}/health", fake, 15)
            gateway = procs.start("gateway", [sys.executable, "-m", "gateway"], env=venv_env(gw_vars), cwd=ROOT,
                                  limit=budget)
            wait_ready(f"http://127.0.0.1:{gw_port}/health", gateway, 60)
            targets = [Target("direct", direct_port, BACKEND_KEY),
                       Target("gateway", gw_port, CLIENT_KEY, pid=gateway.pid)]
            for t in targets:  # each answers a real request before the pass
                status, body = http_status(t.url, {"Authorization": f"Bearer {t.key}",
                                                   "Content-Type": "application/json"}, JSON_BODY)
                if status != 200 or b"chatcmpl-fake" not in body:
                    raise SystemExit(f"{t.name} answered {status}: {body[:300]!r}")
            print(f"ready in {time.monotonic() - started:.1f}s; {args.requests} requests at concurrency "
                  f"{args.concurrency}, {args.stream_pct} % streamed, gateway PARALLEL={args.parallel}",
                  file=sys.stderr)
            for t in targets:
                if t.name == "direct" and args.no_direct:
                    continue
                with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                    passes[t.name] = runner.run(run_pass(t, args))
            queue = queue_metrics(gw_port)
            shutdown = graceful_stop(gateway)
        finally:
            for child in procs.children:
                if child.proc.poll() is not None and child.proc.returncode not in (0, -15):
                    print(f"{child.name} exited with {child.proc.returncode}:\n{tail(child.log)}", file=sys.stderr)
    # The gateway has stopped: its whole output, shutdown included, is in these files.
    logs = [tmp / "gateway.log", *(path for path in sorted((tmp / "data" / "logs").glob("**/*.log"))
                                   if not path.name.startswith("access.log"))]
    access = access_log_counts(tmp / "data")
    log_lines = scan_logs(logs)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if (tmp / "gateway.log").exists():
        kept_log = OUT / f"soak-gateway-{stamp}.log"
        shutil.copyfile(tmp / "gateway.log", kept_log)
    shutil.rmtree(tmp, ignore_errors=True)

    table, verdicts = markdown(passes, args.requests)
    result = {
        "benchmark": "soak",
        "machine": info,
        "config": {"requests": args.requests, "concurrency": args.concurrency, "stream_pct": args.stream_pct,
                   "stream_chunks": args.stream_chunks, "parallel": args.parallel,
                   "max_queue_size": args.max_queue_size, "queue_timeout": args.queue_timeout,
                   "auth": not args.no_auth, "key_rate_limit": args.rate_limit,
                   "access_log": not args.no_access_log,
                   "client": "aiohttp on uvloop, keep-alive", "wall_s": round(time.monotonic() - started, 1)},
        "passes": {name: asdict(p) for name, p in passes.items()},
        "verdicts": verdicts,
        "gateway_queue_metrics": queue,
        "gateway_shutdown": shutdown,
        "gateway_log_matches": log_lines,
        "access_log": access,
        "gateway_log": str(kept_log) if kept_log else None,
    }
    path = OUT / f"soak-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    g = passes["gateway"]
    print("\ngateway RSS (MiB) at each 5 %: "
          + " ".join(f"{kb / 1024:.1f}" for _, kb in g.rss_kb))
    if not args.no_access_log:
        expected = g.requests + 1  # and the one check request before the pass
        print(f"\naccess log: {access['lines']} lines in {access['files']} file(s); chat requests by status "
              f"{access['chat_by_status']} (expected {expected})")
    print(f"\ngateway /metrics on its admission queue (whole run): {queue}")
    ends = tail(kept_log, 1) if kept_log else ""
    print(f"\ngateway shutdown on one SIGTERM: {shutdown}; its log ends with: {ends.strip()!r}")
    print(f"\ngateway log lines matching {LOG_PATTERN.pattern!r}: {len(log_lines) or 'none'}")
    for line in log_lines:
        print(f"  {line}")
    print(f"\nresults: {path}\ngateway log: {kept_log}  (commit {info['commit']}, "
          f"load at start {info['loadavg_at_start']}, wall {time.monotonic() - started:.0f} s)")
    return 0


def _loop_factory():  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
