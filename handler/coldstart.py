"""The cold-start breakdown: when each stage of a serverless worker's start ended, logged once, after the first job.

Times are seconds since the process started (Linux: /proc/self/stat, so the interpreter's own start is counted);
handler/__main__.py takes time.monotonic() before its imports and makes a ColdStart of it; the process's age,
read once, places that on the process's own clock, and each mark is a time.monotonic() reading. The line, at INFO:

    cold start: imports 0.33s, settings 0.33s, provision 0.36s, llama-server ready 1.14s, sdk 1.60s, first job 3.07s
    after process start (llama-server's own start 0.78s, first job 1.93s)

imports: our modules; settings: the environment read, logging up; provision: the binary found and the model
resolved (downloads, on a first start); llama-server ready: it answers /health; sdk: the runpod SDK imported;
first job: the first job's answer handed to the SDK (from "llama-server ready": the SDK's import and start, and the
job itself).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lifecycle.background import process_age

STAGES = ("imports", "settings", "provision", "sdk", "llama-server ready", "first job")




class ColdStart:
    """mark(stage) records when a stage ended; line() is the breakdown once "first job" is marked."""

    def __init__(self, started: float, clock: Callable[[], float] = time.monotonic,
                 age: float | None = None) -> None:
        """`started`: clock() as early as the entry point could take it; `age`: the process's age now (default
        process_age()), so that the interpreter's own start before `started` is counted too."""
        self._clock = clock
        now = clock()
        age = process_age() if age is None else age
        # Off Linux, no process age: times count from `started`.
        self._t0 = now - age if age is not None else started
        self.marks: dict[str, float] = {}

    def now(self) -> float:
        """Seconds since process start."""
        return self._clock() - self._t0

    def mark(self, stage: str, at: float | None = None) -> None:
        """Stage `stage` ended now, or at clock() reading `at`. The first mark of a stage counts; later ones (a
        second job) are ignored."""
        if stage not in STAGES:
            raise ValueError(f"unknown cold-start stage {stage!r}")
        self.marks.setdefault(stage, (self._clock() if at is None else at) - self._t0)

    def line(self) -> str:
        # In the order they ended (the SDK's import overlaps llama-server's start)
        stages = sorted((at, STAGES.index(stage), stage) for stage, at in self.marks.items())
        parts = ", ".join(f"{stage} {at:.2f}s" for at, _, stage in stages)
        text = f"cold start: {parts} after process start"
        extra = []
        if "provision" in self.marks and "llama-server ready" in self.marks:
            extra.append(f"llama-server's own start {self.marks['llama-server ready'] - self.marks['provision']:.2f}s")
        if "llama-server ready" in self.marks and "first job" in self.marks:
            extra.append(f"first job {self.marks['first job'] - self.marks['llama-server ready']:.2f}s")
        return f"{text} ({', '.join(extra)})" if extra else text
