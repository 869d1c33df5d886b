"""Job input: the two formats a RunPod job may carry, validated into one backend request.

1. Pass-through, as RunPod's vLLM worker takes it: {"openai_route": "/v1/chat/completions", "openai_input": {...}},
   for every route the gateway serves (lifecycle.routes.JSON_ROUTES: OpenAI's, the Responses API, Anthropic's
   Messages API, rerank, tokenize, infill, ...) and GET /v1/models. `openai_input` is the body, sent as it is.
2. Native: {"messages": [...]} or {"prompt": "..."} with optional "sampling_params" and "stream". Without
   sampling_params.max_tokens a native job generates at most JOB_MAX_TOKENS (never more than MAX_TOKENS); an
   openai_route body is left as it is (without a max_tokens-like field: up to MAX_TOKENS, llama-server's -n).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lifecycle.request_rules import Limits, RequestRejected, admit_body
from lifecycle.routes import JSON_ROUTES

MODELS_ROUTE = "/v1/models"  # GET, no body
OPENAI_ROUTES = (*JSON_ROUTES, MODELS_ROUTE)

# Sampling parameters llama-server understands, with the JSON types each accepts.
_NUMBER = (int, float)
SAMPLING_PARAMS: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "top_k": (int,),
    "min_p": _NUMBER,
    "typical_p": _NUMBER,
    "stop": (str, list),
    "seed": (int,),
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "repeat_penalty": _NUMBER,
    "repeat_last_n": (int,),
    "ignore_eos": (bool,),
    "n_probs": (int,),
    "grammar": (str,),
    "json_schema": (dict,),
    "response_format": (dict,),
    "logit_bias": (dict, list),
}
_NATIVE_KEYS = {"messages", "prompt", "sampling_params", "stream", "model"}


class JobInputError(ValueError):
    """A job input we refuse; str() is the error the job result carries."""


@dataclass(frozen=True)
class BackendCall:
    """What to send to llama-server for one job, and how to shape what comes back."""

    method: str
    path: str
    body: dict[str, Any] | None
    stream: bool
    native: bool  # shape output as text chunks / {"text", "finish_reason", "usage"}


def _is_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not a number
    return isinstance(value, types)


def _stream_flag(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise JobInputError(f"{where} must be true or false")
    return value


def parse_job_input(job_input: Any, max_size: int, job_max_tokens: int | None = None) -> BackendCall:
    """The backend call of one job. `job_max_tokens`: the max_tokens a native job gets when it gives none
    (None: none added)."""
    if not isinstance(job_input, dict):
        raise JobInputError("job input must be a JSON object")
    size = len(json.dumps(job_input, separators=(",", ":")).encode())
    if size > max_size:
        raise JobInputError(f"job input is {size} bytes, over the limit of {max_size} (MAX_REQUEST_BODY_SIZE)")
    if "openai_route" in job_input:
        return _openai(job_input)
    return _native(job_input, job_max_tokens)


def _openai(job_input: dict[str, Any]) -> BackendCall:
    route = job_input["openai_route"]
    if not isinstance(route, str) or route not in OPENAI_ROUTES:
        raise JobInputError(f"unknown openai_route {route!r}: use one of {', '.join(OPENAI_ROUTES)}")
    if route == MODELS_ROUTE:
        return BackendCall("GET", route, None, stream=False, native=False)
    body = job_input.get("openai_input")
    if not isinstance(body, dict):
        raise JobInputError(f"openai_input must be a JSON object with the request body of {route}")
    stream = _stream_flag(body.get("stream"), "openai_input.stream")
    # Only a generating route streams: any other answers one JSON object, whatever `stream` says.
    return BackendCall("POST", route, body, stream=stream and JSON_ROUTES[route].generates, native=False)


def _native(job_input: dict[str, Any], job_max_tokens: int | None) -> BackendCall:
    unknown = sorted(set(job_input) - _NATIVE_KEYS)
    if unknown:
        raise JobInputError(
            f"unknown input keys {', '.join(unknown)}: use messages or prompt, sampling_params, stream, model "
            "(or openai_route with openai_input)"
        )
    messages, prompt = job_input.get("messages"), job_input.get("prompt")
    if messages is None and prompt is None:
        raise JobInputError("job input needs messages (a chat) or prompt (a text completion)")
    if messages is not None and prompt is not None:
        raise JobInputError("give either messages or prompt, not both")
    params = job_input.get("sampling_params")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise JobInputError("sampling_params must be a JSON object")
    bad = sorted(set(params) - set(SAMPLING_PARAMS))
    if bad:
        raise JobInputError(f"unknown sampling_params {', '.join(bad)}: allowed are {', '.join(SAMPLING_PARAMS)}")
    for key, value in params.items():
        if not _is_type(value, SAMPLING_PARAMS[key]):
            allowed = " or ".join(t.__name__ for t in SAMPLING_PARAMS[key])
            raise JobInputError(f"sampling_params.{key} must be {allowed}, not {type(value).__name__}")
    stream = _stream_flag(job_input.get("stream"), "stream")
    body: dict[str, Any] = {**params, "stream": stream}
    if job_max_tokens is not None and params.get("max_tokens") is None:
        body["max_tokens"] = job_max_tokens  # JOB_MAX_TOKENS: not on to MAX_TOKENS (or the end of the context)
    if job_input.get("model") is not None:
        body["model"] = job_input["model"]  # with several models (MODELS), the one the job is for
    if stream:
        body["stream_options"] = {"include_usage": True}
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise JobInputError("messages must be a non-empty list of {role, content} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
                raise JobInputError(f"messages[{i}] must be an object with a role and content")
        body["messages"] = messages
        return BackendCall("POST", "/v1/chat/completions", body, stream=stream, native=True)
    if not isinstance(prompt, str) or not prompt:
        raise JobInputError("prompt must be a non-empty string")
    body["prompt"] = prompt
    return BackendCall("POST", "/v1/completions", body, stream=stream, native=True)


def encode_body(call: BackendCall, limits: Limits) -> bytes | None:
    """The bytes to send for `call`, after the same body rules as the HTTP gateway (lifecycle.request_rules):
    strict JSON and capped fields. Raises JobInputError naming what is wrong."""
    if call.body is None:
        return None
    try:
        raw = json.dumps(call.body, allow_nan=False, ensure_ascii=False).encode()
    except ValueError:  # NaN or Infinity (Python's json reads them), or a lone surrogate
        raise JobInputError("job input has a value that is not valid JSON (NaN, Infinity or a lone surrogate)") \
            from None
    try:
        return admit_body(raw, limits, call.path).raw
    except RequestRejected as exc:
        if call.native and exc.param == "max_tokens":  # a native job that leaves it out gets JOB_MAX_TOKENS
            raise JobInputError(
                f"sampling_params.max_tokens={call.body.get('max_tokens')} is not allowed: use 1 to "
                f"{limits.max_tokens} (MAX_TOKENS), or -1 for up to MAX_TOKENS; left out, the job gets "
                "JOB_MAX_TOKENS") from None
        where = ("" if exc.param == "model" and call.native else "sampling_params." if call.native and exc.param
                 else "openai_input." if exc.param else "")
        raise JobInputError(str(exc) if not exc.param else f"{where}{exc}") from None
