#!/usr/bin/env python3
"""Serverless cold start: what `python -m handler` adds to llama-server's own start, page cache cold and warm.

Each round measures, for the default model, in a rotating order:

  server   plain llama-server with the command line the supervisor builds (lifecycle.supervisor.backend_command
           from a Settings of the same environment; only the port differs) and the key in LLAMA_API_KEY:
           process start -> /health 200 (polled every 10 ms) = its own time to ready; then one completion
           (max_tokens 1) -> answered = its time to a first answer
  worker   `python -m handler --test_input '{"input": {"prompt": ..., "sampling_params": {"max_tokens": 1}}}'`
           (the SDK's local test mode, RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true): process start -> its cold-start
           breakdown line on its output (logged when the first job's answer is handed to the SDK), and -> exit;
           the breakdown itself (imports, settings, provision, llama-server ready, sdk, first job) is recorded

once with the page cache cold (the model file and the llama-server binary evicted just before, with
posix_fadvise(DONTNEED); Python's own files stay cached) and once warm (right after). Reported: medians, the ratio
worker / server and the seconds the worker adds (worker first job - server first answer; and worker first job -
server ready, the issue's measure). Target: the worker adds under 0.5 s to llama-server's own start.

    .venv/bin/python bench/cold_start.py [--rounds 5]

About 1 minute on 2 cores. Everything listens on 127.0.0.1 (ports --port-base + 1..2); children die with the
script (PR_SET_PDEATHSIG, process groups) and stop by themselves after the run's time budget (timeout(1)).
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
import threading
import time
from pathlib import Path

from harness import (
    ROOT,
    Processes,
    ensure_free,
    git_commit,
    http_status,
    machine,
    median,
    require_files,
    require_project_venv,
    tail,
    venv_env,
    write_json,
)
from stream_throughput import default_paths

TARGET_ADDED_S = 0.5
KEY = "sk-bench-coldstart-0123456789abcdef"
PROMPT = "Hi"
JOB = {"input": {"prompt": PROMPT, "sampling_params": {"max_tokens": 1, "temperature": 0}}}
BREAKDOWN = re.compile(r"cold start: (?P<stages>imports .*?) after process start")
STAGE = re.compile(r"(?P<name>[a-z][a-z -]*?) (?P<s>\d+\.\d+)s")


def evict(*paths: Path) -> None:
    """Drop the files' clean pages from the page cache (what a fresh machine or a reclaimed cache looks like)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """The share of the file in the page cache (mincore), to check that an eviction took; None if unknown."""
    import ctypes
    import mmap

    size = path.stat().st_size
    if size == 0:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
            page = mmap.PAGESIZE
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            buf = (ctypes.c_char * size).from_buffer(m)
            try:
                if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) != 0:
                    return None
            finally:
                del buf  # before the mmap closes
            return sum(b & 1 for b in vec) / pages
    except (OSError, ValueError, TypeError, BufferError):
        return None


def server_round(args: argparse.Namespace, procs: Processes, cmd: list[str], env: dict[str, str],
                 name: str) -> dict[str, float]:
    url = f"http://127.0.0.1:{args.server_port}"
    t0 = time.perf_counter()
    child = procs.start(name, cmd, env=env, limit=args.budget)
    deadline = t0 + 120
    while True:
        if child.proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {child.proc.returncode}:\n{tail(child.log)}")
        try:
            if http_status(url + "/health", timeout=2.0)[0] == 200:
                break
        except OSError:
            pass
        if time.perf_counter() > deadline:
            raise SystemExit(f"llama-server not ready:\n{tail(child.log)}")
        time.sleep(0.01)
    ready = time.perf_counter() - t0
    body = json.dumps({"prompt": PROMPT, "max_tokens": 1, "temperature": 0}).encode()
    status, answer = http_status(url + "/v1/completions", data=body, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    if status != 200:
        raise SystemExit(f"llama-server answered {status}: {answer[:300]!r}")
    first = time.perf_counter() - t0
    procs.stop(child)
    procs.children.remove(child)
    return {"ready_s": ready, "first_answer_s": first}


def worker_round(args: argparse.Namespace, env: dict[str, str], log: Path) -> dict[str, object]:
    cmd = ["timeout", "-k", "5", f"{args.budget:.0f}", sys.executable, "-m", "handler",
           "--test_input", json.dumps(JOB)]
    seen: dict[str, float] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "breakdown" not in seen and BREAKDOWN.search(line):
                seen["breakdown"] = time.perf_counter() - t0
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait(args.budget + 10)
    exited = time.perf_counter() - t0
    reader.join(5)
    log.write_text("".join(lines))
    text = "".join(lines)
    match = BREAKDOWN.search(text)
    if code != 0 or match is None or "breakdown" not in seen:
        raise SystemExit(f"the worker exited with {code} (breakdown line: {match is not None}):\n{text[-3000:]}")
    stages = {m["name"].strip(): float(m["s"]) for m in STAGE.finditer(match["stages"])}
    return {"first_job_s": seen["breakdown"], "exit_s": exited, "stages": stages}


def main() -> int:
    binary, model = default_paths()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", type=Path, default=binary)
    p.add_argument("--model", type=Path, default=model)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--parallel", type=int, default=None, help="PARALLEL for both (default: unset, the project's)")
    p.add_argument("--port-base", type=int, default=19800, help="uses this port + 1..2 on 127.0.0.1")
    args = p.parse_args()
    require_project_venv()
    require_files((args.llama_server, "llama-server"), (args.model, "model"))
    args.llama_server, args.model = args.llama_server.resolve(), args.model.resolve()
    args.server_port, worker_backend = args.port_base + 1, args.port_base + 2
    ensure_free(args.server_port, worker_backend)
    args.budget = 120

    sys.path.insert(0, str(ROOT))
    from lifecycle.settings import Settings
    from lifecycle.supervisor import backend_command, backend_env

    tmp = Path(tempfile.mkdtemp(prefix="bench-coldstart-"))
    common = {"CTX": str(args.ctx), "MODEL_PATH": str(args.model),
              "LLAMA_SERVER_BIN": str(args.llama_server), "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
              "RUNPOD_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    if args.parallel is not None:
        common["PARALLEL"] = str(args.parallel)
    settings = Settings.from_env({**common, "DATA_DIR": str(tmp / "server-data"),
                                  "PORT_BACKEND": str(args.server_port)})
    server_cmd = backend_command(settings, args.llama_server, args.model)
    server_env, _ = backend_env(os.environ, KEY)
    worker_env = venv_env({**common, "DATA_DIR": str(tmp / "worker-data"), "PORT_BACKEND": str(worker_backend)})
    for name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_REALTIME_PORT", "MODE"):
        worker_env.pop(name, None)

    info = machine()
    info["commit"] = git_commit()
    model_mib = args.model.stat().st_size / 2**20
    config = {"rounds": args.rounds, "ctx": args.ctx, "parallel": settings.parallel, "model": str(args.model),
              "model_mib": round(model_mib, 1), "llama_server": str(args.llama_server), "server_cmd": server_cmd,
              "job": JOB}
    samples: list[dict[str, object]] = []
    started = time.monotonic()
    with Processes(tmp) as procs:
        for r in range(args.rounds):
            order = ("server", "worker") if r % 2 == 0 else ("worker", "server")
            for cache in ("cold", "warm"):
                for target in order:
                    resident = None
                    if cache == "cold":
                        evict(args.model, args.llama_server)
                        resident = resident_fraction(args.model)
                    if target == "server":
                        sample: dict[str, object] = server_round(args, procs, server_cmd, server_env,
                                                                 f"server-{r}-{cache}")
                    else:
                        sample = worker_round(args, worker_env, tmp / f"worker-{r}-{cache}.log")
                    sample.update(round=r, cache=cache, target=target, model_resident_before=resident)
                    samples.append(sample)
                    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in sample.items()}
                    print(f"  {shown}", flush=True)
    config["wall_s"] = round(time.monotonic() - started, 1)
    shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(samples)
    result = {"benchmark": "cold_start", "machine": info, "config": config, "summary": summary,
              "targets_met": {c: summary[c]["added_vs_ready_s"] < TARGET_ADDED_S for c in ("cold", "warm")},
              "samples": samples}
    path = write_json("cold_start", result)
    print(markdown(summary, args.rounds))
    print(f"\nresults: {path}  (wall {config['wall_s']:.0f} s)")
    return 0


def summarize(samples: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for cache in ("cold", "warm"):
        server = [s for s in samples if s["cache"] == cache and s["target"] == "server"]
        worker = [s for s in samples if s["cache"] == cache and s["target"] == "worker"]
        ready = median([float(s["ready_s"]) for s in server])  # type: ignore[arg-type]
        answer = median([float(s["first_answer_s"]) for s in server])  # type: ignore[arg-type]
        first = median([float(s["first_job_s"]) for s in worker])  # type: ignore[arg-type]
        exited = median([float(s["exit_s"]) for s in worker])  # type: ignore[arg-type]
        names = list(worker[0]["stages"]) if worker else []  # type: ignore[call-overload]
        stages = {n: median([float(s["stages"][n]) for s in worker]) for n in names}  # type: ignore[index]
        own = stages.get("llama-server ready", 0.0) - stages.get("provision", 0.0)
        out[cache] = {
            "server_ready_s": ready, "server_first_answer_s": answer, "worker_first_job_s": first,
            "worker_exit_s": exited, "worker_stages_s": stages, "worker_llama_server_own_s": own,
            "ratio_vs_ready": first / ready, "ratio_vs_first_answer": first / answer,
            "added_vs_ready_s": first - ready, "added_vs_first_answer_s": first - answer,
            "samples": len(worker),
        }
    return out


def verdict(added: float) -> str:
    return "met" if added < TARGET_ADDED_S else "NOT met"


def markdown(summary: dict[str, dict[str, object]], rounds: int) -> str:
    lines = [f"| median of {rounds} rounds (s) | page cache cold | warm |", "| --- | ---: | ---: |"]

    def row(label: str, key: str, fmt: str = "{:.3f}") -> None:
        lines.append(f"| {label} | {fmt.format(summary['cold'][key])} | {fmt.format(summary['warm'][key])} |")

    row("llama-server: start -> /health 200 (its own time to ready)", "server_ready_s")
    row("llama-server: start -> first answer (max_tokens 1)", "server_first_answer_s")
    row("worker: start -> first job answered (breakdown line)", "worker_first_job_s")
    row("worker: start -> exit (local test mode)", "worker_exit_s")
    for name in summary["warm"]["worker_stages_s"]:  # type: ignore[union-attr]
        cold_v = summary["cold"]["worker_stages_s"].get(name, float("nan"))  # type: ignore[union-attr]
        warm_v = summary["warm"]["worker_stages_s"][name]  # type: ignore[index]
        lines.append(f"| worker breakdown: {name} (since process start) | {cold_v:.3f} | {warm_v:.3f} |")
    row("worker: its llama-server's start (ready - provision)", "worker_llama_server_own_s")
    row("ratio worker first job / llama-server ready", "ratio_vs_ready")
    row("ratio worker first job / llama-server first answer", "ratio_vs_first_answer")
    row("added s: worker first job - llama-server ready", "added_vs_ready_s", "{:+.3f}")
    row("added s: worker first job - llama-server first answer", "added_vs_first_answer_s", "{:+.3f}")
    lines.append(f"| target: added < {TARGET_ADDED_S} s (vs ready) | {verdict(summary['cold']['added_vs_ready_s'])} "
                 f"| {verdict(summary['warm']['added_vs_ready_s'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
