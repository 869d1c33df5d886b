from __future__ import annotations

import re

import pytest

from gateway.requestid import HEADER, MAX_LENGTH, RequestIds

request_id = RequestIds()
new_request_id = request_id.new

GENERATED = re.compile(r"[0-9a-f]{24}")


def test_a_safe_client_id_is_kept_as_is() -> None:
    for value in ("abc", "0f8fad5b-d9cb-469f-a165-70867728950e", "trace:span.1_2", "x" * MAX_LENGTH):
        assert request_id(value) == value


@pytest.mark.parametrize(("header", "expected"), [
    ("abc def", "abcdef"),
    ("req\r\nX-Injected: 1", "reqX-Injected:1"),
    ('"quoted"<tag>', "quotedtag"),
    ("caf\u00e9-42", "caf-42"),
    ("a/b?c=d&e", "abcde"),
])
def test_unsafe_characters_are_dropped(header: str, expected: str) -> None:
    assert request_id(header) == expected


def test_long_ids_are_capped() -> None:
    assert request_id("a" * 1000) == "a" * MAX_LENGTH
    assert request_id(" " * 50 + "b" * 200) == "b" * MAX_LENGTH


@pytest.mark.parametrize("header", [None, "", "   ", "\r\n", "\u00e9\u00e8", "<>\"'{}"])
def test_missing_or_empty_after_cleaning_gets_a_new_id(header: str | None) -> None:
    assert GENERATED.fullmatch(request_id(header))


def test_generated_ids_are_unique() -> None:
    ids = {request_id(None) for _ in range(10_000)}
    assert len(ids) == 10_000
    assert GENERATED.fullmatch(new_request_id())


def test_header_name() -> None:
    assert HEADER == "X-Request-ID"
