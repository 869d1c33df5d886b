from __future__ import annotations

import logging

import pytest

from gateway.auth import bearer_token, parse_keys


def test_seed_format(caplog: pytest.LogCaptureFixture) -> None:
    text = (
        "# keys\n\nprod:sk-prod-abcdef0123456789\n"
        "limited:sk-lim-abcdef0123456789:10:2030-01-01\nshort:abc\nnocolon\n"
    )
    with caplog.at_level(logging.WARNING):
        ring = parse_keys(text)
    assert len(ring) == 2
    assert ring.match("sk-prod-abcdef0123456789") == "prod"
    assert ring.match("sk-lim-abcdef0123456789") == "limited"
    assert ring.match("sk-nope") is None
    assert "line 5" in caplog.text and "line 6" in caplog.text
    assert "sk-" not in caplog.text and ":abc" not in caplog.text


def test_bearer() -> None:
    assert bearer_token("Bearer sk-1") == "sk-1"
    assert bearer_token("bearer  sk-1 ") == "sk-1"
    assert bearer_token("sk-1") == "sk-1"
    assert bearer_token("") == ""
