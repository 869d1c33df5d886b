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
