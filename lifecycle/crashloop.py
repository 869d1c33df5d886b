"""The crash-loop policy: how long to wait before starting a llama-server that died again, and when to stop.

A crash loop is BACKEND_RESTART_LIMIT crashes within BACKEND_RESTART_WINDOW seconds. Before one, the wait doubles
with each crash still inside the window: BACKEND_RESTART_DELAY, twice that, four times, ... up to
BACKEND_RESTART_MAX_DELAY. In one, the backend is down and BACKEND_CRASH_LOOP decides: `exit` gives up (the entry
point exits non-zero, so the platform replaces the container); `retry` tries again every BACKEND_RESTART_MAX_DELAY
seconds. Pure bookkeeping on an injected clock: the supervisor acts on the verdict.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from lifecycle.settings import Settings


@dataclass(frozen=True, slots=True)
class Verdict:
    loop: bool  # BACKEND_RESTART_LIMIT crashes within the window: the backend is down
    delay: float | None  # seconds until the next start; None: give up (BACKEND_CRASH_LOOP=exit)


class CrashLoop:
    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self.limit = settings.restart_limit
        self.window = settings.restart_window
        self.base_delay = settings.restart_base_delay
        self.max_delay = settings.restart_max_delay
        self.give_up = settings.crash_loop == "exit"
        self.clock = clock
        self._crashes: deque[float] = deque()

    @property
    def recent(self) -> int:
        """Crashes inside the window, as of the last one recorded."""
        return len(self._crashes)

    def crashed(self) -> Verdict:
        """Record a crash now and say what to do."""
        now = self.clock()
        self._crashes.append(now)
        while self._crashes and self._crashes[0] <= now - self.window:
            self._crashes.popleft()
        if len(self._crashes) >= self.limit:
            return Verdict(True, None if self.give_up else self.max_delay)
        return Verdict(False, min(self.max_delay, self.base_delay * 2 ** (len(self._crashes) - 1)))
