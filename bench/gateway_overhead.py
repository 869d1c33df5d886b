#!/usr/bin/env python3
"""The gateway's pure proxy cost: direct vs gateway vs nginx, all in front of the same fast fake llama-server.

Three targets, each answering POST /v1/chat/completions with the same small JSON body:

  direct   bench/fake_llama_server.py on its own port (the floor: what a client gets with no proxy at all)
  gateway  `python -m gateway` with auth on, a keys file in a temp DATA_DIR, and LLAMA_SERVER_BIN = the fake,
           so it spawns and supervises a second, identical fake exactly as it would spawn llama-server
  nginx    nginx (1 worker, upstream keepalive, checks the client key and injects the backend key) in front
           of the direct fake: what a well-built reverse proxy costs on this machine
  nginx-default  the same nginx job as set-up guides usually leave it (access log on, HTTP/1.0 and so a new
           connection to the upstream per request): a reference only; the target is measured against `nginx`

wrk (`--latency`, a Lua script for the POST body and Authorization header) loads each target at concurrency 1
(-t1 -c1) and 32 (-t2 -c32) for a few seconds, alternating targets and rotating their order every round.
The script reports the median over rounds of p50/p99 latency and req/s, and two ratios:

  added p50 latency at c=1, gateway minus direct      target <= 0.3 ms
  gateway req/s / nginx req/s at c=32                  target >= 0.25

Everything listens on 127.0.0.1 only; every child dies with this script (PR_SET_PDEATHSIG, process groups,
cleanup in `finally`) and also stops by itself after the run's time budget (timeout(1); the gateway's own fake
gets --exit-after).

Needs wrk and nginx (Debian: apt-get install -y nginx wrk); run as root, the script installs them itself.

    .venv/bin/python bench/gateway_overhead.py [--rounds 3] [--duration 3] [--profile] [--variant DIR] [--redis]

--redis adds the target `redis`: the current gateway with REDIS_URL set, its limits shared through a real
redis-server (started here on loopback, no persistence; Debian's redis-server, installed when missing), and the
ratio it is judged by, in the same rounds:

  p50 and p99 added by Redis-backed limits over local ones (redis minus gateway), c=1 and c=32
                                                       target <= 0.3 ms p50

--variant DIR adds a target: the gateway run from DIR, a patched copy of gateway/ and lifecycle/, so a
hot-path change is measured against the current code in the same rounds. --key-options '...' gives the current
gateway's key those keys-file options (scopes, budgets: the variant, maybe older code, keeps the plain line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import (
    FAKE_SERVER,
    OUT,
    ROOT,
    Processes,
    ensure_free,
    http_status,
    machine,
    median,
    require_project_venv,
    tail,
    venv_env,
    wait_port,
    wait_ready,
    write_json,
)

BODY = '{"model":"any","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
TARGET_ADDED_P50_MS = 0.3
TARGET_RPS_VS_NGINX = 0.25
TARGET_REDIS_ADDED_P50_MS = 0.3
RESULT_MARK = "WRK_RESULT "

# wrk calls done() once with the merged statistics of all threads; latencies are in microseconds.
WRK_LUA = """
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, ' ..
    '"mean_us": %%.1f, "max_us": %%d, "connect_errors": %%d, "read_errors": %%d, "write_errors": %%d, ' ..
    '"timeouts": %%d, "non_2xx": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.timeout, e.status))
end
"""

NGINX_CONF = """
worker_processes 1;
daemon off;
pid %(tmp)s/nginx.pid;
error_log %(tmp)s/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path %(tmp)s/nginx-body;
  proxy_temp_path %(tmp)s/nginx-proxy;
  fastcgi_temp_path %(tmp)s/nginx-fastcgi;
  uwsgi_temp_path %(tmp)s/nginx-uwsgi;
  scgi_temp_path %(tmp)s/nginx-scgi;
  upstream fake { server 127.0.0.1:%(upstream)d; keepalive 64; }
  server {
    listen 127.0.0.1:%(port)d;
    location / {
      if ($http_authorization != "Bearer %(client_key)s") { return 401; }
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer %(backend_key)s";
    }
  }
  # nginx-default: the same job as most set-up guides configure it: an access log, and HTTP/1.0 to the upstream,
  # so a new upstream connection per request. A reference, not the target's yardstick.
  server {
    listen 127.0.0.1:%(port_default)d;
    access_log %(tmp)s/nginx-access.log;
    location / {
      if ($http_authorization != "Bearer %(client_key)s") { return 401; }
      proxy_pass http://127.0.0.1:%(upstream)d;
      proxy_set_header Authorization "Bearer %(backend_key)s";
    }
  }
}
"""


@dataclass
class Target:
    name: str
    port: int
    key: str
    script: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


@dataclass
class Sample:
    target: str
    concurrency: int
    round: int
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    errors: int
    non_2xx: int


def nginx_bin() -> str | None:
    found = shutil.which("nginx") or "/usr/sbin/nginx"  # /usr/sbin is not on every PATH
    return found if os.access(found, os.X_OK) else None


def ensure_tools(install: bool) -> None:
    missing = [name for name, found in (("wrk", shutil.which("wrk")), ("nginx", nginx_bin())) if not found]
    if not missing:
        return
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} with apt-get ...", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
        return
    raise SystemExit(f"missing {' and '.join(missing)}: apt-get update && apt-get install -y nginx wrk")


def run_wrk(target: Target, concurrency: int, threads: int, duration: float, round_no: int) -> Sample:
    assert target.script is not None
    cmd = ["wrk", f"-t{min(threads, concurrency)}", f"-c{concurrency}", f"-d{duration:g}s", "--latency",
           "--timeout", "5s", "-s", str(target.script), target.url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed on {target.name} (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    r = json.loads(line[len(RESULT_MARK):])
    errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    return Sample(
        target=target.name, concurrency=concurrency, round=round_no, requests=r["requests"],
        rps=r["requests"] / (r["duration_us"] / 1e6),
        p50_ms=r["p50_us"] / 1000, p90_ms=r["p90_us"] / 1000, p99_ms=r["p99_us"] / 1000, mean_ms=r["mean_us"] / 1000,
        errors=errors, non_2xx=r["non_2xx"],
    )


def summarize(samples: list[Sample], targets: list[str], levels: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in targets:
        for c in levels:
            mine = [s for s in samples if s.target == name and s.concurrency == c]
            out.setdefault(name, {})[f"c{c}"] = {
                "p50_ms": median([s.p50_ms for s in mine]),
                "p99_ms": median([s.p99_ms for s in mine]),
                "rps": median([s.rps for s in mine]),
                "errors": sum(s.errors for s in mine),
                "non_2xx": sum(s.non_2xx for s in mine),
            }
    return out


def profile_gateway(gateway_pid: int, target: Target, threads: int, duration: float, py_spy: str) -> Path | None:
    """py-spy on the gateway while wrk loads it at c=32 (sampling pauses it briefly: read shares, not req/s)."""
    OUT.mkdir(parents=True, exist_ok=True)
    raw = OUT / f"gateway_profile-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    spy = subprocess.Popen(
        [py_spy, "record", "--pid", str(gateway_pid), "--duration", str(int(duration)), "--rate", "200",
         "--format", "raw", "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    run_wrk(target, 32, threads, duration, -1)
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if spy.returncode != 0 or not raw.exists():
        print(f"py-spy failed (exit {spy.returncode}): {err.decode(errors='replace')[-500:]}", file=sys.stderr)
        return None
    return raw


def top_functions(raw: Path, limit: int = 25) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) of the event loop thread's samples, line numbers folded into functions.

    Without --native, time inside uvloop's C code (epoll, recv, callbacks' glue) shows as Runner.run's own time.
    """
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        if stack.startswith(("Thread._bootstrap", "_bootstrap (")):
            continue  # idle helper threads (log listener, to_thread pool): only the event loop's time counts
        count = int(count_s)
        total += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + count
    if not total:
        return []
    by_self = sorted(own, key=lambda f: -own[f])[:limit]
    by_incl = [f for f in sorted(incl, key=lambda f: -incl[f]) if f not in by_self][:limit]
    return [(f, 100 * own.get(f, 0) / total, 100 * incl[f] / total) for f in by_self + by_incl]


def ratios_for(summary: dict[str, dict[str, dict[str, float]]], name: str) -> dict[str, float]:
    mine, direct, nginx = summary[name], summary["direct"], summary["nginx"]
    return {
        "added_p50_ms_c1": mine["c1"]["p50_ms"] - direct["c1"]["p50_ms"],
        "rps_over_nginx_c32": mine["c32"]["rps"] / nginx["c32"]["rps"],
        "rps_over_direct_c32": mine["c32"]["rps"] / direct["c32"]["rps"],
    } | ({"rps_over_nginx_default_c32": mine["c32"]["rps"] / summary["nginx-default"]["c32"]["rps"]}
         if "nginx-default" in summary else {})


def redis_ratios(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """What Redis-backed limits add over the same gateway's local ones."""
    redis, local = summary["redis"], summary["gateway"]
    return {f"added_{q}_ms_c{c}": redis[f"c{c}"][f"{q}_ms"] - local[f"c{c}"][f"{q}_ms"]
            for c in (1, 32) for q in ("p50", "p99")} | {
        "rps_over_local_c32": redis["c32"]["rps"] / local["c32"]["rps"]}


def redis_markdown(r: dict[str, float]) -> str:
    lines = ["| Redis-backed limits vs local (redis - gateway) | value | target | verdict |",
             "| --- | ---: | ---: | --- |"]
    for c in (1, 32):
        added = r[f"added_p50_ms_c{c}"]
        lines.append(f"| added p50, c={c} | {added:.3f} ms | <= {TARGET_REDIS_ADDED_P50_MS} ms | "
                     f"{'met' if added <= TARGET_REDIS_ADDED_P50_MS else 'MISSED'} |")
        lines.append(f"| added p99, c={c} | {r[f'added_p99_ms_c{c}']:.3f} ms | | |")
    lines.append(f"| req/s redis / local, c=32 | {r['rps_over_local_c32']:.3f} | | |")
    return "\n".join(lines)


def redis_server_bin(install: bool) -> str:
    found = shutil.which("redis-server")
    if found is None and install and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "redis-server"], check=True,
                       stdout=subprocess.DEVNULL)
        found = shutil.which("redis-server")
    if found is None:
        raise SystemExit("--redis needs redis-server (Debian: apt-get install -y redis-server)")
    return found


def markdown(summary: dict[str, dict[str, dict[str, float]]], ratios: dict[str, dict[str, float]],
             levels: list[int]) -> str:
    lines = ["| target | concurrency | p50 (ms) | p99 (ms) | req/s | errors / non-2xx |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in levels:
        for name, by_level in summary.items():
            s = by_level[f"c{c}"]
            lines.append(f"| {name} | {c} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {s['rps']:,.0f} | "
                         f"{s['errors']:.0f} / {s['non_2xx']:.0f} |")
    lines += ["", "| ratio | value | target | verdict |", "| --- | ---: | ---: | --- |"]
    for name, r in ratios.items():
        added, rel = r["added_p50_ms_c1"], r["rps_over_nginx_c32"]
        if name.startswith("nginx"):
            lines.append(f"| {name} added p50 vs direct, c=1 (reference) | {added:.3f} ms | | |")
            if name != "nginx":
                lines.append(f"| {name} req/s / nginx req/s, c=32 (reference) | {rel:.3f} | | |")
            continue
        lines += [
            f"| {name} added p50 vs direct, c=1 | {added:.3f} ms | <= {TARGET_ADDED_P50_MS} ms | "
            f"{'met' if added <= TARGET_ADDED_P50_MS else f'MISSED by {added - TARGET_ADDED_P50_MS:.3f} ms'} |",
            f"| {name} req/s / nginx req/s, c=32 | {rel:.3f} | >= {TARGET_RPS_VS_NGINX} | "
            f"{'met' if rel >= TARGET_RPS_VS_NGINX else f'MISSED ({rel / TARGET_RPS_VS_NGINX:.0%} of target)'} |",
            f"| {name} req/s / direct req/s, c=32 (reference) | {r['rps_over_direct_c32']:.3f} | | |",
        ]
        if "nginx-default" in summary:
            plain = r["rps_over_nginx_default_c32"]
            lines.append(f"| {name} req/s / nginx-default req/s, c=32 (reference) | {plain:.3f} | | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    p.add_argument("--threads", type=int, default=2, help="wrk threads for the c=32 runs")
    p.add_argument("--port-base", type=int, default=19400, help="uses this port + 1..9 on 127.0.0.1")
    p.add_argument("--no-install", action="store_true", help="never apt-get install nginx/wrk")
    p.add_argument("--profile", action="store_true", help="after the rounds, py-spy the gateway under c=32 load")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "", help="py-spy binary for --profile")
    p.add_argument("--variant", type=Path, default=None,
                   help="a folder holding a patched copy of gateway/ and lifecycle/: adds a 'variant' target, "
                        "measured in the same rounds, to A/B a hot-path change")
    p.add_argument("--key-options", default="",
                   help="keys-file options for the 'gateway' target's key only (the variant gets the plain line), "
                        "e.g. 'models=fake*,other-* tokens_per_minute=1000000000 max_concurrent=1000'")
    p.add_argument("--redis", action="store_true",
                   help="adds a 'redis' target: this gateway with REDIS_URL (a redis-server started here)")
    args = p.parse_args()
    require_project_venv()
    ensure_tools(not args.no_install)
    redis_bin = redis_server_bin(not args.no_install) if args.redis else None
    levels = [1, 32]
    roots = ({"gateway": ROOT} | ({"variant": args.variant.resolve()} if args.variant else {})
             | ({"redis": ROOT} if args.redis else {}))
    for name, root in roots.items():
        if not (root / "gateway" / "__main__.py").is_file():
            raise SystemExit(f"{name}: no gateway/__main__.py under {root}")

    base = args.port_base
    direct_port, nginx_port, nginx_default_port = base + 1, base + 2, base + 9
    gw_ports = {name: (base + 3 + 3 * i, base + 4 + 3 * i, base + 5 + 3 * i) for i, name in enumerate(roots)}
    redis_port = base + 30
    ensure_free(direct_port, nginx_port, nginx_default_port, *(port for ports in gw_ports.values() for port in ports),
                *([redis_port] if args.redis else []))
    n_targets = 3 + len(roots)
    runs = args.rounds * len(levels) * n_targets + n_targets + (1 if args.profile else 0)
    budget = runs * (args.duration + 2) + 120  # every server stops by itself after this, whatever happens

    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    backend_key = "sk-bench-backend-0123456789abcdef"
    client_key = "sk-bench-client-0123456789abcdef"
    (tmp / "backend.key").write_text(backend_key + "\n")
    (tmp / "api_keys.txt").write_text(f"bench:{client_key}\n")
    (tmp / "api_keys-gateway.txt").write_text(f"bench:{client_key} {args.key_options}".rstrip() + "\n")
    (tmp / "fake.gguf").write_bytes(b"GGUF")  # resolve_model only checks that the file exists
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / f"nginx-{sub}").mkdir()

    env = venv_env({})
    fake_cmd = [sys.executable, str(FAKE_SERVER), "--host", "127.0.0.1", "--port", str(direct_port),
                "--api-key-file", str(tmp / "backend.key"), "--alias", "fake.gguf"]

    def gateway_env(name: str) -> dict[str, str]:
        port, health, backend = gw_ports[name]
        return venv_env({
            "DATA_DIR": str(tmp / f"data-{name}"), "AUTH_ENABLED": "true",
            "AUTH_KEYS_FILE": str(tmp / ("api_keys-gateway.txt" if name == "gateway" else "api_keys.txt")),
            "HOST": "127.0.0.1", "PORT": str(port), "PORT_HEALTH": str(health), "PORT_BACKEND": str(backend),
            "LLAMA_SERVER_BIN": str(FAKE_SERVER), "MODEL_PATH": str(tmp / "fake.gguf"),
            "EXTRA_ARGS": f"--exit-after {budget:.0f}",
            # The fake has no slots to protect: admission and rate limits must not be what we measure.
            "PARALLEL": "32", "MAX_CONCURRENT_REQUESTS": "32", "MAX_QUEUE_SIZE": "64",
            "MAX_REQUESTS_PER_MINUTE": "1000000000",
            "PYTHONPATH": str(roots[name]),  # the variant's packages shadow the editable install
        } | ({"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"} if name == "redis" else {}))

    nginx_conf = tmp / "nginx.conf"
    nginx_conf.write_text(NGINX_CONF % {"tmp": tmp, "upstream": direct_port, "port": nginx_port,
                                        "port_default": nginx_default_port,
                                        "client_key": client_key, "backend_key": backend_key})

    targets = [Target("direct", direct_port, backend_key)]
    targets += [Target(name, gw_ports[name][0], client_key) for name in roots]
    targets += [Target("nginx", nginx_port, client_key), Target("nginx-default", nginx_default_port, client_key)]
    for t in targets:
        t.script = tmp / f"{t.name}.lua"
        t.script.write_text(WRK_LUA % {"body": BODY, "key": t.key, "mark": RESULT_MARK})

    info = machine()
    samples: list[Sample] = []
    profile: list[tuple[str, float, float]] = []
    profile_path: Path | None = None
    with Processes(tmp) as procs:
        try:
            fake = procs.start("fake-direct", fake_cmd, env=env, limit=budget)
            wait_ready(f"http://127.0.0.1:{direct_port}/health", fake, 15)
            nginx_cmd = [nginx_bin() or "nginx", "-p", str(tmp), "-c", str(nginx_conf)]
            nginx = procs.start("nginx", nginx_cmd, env=env, limit=budget)
            wait_port(nginx_port, nginx, 15)
            if redis_bin is not None:
                redis = procs.start("redis-server", [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1",
                                                     "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                    env=env, limit=budget)
                wait_port(redis_port, redis, 15)
            gateways = {}
            for name, root in roots.items():
                gateways[name] = procs.start(name, [sys.executable, "-m", "gateway"], env=gateway_env(name),
                                             cwd=root, limit=budget)
            for name, child in gateways.items():
                wait_ready(f"http://127.0.0.1:{gw_ports[name][0]}/health", child, 60)
            for t in targets:  # each target answers a real request before we time it
                status, body = http_status(t.url, {"Authorization": f"Bearer {t.key}",
                                                   "Content-Type": "application/json"}, BODY.encode())
                if status != 200 or b"chatcmpl-fake" not in body:
                    raise SystemExit(f"{t.name} answered {status}: {body[:300]!r}")
            print(f"targets ready; {args.rounds} rounds x c={levels} x {len(targets)} targets x {args.duration:g}s",
                  file=sys.stderr)
            for t in targets:
                run_wrk(t, 32, args.threads, 1, 0)  # warm-up: connections, pools, caches
            for rnd in range(1, args.rounds + 1):
                order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                for c in levels:
                    for t in order:
                        s = run_wrk(t, c, args.threads, args.duration, rnd)
                        samples.append(s)
                        print(f"  round {rnd} c={c:<2} {t.name:<8} p50 {s.p50_ms:7.3f} ms  {s.rps:9,.0f} req/s"
                              + (f"  errors {s.errors} non-2xx {s.non_2xx}" if s.errors or s.non_2xx else ""),
                              file=sys.stderr)
            if args.profile:
                if not args.py_spy:
                    print("--profile: py-spy not found (pip install py-spy, or pass --py-spy)", file=sys.stderr)
                else:
                    profile_path = profile_gateway(gateways["gateway"].pid, targets[1], args.threads,
                                                   args.duration * 2, args.py_spy)
                    if profile_path is not None:
                        profile = top_functions(profile_path)
        finally:
            for child in procs.children:
                if child.proc.poll() is not None and child.proc.returncode not in (0, -15):
                    print(f"{child.name} exited with {child.proc.returncode}:\n{tail(child.log)}", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(samples, [t.name for t in targets], levels)
    ratios = {name: ratios_for(summary, name) for name in [*roots, "nginx", "nginx-default"]}
    table = markdown(summary, ratios, levels)
    shared = redis_ratios(summary) if args.redis else None
    if shared is not None:
        table += "\n\n" + redis_markdown(shared)
    result = {
        "benchmark": "gateway_overhead",
        "machine": info,
        "config": {"rounds": args.rounds, "duration_s": args.duration, "threads_c32": args.threads,
                   "roots": {name: str(root) for name, root in roots.items()}, "body": BODY, "nginx_workers": 1},
        "summary": summary,
        "ratios": ratios,
        "targets_met": {
            name: {"added_p50_c1": r["added_p50_ms_c1"] <= TARGET_ADDED_P50_MS,
                   "rps_vs_nginx_c32": r["rps_over_nginx_c32"] >= TARGET_RPS_VS_NGINX}
            for name, r in ratios.items() if not name.startswith("nginx")
        },
        "redis": None if shared is None else {
            "ratios": shared, "target_met_added_p50": all(shared[f"added_p50_ms_c{c}"] <= TARGET_REDIS_ADDED_P50_MS
                                                          for c in (1, 32))},
        "samples": [asdict(s) for s in samples],
        "profile_top": [{"frame": f, "self_pct": round(a, 2), "incl_pct": round(b, 2)} for f, a, b in profile],
    }
    path = write_json("gateway_overhead", result)
    print(table)
    if profile:
        print("\ngateway profile under c=32 load (py-spy; top functions by own time, then by inclusive time):")
        print("| self % | incl % | frame |\n| ---: | ---: | --- |")
        for frame, own, incl in profile:
            print(f"| {own:.1f} | {incl:.1f} | `{frame}` |")
        print(f"\nraw collapsed stacks: {profile_path}")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
