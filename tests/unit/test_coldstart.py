"""The cold-start breakdown line (handler.coldstart)."""

from __future__ import annotations

import pytest

from handler.coldstart import ColdStart, process_age


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_marks_count_from_process_start_and_the_line_has_every_stage_in_order() -> None:
    clock = Clock(100.0)
    cold = ColdStart(started=99.9, clock=clock, age=0.25)  # the process is 0.25 s old at construction
    cold.mark("imports")
    clock.now = 100.05
    cold.mark("settings")
    cold.mark("provision", at=100.10)
    clock.now = 100.90
    cold.mark("llama-server ready")
    clock.now = 101.00
    cold.mark("sdk")
    clock.now = 101.20
    cold.mark("first job")
    assert cold.line() == (
        "cold start: imports 0.25s, settings 0.30s, provision 0.35s, llama-server ready 1.15s, sdk 1.25s, "
        "first job 1.45s after process start (llama-server's own start 0.80s, first job 0.30s)")
    cold.marks["sdk"] = 0.9  # imported while llama-server loaded: the stages are listed in the order they ended
    assert "provision 0.35s, sdk 0.90s, llama-server ready 1.15s, first job" in cold.line()


def test_a_second_mark_of_a_stage_is_ignored() -> None:
    clock = Clock(10.0)
    cold = ColdStart(started=10.0, clock=clock, age=0.0)
    cold.mark("first job")
    clock.now = 20.0
    cold.mark("first job")
    assert cold.marks == {"first job": 0.0}


def test_without_a_process_age_times_count_from_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("handler.coldstart.process_age", lambda: None)  # not Linux
    cold = ColdStart(started=4.5, clock=Clock(5.0))
    cold.mark("imports")
    assert cold.marks == {"imports": 0.5}


def test_stages_missing_leave_out_their_differences() -> None:
    cold = ColdStart(started=0.0, clock=Clock(1.0), age=1.0)
    cold.mark("imports")
    assert cold.line() == "cold start: imports 1.00s after process start"


def test_an_unknown_stage_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown cold-start stage"):
        ColdStart(started=0.0, clock=Clock(0.0), age=0.0).mark("warmup")


def test_process_age_is_small_and_positive_here() -> None:
    age = process_age()
    assert age is None or 0.0 <= age < 24 * 3600
