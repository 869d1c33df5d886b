"""lifecycle/request_rules.py: strict JSON and capped request fields, the rules both lanes and serverless use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from handler.jobs import JobInputError, encode_body, parse_job_input
from lifecycle.request_rules import (
    Limits,
    RequestRejected,
    admit_body,
    check_fields,
    parse_json_object,
    prepare_body,
    slots_needed,
)
from lifecycle.settings import Settings

LIMITS = Limits(max_tokens=512, max_slots=4, max_dry_penalty_last_n=4096)


@pytest.mark.parametrize("body", [
    b'{"temperature": NaN}',
    b'{"temperature": Infinity}',
    b'{"temperature": -Infinity}',
    b'{"temperature": 1e400}',
    b'{"prompt": "\\ud800"}',
    b'{"prompt": "\\udc00 after"}',
    b'{"\\ud83d": 1}',
    '{"prompt": "hi"}'.encode("utf-16"),
    '{"prompt": "hi"}'.encode("utf-32-le"),
    b"\xef\xbb\xbf{}",
    b'{"prompt": "\xff"}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b"[1, 2]",
    b'"text"',
    b"{",
])
def test_strict_json_refuses_what_python_json_would_pass_on(body: bytes) -> None:
    with pytest.raises(RequestRejected) as caught:
        parse_json_object(body)
    assert caught.value.code == "invalid_json"


def test_strict_json_keeps_valid_unicode_and_numbers() -> None:
    body = '{"prompt": "caf\\u00e9 \\ud83d\\ude00 ☕", "temperature": 1e300, "n": 2, "ok": [true, null]}'
    parsed = parse_json_object(body.encode())
    assert parsed["prompt"] == "café 😀 ☕"
    assert parsed["temperature"] == 1e300
    assert parse_json_object(b'{"path": "C:\\\\ud800"}') == {"path": "C:\\ud800"}  # an escaped backslash, no escape


@pytest.mark.parametrize(("body", "param"), [
    ({"n_probs": 100_000}, "n_probs"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 50}, "logprobs"),
    ({"max_tokens": -2}, "max_tokens"),
    ({"max_tokens": 513}, "max_tokens"),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
    ({"n_predict": 1 << 40}, "n_predict"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": 8}, "n"),
    ({"n": 0}, "n"),
    ({"n_cmpl": 5}, "n_cmpl"),
    ({"dry_sequence_breakers": ["x"] * 3000}, "dry_sequence_breakers"),
    ({"dry_sequence_breakers": ["x" * 65]}, "dry_sequence_breakers"),
    ({"dry_sequence_breakers": [1]}, "dry_sequence_breakers"),
    ({"dry_penalty_last_n": 1 << 30}, "dry_penalty_last_n"),
    ({"dry_allowed_length": -1}, "dry_allowed_length"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"samplers": ["top_k"] * 100}, "samplers"),
    ({"logit_bias": {str(i): 1 for i in range(2000)}}, "logit_bias"),
])
def test_unbounded_fields_are_refused_naming_the_field(body: dict, param: str) -> None:
    with pytest.raises(RequestRejected) as caught:
        check_fields(body, LIMITS)
    assert caught.value.param == param
    assert param in str(caught.value)


@pytest.mark.parametrize("body", [
    {}, {"max_tokens": 512}, {"max_tokens": -1}, {"max_tokens": 0}, {"n": 4}, {"n_probs": 20}, {"logprobs": True},
    {"top_logprobs": 20, "logprobs": True}, {"dry_sequence_breakers": ["\n", ":", "\"", "*"]}, {"stop": "END"},
    {"dry_penalty_last_n": -1},
])
def test_ordinary_fields_pass(body: dict) -> None:
    check_fields(body, LIMITS)


def test_slots_needed_counts_parallel_completions() -> None:
    assert slots_needed({}) == 1
    assert slots_needed({"n": 1}) == 1
    assert slots_needed({"n": 3}) == 3
    assert slots_needed({"n_cmpl": 2}) == 2


def test_limits_come_from_settings(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "MAX_TOKENS": "77", "PARALLEL": "6",
                                  "MAX_CONCURRENT_REQUESTS": "3", "CTX": "2048"})
    assert Limits.from_settings(settings) == Limits(max_tokens=77, max_slots=3, max_dry_penalty_last_n=2048)


def test_shared_prompt_cache_off_rewrites_only_what_it_must() -> None:
    raw = b'{"prompt": "hi"}'
    off = Limits(512, 4, 4096, shared_prompt_cache=False)
    assert prepare_body({"prompt": "hi"}, raw, LIMITS) is raw
    assert json.loads(prepare_body({"prompt": "hi"}, raw, off)) == {"prompt": "hi", "cache_prompt": False}
    _, sent, slots, _ = admit_body(b'{"prompt": "caf\xc3\xa9", "n": 2}', off)
    assert json.loads(sent) == {"prompt": "café", "n": 2, "cache_prompt": False} and slots == 2


def test_serverless_jobs_pass_the_same_rules() -> None:
    call = parse_job_input({"prompt": "hi", "sampling_params": {"n_probs": 1000}}, 10_000)
    with pytest.raises(JobInputError, match="n_probs"):
        encode_body(call, LIMITS)
    call = parse_job_input({"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "max_tokens": 10**6}},
                           10_000)
    with pytest.raises(JobInputError, match=r"openai_input\.max_tokens"):
        encode_body(call, LIMITS)
    call = parse_job_input({"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "top_p": float("nan")}},
                           10_000)
    with pytest.raises(JobInputError, match="not valid JSON"):
        encode_body(call, LIMITS)
    call = parse_job_input({"prompt": "hi", "sampling_params": {"max_tokens": 8}}, 10_000)
    assert json.loads(encode_body(call, LIMITS) or b"")["max_tokens"] == 8


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "https://x.io/a.png"}}]}]},
    {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "HTTPS://x.io/a.png"}]}]},
])
def test_media_by_url_is_refused_wherever_it_is(body: dict) -> None:
    with pytest.raises(RequestRejected) as refused:
        admit_body(json.dumps(body).encode(), LIMITS)
    assert refused.value.code == "media_url_not_allowed"


def test_data_urls_and_urls_in_text_pass() -> None:
    ok = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "see https://example.com"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}],
          "tools": [{"type": "function",
                     "function": {"name": "f", "parameters": {"properties": {"url": {"type": "string"}}}}}]}
    assert admit_body(json.dumps(ok).encode(), LIMITS).body == ok


@pytest.mark.parametrize("field", ["id_slot", "lora", "chat_format", "chat_parser", "reasoning_control"])
def test_fields_no_public_client_may_set_are_refused(field: str) -> None:
    with pytest.raises(RequestRejected) as refused:
        admit_body(json.dumps({"prompt": "hi", field: 0}).encode(), LIMITS)
    assert refused.value.code == "field_not_allowed" and refused.value.param == field


def test_anthropic_bodies_get_max_tokens_and_stop_sequences_are_capped() -> None:
    sent = admit_body(b'{"messages": []}', LIMITS, "/v1/messages")
    assert json.loads(sent.raw)["max_tokens"] == LIMITS.max_tokens
    raw = b'{"messages": [], "max_tokens": 5}'
    assert admit_body(raw, LIMITS, "/v1/messages").raw is raw
    with pytest.raises(RequestRejected):
        admit_body(json.dumps({"messages": [], "stop_sequences": ["x"] * 99}).encode(), LIMITS, "/v1/messages")


def test_infill_needs_its_prefix_and_suffix() -> None:
    with pytest.raises(RequestRejected, match="input_prefix"):
        admit_body(b'{"prompt": "x"}', LIMITS, "/infill")
    assert admit_body(b'{"input_prefix": "a", "input_suffix": "b"}', LIMITS, "/infill").slots == 1
