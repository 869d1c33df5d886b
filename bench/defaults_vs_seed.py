#!/usr/bin/env python3
"""Our defaults vs the old project's: 8 concurrent streaming clients through the gateway, real llama-server and the
default model, configuration A (the gateway's own defaults: PARALLEL unset, so its default, and
MAX_CONCURRENT_REQUESTS = PARALLEL) against configuration B (PARALLEL=1 and MAX_CONCURRENT_REQUESTS=1, the old
project's defaults: one llama-server slot and one request at a time). `--a-parallel N` pins A's PARALLEL instead.

Two gateways, each spawning and supervising its own llama-server from the same binary, model and CTX, with auth
on and a per-key rate limit far above the load. Both stay up for the whole run; the load alternates between them,
the order swapped every round, and an idle llama-server uses no CPU. What each llama-server says about its slots
(`n_slots`, `n_ctx_slot`) is printed as proof of the configuration. Each measurement is a batch: `--clients`
clients, each sending `--per-client` streamed chat completions one after another (max_tokens 64, temperature 0,
seed 42, `ignore_eos` so every answer is exactly max_tokens long, `stream_options.include_usage` for the token
count; the request and client code are stream_throughput.py's). Reported per configuration:

  tokens/s     completion tokens of the batch / the batch's wall time; median over rounds
  TTFT         request sent -> first non-empty content delta (queueing in the gateway included: that is what a
               client waits); median and p90 over every request of every round

and the ratios A/B tokens/s (target >= 1.2) and B/A median TTFT (target >= 3). Verdicts are printed, never turned
into an exit code.

With more clients than slots, clients queue in the gateway in both configurations, and the TTFT ratio is then
bounded by the throughput ratio: with N closed-loop clients, C slots in A and one in B, TTFT is about the time to
answer the requests queued ahead, so B/A TTFT ~ (N - 1) / (N - C) x (A/B tokens/s).

    .venv/bin/python bench/defaults_vs_seed.py [--rounds 4] [--clients 8] [--per-client 3] [--a-parallel N]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import aiohttp
from harness import (
    ROOT,
    Processes,
    ensure_free,
    git_commit,
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
from stream_throughput import Batch, Target, default_paths, request_body, run_batch

TARGET_TPS_RATIO = 1.2
TARGET_TTFT_RATIO = 3.0
CLIENT_KEY = "sk-bench-client-0123456789abcdef"
NAMES = ("A", "B")
OLD_DEFAULTS = {"PARALLEL": "1", "MAX_CONCURRENT_REQUESTS": "1"}  # B: the old project's defaults
SLOT_LINE = re.compile(r"n_slots|n_ctx_slot|n_ctx_seq|--parallel|n_parallel")


async def measure(targets: list[Target], args: argparse.Namespace) -> tuple[list[Batch], int]:
    body = request_body(args.max_tokens)
    batches: list[Batch] = []
    deadline = time.monotonic() + args.max_seconds
    # A new connection per request for both, as in stream_throughput.py (llama-server closes after each stream).
    sessions = {t.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                              timeout=aiohttp.ClientTimeout(total=300)) for t in targets}
    rounds_done = 0
    try:
        for t in targets:  # warm-up: connections, prompt cache, page faults; every slot once
            await run_batch(sessions[t.name], t, 4, 1, body, 0)
        for rnd in range(1, args.rounds + 1):
            if time.monotonic() > deadline:
                print(f"  stopping after {rounds_done} rounds: --max-seconds reached", file=sys.stderr)
                break
            for t in (targets if rnd % 2 else targets[::-1]):
                batch, _ = await run_batch(sessions[t.name], t, args.clients, args.per_client, body, rnd)
                batches.append(batch)
                print(f"  round {rnd} {t.name}: {batch.tokens_per_s:6.1f} tok/s, TTFT median "
                      f"{median(batch.ttft_ms):7.1f} ms  ({batch.requests} requests, {batch.tokens} tokens, "
                      f"{batch.seconds:.1f} s)", file=sys.stderr)
            rounds_done = rnd
    finally:
        for session in sessions.values():
            await session.close()
    return batches, rounds_done


def summarize(batches: list[Batch]) -> dict[str, dict[str, float]]:
    out = {}
    for name in NAMES:
        mine = [b for b in batches if b.target == name]
        ttfts = [x for b in mine for x in b.ttft_ms]
        out[name] = {
            "tokens_per_s": median([b.tokens_per_s for b in mine]),
            "tokens_per_s_pooled": sum(b.tokens for b in mine) / sum(b.seconds for b in mine),
            "ttft_median_ms": median(ttfts),
            "ttft_p90_ms": percentile(ttfts, 90),
            "ttft_min_ms": min(ttfts),
            "ttft_max_ms": max(ttfts),
            "requests": sum(b.requests for b in mine),
            "tokens": sum(b.tokens for b in mine),
        }
    return out


def markdown(summary: dict[str, dict[str, float]], ratios: dict[str, float], clients: int,
             label: dict[str, str]) -> str:
    lines = [f"| configuration ({clients} streaming clients) | tokens/s (median of rounds) | tokens/s (pooled) | "
             "TTFT median (ms) | TTFT p90 (ms) | requests |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary.items():
        lines.append(f"| {label[name]} | {s['tokens_per_s']:.1f} | {s['tokens_per_s_pooled']:.1f} | "
                     f"{s['ttft_median_ms']:.0f} | {s['ttft_p90_ms']:.0f} | {s['requests']:.0f} |")
    tps, ttft = ratios["tps_ratio"], ratios["ttft_ratio"]
    lines += ["", "| ratio | value | target | verdict |", "| --- | ---: | ---: | --- |",
              f"| A/B tokens/s (paired per round: {ratios['tps_ratio_paired_median']:.2f}) | {tps:.2f} | "
              f">= {TARGET_TPS_RATIO} | {'met' if tps >= TARGET_TPS_RATIO else 'MISSED'} |",
              f"| B/A median TTFT (paired per round: {ratios['ttft_ratio_paired_median']:.2f}) | {ttft:.2f} | "
              f">= {TARGET_TTFT_RATIO} | {'met' if ttft >= TARGET_TTFT_RATIO else 'MISSED'} |"]
    return "\n".join(lines)


def slot_lines(log_dir: Path) -> list[str]:
    """What llama-server itself said about its slots and their context (proof of the configuration)."""
    found = []
    for path in sorted(log_dir.glob("**/*server*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if SLOT_LINE.search(line):
                found.append(line.strip())
    return found[:6]


def main() -> int:
    binary, model = default_paths()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", type=Path, default=binary)
    p.add_argument("--model", type=Path, default=model)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=3, help="sequential requests per client in a batch")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ctx", type=int, default=4096, help="CTX for both")
    p.add_argument("--a-parallel", type=int, default=None, help="pin A's PARALLEL (default: the gateway's default)")
    p.add_argument("--threads", type=int, default=0, help="THREADS, llama-server -t (0: its default)")
    p.add_argument("--max-seconds", type=float, default=150, help="start no new round after this")
    p.add_argument("--port-base", type=int, default=19800, help="uses this port + 1..6 on 127.0.0.1")
    args = p.parse_args()
    require_project_venv()
    require_files((args.llama_server, "llama-server"), (args.model, "model"))

    base = args.port_base
    ports = {name: (base + 1 + 3 * i, base + 2 + 3 * i, base + 3 + 3 * i) for i, name in enumerate(NAMES)}
    ensure_free(*(port for trio in ports.values() for port in trio))
    budget = args.max_seconds + 300  # every server stops by itself after this, whatever happens

    tmp = Path(tempfile.mkdtemp(prefix="bench-defaults-"))
    (tmp / "api_keys.txt").write_text(f"bench:{CLIENT_KEY}:1000000\n")
    common = {
        "HOST": "127.0.0.1", "LLAMA_SERVER_BIN": str(args.llama_server), "MODEL_PATH": str(args.model),
        "CTX": str(args.ctx), "NGL": "0", "THREADS": str(args.threads),
        "AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(tmp / "api_keys.txt"), "MAX_REQUESTS_PER_MINUTE": "1000000",
    }
    configs = {"A": {} if args.a_parallel is None else {"PARALLEL": str(args.a_parallel)}, "B": OLD_DEFAULTS}
    envs = {name: {**common, **extra, "DATA_DIR": str(tmp / f"data-{name}"), "PORT": str(ports[name][0]),
                   "PORT_HEALTH": str(ports[name][1]), "PORT_BACKEND": str(ports[name][2])}
            for name, extra in configs.items()}
    targets = [Target(name, ports[name][0], CLIENT_KEY) for name in NAMES]
    from lifecycle.settings import Settings

    resolved = {name: Settings.from_env(env) for name, env in envs.items()}  # what each gateway will run with
    label = {name: f"{name}: PARALLEL={r.parallel}, MAX_CONCURRENT_REQUESTS={r.max_concurrent_requests}"
             + {"A": " (ours)" if args.a_parallel is None else " (pinned)", "B": " (old)"}[name]
             for name, r in resolved.items()}

    info = {**machine(), "commit": git_commit()}
    started = time.monotonic()
    slots: dict[str, list[str]] = {}
    with Processes(tmp) as procs:
        try:
            gateways = {name: procs.start(f"gateway-{name}", [sys.executable, "-m", "gateway"],
                                          env=venv_env(env), cwd=ROOT, limit=budget) for name, env in envs.items()}
            for name, child in gateways.items():
                wait_ready(f"http://127.0.0.1:{ports[name][0]}/health", child, 180)
            print(f"both ready in {time.monotonic() - started:.1f}s; {args.rounds} rounds x {args.clients} clients "
                  f"x {args.per_client} requests x {args.max_tokens} tokens; {label['A']} vs {label['B']}",
                  file=sys.stderr)
            batches, rounds_done = asyncio.run(measure(targets, args))
        finally:
            for child in procs.children:
                if child.proc.poll() is not None and child.proc.returncode not in (0, -15):
                    print(f"{child.name} exited with {child.proc.returncode}:\n{tail(child.log)}", file=sys.stderr)
        slots = {name: slot_lines(tmp / f"data-{name}") for name in NAMES}
    shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(batches)
    a, b = summary["A"], summary["B"]
    by_round = {(x.target, x.round): x for x in batches}
    paired = [(by_round[("A", r)], by_round[("B", r)]) for r in range(1, rounds_done + 1)]
    ratios = {
        "tps_ratio": a["tokens_per_s"] / b["tokens_per_s"],
        "ttft_ratio": b["ttft_median_ms"] / a["ttft_median_ms"],
        "tps_ratio_paired_median": median([ra.tokens_per_s / rb.tokens_per_s for ra, rb in paired]),
        "ttft_ratio_paired_median": median([median(rb.ttft_ms) / median(ra.ttft_ms) for ra, rb in paired]),
    }
    table = markdown(summary, ratios, args.clients, label)
    result = {
        "benchmark": "defaults_vs_seed",
        "machine": info,
        "config": {"rounds": args.rounds, "rounds_done": rounds_done, "clients": args.clients,
                   "per_client": args.per_client, "max_tokens": args.max_tokens, "ctx": args.ctx,
                   "threads": args.threads, "env_overrides": configs, "labels": label,
                   "resolved": {name: {"parallel": r.parallel, "max_concurrent_requests": r.max_concurrent_requests,
                                       "max_queue_size": r.max_queue_size, "queue_timeout": r.queue_timeout}
                                for name, r in resolved.items()},
                   "wall_s": round(time.monotonic() - started, 1)},
        "llama_server_slot_lines": slots,
        "summary": summary,
        "ratios": ratios,
        "targets_met": {"tps_ratio": ratios["tps_ratio"] >= TARGET_TPS_RATIO,
                        "ttft_ratio": ratios["ttft_ratio"] >= TARGET_TTFT_RATIO},
        "batches": [asdict(x) for x in batches],
    }
    path = write_json("defaults_vs_seed", result)
    print(table)
    for name, lines in slots.items():
        print(f"\nllama-server {name} said: " + ("\n  ".join(["", *lines]) if lines else "(no slot lines found)"))
    print(f"\nresults: {path}  (commit {info['commit']}, load at start {info['loadavg_at_start']}, "
          f"wall {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
