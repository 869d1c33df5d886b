"""The RunPod job handler: one async generator per job, streaming llama-server's output as it arrives.

Output shapes (with `return_aggregate_stream=True` the job's final output is the list of everything yielded):
- openai_route, non-streaming: one item, the route's JSON answer (the OpenAI response object, ...).
- openai_route, streaming: strings of raw SSE events exactly as llama-server sent them, which RunPod's
  OpenAI-compatible route (`/openai/v1/...`) writes straight into its event stream, as RunPod's vLLM worker does
  with RAW_OPENAI_OUTPUT. Chat and completions: `data: {...}\\n\\n`, ending with `data: [DONE]\\n\\n`; the
  Responses API (/v1/responses) and Anthropic's Messages API (/v1/messages): their own `event: ...\\ndata: {...}`
  events, with no [DONE]. Nothing here reads those events.
- native, streaming: text chunks as they are generated.
- native, non-streaming: one item, {"text", "finish_reason", "usage"}.
Anything that goes wrong (bad input, a backend error, a backend that did not become ready in time, a bug here) is
one yielded {"error": "..."}, always the last item, never a raised exception; the worker takes the next job. What
each place makes of it (runpod 1.12):
- the real queue loop (rp_job.handle_job): a yielded dict with a truthy "error" ends the job; the result it posts
  to job-done is {"error": "..."} alone, without the output so far, so RunPod shows the job FAILED.
- the SDK's local API server (rp_fastapi, --rp_serve_api): it only collects the yielded items, so the job is
  COMPLETED with {"error": "..."} as the last item of its output. (A raised exception would be a bare 500 there,
  and a traceback in the queue's error.)
- local test mode (`python -m handler` with test_input.json): `collect` returns {"error": "..."}, the SDK logs the
  job as failed and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from handler.jobs import BackendCall, JobInputError, encode_body, parse_job_input
from lifecycle.backend import Backend, Failure
from lifecycle.request_rules import Limits
from lifecycle.routes import feature_missing, route_of
from lifecycle.settings import Settings
from lifecycle.upstream import Reply, Stream, Upstream, UpstreamError

log = logging.getLogger("handler")

RETRY_PAUSE = 0.25  # seconds between attempts to reach a backend that is restarting


async def sse_batches(resp: Stream) -> AsyncIterator[list[bytes]]:
    """The complete SSE events that have arrived, as a batch each time more bytes arrive."""
    buffer = b""
    while chunk := await resp.read():
        buffer += chunk.replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")
        events = [event for event in events if event.strip()]
        if events:
            yield events
    if buffer.strip():
        yield [buffer]


def _event_json(event: bytes) -> dict[str, Any] | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data == b"[DONE]":
                return None
            try:
                parsed = json.loads(data)
            except ValueError:
                return None
            return parsed if isinstance(parsed, dict) else None
    return None


def _text_of(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    if "message" in choice:
        return choice["message"].get("content") or ""
    return choice.get("text") or ""


def native_result(response: dict[str, Any]) -> dict[str, Any]:
    choice = (response.get("choices") or [{}])[0]
    return {"text": _text_of(choice), "finish_reason": choice.get("finish_reason"), "usage": response.get("usage")}


def _backend_error(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")[:500] or "no details"
    return f"the model backend answered {status}: {message}"


class JobHandler:
    """`run` is the SDK's handler, an async generator function: `async for output in handler.run(job)`."""

    def __init__(self, settings: Settings, backend: Backend, *, backend_wait: float | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.backend_wait = settings.backend_wait if backend_wait is None else backend_wait
        # A native job without max_tokens: JOB_MAX_TOKENS, never above MAX_TOKENS (which would refuse it).
        self.job_max_tokens = min(settings.job_max_tokens, settings.max_tokens)
        self.limits = Limits.from_settings(settings, backend if settings.models else None)
        self._upstreams: dict[asyncio.AbstractEventLoop, Upstream] = {}
        # Called once, when the first job has ended (answered or failed): the cold-start breakdown.
        self.on_first_job: Callable[[], None] | None = None

    def _upstream(self) -> Upstream:
        # One pooled client per event loop: the SDK's API server and worker loop each run their own.
        loop = asyncio.get_running_loop()
        upstream = self._upstreams.get(loop)
        if upstream is None:
            upstream = self.backend.client(max_response_size=self.settings.max_response_size)
            self._upstreams[loop] = upstream
        return upstream

    async def _backend_ready(self, deadline: float) -> bool:
        """A job arriving while the backend (re)starts waits for it, but only until `deadline` (loop time)."""
        loop = asyncio.get_running_loop()
        while not self.backend.ready:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def run(self, job: dict[str, Any]) -> AsyncIterator[Any]:
        job_id = job.get("id", "?")
        try:
            async with aclosing(self._run(job_id, job)) as items:
                async for item in items:
                    yield item
                    if _is_error(item):
                        return  # the job has failed: the SDK reads nothing after it
        except Exception as exc:  # a bug here: still one clear error, not a traceback (queue) or a bare 500 (API)
            log.exception("job %s: the handler failed", job_id)
            yield {"error": f"the worker failed on this job ({exc.__class__.__name__}: {exc})"}
        finally:
            if self.on_first_job is not None:
                first, self.on_first_job = self.on_first_job, None
                first()

    async def _run(self, job_id: str, job: dict[str, Any]) -> AsyncIterator[Any]:
        try:
            call = parse_job_input(job.get("input"), self.settings.max_request_body_size, self.job_max_tokens)
            route = route_of(call.path)
            missing = feature_missing(route, self.settings) if route is not None else None
            if missing is not None:  # EMBEDDINGS or RERANK is off: llama-server would answer a 501
                raise JobInputError(missing)
            body = encode_body(call, self.limits)
        except JobInputError as exc:
            log.info("job %s rejected: %s", job_id, exc)
            yield {"error": str(exc)}
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.backend_wait
        if not await self._backend_ready(deadline):
            yield {"error": self._not_ready()}
            return
        upstream = self._upstream()
        headers = {"Content-Type": "application/json"} if body is not None else None
        while True:
            pid = self.backend.pid
            try:
                if not call.stream:
                    answer: Reply | Stream = await upstream.request(
                        call.method, call.path, body=body, headers=headers)
                else:
                    answer = await upstream.open_stream(call.method, call.path, body=body, headers=headers)
                break
            except UpstreamError as exc:
                failure = await self.backend.classify(exc, pid)
                if failure is not Failure.RESTARTING:
                    # The backend is up and misbehaving (or too slow, or answered too much): never send twice.
                    log.warning("job %s: backend request failed: %s", job_id, exc)
                    yield {"error": str(exc) if failure is Failure.TOO_LARGE else "the model backend did not answer"}
                    return
                # Nobody got anything from it: it died and is being restarted (the supervisor may not have seen the
                # exit yet). Sending again once it is back is safe.
                reason = str(exc)
            # Wait for the restart within BACKEND_WAIT_TIMEOUT, like a job that arrives during it.
            log.info("job %s: backend not reachable (%s); waiting for it", job_id, reason)
            if loop.time() + RETRY_PAUSE < deadline:
                await asyncio.sleep(RETRY_PAUSE)
                if await self._backend_ready(deadline):
                    continue
            yield {"error": self._not_ready()}
            return
        if isinstance(answer, Reply):
            yield self._whole(call, answer)
            return
        error = None
        # A stopped job (RunPod's stop channel, which also carries executionTimeout) is a cancelled task
        # (rp_scale.JobScaler.stop_job). Cancelled while this generator waits on llama-server, the CancelledError
        # leaves `async with answer` and closes the connection. Cancelled while the SDK posts a chunk, this
        # generator sits at a yield that nothing resumes until it is garbage-collected: close the connection as the
        # task ends instead, so llama-server stops generating and frees the slot at once.
        task = asyncio.current_task()
        close = answer.close

        def close_with_task(done: asyncio.Future[object]) -> None:
            if done.cancelled():
                log.info("job %s stopped: closed its backend stream", job_id)
            close()

        if task is not None:
            task.add_done_callback(close_with_task)
        try:
            async with answer:
                try:
                    async for item in self._events(call, answer):
                        if _is_error(item):
                            error = item
                            break
                        yield item
                except UpstreamError as exc:
                    log.warning("job %s: backend broke off: %s", job_id, exc.__class__.__name__)
                    error = {"error": "the model backend broke off its answer"}
        except asyncio.CancelledError:
            log.info("job %s stopped: closed its backend stream", job_id)
            raise
        finally:
            if task is not None:
                task.remove_done_callback(close_with_task)
        if error is not None:  # after the backend connection is closed: the SDK does not resume us after it
            yield error

    def _not_ready(self) -> str:
        return (f"the model backend is {self.backend.state.value} and did not become ready within "
                f"{self.backend_wait:g}s; retry the job")

    @staticmethod
    def _whole(call: BackendCall, reply: Reply) -> Any:
        if reply.status >= 400:
            return {"error": _backend_error(reply.status, reply.body)}
        data = json.loads(reply.body)
        return native_result(data) if call.native else data

    async def _events(self, call: BackendCall, resp: Stream) -> AsyncIterator[Any]:
        if resp.status >= 400:
            yield {"error": _backend_error(resp.status, await resp.read_all())}
            return
        async for events in sse_batches(resp):
            if not call.native:  # raw, whatever the format: OpenAI chunks, Responses or Anthropic events
                yield "".join(event.decode() + "\n\n" for event in events)
                continue
            for event in events:
                parsed = _event_json(event)
                if parsed and parsed.get("error"):
                    yield {"error": _backend_error(500, json.dumps(parsed).encode())}
                    return
                text = "".join(_text_of(c) for c in (parsed or {}).get("choices") or [])
                if text:
                    yield text


def _is_error(item: Any) -> bool:
    """What the SDK's queue loop takes for a failed job (rp_job.handle_job): a dict with a truthy "error"."""
    return isinstance(item, dict) and bool(item.get("error"))


def collect(handler: Callable[[dict[str, Any]], AsyncIterator[Any]]):  # type: ignore[no-untyped-def]
    """The SDK's local test mode awaits a handler instead of iterating it: hand it the aggregate."""

    async def run(job: dict[str, Any]) -> Any:
        outputs = []
        async for item in handler(job):
            if _is_error(item):
                return {"error": item["error"]}  # run_job makes it the result's error: the SDK exits 1
            outputs.append(item)
        return outputs

    return run
