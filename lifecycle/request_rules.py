"""The rules every JSON request body must pass before it reaches llama-server: in both HTTP lanes and in
serverless mode, through these functions alone.

1. `parse_json_object(body)`: strict JSON. UTF-8 only (no UTF-16/32, no BOM), no NaN/Infinity, no number that
   overflows to infinity (1e400), no lone UTF-16 surrogate escapes, no nesting so deep that it exhausts the parser.
   Python's json module accepts all of those, and llama-server answers them with a 500.
2. `check_fields(body, limits)`: the request fields that cost the backend without bound are capped: max_tokens (and
   its aliases) by MAX_TOKENS, n (completions) by the slots one request may take, logprob counts, DRY sampler
   lists and ranges, stop and sampler lists, logit_bias size; the fields no public client may set (REFUSED_FIELDS)
   are refused. `check_media(body, raw)`: no media by http(s) URL (llama-server would fetch it). `check_route`:
   what one route needs (/infill's prefix and suffix). A refusal names the field.
3. `slots_needed(body)`: how many backend slots a request takes (n > 1 generates n completions in parallel).
4. `choose_model(body, limits)`: with several models (MODELS), the model the request's `model` means
   (lifecycle.router.ModelSet.choose: the default for `any`, empty or missing; a 404 for an unknown name).
5. `prepare_body(body, raw, limits, model)`: the bytes to send; the same bytes unless a setting rewrites the request
   (SHARED_PROMPT_CACHE=false turns llama-server's prompt reuse off for every request; with several models the
   `model` field becomes the chosen model's id, which the router routes on).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from lifecycle.routes import Route, route_of
from lifecycle.settings import Settings

MAX_PROBS = 20  # OpenAI's own cap for top_logprobs; llama-server returns n_probs entries for every token
MAX_DRY_BREAKERS = 32
MAX_DRY_BREAKER_CHARS = 64
MAX_STOP = 16
MAX_SAMPLERS = 16
MAX_LOGIT_BIAS = 1024

# The request field and its aliases, as llama-server reads them (tools/server/server-schema.cpp).
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict", "max_output_tokens")
COMPLETION_COUNT_FIELDS = ("n", "n_cmpl")
# Fields llama-server reads that no client of a public API may set, on any route (docs/API.md, "Never public").
REFUSED_FIELDS = {
    "id_slot": "it pins the request to one backend slot and its cached prompt",
    "lora": "it changes the LoRA adapters' scales",
    "chat_format": "it is an internal parser setting of llama-server",
    "chat_parser": "it loads a parser definition into llama-server",
    "reasoning_control": "it arms /v1/chat/completions/control, which the gateway never serves",
}
STOP_FIELDS = ("stop", "stop_sequences")  # OpenAI's and Anthropic's names for the stop sequences
CHECKED = frozenset({*TOKEN_FIELDS, *COMPLETION_COUNT_FIELDS, "n_probs", "top_logprobs", "logprobs",
                     "dry_sequence_breakers", "dry_penalty_last_n", "dry_allowed_length", *STOP_FIELDS, "samplers",
                     "logit_bias", *REFUSED_FIELDS})
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class RequestRejected(ValueError):
    """A body we refuse with `status` (400 unless said); str() is the message, `param` the field it names (None for
    the whole body), `code` the OpenAI-style error code."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request",
                 status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status


class Chosen(Protocol):
    @property
    def id(self) -> str: ...


class ModelChooser(Protocol):
    """What picks the model of a request (lifecycle.backend.Backend with several models)."""

    def choose(self, requested: object) -> Chosen: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """The settings the rules read, taken from Settings once."""

    max_tokens: int
    max_slots: int  # the most backend slots one request may take (n)
    max_dry_penalty_last_n: int
    shared_prompt_cache: bool = True
    models: ModelChooser | None = None  # several models (MODELS): picks each request's model

    @classmethod
    def from_settings(cls, settings: Settings, models: ModelChooser | None = None) -> Limits:
        return cls(
            max_tokens=settings.max_tokens,
            max_slots=max(1, min(settings.parallel, settings.max_concurrent_requests)),
            max_dry_penalty_last_n=settings.ctx or 1 << 20,  # unset or 0: the model's own, not known here
            shared_prompt_cache=settings.shared_prompt_cache,
            models=models,
        )


# ------------------------------------------------------------------------------------------- strict JSON


def _refuse_constant(name: str) -> Any:
    raise RequestRejected(f"the request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise RequestRejected(f"the request body has a number out of range: {text[:40]}", code="invalid_json")
    return number


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)  # made once, not per body


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or RequestRejected (code invalid_json) saying what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestRejected("the request body is not UTF-8 JSON", code="invalid_json") from None
    try:
        parsed = _DECODER.decode(text)
    except RecursionError:
        raise RequestRejected("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:
        if isinstance(exc, RequestRejected):
            raise
        raise RequestRejected("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise RequestRejected("the request body must be a JSON object", code="invalid_json")
    # A lone surrogate can only come from a \\uD800-\\uDFFF escape; look closer only when one may be there.
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(parsed):
        raise RequestRejected("the request body has a lone UTF-16 surrogate escape (not valid Unicode)",
                              code="invalid_json")
    return parsed


# ------------------------------------------------------------------------------------------- field caps


def _int(body: dict[str, Any], name: str, low: int, high: int, what: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestRejected(f"{name} must be an integer", name)
    if not low <= value <= high:
        raise RequestRejected(f"{name}={value} is not allowed: {what}", name)
    return value


def _list(body: dict[str, Any], name: str, most: int, what: str) -> list[Any] | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RequestRejected(f"{name} must be a list", name)
    if len(value) > most:
        raise RequestRejected(f"{name} has {len(value)} entries; at most {most} {what} are allowed", name)
    return value


def check_fields(body: dict[str, Any], limits: Limits) -> None:
    """Refuse (RequestRejected) the fields that would cost the backend without bound."""
    if CHECKED.isdisjoint(body):
        return  # the usual body: none of them (one set operation, not a look-up per field)
    for name, why in REFUSED_FIELDS.items():
        if name in body:
            raise RequestRejected(f"{name} may not be set: {why}", name, "field_not_allowed")
    for name in TOKEN_FIELDS:
        _int(body, name, -1, limits.max_tokens,
             f"use 1 to {limits.max_tokens} (MAX_TOKENS), or -1 or leave it out for up to MAX_TOKENS")
    for name in COMPLETION_COUNT_FIELDS:
        _int(body, name, 1, limits.max_slots,
             f"one request may generate at most {limits.max_slots} completions (the backend slots it may hold)")
    _int(body, "n_probs", 0, MAX_PROBS, f"use 0 to {MAX_PROBS}")
    _int(body, "top_logprobs", 0, MAX_PROBS, f"use 0 to {MAX_PROBS}")
    logprobs = body.get("logprobs")
    if not isinstance(logprobs, bool):  # chat: true/false; completions: a count
        _int(body, "logprobs", 0, MAX_PROBS, f"use 0 to {MAX_PROBS}")
    breakers = _list(body, "dry_sequence_breakers", MAX_DRY_BREAKERS, "sequence breakers")
    for breaker in breakers or ():
        if not isinstance(breaker, str) or len(breaker) > MAX_DRY_BREAKER_CHARS:
            raise RequestRejected(
                f"dry_sequence_breakers entries must be strings of at most {MAX_DRY_BREAKER_CHARS} characters",
                "dry_sequence_breakers")
    _int(body, "dry_penalty_last_n", -1, limits.max_dry_penalty_last_n,
         f"use -1 (the context) or 0 to {limits.max_dry_penalty_last_n}")
    _int(body, "dry_allowed_length", 0, 1 << 16, "use 0 to 65536")
    for name in STOP_FIELDS:
        _list(body, name, MAX_STOP, "stop sequences")
    _list(body, "samplers", MAX_SAMPLERS, "samplers")
    bias = body.get("logit_bias")
    if isinstance(bias, (dict, list)) and len(bias) > MAX_LOGIT_BIAS:
        raise RequestRejected(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed",
                              "logit_bias")


def slots_needed(body: dict[str, Any]) -> int:
    """Backend slots the request takes while it runs: n (or n_cmpl) completions run side by side.
    Call after check_fields, which bounds it."""
    for name in COMPLETION_COUNT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return 1


def choose_model(body: dict[str, Any], limits: Limits) -> str | None:
    """The id of the model the request is for, with several models; None with one (its `model` is not read)."""
    if limits.models is None:
        return None
    return limits.models.choose(body.get("model")).id


# Where a request names media by URL (chat's image_url, the Responses API's input_image, Anthropic's source.url):
# llama-server with a multimodal model downloads any http(s) URL it is given, from the backend's host.
_MEDIA_URL_KEYS = frozenset({"url", "image_url", "video_url", "audio_url"})


def check_media(body: dict[str, Any], raw: bytes) -> None:
    """Refuse media named by an http(s) URL: llama-server would fetch it from the backend's host, which a public
    API must not let a caller do (server-side request forgery). `data:` URLs (the file itself) pass."""
    if b"://" not in raw:
        return  # the usual body: no URL at all, no walk
    stack: list[Any] = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in _MEDIA_URL_KEYS and isinstance(value, str) and value[:8].lower().startswith(
                        ("http://", "https://")):
                    raise RequestRejected(f"{key}: media given by an http(s) URL is not fetched; send the file "
                                          "itself as a data: URL (base64)", key, "media_url_not_allowed")
                if isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(i for i in item if isinstance(i, dict | list))


def check_route(body: dict[str, Any], route: Route | None) -> None:
    """What one route's body needs beyond the shared rules (llama-server would answer a 500 instead)."""
    if route is None:
        return
    if route.path == "/infill":
        for name in ("input_prefix", "input_suffix"):
            if not isinstance(body.get(name), str):
                raise RequestRejected(f"{name} must be a string (the code before and after the cursor)", name)
        if body.get("prompt") is not None and not isinstance(body["prompt"], str):
            raise RequestRejected("prompt must be a string", "prompt")


def prepare_body(body: dict[str, Any], raw: bytes, limits: Limits, model: str | None = None,
                 route: Route | None = None) -> bytes:
    """What goes to llama-server: `raw` as received, unless a setting changes the request."""
    changes: dict[str, Any] = {}
    if route is not None and route.shape == "anthropic" and route.generates and body.get("max_tokens") is None:
        # Anthropic's API requires it; llama-server would put 4096 in its place, whatever MAX_TOKENS says
        changes["max_tokens"] = limits.max_tokens
    if not limits.shared_prompt_cache and body.get("cache_prompt") is not False:
        changes["cache_prompt"] = False
    if model is not None and body.get("model") != model:
        changes["model"] = model
    if not changes:
        return raw
    return json.dumps({**body, **changes}, ensure_ascii=False, separators=(",", ":")).encode()


class Prepared(NamedTuple):
    body: dict[str, Any]  # the parsed request
    raw: bytes  # the bytes to send
    slots: int  # backend slots it takes
    model: str | None  # the chosen model's id with several models, else None


def admit_body(raw: bytes, limits: Limits, path: str | None = None) -> Prepared:
    """All of the above in order, for a route whose body is a JSON object (`path`: its route, lifecycle.routes)."""
    body = parse_json_object(raw)
    check_fields(body, limits)
    check_media(body, raw)
    route = route_of(path) if path is not None else None
    check_route(body, route)
    model = choose_model(body, limits)
    return Prepared(body, prepare_body(body, raw, limits, model, route), slots_needed(body), model)
