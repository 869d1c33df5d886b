"""Request counters for /metrics and /health; owned by the app, updated on the event loop only."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    requests_total: int = 0
    requests_success: int = 0
    requests_error: int = 0
    requests_active: int = 0
    queue_rejections: int = 0
    fast_lane: int = 0  # API requests answered by gateway.fastlane
    handed_over: int = 0  # connections gateway.fastlane passed to aiohttp

    def begin(self) -> None:
        self.requests_total += 1
        self.requests_active += 1

    def end(self, status: int) -> None:
        self.requests_active -= 1
        if status < 400:
            self.requests_success += 1
        else:
            self.requests_error += 1

    def snapshot(self) -> dict[str, float | int]:
        return {
            "requests_total": self.requests_total,
            "requests_success": self.requests_success,
            "requests_error": self.requests_error,
            "requests_active": self.requests_active,
            "queue_rejections": self.queue_rejections,
            "requests_fast_lane": self.fast_lane,
            "connections_handed_over": self.handed_over,
            "uptime_seconds": round(time.monotonic() - self.started, 3),
        }
