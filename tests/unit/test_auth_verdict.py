"""gateway.auth.verdict: the one auth and rate-limit rule of both lanes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.auth import Admitted, KeyRing, Refused, verdict
from gateway.guard import Guard
from gateway.keyfile import parse_keys
from lifecycle.settings import Settings

GOOD = "sk-good-0123456789abcdef"
LIMITED = "sk-limited-0123456789abcdef"
EXPIRED = "sk-expired-0123456789abcdef"
OTHER = "sk-other-0123456789abcdef"
NOW = datetime(2030, 6, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> tuple[KeyRing, Guard, Settings, Clock]:
    ring = KeyRing(tuple(parse_keys(f"good:{GOOD}\nlimited:{LIMITED}:2\nold:{EXPIRED}::2030-01-01\n"
                                    f"other:{OTHER}\n")))
    clock = Clock()
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "AUTH_FAILURE_LIMIT": "3",
                                  "MAX_REQUESTS_PER_MINUTE": "5"}, probe_roots=[])
    return ring, Guard(settings, clock), settings, clock


def judge(world, header: str, client: str = "10.9.9.9", consume: bool = True,  # type: ignore[no-untyped-def]
          path: str = "/v1/chat/completions"):
    ring, guard, settings, _ = world
    return verdict(ring, guard, settings, header, client, path, consume=consume, now=NOW)


def test_a_good_key_is_admitted_with_its_limit(world) -> None:  # type: ignore[no-untyped-def]
    result = judge(world, f"Bearer {GOOD}")
    assert isinstance(result, Admitted) and result.key_id == "good"
    assert result.decision is not None and result.decision.limit == 5 and result.decision.remaining == 4
    assert isinstance(judge(world, GOOD), Admitted)  # the bare key, as in the seed


@pytest.mark.parametrize(("header", "code"), [
    ("", "missing_api_key"), ("  ", "missing_api_key"), ("Bearer sk-wrong-0123456789abcdef", "invalid_api_key"),
    (f"Bearer {EXPIRED}", "expired_api_key"), ("Bearer \udcff\udcfe", "invalid_api_key"),
])
def test_bad_keys_are_refused_with_the_exact_401(world, header: str, code: str) -> None:  # type: ignore[no-untyped-def]
    result = judge(world, header)
    assert isinstance(result, Refused)
    assert (result.status, result.code, result.reason) == (401, code, "auth")


def test_no_keys_at_all_is_its_own_401(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)}, probe_roots=[])
    result = verdict(KeyRing(), Guard(settings), settings, f"Bearer {GOOD}", "c", "/v1/models")
    assert isinstance(result, Refused) and result.code == "no_api_keys"


def test_auth_disabled_admits_everyone_as_anonymous(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "AUTH_ENABLED": "false"}, probe_roots=[])
    assert verdict(KeyRing(), Guard(settings), settings, "", "c", "/v1/models") == Admitted("anonymous", None)


def test_failed_keys_block_new_guesses_from_the_address_not_its_good_keys(world) -> None:  # type: ignore[no-untyped-def]
    """Over AUTH_FAILURE_LIMIT failures an address is refused wrong keys and keys it was not using (a guess that
    happens to be right), but the keys it used lately go on working: one client behind a NAT sending a stale key
    no longer locks out everyone else there."""
    for _ in range(5):
        judge(world, "Bearer sk-wrong-0123456789abcdef", consume=False)  # only looking: nothing counted
    assert isinstance(judge(world, f"Bearer {GOOD}"), Admitted)  # "good" is now a key this address uses
    for _ in range(3):
        assert judge(world, "Bearer sk-wrong-0123456789abcdef").code == "invalid_api_key"
    wrong = judge(world, "Bearer sk-wrong-0123456789abcdef")
    assert isinstance(wrong, Refused) and wrong.status == 429 and wrong.code == "too_many_auth_failures"
    assert wrong.headers and int(wrong.headers["Retry-After"]) >= 1
    assert isinstance(judge(world, f"Bearer {GOOD}"), Admitted)  # its good traffic goes on
    unseen = judge(world, f"Bearer {OTHER}")  # a valid key it never used: as good as a guess, refused for now
    assert isinstance(unseen, Refused) and unseen.code == "too_many_auth_failures"
    assert isinstance(judge(world, f"Bearer {OTHER}", client="10.1.1.1"), Admitted)  # another address
    world[3].now += 61  # the failures age out
    assert isinstance(judge(world, f"Bearer {OTHER}"), Admitted)


def test_the_rate_limit_is_used_up_only_when_consuming(world) -> None:  # type: ignore[no-untyped-def]
    for _ in range(4):
        assert isinstance(judge(world, f"Bearer {LIMITED}", consume=False), Admitted)
    assert isinstance(judge(world, f"Bearer {LIMITED}"), Admitted)
    assert isinstance(judge(world, f"Bearer {LIMITED}"), Admitted)
    refused = judge(world, f"Bearer {LIMITED}")
    assert isinstance(refused, Refused) and (refused.status, refused.code, refused.reason) == (
        429, "rate_limit_exceeded", "rate")
    assert refused.key_id == "limited" and refused.decision is not None and not refused.decision.allowed
    world[3].now += 61
    assert isinstance(judge(world, f"Bearer {LIMITED}"), Admitted)
