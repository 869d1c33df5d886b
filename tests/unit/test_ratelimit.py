from __future__ import annotations

from gateway.ratelimit import SlidingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_exact_at_window_edges() -> None:
    clock = Clock()
    limiter = SlidingWindow(60.0, clock)
    for _ in range(3):  # at 1000, 1010, 1020
        assert limiter.check("k", 3).allowed
        clock.now += 10
    denied = limiter.check("k", 3)  # at 1030
    assert not denied.allowed and denied.remaining == 0 and denied.retry_after == 30
    clock.now = 1059.999
    assert not limiter.check("k", 3).allowed
    clock.now = 1060.0  # exactly one window after the first request
    assert limiter.check("k", 3).allowed
    assert not limiter.check("k", 3).allowed  # 1010, 1020 and 1060 are in the window


def test_rejected_requests_use_up_nothing() -> None:
    clock = Clock()
    limiter = SlidingWindow(60.0, clock)
    limiter.check("k", 2)
    clock.now += 30
    limiter.check("k", 2)
    for _ in range(50):
        clock.now += 0.1
        assert not limiter.check("k", 2).allowed
    clock.now = 1000.0 + 60  # the first accepted request leaves the window; the 50 refusals count for nothing
    decision = limiter.check("k", 2)
    assert decision.allowed and decision.remaining == 0


def test_retry_after_and_headers() -> None:
    clock = Clock()
    limiter = SlidingWindow(60.0, clock)
    limiter.check("k", 1)
    clock.now += 20.5
    denied = limiter.check("k", 1)
    assert denied.retry_after == 40  # ceil(39.5)
    headers: dict[str, str] = {}
    denied.apply(headers)
    assert headers["Retry-After"] == "40"
    assert headers["X-RateLimit-Limit"] == "1" and headers["X-RateLimit-Remaining"] == "0"
    assert int(headers["X-RateLimit-Reset"]) == 40
    ok, ok_headers = limiter.check("other", 5), {}
    ok.apply(ok_headers)
    assert ok_headers["X-RateLimit-Remaining"] == "4" and "Retry-After" not in ok_headers


def test_keys_are_independent_and_pruned() -> None:
    clock = Clock()
    limiter = SlidingWindow(60.0, clock)
    limiter.check("a", 1)
    assert limiter.check("b", 1).allowed
    clock.now += 61
    limiter.prune()
    assert limiter._hits == {}


def test_peek_does_not_consume() -> None:
    limiter = SlidingWindow(60.0, Clock())
    for _ in range(5):
        assert limiter.check("ip", 1, consume=False).allowed
    limiter.add("ip")
    assert not limiter.check("ip", 1, consume=False).allowed


def headers_of(decision) -> dict[str, str]:  # type: ignore[no-untyped-def]
    headers: dict[str, str] = {}
    decision.apply(headers)
    return headers


def test_reset_on_a_200_is_when_the_oldest_counted_request_leaves() -> None:
    """X-RateLimit-Reset: seconds until X-RateLimit-Remaining next goes up by one."""
    clock = Clock()
    limiter = SlidingWindow(60.0, clock)
    first = limiter.check("k", 3)  # at 1000: counted, so Remaining goes up again when it leaves at 1060
    assert first.allowed and first.reset == 60.0 and headers_of(first)["X-RateLimit-Reset"] == "60"
    clock.now = 1010.25
    second = limiter.check("k", 3)
    assert second.reset == 49.75 and headers_of(second)["X-RateLimit-Reset"] == "50"  # rounded up
    assert second.remaining == 1 and "Retry-After" not in headers_of(second)
    clock.now = 1060.0  # the first leaves: Remaining is 2 again, and the next to leave is the one at 1010.25
    peek = limiter.check("k", 3, consume=False)
    assert peek.remaining == 2 and peek.reset == 10.25
    assert headers_of(limiter.check("idle", 3, consume=False))["X-RateLimit-Reset"] == "0"  # nothing counted


def test_reset_on_a_429_is_exactly_when_a_request_would_pass_and_retry_after_agrees() -> None:
    """The old 429 said the window length (when the newest request leaves), not when the next one could pass."""
    clock = Clock()
    limiter = SlidingWindow(60.0, clock)
    for at in (1000.0, 1030.0, 1059.0):
        clock.now = at
        assert limiter.check("k", 3).allowed
    clock.now = 1059.5
    refused = limiter.check("k", 3)
    assert not refused.allowed and refused.reset == 0.5  # the request at 1000 leaves at 1060
    headers = headers_of(refused)
    assert headers["X-RateLimit-Reset"] == headers["Retry-After"] == "1"
    clock.now = 1059.999
    assert not limiter.check("k", 3).allowed
    clock.now = 1060.0  # the moment Reset named
    assert limiter.check("k", 3).allowed


def test_retry_after_is_reset_rounded_up_and_at_least_1() -> None:
    clock = Clock()
    limiter = SlidingWindow(60.0, clock)
    limiter.check("k", 1)
    for later, expected in ((0.0, "60"), (20.5, "40"), (59.01, "1"), (59.9999, "1")):
        clock.now = 1000.0 + later
        refused = limiter.check("k", 1)
        headers = headers_of(refused)
        assert headers["Retry-After"] == headers["X-RateLimit-Reset"] == expected
        assert refused.retry_after == int(expected)


def test_a_lowered_limit_waits_for_the_request_that_blocks_the_next_one() -> None:
    clock = Clock()
    limiter = SlidingWindow(60.0, clock)
    for at in (1000.0, 1010.0, 1020.0, 1030.0):
        clock.now = at
        limiter.check("k", 10)
    clock.now = 1040.0
    refused = limiter.check("k", 2)  # 4 counted, limit now 2: the one at 1020 must leave (at 1080)
    assert not refused.allowed and refused.reset == 40.0 and headers_of(refused)["Retry-After"] == "40"
    clock.now = 1080.0
    assert limiter.check("k", 2).allowed
