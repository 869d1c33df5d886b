"""A small stand-in for RunPod's job queue, so the SDK's real worker loop can be tested end to end.

It hands out jobs on job-take (long-polling, as the real one does), plays the stop channel (job-stop, which
runpod >= 1.10 long-polls next to job-take: 204 for nothing to stop, else {"jobsToStop": [ids]}), both for a job
stopped by the test (`stop_job`, as a user's /cancel) and for one past its execution timeout (`put(...,
execution_timeout=s)`, which RunPod enforces on its side and signals the same way), and records every stream chunk
and final output the worker posts back, with arrival times.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from typing import Any

from aiohttp import web


class FakeRunPodQueue:
    def __init__(self) -> None:
        self.port = 0
        self.streams: dict[str, list[tuple[float, Any]]] = defaultdict(list)
        self.done: dict[str, Any] = {}
        self.taken: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.auth: set[str] = set()
        self.stop_requested: dict[str, float] = {}  # job id -> when stop_job() was called
        self.stop_sent: dict[str, float] = {}  # job id -> when a job-stop answer carried it to the worker
        self._pending: list[dict[str, Any]] = []
        self._to_stop: list[str] = []
        self._timeouts: dict[str, float] = {}  # job id -> its execution timeout, seconds from job-take
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # --- what the worker is pointed at -------------------------------------------------------------
    def env(self) -> dict[str, str]:
        base = f"http://127.0.0.1:{self.port}/v2/test-endpoint"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_AI_API_KEY": "fake-runpod-key",
            "RUNPOD_POD_ID": "test-worker",
            # The SDK's start-up checks probe the internet (a TCP connect to a public DNS server): never here.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    # --- test side ---------------------------------------------------------------------------------
    def put(self, job_id: str, job_input: dict[str, Any], execution_timeout: float | None = None) -> None:
        """Queue a job; with `execution_timeout`, the stop channel signals it that many seconds after it was taken
        (if it has not finished), as RunPod does for an endpoint's or job's executionTimeout."""
        with self._cond:
            self._pending.append({"id": job_id, "input": job_input})
            if execution_timeout is not None:
                self._timeouts[job_id] = execution_timeout

    def stop_job(self, job_id: str) -> None:
        """Signal the job to the worker on the stop channel (at its next poll), as RunPod does for /cancel."""
        with self._cond:
            self.stop_requested[job_id] = time.monotonic()
            self._to_stop.append(job_id)

    def wait_stop_sent(self, job_id: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        with self._cond:
            while job_id not in self.stop_sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no stop signal for {job_id} went out")
                self._cond.wait(left)
            return self.stop_sent[job_id]

    def wait_done(self, job_id: str, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while job_id not in self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} not finished; streams so far: {dict(self.streams)}")
                self._cond.wait(left)
            return self.done[job_id]

    def chunks(self, job_id: str) -> list[Any]:
        return [output for _, output in self.streams[job_id]]

    # --- server side -------------------------------------------------------------------------------
    def _take(self, count: int) -> list[dict[str, Any]]:
        with self._cond:
            jobs, self._pending = self._pending[:count], self._pending[count:]
            for job in jobs:
                self.taken[job["id"]] = time.monotonic()
            return jobs

    async def _job_take(self, request: web.Request) -> web.Response:
        self.auth.add(request.headers.get("Authorization", ""))
        batch = "job-take-batch" in request.path
        count = int(request.query.get("batch_size", "1")) if batch else 1
        for _ in range(20):  # hold the long poll up to 1 s, as the real queue does
            jobs = self._take(count)
            if jobs:
                return web.json_response(jobs if batch else jobs[0])
            await asyncio.sleep(0.05)
        return web.Response(status=204)

    def _stops(self) -> list[str]:
        now = time.monotonic()
        with self._cond:
            for job_id, limit in list(self._timeouts.items()):
                if job_id in self.taken and now - self.taken[job_id] >= limit:
                    del self._timeouts[job_id]
                    if job_id not in self.done:
                        self._to_stop.append(job_id)
            stops, self._to_stop = self._to_stop, []
            for job_id in stops:
                self.stop_sent[job_id] = now
            if stops:
                self._cond.notify_all()
            return stops

    async def _job_stop(self, request: web.Request) -> web.Response:
        self.auth.add(request.headers.get("Authorization", ""))
        for _ in range(20):  # a long poll, held up to 1 s (the SDK waits 1 s more after an empty one)
            stops = self._stops()
            if stops:
                return web.json_response({"jobsToStop": stops})
            await asyncio.sleep(0.05)
        return web.Response(status=204)

    async def _posted(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        body = json.loads(await request.text())
        with self._cond:
            if request.match_info["kind"] == "job-stream":
                self.streams[job_id].append((time.monotonic(), body.get("output")))
            else:
                self.done[job_id] = body
                self.finished[job_id] = time.monotonic()
            self._cond.notify_all()
        return web.json_response({})

    def start(self) -> FakeRunPodQueue:
        app = web.Application()
        app.router.add_get("/v2/test-endpoint/job-take/{worker}", self._job_take)
        app.router.add_get("/v2/test-endpoint/job-take-batch/{worker}", self._job_take)
        app.router.add_get("/v2/test-endpoint/job-stop/{worker}", self._job_stop)
        app.router.add_post("/v2/test-endpoint/{kind:job-done|job-stream}/{worker}/{job}", self._posted)
        self._runner = web.AppRunner(app, access_log=None)
        self._thread.start()

        async def up() -> int:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self.port = asyncio.run_coroutine_threadsafe(up(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
