"""gateway.scopes and gateway.guard: what a key may use, its token budgets and concurrency (gateway.auth.charge)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import Admitted, KeyRing, Refused, charge, finished, verdict
from gateway.guard import Guard, TokenWindow
from gateway.keyfile import DEFAULT_ROUTES, GROUPS, KeyEntry, digest, parse_keys, parse_line
from gateway.routes import ADMIN_ROUTES, JSON_ROUTES
from gateway.scopes import group_of, model_allowed, model_refusal, route_refusal
from lifecycle.settings import Settings

KEY = "sk-scopes-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def entry(options: str = "") -> KeyEntry:
    return parse_line(f"k:{KEY} {options}".strip())


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"DATA_DIR": str(tmp_path), "PASSTHROUGH_ROUTES": "/props"}, probe_roots=[])


def test_every_route_a_key_can_reach_has_a_group() -> None:
    assert {group_of(path) for path in JSON_ROUTES} == {"inference", "embeddings", "tokenize"}
    assert group_of("/v1/chat/completions") == group_of("/v1/messages/count_tokens") == "inference"
    assert group_of("/v1/embeddings") == group_of("/v1/rerank") == "embeddings"
    assert group_of("/apply-template") == "tokenize"
    assert {group_of(path) for path in (*ADMIN_ROUTES, "/reload")} == {"admin"}
    assert group_of("/metrics") == "metrics"
    assert group_of("/v1/models") is None and group_of("/v1/models/x") is None  # every key lists models
    assert group_of("/slots") is None and group_of("/slots", ("/slots",)) == "metrics"  # only once opened
    assert group_of("/props", ("/props",)) == "inference"


def test_default_groups_and_refusals_name_what_is_allowed() -> None:
    plain = entry()
    assert plain.groups == DEFAULT_ROUTES
    assert route_refusal(plain, "/v1/chat/completions") is None and route_refusal(plain, "/v1/embeddings") is None
    refused = route_refusal(plain, "/tokenize")
    assert isinstance(refused, Refused) and (refused.status, refused.code, refused.reason) == (
        403, "route_not_allowed", "scope")
    assert refused.message == ("this API key may not use /tokenize (route group tokenize); its route groups: "
                               "embeddings, inference")
    admin = route_refusal(plain, "/admin/models/load")
    assert isinstance(admin, Refused) and admin.code == "admin_key_required"
    assert route_refusal(entry("admin=true"), "/reload") is None
    assert route_refusal(entry("routes=metrics"), "/metrics") is None
    assert route_refusal(entry("routes=metrics"), "/v1/completions") is not None


def test_models_match_by_any_name_and_glob() -> None:
    names = ("qwen3-8b-q4_k_m", "qwen3-8b-q4_k_m.gguf", "qwen")
    assert model_allowed(None, names) and model_allowed(entry(), names)
    assert model_allowed(entry("models=qwen3-*"), names)
    assert model_allowed(entry("models=qwen"), names)  # an alias
    assert model_allowed(entry("models=qwen3-8b-q4_k_m.gguf"), names)  # the file name
    assert not model_allowed(entry("models=llama-*,mistral"), names)
    assert not model_allowed(entry("models=QWEN3-*"), names)  # case counts, as in the ids
    refused = model_refusal(entry("models=llama-*,mistral"), names)
    assert isinstance(refused, Refused) and refused.code == "model_not_allowed"
    assert refused.message == "this API key may not use the model qwen3-8b-q4_k_m; it may use: llama-*, mistral"
    assert entry("models=*").models == ()  # `*` is every model: the default, not written back


def test_options_round_trip_through_the_line_the_cli_writes() -> None:
    for options in ("", "admin=true", "models=a,b* routes=tokenize,admin", "routes=admin",
                    "tokens_per_minute=100 tokens_per_day=5000 max_concurrent=2", "routes=inference,metrics"):
        parsed = entry(options)
        hashed = KeyEntry("k", digest(KEY), admin=parsed.admin, models=parsed.models, routes=parsed.routes,
                          tokens_per_minute=parsed.tokens_per_minute, tokens_per_day=parsed.tokens_per_day,
                          max_concurrent=parsed.max_concurrent)
        assert parse_line(hashed.line()) == hashed, options
    assert set(GROUPS) == {"inference", "embeddings", "tokenize", "metrics", "admin"}


def test_a_token_window_frees_its_budget_as_tokens_age_out() -> None:
    clock = Clock()
    window = TokenWindow(60.0, 1.0, clock)
    assert window.retry_after("k", 100) is None
    window.add("k", 60)
    clock.now += 10.5
    window.add("k", 50)
    assert window.spent("k") == 110
    wait = window.retry_after("k", 100)  # under budget once the first 60 age out: 49.5 s (bucket-rounded) on
    assert wait is not None and 49 <= wait <= 50.5
    assert window.retry_after("k", 111) is None  # 110 < 111: still allowed
    clock.now += wait
    assert window.retry_after("k", 100) is None and window.spent("k") == 50
    clock.now += 60
    assert window.spent("k") == 0 and "k" not in window._spent  # forgotten


def test_a_spent_budget_refuses_with_retry_after_and_uses_nothing_up(settings: Settings) -> None:
    clock = Clock()
    guard = Guard(settings, clock)
    ring = KeyRing(tuple(parse_keys(f"k:{KEY}:100 tokens_per_minute=50 tokens_per_day=1000\n")))
    first = verdict(ring, guard, settings, f"Bearer {KEY}", "10.0.0.1", "/v1/chat/completions")
    assert isinstance(first, Admitted) and first.decision is not None and first.decision.remaining == 99
    finished(guard, first, lambda: 60)  # its answer: 60 tokens
    refused = verdict(ring, guard, settings, f"Bearer {KEY}", "10.0.0.1", "/v1/chat/completions")
    assert isinstance(refused, Refused) and (refused.status, refused.code, refused.reason) == (
        429, "token_budget_exceeded", "budget")
    assert refused.headers is not None and 59 <= int(refused.headers["Retry-After"]) <= 61
    assert "50 tokens per minute" in refused.message
    assert guard.limiter.check("k", 100, consume=False).remaining == 99  # the refused request used nothing
    clock.now += 61
    again = verdict(ring, guard, settings, f"Bearer {KEY}", "10.0.0.1", "/v1/chat/completions")
    assert isinstance(again, Admitted)
    for _ in range(16):
        finished(guard, again, lambda: 60)  # 1020 of 1000 tokens in a day, long after the minute
        clock.now += 61
    day = verdict(ring, guard, settings, f"Bearer {KEY}", "10.0.0.1", "/v1/chat/completions")
    assert isinstance(day, Refused) and "1000 tokens per day" in day.message
    assert int(day.headers["Retry-After"]) > 20 * 3600  # type: ignore[index]


def test_max_concurrent_holds_a_place_until_the_request_is_recorded(settings: Settings) -> None:
    guard = Guard(settings)
    looked = Admitted("k", None, 100, False, entry("max_concurrent=2"))
    first, second = charge(guard, looked, "a"), charge(guard, looked, "a")
    assert isinstance(first, Admitted) and first.holds and isinstance(second, Admitted)
    third = charge(guard, looked, "a")
    assert isinstance(third, Refused) and third.code == "too_many_concurrent_requests"
    assert third.headers == {"Retry-After": "1"}
    finished(guard, first, lambda: 0)
    assert isinstance(charge(guard, looked, "a"), Admitted)
    unlimited = charge(guard, Admitted("k", None, 100, False, entry()), "a")
    assert isinstance(unlimited, Admitted) and not unlimited.holds


def test_a_route_refusal_comes_before_the_rate_limit(settings: Settings) -> None:
    guard = Guard(settings)
    ring = KeyRing(tuple(parse_keys(f"k:{KEY}:2 routes=embeddings\n")))
    for _ in range(5):
        refused = verdict(ring, guard, settings, f"Bearer {KEY}", "a", "/v1/chat/completions")
        assert isinstance(refused, Refused) and refused.code == "route_not_allowed"
    assert isinstance(verdict(ring, guard, settings, f"Bearer {KEY}", "a", "/v1/embeddings"), Admitted)


def test_known_keys_per_address_are_bounded_and_age_out(settings: Settings) -> None:
    clock = Clock()
    guard = Guard(settings, clock)
    for index in range(100):
        guard.got_in("10.0.0.1", f"key{index}")
    assert len(guard.good["10.0.0.1"]) == 64 and guard.known("10.0.0.1", "key99")
    assert not guard.known("10.0.0.1", "key0")
    clock.now += 3601
    assert not guard.known("10.0.0.1", "key99")
    guard.prune()
    assert guard.good == {}


def test_a_whole_answer_spends_its_budget_in_the_observers_batch() -> None:
    """A stream's tokens are spent as it is recorded (finished() reads its tail); a whole answer's in the batch,
    where it is read with every other one (within FLUSH_INTERVAL), never twice."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from gateway.metrics import Metrics
    from gateway.observe import JSON, Answer, Observer

    spent: list[tuple[str, int]] = []
    body = b'{"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}}'

    async def run() -> None:
        observer = Observer(Metrics(CollectorRegistry()), None, lambda: "m", None, lambda k, n: spent.append((k, n)))
        observer.record("/v1/chat/completions", "POST", 200, "k", 0.01, "rid", None, None, Answer(JSON, body),
                        spend=True)
        observer.record("/v1/chat/completions", "POST", 200, "other", 0.01, "rid", None, None, Answer(JSON, body))
        assert spent == []  # not yet: in the batch
        observer.flush()

    asyncio.run(run())
    assert spent == [("k", 20)]
