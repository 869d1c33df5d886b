#!/usr/bin/env python3
"""Several models (MODELS=all, MODELS_MAX=1): what the gateway adds to a cold model and to switching models.

Two copies of the real model, `alpha.gguf` and `beta.gguf`, in one temp MODELS_DIR, served three ways:

  gateway  `python -m gateway` with MODELS=all, MODELS_MAX=1, AUTH_ENABLED=false, PARALLEL=1, CTX=2048: it spawns
           llama-server as a router and, for a request whose model is not loaded, asks the router to load it and
           polls GET /models until it is (gateway.pipeline.model_ready -> lifecycle.router.Router.wait_ready)
  router   a second llama-server router that this script starts itself, with the command line and preset file the
           gateway builds (lifecycle.supervisor.router_command / write_preset from the same Settings; only the port
           and the preset's folder differ), the key in LLAMA_API_KEY and LLAMA_CACHE at an empty folder as the
           supervisor passes them; requests go straight to it and it loads the model itself (autoload)
  server   plain `llama-server --model alpha.gguf` with exactly the arguments the router gives its child for that
           model (GET /models `status.args`, only `--port` changed): llama-server's own load time

Every round starts a fresh gateway and a fresh router (nothing loaded; checked), then measures, in a rotating order:

  cold     a streamed chat request (max_tokens 2, `ignore_eos`) for alpha, which is not loaded: request sent ->
           first SSE data event with content, on gateway and router; and for server: process start -> /health 200
           (polled every 10 ms), then its first token
  switch   --switches requests alternating beta, alpha, beta, ... on gateway and router in turn (each one makes
           the router unload the other model and load this one): request sent -> end of the stream

Reported: medians over rounds (cold) and over every request (switch, with p90), the ratios gateway / router and
gateway / server load time, and the seconds the gateway adds (gateway minus router; also the median of the
per-round / per-request paired differences). Target: the gateway adds under 0.2 s to either.

    .venv/bin/python bench/models.py [--rounds 9] [--switches 6] [--max-tokens 2]

About 2 minutes on 2 cores. Everything listens on 127.0.0.1 (ports --port-base + 1..6); every child dies with the
script (PR_SET_PDEATHSIG, process groups) and stops by itself after the run's time budget (timeout(1)).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
from harness import (
    ROOT,
    Child,
    Processes,
    ensure_free,
    git_commit,
    http_status,
    machine,
    median,
    percentile,
    require_files,
    require_project_venv,
    tail,
    venv_env,
    wait_ready,
    write_json,
)
from stream_throughput import default_paths

TARGET_ADDED_S = 0.2
MODELS = ("alpha", "beta")
PROMPT = "Say hi."
DIRECT_KEY = "sk-bench-router-0123456789abcdef"


@dataclass
class Sample:
    kind: str  # cold, switch
    target: str  # gateway, router, server
    round: int
    index: int  # position within the round (switch), 0 for cold
    model: str
    ttft_s: float  # request sent -> first content event
    total_s: float  # request sent -> end of stream
    load_s: float | None = None  # server only: process start -> /health 200
    order: int = 0  # the position among the targets of this step (who went first)
    load_retries: int | None = None  # gateway only: "router: loading X answered N; waiting" lines it logged


def body(model: str, max_tokens: int) -> bytes:
    return json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }).encode()


async def one_stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str], data: bytes,
                     name: str) -> tuple[float, float]:
    """(seconds to the first SSE data event with content, seconds to the end of the stream)."""
    start = time.perf_counter()
    first: float | None = None
    async with session.post(url, data=data, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{name} answered {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                raise RuntimeError(f"{name} stream error: {event['error']}")
            if first is None and any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                first = time.perf_counter()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{name} streamed no content")
    return first - start, end - start


def poll_health(port: int, child: Child, timeout: float, interval: float = 0.01) -> float:
    """perf_counter() when GET /health first answers 200 (a tight poll: this is the measured load time)."""
    deadline = time.perf_counter() + timeout
    url = f"http://127.0.0.1:{port}/health"
    while time.perf_counter() < deadline:
        if child.proc.poll() is not None:
            raise SystemExit(f"{child.name} exited with code {child.proc.returncode}:\n{tail(child.log)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as resp:
            if resp.status == 200:
                return time.perf_counter()
        time.sleep(interval)
    raise SystemExit(f"{child.name} not healthy after {timeout:.0f}s:\n{tail(child.log)}")


def router_models(port: int, key: str | None) -> list[dict[str, object]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, raw = http_status(f"http://127.0.0.1:{port}/models", headers)
    if status != 200:
        raise SystemExit(f"GET /models on {port} answered {status}: {raw[:300]!r}")
    return json.loads(raw)["data"]


def gateway_statuses(port: int) -> dict[str, str]:
    status, raw = http_status(f"http://127.0.0.1:{port}/v1/models")
    if status != 200:
        raise SystemExit(f"gateway GET /v1/models answered {status}: {raw[:300]!r}")
    out = {}
    for entry in json.loads(raw)["data"]:
        st = entry.get("status")
        out[entry["id"]] = st.get("value") if isinstance(st, dict) else str(st)
    return out


def proc_children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def scan_gateway_logs(tmp: Path) -> dict[str, int]:
    """What the gateways logged that bears on the timings: load retries (the router refused a load, e.g. "model
    limit reached", and the gateway asked again), warnings, errors, tracebacks."""
    counts = {"load_retries": 0, "warnings": 0, "errors": 0, "tracebacks": 0}
    for log in tmp.glob("gateway-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            counts["load_retries"] += "router: loading" in line
            counts["warnings"] += "WARNING" in line
            counts["errors"] += "ERROR" in line
            counts["tracebacks"] += line.startswith("Traceback")
    return counts


def stop(procs: Processes, child: Child) -> None:
    procs.stop(child)
    with contextlib.suppress(ValueError):
        procs.children.remove(child)


def summarize(samples: list[Sample]) -> dict[str, object]:
    def pick(kind: str, target: str) -> list[Sample]:
        return [s for s in samples if s.kind == kind and s.target == target]

    cold = {t: pick("cold", t) for t in ("gateway", "router", "server")}
    sw = {t: pick("switch", t) for t in ("gateway", "router")}
    server_load = [s.load_s for s in cold["server"] if s.load_s is not None]
    by_round = {t: {s.round: s.ttft_s for s in cold[t]} for t in ("gateway", "router")}
    cold_paired = [by_round["gateway"][r] - by_round["router"][r] for r in by_round["gateway"]
                   if r in by_round["router"]]
    sw_key = {t: {(s.round, s.index): s.total_s for s in sw[t]} for t in sw}
    retried = [s for s in sw["gateway"] if s.load_retries]
    sw_paired = [sw_key["gateway"][k] - sw_key["router"][k] for k in sw_key["gateway"] if k in sw_key["router"]]
    out: dict[str, object] = {
        "cold": {
            "gateway_ttft_s": median([s.ttft_s for s in cold["gateway"]]),
            "router_ttft_s": median([s.ttft_s for s in cold["router"]]),
            "server_load_s": median(server_load),
            "server_first_token_s": median([s.ttft_s for s in cold["server"]]),
            "server_load_plus_first_token_s": median([(s.load_s or 0) + s.ttft_s for s in cold["server"]]),
            "samples": {t: len(v) for t, v in cold.items()},
            "added_paired_median_s": median(cold_paired),
        },
        "switch": {
            **{f"{t}_{stat}_s": fn([s.total_s for s in sw[t]]) for t in sw
               for stat, fn in (("median", median), ("p90", lambda v: percentile(v, 90)))},
            **{f"{t}_ttft_median_s": median([s.ttft_s for s in sw[t]]) for t in sw},
            "samples": {t: len(v) for t, v in sw.items()},
            "added_paired_median_s": median(sw_paired),
            # the gateway's switches whose load the router refused at first (the gateway asked again after a poll)
            "gateway_with_retries": len(retried),
            "gateway_with_retries_median_s": median([s.total_s for s in retried]),
            "gateway_without_retries_median_s": median([s.total_s for s in sw["gateway"] if not s.load_retries]),
        },
    }
    c, s = out["cold"], out["switch"]
    assert isinstance(c, dict) and isinstance(s, dict)
    c["ratio_gateway_router"] = c["gateway_ttft_s"] / c["router_ttft_s"]
    c["ratio_gateway_server_load"] = c["gateway_ttft_s"] / c["server_load_s"]
    c["added_s"] = c["gateway_ttft_s"] - c["router_ttft_s"]
    s["ratio_gateway_router"] = s["gateway_median_s"] / s["router_median_s"]
    s["added_s"] = s["gateway_median_s"] - s["router_median_s"]
    s["added_p90_s"] = s["gateway_p90_s"] - s["router_p90_s"]
    return out


def verdict(added: float) -> str:
    return "met" if added < TARGET_ADDED_S else f"MISSED by {added - TARGET_ADDED_S:.3f} s"


def markdown(summary: dict[str, object]) -> str:
    c, s = summary["cold"], summary["switch"]
    assert isinstance(c, dict) and isinstance(s, dict)
    n = c["samples"]
    lines = [
        "| cold model (alpha not loaded) | median (s) | samples |",
        "| --- | ---: | ---: |",
        f"| gateway: request -> first token | {c['gateway_ttft_s']:.3f} | {n['gateway']} |",
        f"| router direct: request -> first token | {c['router_ttft_s']:.3f} | {n['router']} |",
        f"| llama-server -m: start -> /health 200 (load time) | {c['server_load_s']:.3f} | {n['server']} |",
        f"| llama-server -m: then request -> first token | {c['server_first_token_s']:.3f} | {n['server']} |",
        f"| llama-server -m: load + first token | {c['server_load_plus_first_token_s']:.3f} | {n['server']} |",
        "",
        "| switching (alternating beta/alpha, MODELS_MAX=1), request -> end of stream | median (s) | p90 (s) | "
        "requests |",
        "| --- | ---: | ---: | ---: |",
        f"| gateway | {s['gateway_median_s']:.3f} | {s['gateway_p90_s']:.3f} | {s['samples']['gateway']} |",
        f"| router direct | {s['router_median_s']:.3f} | {s['router_p90_s']:.3f} | {s['samples']['router']} |",
        "",
        "| ratio | value | target | verdict |",
        "| --- | ---: | ---: | --- |",
        f"| cold: gateway TTFT / router TTFT | {c['ratio_gateway_router']:.3f} | | |",
        f"| cold: gateway TTFT / llama-server load time | {c['ratio_gateway_server_load']:.3f} | | |",
        f"| cold: added s (gateway - router, medians) | {c['added_s']:+.3f} s | < {TARGET_ADDED_S} s | "
        f"{verdict(c['added_s'])} |",
        f"| cold: added s, median of per-round pairs | {c['added_paired_median_s']:+.3f} s | | |",
        f"| switch: gateway / router, median | {s['ratio_gateway_router']:.3f} | | |",
        f"| switch: added s (gateway - router, medians) | {s['added_s']:+.3f} s | < {TARGET_ADDED_S} s | "
        f"{verdict(s['added_s'])} |",
        f"| switch: added s, p90 | {s['added_p90_s']:+.3f} s | | |",
        f"| switch: added s, median of per-request pairs | {s['added_paired_median_s']:+.3f} s | | |",
        "",
        f"gateway switches the router refused to load at first (gateway retried after STATUS_POLL): "
        f"{s['gateway_with_retries']} of {s['samples']['gateway']}, median {s['gateway_with_retries_median_s']:.3f} s "
        f"vs {s['gateway_without_retries_median_s']:.3f} s without",
    ]
    return "\n".join(lines)


async def measure(args: argparse.Namespace, tmp: Path, procs: Processes, ports: dict[str, int],
                  info: dict[str, object]) -> list[Sample]:
    from lifecycle.router import plan
    from lifecycle.settings import Settings
    from lifecycle.supervisor import backend_env, router_command, router_files, write_preset

    models_dir = tmp / "models"
    common = {
        "HOST": "127.0.0.1", "MODELS": "all", "MODELS_DIR": str(models_dir), "MODELS_MAX": "1",
        "PARALLEL": "1", "CTX": str(args.ctx), "AUTH_ENABLED": "false",
        "PORT": str(ports["gateway"]), "PORT_HEALTH": str(ports["gateway_health"]),
    }
    # The direct router: the same Settings the gateway reads, with its own backend port and cache folder.
    settings = Settings.from_env({**common, "DATA_DIR": str(tmp / "router-data"), "PORT_BACKEND": str(ports["router"]),
                                  "LLAMA_GGUF_CACHE_DIR": str(tmp / "router-cache")})
    modelset = plan(settings, Path)
    preset = write_preset(settings, modelset)
    router_cmd = router_command(settings, args.llama_server, preset)
    router_env, _ = backend_env(os.environ, DIRECT_KEY)  # the key as the supervisor passes it
    router_env["LLAMA_CACHE"] = str(router_files(settings)[1])
    gw_env = venv_env({**common, "DATA_DIR": str(tmp / "gateway-data"), "PORT_BACKEND": str(ports["gateway_backend"]),
                       "LLAMA_SERVER_BIN": str(args.llama_server), "LLAMA_GGUF_CACHE_DIR": str(tmp / "gateway-cache")})
    info["router_cmd"] = router_cmd
    info["preset"] = preset.read_text()

    urls = {"gateway": f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions",
            "router": f"http://127.0.0.1:{ports['router']}/v1/chat/completions",
            "server": f"http://127.0.0.1:{ports['server']}/v1/chat/completions"}
    headers = {"Content-Type": "application/json"}
    keyed = {**headers, "Authorization": f"Bearer {DIRECT_KEY}"}
    hdrs = {"gateway": headers, "router": keyed, "server": keyed}
    samples: list[Sample] = []
    server_args: list[str] | None = None
    # A new connection per request for every target (llama-server closes it after a stream anyway).
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                    timeout=aiohttp.ClientTimeout(total=120))

    last_gw: list[Sample] = []
    gw_log_offset = [0]

    def attribute_retries(child: Child) -> None:
        """Count the retry lines the gateway logged since the last look, for its previous request (the log is
        written by a listener thread, so it is read before the next gateway request, and at the round's end)."""
        with child.log.open("rb") as fh:
            fh.seek(gw_log_offset[0])
            new = fh.read()
        gw_log_offset[0] += len(new)
        if last_gw:
            last_gw[-1].load_retries = (last_gw[-1].load_retries or 0) + new.count(b"router: loading")

    def log(sample: Sample) -> None:
        extra = f" load {sample.load_s:.3f}" if sample.load_s is not None else ""
        print(f"  round {sample.round} {sample.kind:<6} {sample.target:<7} {sample.model:<5}{extra} "
              f"ttft {sample.ttft_s:.3f} total {sample.total_s:.3f}", file=sys.stderr)

    try:
        for rnd in range(1, args.rounds + 1):
            last_gw.clear()
            gw_log_offset[0] = 0
            router = procs.start(f"router-{rnd}", router_cmd, env=router_env, limit=args.budget)
            gateway = procs.start(f"gateway-{rnd}", [sys.executable, "-m", "gateway"], env=gw_env, cwd=ROOT,
                                  limit=args.budget)
            wait_ready(f"http://127.0.0.1:{ports['router']}/health", router, 60)
            wait_ready(f"http://127.0.0.1:{ports['gateway']}/health", gateway, 120)
            listed = {m["id"]: m for m in router_models(ports["router"], DIRECT_KEY)}
            if server_args is None:
                status = listed["alpha"]["status"]
                assert isinstance(status, dict)
                server_args = [str(a) for a in status["args"]]
                info["server_args_from_router"] = list(server_args)
                at = server_args.index("--port")
                server_args[at + 1] = str(ports["server"])
            if rnd == 1:  # the gateway's router: the same command line and preset as ours, but for port and folder
                kids = [cmdline(p) for p in proc_children(gateway.pid)]
                gw_cmd = next((c for c in kids if c and c[0] == str(args.llama_server)), [])
                gw_preset = tmp / "gateway-cache" / "router" / str(ports["gateway_backend"]) / "models.ini"
                norm = [str(ports["router"]) if a == str(ports["gateway_backend"]) else
                        str(preset) if a == str(gw_preset) else a for a in gw_cmd]
                info["gateway_router_cmd"] = gw_cmd
                info["same_router_cmd"] = norm == router_cmd
                info["same_preset"] = gw_preset.is_file() and gw_preset.read_text() == preset.read_text()
                if not (info["same_router_cmd"] and info["same_preset"]):
                    print(f"WARNING: the gateway's router differs from ours:\n  {gw_cmd}\n  {router_cmd}",
                          file=sys.stderr)
            loaded = [m for m, st in gateway_statuses(ports["gateway"]).items() if st != "unloaded"]
            loaded += [f"router:{k}" for k, m in listed.items() if (m["status"] or {}).get("value") != "unloaded"]
            if loaded:
                raise SystemExit(f"round {rnd}: not cold, loaded: {loaded}")

            order = ["gateway", "router", "server"]
            order = order[(rnd - 1) % 3:] + order[:(rnd - 1) % 3]
            for pos, target in enumerate(order):
                data = body("alpha", args.max_tokens)
                if target == "server":
                    assert server_args is not None
                    t0 = time.perf_counter()
                    server = procs.start(f"server-{rnd}", server_args, env=router_env, limit=args.budget)
                    ready = poll_health(ports["server"], server, 60)
                    ttft, total = await one_stream(session, urls[target], hdrs[target], data, target)
                    stop(procs, server)
                    sample = Sample("cold", target, rnd, 0, "alpha", ttft, total, ready - t0, pos)
                else:
                    if target == "gateway":
                        attribute_retries(gateway)
                    ttft, total = await one_stream(session, urls[target], hdrs[target], data, target)
                    sample = Sample("cold", target, rnd, 0, "alpha", ttft, total, order=pos)
                    if target == "gateway":
                        sample.load_retries = 0
                        last_gw.append(sample)
                samples.append(sample)
                log(sample)
            for i in range(args.switches):
                model = MODELS[(i + 1) % 2]  # beta, alpha, beta, ...: alpha is loaded after the cold request
                pair = ["gateway", "router"] if (rnd + i) % 2 else ["router", "gateway"]
                for pos, target in enumerate(pair):
                    if target == "gateway":
                        attribute_retries(gateway)
                    ttft, total = await one_stream(session, urls[target], hdrs[target], body(model, args.max_tokens),
                                                   target)
                    sample = Sample("switch", target, rnd, i + 1, model, ttft, total, order=pos)
                    if target == "gateway":
                        sample.load_retries = 0
                        last_gw.append(sample)
                    samples.append(sample)
                    log(sample)
            await asyncio.sleep(0.3)
            attribute_retries(gateway)
            for child in (gateway, router):
                if child.proc.poll() is not None:
                    raise SystemExit(f"{child.name} exited with {child.proc.returncode}:\n{tail(child.log)}")
                stop(procs, child)
    finally:
        await session.close()
    return samples


def main() -> int:
    binary, model = default_paths()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", type=Path, default=binary)
    p.add_argument("--model", type=Path, default=model, help="copied as alpha.gguf and beta.gguf")
    p.add_argument("--rounds", type=int, default=9, help="fresh gateway + router each round; one cold sample each")
    p.add_argument("--switches", type=int, default=6, help="switching requests per path per round")
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--port-base", type=int, default=19700, help="uses this port + 1..6 on 127.0.0.1")
    args = p.parse_args()
    require_project_venv()
    require_files((args.llama_server, "llama-server"), (args.model, "model"))
    args.llama_server = args.llama_server.resolve()
    base = args.port_base
    ports = dict(zip(("gateway", "gateway_health", "gateway_backend", "router", "server", "spare"),
                     range(base + 1, base + 7), strict=True))
    ensure_free(*ports.values())
    args.budget = 60 + args.rounds * (90 + 20 * args.switches)  # every server stops by itself after this

    tmp = Path(tempfile.mkdtemp(prefix="bench-models-"))
    (tmp / "models").mkdir()
    for name in MODELS:  # two files, the same bytes: loads cost the same and both sit in the page cache
        shutil.copyfile(args.model, tmp / "models" / f"{name}.gguf")
    info = machine()
    info["commit"] = git_commit()
    config: dict[str, object] = {"rounds": args.rounds, "switches": args.switches, "max_tokens": args.max_tokens,
                                 "ctx": args.ctx, "model": str(args.model), "llama_server": str(args.llama_server)}
    started = time.monotonic()
    with Processes(tmp) as procs:
        try:
            samples = asyncio.run(measure(args, tmp, procs, ports, config))
        except BaseException:
            for child in procs.children:
                print(f"--- {child.name} log:\n{tail(child.log, 15)}", file=sys.stderr)
            raise
    config["gateway_log"] = scan_gateway_logs(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    config["wall_s"] = round(time.monotonic() - started, 1)

    summary = summarize(samples)
    cold, switch = summary["cold"], summary["switch"]
    assert isinstance(cold, dict) and isinstance(switch, dict)
    result = {
        "benchmark": "models",
        "machine": info,
        "config": config,
        "summary": summary,
        "targets_met": {"cold_added": cold["added_s"] < TARGET_ADDED_S,
                        "switch_added": switch["added_s"] < TARGET_ADDED_S},
        "samples": [asdict(s) for s in samples],
    }
    path = write_json("models", result)
    print(markdown(summary))
    print(f"\nsame router command line and preset as the gateway's: {config.get('same_router_cmd')} / "
          f"{config.get('same_preset')}")
    print(f"gateway logs: {config['gateway_log']}")
    print(f"results: {path}  (wall {config['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
